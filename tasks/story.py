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

Training prompts come from shards 1+, held-out prompts only from shard 0 (llama2.c's validation shard).
`python -m rlhf.pilot` shows each component's rate on real continuations and on the model's samples.
"""
import re
from typing import Dict, List

from tasks.common import Example, Splits, Task
from tasks.instruct import WordStats, load_stories, sentences_of, shard_files
from utils import repeated_ngram_rate

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


class StoryTask(Splits, Task):
    name = "story"
    rng_prefix = "story-"  # a prompt's length is drawn per story and epoch (train_examples)
    components = COMPONENTS
    max_gen_len = MAX_GEN_LEN

    def __init__(self, enc, data_dir=None, seed=0, reference=None):
        """reference: the frozen pre-trained model of the fluency component, as an object whose
        nll(prompts, responses) gives each response's NLL per token (rlhf.common.Reference); needed to score
        without precomputed NLLs."""
        files = shard_files(data_dir)
        self.enc, self.seed, self.reference = enc, seed, reference
        self.train_stories = load_stories(files[1:], enc, MAX_STORY_TOKENS)
        self.heldout_stories = load_stories(files[:1], enc, MAX_STORY_TOKENS)
        ws = WordStats.from_stories(s for s, _ in self.train_stories)
        # names: capitalised in the middle of sentences at least 3 times, and more often so than in lower case
        self.names = {w.capitalize() for w, c in ws.capitalised.items() if c >= 3 and c > ws.lower[w]}

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

    def story_text(self, example, story_ids):
        """The whole story: the prompt's tokens and the continuation's, decoded together."""
        return self.enc.decode(example.prompt[1:] + list(story_ids)).strip()

    # gold ----------------------------------------------------------------------
    def score(self, examples, responses, nll=None) -> List[Dict[str, float]]:
        """The components of each story: responses are the generated tokens, the end token (BOS) last when the
        story ended. nll: the responses' NLL per token under the reference, if already computed."""
        if nll is None:
            if self.reference is None:
                raise ValueError("the story task's fluency component needs the reference model: pass --reference=...")
            nll = self.reference.nll([e.prompt for e in examples], responses)
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
