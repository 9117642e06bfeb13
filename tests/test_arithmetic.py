"""The arithmetic task of the reasoning study: the verifier on hand-made responses, the worked solutions, the
generator's determinism, and that no held-out or out-of-distribution problem occurs in any training data."""
import random

import pytest

from stats import pass_at_k
from tasks import arithmetic as ar


@pytest.mark.parametrize("text, expected, correct, formatted", [
    ("<think>7+9+0=16 (6)</think> <answer>16</answer>", 16, 1, 1),
    ("<think>7+9+0=16 (6)</think> <answer>15</answer>", 16, 0, 1),  # a wrong answer
    ("<think></think> <answer>16</answer>", 16, 1, 1),  # no working is still the template
    ("<think>7+9+0=16 (6)</think><answer>16</answer>", 16, 1, 1),  # no space between the parts
    ("  <think>x</think> <answer>16</answer>  ", 16, 1, 1),  # surrounding whitespace
    ("<think>7+9+0=16 (6) <answer>16</answer>", 16, 1, 0),  # </think> missing: right answer, wrong format
    ("<answer>16</answer>", 16, 1, 0),  # no working tags at all
    ("<think>x</think> 16", 16, 0, 0),  # no answer tags
    ("<think>x</think> <answer>16</answer> <answer>16</answer>", 16, 0, 0),  # a doubled answer tag
    ("<think>x</think> <think>y</think> <answer>16</answer>", 16, 1, 0),  # a doubled think tag
    ("<think>x</think> <answer>016</answer>", 16, 0, 1),  # leading zeros are not the integer, exactly
    ("<think>x</think> <answer>+16</answer>", 16, 0, 1),
    ("<think>x</think> <answer>-242</answer>", -242, 1, 1),  # negative numbers
    ("<think>x</think> <answer>242</answer>", -242, 0, 1),
    ("<think>x</think> <answer>-0</answer>", 0, 0, 1),  # "-0" is not 0 written exactly
    ("<think>x</think> <answer>0</answer>", 0, 1, 1),
    ("<think>x</think> <answer>16</answer> so 16", 16, 1, 0),  # text after </answer>: the format fails
    ("<think>x</think> <answer>sixteen</answer>", 16, 0, 1),  # not an integer
    ("<think>x</think> <answer> 16 </answer>", 16, 1, 1),  # spaces inside the tag
    ("", 16, 0, 0),
])
def test_verifier_on_hand_made_responses(text, expected, correct, formatted):
    assert ar.verify(text, expected) == {"correct": float(correct), "format": float(formatted)}


def test_answer_of_gives_the_integer_as_written_or_nothing():
    assert ar.answer_of("<think>x</think> <answer>-0042</answer>") == "-0042"
    assert ar.answer_of("<think>x</think> <answer>12a</answer>") == ""
    assert ar.answer_of("<think>x</think> <answer>1</answer><answer>1</answer>") == ""
    assert ar.answer_of("no tags 42") == ""


def test_think_of_is_the_working():
    assert ar.think_of("<think>7+9+0=16 (6)</think> <answer>16</answer>") == "7+9+0=16 (6)"
    assert ar.think_of("<think></think> <answer>16</answer>") == ""
    assert ar.think_of("<answer>16</answer>") == ""


class Characters:
    """A stand-in tokenizer: one token per character."""
    bos_id = 1

    def encode(self, text, bos, eos):
        return [ord(c) for c in text]


def test_response_stats_measure_the_working():
    task = ar.ArithmeticTask(Characters())
    stats = task.response_stats(["<think>1+2=3</think> <answer>3</answer>", "<answer>5</answer>"])
    assert stats == {"think_tokens": 2.5, "no_working": 0.5}  # "1+2=3": 5 tokens; the second has no working


@pytest.mark.parametrize("question", ["347+589", "47+589", "532-178", "532-528", "347-589", "5-7", "347*6", "999*9",
                                      "0+0", "9999+1", "1000-1", "7*2"])
def test_worked_solutions_arrive_at_the_value(question):
    think, answer = ar.working(question)
    assert answer == ar.evaluate(question) == eval(question)
    assert think.endswith(f"({str(abs(answer)).zfill(len(think.split('(')[-1]) - 1)})")  # the answer so far, last


def test_the_working_reads_column_by_column():
    assert ar.working("347+589")[0] == "7+9+0=16 (6) 4+8+1=13 (36) 3+5+1=9 (936)"
    assert ar.working("532-178")[0] == "12-8-0=4 (4) 13-7-1=5 (54) 5-1-1=3 (354)"
    assert ar.working("347-589")[0] == "347<589 so -(589-347) 9-7-0=2 (2) 8-4-0=4 (42) 5-3-0=2 (242)"
    assert ar.working("347*6")[0] == "7*6+0=42 (2) 4*6+4=28 (82) 3*6+2=20 (2082)"


def test_a_slip_gives_a_wrong_answer_from_one_wrong_column():
    rng = random.Random(0)
    for _ in range(300):
        q, value = ar.make_problem(rng)
        think, answer = ar.working(q, random.Random(rng.random()))
        assert answer != value, (q, think, answer)


def test_evaluate_takes_plain_expressions_only():
    assert ar.evaluate("347+589*2") == 1525
    assert ar.evaluate("(3+4)*5-6") == 29
    with pytest.raises(ValueError, match="not a plain integer expression"):
        ar.evaluate("__import__('os')")


def test_the_generator_is_deterministic():
    assert ar.problem_set("x", 50) == ar.problem_set("x", 50)
    assert ar.problem_set("x", 50) != ar.problem_set("y", 50)
    assert ar.corpus_documents(200, seed=3) == ar.corpus_documents(200, seed=3)
    assert ar.corpus_documents(200, seed=3) != ar.corpus_documents(200, seed=4)


def test_the_problem_families_and_their_digits():
    rng = random.Random(1)
    for _ in range(500):
        q, a = ar.make_problem(rng)
        x, op, y = ar.re.fullmatch(r"(\d+)([+\-*])(\d+)", q).groups()
        assert len(x) <= 3 and len(y) <= 3 and (op != "*" or len(y) == 1)
        assert a == ar.evaluate(q)
    for q, _ in ar.OOD:
        assert len(ar.re.match(r"\d+", q).group()) == 4  # one digit longer than any training operand


def test_heldout_problems_never_occur_in_training_data():
    """The held-out and out-of-distribution problems are disjoint from the corpus and from RL's problems."""
    assert len(ar.HELDOUT) == len({q for q, _ in ar.HELDOUT}) >= 256
    assert not {q for q, _ in ar.HELDOUT} & {q for q, _ in ar.OOD}
    docs = ar.corpus_documents(20_000, seed=0)
    questions = {d.split("User: ")[1].split(" Assistant:")[0] for _, d in docs}
    assert len(questions) == len(docs)  # each document its own problem
    assert not questions & ar.RESERVED
    assert not {q for q, _ in ar.training_problems("arithmetic-train-0-20000", 4096)} & ar.RESERVED
    # the check bites: a draw that does not exclude them meets held-out problems
    unexcluded = {q for q, _ in ar.problem_set("arithmetic-corpus-problems-0", 20_000)}
    assert unexcluded & ar.RESERVED


def test_corpus_mix_and_kinds():
    docs = ar.corpus_documents(4000, seed=0)
    kinds = [k for k, _ in docs]
    for kind, share in ar.MIX.items():
        assert abs(kinds.count(kind) / len(docs) - share) < 0.03
    for kind, d in docs[:400]:
        q = d.split("User: ")[1].split(" Assistant:")[0]
        text = d.split("Assistant: ")[1]
        v = ar.verify(text, ar.evaluate(q))
        if kind == "worked":
            assert v == {"correct": 1.0, "format": 1.0}, d
        elif kind == "slip":
            assert v == {"correct": 0.0, "format": 1.0}, d
        elif kind == "direct":
            assert v == {"correct": 1.0, "format": 1.0} and ar.think_of(text) == "", d
        else:
            assert v["format"] == 0.0, d


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(64, 1, 64) == 1.0
    # the estimator against drawing k of the n samples by brute force
    rng = random.Random(0)
    items = [1] * 3 + [0] * 9
    hits = sum(any(rng.sample(items, 4)) for _ in range(40_000)) / 40_000
    assert pass_at_k(12, 3, 4) == pytest.approx(hits, abs=0.01)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
