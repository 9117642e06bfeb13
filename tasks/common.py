"""
What every task of the RLHF chain gives (rlhf.common.load_task opens one): prompts for a split (training prompts
from the shards 1+, held-out prompts only from shard 0), the text of a prompt, a story's text, and its gold judge:
named components in [0, 1] per story, gold their mean.
"""
import random
from dataclasses import dataclass, field
from typing import Dict, List


@dataclass
class Example:
    prompt: List[int]  # BOS + the prompt's tokens: what the policy is given
    text: str  # the prompt as a person reads it
    target: List[int] = field(default_factory=list)  # a real continuation (SFT's demonstration), end token excluded
    info: Dict = field(default_factory=dict)  # what the gold judge needs beyond the story (a name, constraints)


class Splits:
    """A task's two prompt sets from its examples(stories, rng): every training story once per epoch, its prompt
    redrawn each epoch, and the held-out stories with prompts fixed by the seed. The RNG names are the task's own
    (rng_prefix), so that two tasks never draw the same prompts."""
    rng_prefix = ""

    def train_examples(self, epoch=0):
        return self.examples(self.train_stories, random.Random(f"{self.rng_prefix}train-{self.seed}-{epoch}"))

    def heldout_examples(self, n=None):
        ex = self.examples(self.heldout_stories, random.Random(f"{self.rng_prefix}heldout-{self.seed}"))
        return ex[:n] if n else ex


class Task:
    """The base of every task: name, components, max_gen_len, train_examples(epoch), heldout_examples(n),
    story_text(example, ids) and score(examples, responses) are each task's own."""

    def response_stats(self, texts) -> Dict[str, float]:
        """Task-specific means over a batch of responses (as text), logged per RL iteration: none by default."""
        return {}


def gold_of(components: Dict[str, float]) -> float:
    """Gold: the mean of a story's components (each in [0, 1])."""
    return sum(components.values()) / len(components)
