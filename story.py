"""
The story task of the RLHF chain: the seed's own RL setting (PPO's queries are BOS + the first 0..start_len-1
tokens of a real story, the policy writes the rest at temperature 1, up to max_gen_len tokens) with a gold judge
of what makes a good story in place of the seed's length reward. Gold is the mean of named components in [0, 1]:

    complete      the story ends (the end token) inside the budget, and is at least MIN_STORY_TOKENS long
    dialogue      at least one quoted utterance of three or more words
    happy_ending  the last sentence carries a word of HAPPY_WORDS
    character     a name given in the prompt recurs in the continuation (left out when the prompt has none)
    fluent        the continuation's NLL under the frozen pre-trained model, 1 at <= FLUENT_ANCHORS[0]
                  nats/token, 0 at >= FLUENT_ANCHORS[1], linear between: the component a small reward model
                  captures least, so that a proxy can be over-optimised against it
    not_repetitive  1 - (repeated-3-gram rate of the continuation) / REPETITION_ZERO, floored at 0

    python story.py pilot --n=200     # each component's rate on real continuations and on the model's samples
    python story.py show --n=5        # a few held-out prompts and the names found in them

Training prompts come from shards 1+, held-out prompts only from shard 0 (llama2.c's validation shard).
"""
import random
import re
import sys
from typing import Dict, List

import torch

from instruct import WordStats, load_stories, sentences_of, shard_files
from ppo import repeated_ngram_rate
from tasks import Example, gold_of

START_LEN = 30  # prompts are BOS + the first 0..START_LEN-1 story tokens (the seed's start_len)
MAX_GEN_LEN = 300  # the policy's budget of new tokens (the seed's max_gen_len)
MAX_STORY_TOKENS = 420  # real stories longer than this are not used (BOS + story + end must fit 512 with room)
MIN_STORY_TOKENS = 120  # a "complete" story has at least this many tokens (prompt + continuation)
FLUENT_ANCHORS = (1.0, 2.2)  # nats/token under the pre-trained model: fluent 1 at or below, 0 at or above
REPETITION_ZERO = 0.4  # a repeated-3-gram rate at which not_repetitive reaches 0 (real stories: median 0.13)
HAPPY_WORDS = frozenset("""
happy happily happier glad joy joyful smile smiled smiles smiling laugh laughed laughing love loved loves fun
friend friends best great proud thankful thanked hug hugged together safe kind good wonderful
""".split())
COMPONENTS = ("complete", "dialogue", "happy_ending", "character", "fluent", "not_repetitive")
UTTERANCE = re.compile(r'["“]([^"”]+)["”]')


# -----------------------------------------------------------------------------
# the components: each a function of the text or tokens, each in [0, 1]

def has_utterance(text: str, min_words: int = 3) -> bool:
    """A quoted utterance of at least min_words words ("..." or “...”)."""
    return any(len(re.findall(r"[A-Za-z']+", u)) >= min_words for u in UTTERANCE.findall(text))


def happy_ending(text: str) -> bool:
    """The last sentence carries a word of HAPPY_WORDS."""
    sentences = sentences_of(text)
    return bool(sentences) and any(w in HAPPY_WORDS for w in re.findall(r"[a-z]+", sentences[-1].lower()))


def keeps_character(names: List[str], continuation: str) -> bool:
    """A name given in the prompt recurs in the continuation (as a whole word)."""
    words = set(re.findall(r"[A-Za-z]+", continuation))
    return any(n in words for n in names)


def fluency(nll: float) -> float:
    lo, hi = FLUENT_ANCHORS
    return min(1.0, max(0.0, (hi - nll) / (hi - lo)))


def not_repetitive(tokens: List[int]) -> float:
    return max(0.0, 1.0 - repeated_ngram_rate(tokens) / REPETITION_ZERO)


def complete(ended: bool, story_tokens: int) -> bool:
    return ended and story_tokens >= MIN_STORY_TOKENS


# -----------------------------------------------------------------------------

def prompt_names(prompt_text: str, boundary: bool, names) -> List[str]:
    """The names (words of the corpus's name set) in the prompt; its last word only when the prompt ends at a
    word boundary (else it may be a cut name: "Li" of "Lily")."""
    words = re.findall(r"[A-Za-z]+|[^A-Za-z\s]", prompt_text)
    if words and not boundary:
        words = words[:-1]
    return sorted({w for w in words if w in names})


class StoryTask:
    name = "story"
    components = COMPONENTS
    max_gen_len = MAX_GEN_LEN

    def __init__(self, enc, data_dir=None, seed=0, reference="stories260K/stories260K.pt", device="cpu"):
        files = shard_files(data_dir)
        self.enc, self.seed, self.reference_path, self.device = enc, seed, reference, device
        self.train_stories = load_stories(files[1:], enc, MAX_STORY_TOKENS)
        self.heldout_stories = load_stories(files[:1], enc, MAX_STORY_TOKENS)
        ws = WordStats.from_stories(s for s, _ in self.train_stories)
        # names: capitalised in the middle of sentences at least 3 times, and more often so than in lower case
        self.names = {w.capitalize() for w, c in ws.capitalised.items() if c >= 3 and c > ws.lower[w]}
        self._reference = None

    # prompts -------------------------------------------------------------------
    def examples(self, stories, rng):
        out = []
        for _, ids in stories:
            k = rng.randrange(START_LEN)
            prompt, target = [self.enc.bos_id] + ids[:k], ids[k:]
            text = self.enc.decode(ids[:k])
            boundary = not target or self.enc.sp_model.id_to_piece(target[0]).startswith("▁") \
                or not self.enc.decode(target[:1])[:1].isalpha()
            out.append(Example(prompt, text, target, {"names": prompt_names(text, boundary, self.names)}))
        return out

    def train_examples(self, epoch=0):
        """Every training story once, its prompt length redrawn each epoch."""
        return self.examples(self.train_stories, random.Random(f"story-train-{self.seed}-{epoch}"))

    def heldout_examples(self, n=None):
        ex = self.examples(self.heldout_stories, random.Random(f"story-heldout-{self.seed}"))
        return ex[:n] if n else ex

    def story_text(self, example, story_ids):
        """The whole story: the prompt's tokens and the continuation's, decoded together."""
        return self.enc.decode(example.prompt[1:] + list(story_ids)).strip()

    # gold ----------------------------------------------------------------------
    def reference(self):
        """The frozen pre-trained model of the fluency component, loaded once."""
        if self._reference is None:
            from rlhf import load_policy
            self._reference = load_policy(self.reference_path, self.device).requires_grad_(False)
        return self._reference

    def score(self, examples, responses, nll=None) -> List[Dict[str, float]]:
        """The components of each story: responses are the generated tokens, the end token (BOS) last when the
        story ended. nll: the responses' NLL per token under the reference, if already computed."""
        if nll is None:
            nll = reference_nll(self.reference(), [e.prompt for e in examples], responses)
        out = []
        for e, r, v in zip(examples, responses, nll):
            ended = bool(r) and r[-1] == self.enc.bos_id
            ids = r[:-1] if ended else list(r)
            text = self.story_text(e, ids)
            c = {"complete": float(complete(ended, len(e.prompt) - 1 + len(ids))),
                 "dialogue": float(has_utterance(text)),
                 "happy_ending": float(happy_ending(text)),
                 "fluent": fluency(v),
                 "not_repetitive": not_repetitive(ids)}
            if e.info.get("names"):
                c["character"] = float(keeps_character(e.info["names"], self.enc.decode(ids)))
            out.append(c)
        return out


@torch.no_grad()
def reference_nll(model, prompts, responses, batch_size=32):
    """NLL per token (nats) of each response (its end token included) given its prompt."""
    from rlhf import sequence_logprobs
    sums = sequence_logprobs(model, prompts, [r if r else [0] for r in responses], batch_size)
    return [-s / max(1, len(r)) if r else 0.0 for s, r in zip(sums, responses)]


# -----------------------------------------------------------------------------

def pilot(task, n, policy_path, seed=0):
    """Each component's rate on the real held-out continuations (cut at the budget, as a policy's would be) and on
    the policy's samples for the same prompts. Returns {source: {component: mean}}."""
    from generate import compile_decode
    from rlhf import load_policy, sample_responses
    from utils import should_compile
    examples = task.heldout_examples(n)
    real = [e.target[:MAX_GEN_LEN] + ([task.enc.bos_id] if len(e.target) <= MAX_GEN_LEN else [])
            for e in examples]
    policy = load_policy(policy_path)
    compiled = should_compile("auto", "cpu", "decode", -(-n // 64) * task.max_gen_len)  # 64: the batch size
    samples = sample_responses(policy, examples, task.enc, task.max_gen_len, seed=seed,
                               decode_fn=compile_decode(policy) if compiled else None)
    rows = {}
    for source, responses in (("real continuations", real), ("pre-trained samples", samples)):
        comps = task.score(examples, responses)
        rows[source] = {c: sum(x[c] for x in comps if c in x) / max(1, sum(c in x for x in comps))
                        for c in COMPONENTS}
        rows[source]["gold"] = sum(gold_of(x) for x in comps) / len(comps)
        rows[source]["tokens"] = sum(len(r) for r in responses) / len(responses)
    rows["prompts with a name"] = sum(bool(e.info["names"]) for e in examples) / len(examples)
    return rows


if __name__ == "__main__":
    import argparse

    from tokenizer import load_tokenizer
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["pilot", "show"])
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--tokenizer", default="stories260K/tok512.model")
    parser.add_argument("--policy", default="stories260K/stories260K.pt")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--out", default="", help="pilot: also write the table as JSON here")
    args = parser.parse_args()
    try:
        task = StoryTask(load_tokenizer(args.tokenizer, 512), args.data_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
    if args.command == "show":
        for e in task.heldout_examples(args.n):
            print(repr(e.text), e.info)
    else:
        rows = pilot(task, args.n, args.policy)
        print(f"| source | {' | '.join(COMPONENTS)} | gold | tokens |\n|---|" + "---|" * (len(COMPONENTS) + 2))
        for source, r in rows.items():
            if isinstance(r, dict):
                print(f"| {source} | " + " | ".join(f"{r[c]:.3f}" for c in COMPONENTS)
                      + f" | {r['gold']:.3f} | {r['tokens']:.0f} |")
        print(f"{rows['prompts with a name']:.0%} of the prompts carry a name")
        if args.out:
            import json

            from utils import atomic_write
            with atomic_write(args.out, "w") as f:
                json.dump(rows, f, indent=1)
