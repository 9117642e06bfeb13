"""
The instruction-following story task of the RLHF chain (SFT -> reward model -> PPO / DPO / GRPO / best-of-n),
rebuilt from plain TinyStories by hindsight relabelling, and its programmatic gold judge.

TinyStoriesInstruct's prompts (`Words: ...`, `Random sentence: ...`, `Features: Dialogue`, then `Story:`) are not
in the plain shards, which hold only {"story": ...}. relabel() reads them back out of each story: a few
mid-frequency content words that occur in it, one of its sentences (not the first), whether it has dialogue,
and its length bucket. A prompt carries a random subset of these, its fields shuffled. gold() scores any story
for a prompt: the mean over the prompt's constraints of a verifier's score in [0, 1]. guard metrics (reference
NLL, repetition, KL to SFT) are measured beside gold, never mixed into it.

    python -m rlhf.pilot --task=instruct     # verifiers on real stories (pass rate) and shuffled pairs (base rate)
    python -m rlhf.pilot --task=instruct --show=3   # a few prompts as the model sees them

Shard 0 (the validation split) gives the held-out evaluation prompts; the others the training prompts.
The data folder is $DATA_CACHE_DIR/TinyStories_all_data (default data/; `python tinystories.py download`).
"""
import glob
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from tasks.common import Example, Splits, Task
from utils import DATA_CACHE_DIR

KINDS = ("words", "sentence", "dialogue", "length")
FIELD = {"words": "Words", "sentence": "Random sentence", "dialogue": "Features", "length": "Length"}
# story length in tok512 tokens; the three buckets split the stories that fit the 512-token context in thirds
LENGTH_BUCKETS = {"short": (0, 300), "medium": (301, 360), "long": (361, 430)}
MAX_STORY_TOKENS = LENGTH_BUCKETS["long"][1]
CONTEXT = 512  # stories260K's max_seq_len: BOS + prompt + story + end token must fit
LENGTH_SLACK = 50  # a story this many tokens outside its bucket scores 0; inside it scores 1 (linear between)
WORD_DF = (0.002, 0.05)  # "mid-frequency": in 0.2%..5% of the training stories
STOP_WORDS = set("""
a about above after again against all also always am an and any are around as at away back be because been before
being below between both but by came can could day did do does doing down during each even ever every few for from
get go going got had has have having he her here hers herself him himself his how i if in into is it its itself
just like little made make many me more most much my myself never new no nor not now of off on once one only or
other our ours out over own said same saw say she should so some something such than that the their them then
there these they thing things this those through time to too two under until up upon very was way we went were
what when where which while who whom why will with would yes you your yours big very felt feel feels see look
looked looking want wanted wants know knew let lets put took take told tell come comes coming think thought
""".split())


# -----------------------------------------------------------------------------
# text helpers

def words_of(text: str) -> List[str]:
    return re.findall(r"[a-z]+", text.lower())


def stem(word: str) -> str:
    """A crude regular-inflection stemmer, applied to both sides of a comparison (so it only has to be
    consistent): jump/jumps/jumped/jumping -> jump, happy/happier/happily -> happy, hop/hopped/hopping -> hop,
    bake/baked/baking -> bak. Irregular forms (ran/run) do not match."""
    w = word.lower()
    for suffix, repl in (("ies", "y"), ("ied", "y"), ("iest", "y"), ("ier", "y"), ("ily", "y")):
        if w.endswith(suffix) and len(w) - len(suffix) >= 2:
            return w[: -len(suffix)] + repl
    for suffix in ("ing", "est", "ed", "er", "es", "ly", "s"):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3 and not (suffix == "s" and w.endswith("ss")):
            w = w[: -len(suffix)]
            break
    if len(w) >= 4 and w[-1] == w[-2] and w[-1] not in "aeiou":
        w = w[:-1]  # hopp -> hop, fall -> fal (both sides alike)
    if len(w) > 3 and w.endswith("e"):
        w = w[:-1]
    return w


def normalise(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def sentences_of(story: str) -> List[str]:
    """Split on . ! ? (and a closing quote after them); keeps the punctuation."""
    parts = re.split(r'(?<=[.!?])["”]?\s+', story.strip())
    return [p.strip() for p in parts if p.strip()]


DIALOGUE = re.compile(r'["“][^"”]{2,}["”]')


def has_dialogue(story: str) -> bool:
    return DIALOGUE.search(story) is not None


# -----------------------------------------------------------------------------
# the verifiers: each maps (story, its constraint, token count) to a score in [0, 1]

def score_words(story: str, words: List[str]) -> float:
    present = {stem(w) for w in words_of(story)}
    return sum(stem(w) in present for w in words) / len(words)


def score_sentence(story: str, sentence: str) -> float:
    """1 when the sentence occurs (case and punctuation aside); otherwise the best fraction of its word
    bigrams found in one sentence of the story (partial credit, a dense signal)."""
    target = normalise(sentence)
    if f" {target} " in f" {normalise(story)} ":
        return 1.0
    t = target.split()
    want = set(zip(t, t[1:]))
    if not want:
        return 0.0
    best = 0
    for s in sentences_of(story):
        w = normalise(s).split()
        best = max(best, len(want & set(zip(w, w[1:]))))
    return best / len(want)


def score_dialogue(story: str, wanted: bool) -> float:
    return float(has_dialogue(story) == wanted)


def score_length(n_tokens: int, bucket: str) -> float:
    lo, hi = LENGTH_BUCKETS[bucket]
    outside = max(lo - n_tokens, n_tokens - hi, 0)
    return max(0.0, 1.0 - outside / LENGTH_SLACK)


def constraint_scores(story: str, constraints: Dict, n_tokens: int) -> Dict[str, float]:
    out = {}
    for kind, value in constraints.items():
        if kind == "words":
            out[kind] = score_words(story, value)
        elif kind == "sentence":
            out[kind] = score_sentence(story, value)
        elif kind == "dialogue":
            out[kind] = score_dialogue(story, value)
        elif kind == "length":
            out[kind] = score_length(n_tokens, value)
        else:
            raise ValueError(f"unknown constraint {kind!r}; known: {', '.join(KINDS)}")
    return out


def gold(story: str, constraints: Dict, n_tokens: int) -> float:
    """The gold judge: the mean of the prompt's constraint scores."""
    scores = constraint_scores(story, constraints, n_tokens)
    return sum(scores.values()) / len(scores)


# -----------------------------------------------------------------------------
# hindsight relabelling

@dataclass
class WordStats:
    """Document frequencies of the training stories, for picking mid-frequency words and spotting names."""
    n_docs: int = 0
    df: Counter = field(default_factory=Counter)
    capitalised: Counter = field(default_factory=Counter)  # mid-sentence capitalised uses (names)
    lower: Counter = field(default_factory=Counter)

    @classmethod
    def from_stories(cls, stories):
        ws = cls()
        for s in stories:
            ws.n_docs += 1
            ws.df.update(set(words_of(s)))
            ws.lower.update(re.findall(r"\b[a-z]+\b", s))
            ws.capitalised.update(w.lower() for w in re.findall(r"(?<=[a-z,] )[A-Z][a-z]+", s))
        return ws

    def is_candidate(self, w: str) -> bool:
        lo, hi = WORD_DF
        return (len(w) >= 3 and w not in STOP_WORDS and lo <= self.df[w] / max(1, self.n_docs) <= hi
                and self.capitalised[w] <= self.lower[w])


def relabel(story: str, n_tokens: int, ws: WordStats, rng: random.Random, kinds=KINDS) -> Optional[Dict]:
    """The constraints a story satisfies, a random non-empty subset of kinds. None if the story offers none."""
    options = {}
    candidates = sorted({w for w in re.findall(r"\b[a-z]+\b", story) if ws.is_candidate(w)})
    if "words" in kinds and candidates:
        options["words"] = rng.sample(candidates, min(len(candidates), rng.randint(1, 3)))
    if "sentence" in kinds:
        later = [s for s in sentences_of(story)[1:] if 4 <= len(words_of(s)) <= 15 and '"' not in s]
        if later:
            options["sentence"] = rng.choice(later)
    if "dialogue" in kinds:
        options["dialogue"] = has_dialogue(story)
    if "length" in kinds:
        bucket = next((b for b, (lo, hi) in LENGTH_BUCKETS.items() if lo <= n_tokens <= hi), None)
        if bucket:
            options["length"] = bucket
    if not options:
        return None
    keep = [k for k in options if rng.random() < 0.5] or [rng.choice(list(options))]
    rng.shuffle(keep)  # the field order of the prompt
    return {k: options[k] for k in keep}


def prompt_text(constraints: Dict) -> str:
    """TinyStoriesInstruct's format, fields in the constraints' (shuffled) order, then `Story:`."""
    lines = []
    for kind, value in constraints.items():
        if kind == "words":
            value = ", ".join(value)
        elif kind == "dialogue":
            value = "Dialogue" if value else "NoDialogue"
        lines.append(f"{FIELD[kind]}: {value}")
    return "\n".join(lines + ["Story:"])


def encode_prompt(enc, constraints: Dict) -> List[int]:
    """BOS + the prompt. A story encodes on its own with sentencepiece's leading space, as after `Story:`."""
    return enc.encode(prompt_text(constraints), bos=True, eos=False)


# -----------------------------------------------------------------------------
# the data

def shard_files(data_dir=None):
    data_dir = data_dir or os.path.join(DATA_CACHE_DIR, "TinyStories_all_data")
    files = sorted(glob.glob(os.path.join(data_dir, "*.json")))
    if len(files) < 2:
        raise FileNotFoundError(f"need at least 2 TinyStories JSON shards in {data_dir} (shard 0 is held out); "
                                "run `python tinystories.py download` (--data_url=PATH for a local copy)")
    return files


def load_stories(files, enc, max_tokens=MAX_STORY_TOKENS):
    """(story, token ids) of each story that fits the context with a prompt: at most max_tokens tokens."""
    out = []
    for f in files:
        with open(f) as fh:
            for item in json.load(fh):
                s = item["story"].strip()
                ids = enc.encode(s, bos=False, eos=False)
                if 0 < len(ids) <= max_tokens:
                    out.append((s, ids))
    return out


class InstructData(Splits):
    """Training and held-out examples. Training constraints are redrawn on every call of train_examples(epoch)
    (each story is seen with different prompts); the held-out ones are fixed by the seed."""

    def __init__(self, enc, data_dir=None, kinds=KINDS, seed=0):
        files = shard_files(data_dir)
        self.enc, self.kinds, self.seed = enc, tuple(kinds), seed
        self.train_stories = load_stories(files[1:], enc)
        self.heldout_stories = load_stories(files[:1], enc)
        self.word_stats = WordStats.from_stories(s for s, _ in self.train_stories)

    def examples(self, stories, rng):
        out = []
        for s, ids in stories:
            c = relabel(s, len(ids), self.word_stats, rng, self.kinds)
            prompt = encode_prompt(self.enc, c) if c else None
            if prompt and len(prompt) + len(ids) + 1 <= CONTEXT:
                out.append(Example(prompt, prompt_text(c), ids, {"constraints": c, "story": s}))
        return out


class InstructTask(Task):
    """The instruction task behind the chain's task interface (tasks/common.py): gold's components are the prompt's
    constraints (each prompt carries a subset)."""
    name = "instruct"
    reference = None  # its gold needs no model
    components = KINDS
    max_gen_len = MAX_STORY_TOKENS + 1  # the longest story of the task and its end token

    def __init__(self, enc, data_dir=None, seed=0, kinds=KINDS):
        self.enc = enc
        self.data = InstructData(enc, data_dir, kinds, seed)

    def train_examples(self, epoch=0):
        return self.data.train_examples(epoch)

    def heldout_examples(self, n=None):
        return self.data.heldout_examples(n)

    def story_text(self, example, story_ids):
        return self.enc.decode(list(story_ids)).strip()

    def score(self, examples, responses):
        out = []
        for e, r in zip(examples, responses):
            ids = r[:-1] if r[-1:] == [self.enc.bos_id] else r
            out.append(constraint_scores(self.story_text(e, ids), e.info["constraints"], len(ids)))
        return out


# -----------------------------------------------------------------------------

def check(data: InstructData):
    """Each verifier on the real stories against their own constraints (pass = score 1) and on shuffled pairs
    (another story's constraints: the base rate a model ignoring the prompt gets)."""
    ex = data.heldout_examples() + data.train_examples()[:2000]
    rng = random.Random(1)
    others = ex[:]
    rng.shuffle(others)
    rows = {}
    for kind in KINDS:
        own = [constraint_scores(e.info["story"], {kind: e.info["constraints"][kind]}, len(e.target))[kind]
               for e in ex if kind in e.info["constraints"]]
        pairs = [(e, o) for e, o in zip(ex, others) if kind in o.info["constraints"]]
        base = [constraint_scores(e.info["story"], {kind: o.info["constraints"][kind]}, len(e.target))[kind]
                for e, o in pairs]
        rows[kind] = {"n": len(own), "pass_rate": sum(s == 1.0 for s in own) / max(1, len(own)),
                      "own_mean": sum(own) / max(1, len(own)), "base_rate": sum(base) / max(1, len(base))}
    return rows
