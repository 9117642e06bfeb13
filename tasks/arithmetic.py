"""
The arithmetic task of the reasoning study (rlhf/reason_cpu.sh): integer problems written as plain expressions that
anyone can evaluate ("347+589", "532-178"), answered in DeepSeek-R1-Zero's template, and a verifier that
gives R1-Zero's two rule-based rewards: the answer's correctness and the format.

One document of the base model's corpus, which is also what RL asks the model to write after the prompt:

    User: 347+589 Assistant: <think>7+9+0=16 (6) 4+8+1=13 (36) 3+5+1=9 (936)</think> <answer>936</answer>

The working goes column by column from the right, each column with its carry (or borrow) and the answer so far in
parentheses, so every step reads only what is a few tokens back. The corpus mixes such worked solutions with
solutions holding one slip (a column wrong, the rest consistent with it, so the answer is wrong), answers without
working, and documents whose format is broken: a base model trained on it sometimes gets a problem right, and RL
has something to choose between.

Training problems are additions and subtractions with operands of 1 to 3 digits (the working also covers `*` by
one digit, which make_problem draws on request: a base of this size trained for minutes got none of those right);
the out-of-distribution set has a 4-digit operand. The held-out and out-of-distribution problems are drawn first,
from their own seeds, and never occur in the corpus or among RL's training problems (`ArithmeticTask.train_examples`,
`corpus_documents`).
"""
import random
import re
from typing import Dict, List

from tasks.common import Example, Task

OPS = "+-"  # "*" too can be drawn (make_problem(ops=...)): a 0.47M base trained for minutes did not learn it
MAX_DIGITS = 3  # operands of the training distribution: 1 to 3 digits
N_HELDOUT = 512  # the held-out problems (evaluation uses the first n), and as many out of distribution
MAX_GEN_LEN = 96  # tokens of a response: a 4-digit worked solution takes ~60
PROMPT = "User: {question} Assistant:"
# the corpus: the share of each kind of document
MIX = {"worked": 0.35, "slip": 0.30, "direct": 0.25, "broken": 0.10}


# -----------------------------------------------------------------------------
# problems

def number(rng: random.Random, digits: int) -> int:
    return rng.randrange(10) if digits == 1 else rng.randrange(10 ** (digits - 1), 10 ** digits)


def make_problem(rng: random.Random, max_digits: int = MAX_DIGITS, ood: bool = False, ops: str = OPS):
    """(question, answer): a op b with op one of ops (+ - *); operands of 1..max_digits digits (the multiplier of *
    one digit, 2 to 9). ood: the first operand has max_digits + 1 digits, one more than any training problem."""
    op = rng.choice(ops)
    a = number(rng, max_digits + 1 if ood else rng.randint(1, max_digits))
    if op == "*":
        b = rng.randint(2, 9)
    else:
        b = number(rng, rng.randint(1, max_digits + 1 if ood else max_digits))
    question = f"{a}{op}{b}"
    return question, evaluate(question)


def evaluate(question: str) -> int:
    """The value of a plain integer expression (digits, + - *, parentheses), with the usual precedence."""
    if not re.fullmatch(r"[0-9+\-*() ]+", question):
        raise ValueError(f"not a plain integer expression: {question!r}")
    return int(eval(question, {"__builtins__": {}}, {}))  # only digits, operators and parentheses reach here


def problem_set(name: str, n: int, ood: bool = False, exclude=frozenset()):
    """n distinct problems drawn from the seed `name`, none of them in exclude."""
    rng, seen, out = random.Random(name), set(exclude), []
    while len(out) < n:
        q, a = make_problem(rng, ood=ood)
        if q not in seen:
            seen.add(q)
            out.append((q, a))
    return out


HELDOUT = problem_set("arithmetic-heldout", N_HELDOUT)
OOD = problem_set("arithmetic-ood", N_HELDOUT, ood=True)
RESERVED = frozenset(q for q, _ in HELDOUT + OOD)  # never in the corpus or among RL's training problems


def training_problems(name: str, n: int):
    """n training problems from the seed `name`: the training distribution less the held-out problems."""
    return problem_set(name, n, exclude=RESERVED)


# -----------------------------------------------------------------------------
# worked solutions

def columns(a: int, op: str, b: int, slip_at: int = -1, slip_rng: random.Random = None):
    """The column-by-column working of a op b (a >= b for -; b one digit for *), and the result it arrives at.
    slip_at: the column (from the right) whose result is written one off; the later columns follow from it."""
    da = [int(c) for c in str(a)][::-1]
    db = [int(c) for c in str(b)][::-1]
    n = len(da) if op == "*" else max(len(da), len(db))
    da += [0] * (n - len(da))
    db += [0] * (n - len(db))
    steps, digits, carry = [], "", 0
    for i in range(n):
        x, y = da[i], db[0] if op == "*" else db[i]
        if op == "+":
            s, text = x + y + carry, f"{x}+{y}+{carry}"
        elif op == "*":
            s, text = x * y + carry, f"{x}*{y}+{carry}"
        else:
            s, text = x - y - carry, f"{x}-{y}-{carry}"
            borrow = s < 0  # a borrow: 10 more in this column, 1 less in the next
            if borrow:
                s, text = s + 10, "1" + text
        if i == slip_at:
            delta = slip_rng.choice((-1, 1))
            s = s - delta if s + delta < 0 or (op == "-" and s + delta > 9) else s + delta
        carry = int(borrow) if op == "-" else s // 10
        digits = (str(s) if i == n - 1 and op != "-" else str(s % 10)) + digits  # the last column whole
        steps.append(f"{text}={s} ({digits})")
    return " ".join(steps), int(digits)


def working(question: str, slip_rng: random.Random = None):
    """The think text of a worked solution and the answer it arrives at (wrong when slip_rng is given: one
    column, drawn from it, slips)."""
    m = re.fullmatch(r"(\d+)([+\-*])(\d+)", question)
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    prefix, sign = "", 1
    if op == "-" and a < b:  # a - b = -(b - a)
        prefix, sign, a, b = f"{a}<{b} so -({b}-{a}) ", -1, b, a
    n = len(str(a)) if op == "*" else max(len(str(a)), len(str(b)))
    slip_at = slip_rng.randrange(n) if slip_rng else -1
    steps, result = columns(a, op, b, slip_at, slip_rng)
    answer = sign * result
    return f"{prefix}{steps}", answer


def response(think: str, answer) -> str:
    return f"<think>{think}</think> <answer>{answer}</answer>"


def document(question: str, kind: str, rng: random.Random) -> str:
    """One corpus document of the given kind: worked, slip, direct (no working) or broken (the format)."""
    if kind == "direct":
        return PROMPT.format(question=question) + " " + response("", evaluate(question))
    think, answer = working(question, rng if kind == "slip" else None)
    if kind == "broken":
        variant = rng.randrange(4)
        if variant == 0:
            text = f"<think>{think} <answer>{answer}</answer>"  # </think> missing
        elif variant == 1:
            text = f"<think>{think}</think> {answer}"  # no answer tags
        elif variant == 2:
            text = response(think, answer) + f" so {answer}"  # text after </answer>
        else:
            text = f"<think>{think}</think> <answer>{answer}</answer> <answer>{answer}</answer>"  # doubled
        return PROMPT.format(question=question) + " " + text
    return PROMPT.format(question=question) + " " + response(think, answer)


def corpus_documents(n: int, seed: int = 0, mix=None):
    """n (kind, document) pairs for the base model's corpus: training problems only (never a held-out one), each
    document's kind drawn by mix."""
    mix = mix or MIX
    rng = random.Random(f"arithmetic-corpus-{seed}")
    kinds, weights = list(mix), list(mix.values())
    out = []
    for q, _ in training_problems(f"arithmetic-corpus-problems-{seed}", n):
        kind = rng.choices(kinds, weights)[0]
        out.append((kind, document(q, kind, rng)))
    return out


# -----------------------------------------------------------------------------
# the verifier: R1-Zero's two rewards

TEMPLATE = re.compile(r"<think>(.*?)</think>\s*<answer>(.*?)</answer>", re.S)
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def answer_of(text: str) -> str:
    """The integer the response gives, as text: the content of its one <answer>...</answer>, when that is an
    integer (leading zeros kept as written); "" when it gives none, or two."""
    found = ANSWER.findall(text)
    if len(found) != 1:
        return ""
    given = found[0].strip()
    return given if re.fullmatch(r"-?\d+", given) else ""


def is_formatted(text: str) -> bool:
    """R1-Zero's template, exactly: <think>...</think> then <answer>...</answer>, each tag once, nothing after."""
    text = text.strip()
    return TEMPLATE.fullmatch(text) is not None and all(text.count(t) == 1 for t in TAGS)


def verify(text: str, expected: int) -> Dict[str, float]:
    """The rewards of a response: correct (its answer is the integer, exactly: no leading zeros, no "+", "-0" is
    not 0) and format (the template, exactly)."""
    return {"correct": float(answer_of(text) == str(expected)), "format": float(is_formatted(text))}


def think_of(text: str) -> str:
    """The working: what stands between <think> and </think> ("" without both)."""
    m = re.search(r"<think>(.*?)</think>", text, re.S)
    return m.group(1) if m else ""


def think_tokens(text: str, enc) -> int:
    """The working's length in tokens of the tokenizer enc (0 without any)."""
    think = think_of(text)
    return len(enc.encode(think, bos=False, eos=False)) if think else 0


# -----------------------------------------------------------------------------
# the task, behind the interface of the RLHF chain's tasks (tasks/common.py)

class ArithmeticTask(Task):
    name = "arithmetic"
    components = ("correct", "format")
    max_gen_len = MAX_GEN_LEN
    train_size = 4096  # training problems per epoch, redrawn each epoch

    def __init__(self, enc, data_dir=None, seed=0, reference=None):
        self.enc, self.seed = enc, seed

    def example(self, question: str, answer: int) -> Example:
        return Example(self.enc.encode(PROMPT.format(question=question), bos=True, eos=False), question,
                       info={"answer": answer})

    def train_examples(self, epoch=0):
        return [self.example(q, a) for q, a in training_problems(f"arithmetic-train-{self.seed}-{epoch}",
                                                                  self.train_size)]

    def heldout_examples(self, n=None):
        return [self.example(q, a) for q, a in HELDOUT[:n]]

    def ood_examples(self, n=None):
        return [self.example(q, a) for q, a in OOD[:n]]

    def story_text(self, example, story_ids):
        """The response as text (the prompt is the question)."""
        return self.enc.decode(list(story_ids)).strip()

    def score(self, examples, responses) -> List[Dict[str, float]]:
        """correct and format of each response (generated tokens, the end token last when it stopped)."""
        out = []
        for e, r in zip(examples, responses):
            ids = r[:-1] if r[-1:] == [self.enc.bos_id] else list(r)
            out.append(verify(self.story_text(e, ids), e.info["answer"]))
        return out

    def response_stats(self, texts) -> Dict[str, float]:
        """The working's mean length in tokens and the share of responses without any (does RL lengthen it?)."""
        lengths = [think_tokens(t, self.enc) for t in texts]
        return {"think_tokens": sum(lengths) / len(texts), "no_working": sum(n == 0 for n in lengths) / len(texts)}
