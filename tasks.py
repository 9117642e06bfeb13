"""
The interface between the RLHF chain and its tasks. A task gives prompts for a split (training prompts from
the shards 1+, held-out prompts only from shard 0), the text of a prompt, a story's text, and its gold judge:
named components in [0, 1] per story, gold their mean. Two tasks stand behind it:

    story     the seed's own RL setting (story.py): BOS + the first 0..29 tokens of a real story, the policy
              writes the rest; gold judges what makes a good story (complete, dialogue, happy ending, ...)
    instruct  TinyStoriesInstruct-style prompts rebuilt by hindsight relabelling (instruct.py): words, a
              sentence, dialogue, length; gold the fraction of the prompt's constraints met

Every stage script takes --task=story|instruct and opens its task with load_task().
"""
from dataclasses import dataclass, field
from typing import Dict, List

TASKS = ("story", "instruct")


@dataclass
class Example:
    prompt: List[int]  # BOS + the prompt's tokens: what the policy is given
    text: str  # the prompt as a person reads it
    target: List[int] = field(default_factory=list)  # a real continuation (SFT's demonstration), end token excluded
    info: Dict = field(default_factory=dict)  # what the gold judge needs beyond the story (a name, constraints)


def gold_of(components: Dict[str, float]) -> float:
    """Gold: the mean of a story's components (each in [0, 1])."""
    return sum(components.values()) / len(components)


def load_task(name, enc, data_dir=None, seed=0, **options):
    """The task `name` over the TinyStories JSON shards in data_dir (default $DATA_CACHE_DIR/TinyStories_all_data).
    options go to the task (story: reference=the frozen model of the fluency component; instruct: kinds=...)."""
    if name == "story":
        from story import StoryTask
        return StoryTask(enc, data_dir, seed=seed, **options)
    if name == "instruct":
        from instruct import InstructTask
        return InstructTask(enc, data_dir, seed=seed, **options)
    raise ValueError(f"unknown task {name!r}: use --task=story or --task=instruct")
