"""
Before any training: does the task's gold judge measure what it should? On the story task, each component's
rate on the real held-out continuations (cut at the budget, as a policy's would be) and on the policy's samples
for the same prompts; on the instruction task, each verifier on real stories against their own constraints (the
pass rate) and against another story's (the base rate a model ignoring its prompt gets).

    python -m rlhf.pilot --n=200 --out=out/rlhf/pilot.json     # story task: CPU, ~1 minute
    python -m rlhf.pilot --task=instruct                        # the instruction task's verifiers
    python -m rlhf.pilot --show=5                               # a few held-out prompts and what gold reads in them

Prints a markdown table; --out also writes it as JSON.
"""
import json
import sys

import configurator
from rlhf.common import open_stage, sample_responses
from tasks.common import gold_of
from tasks.instruct import check
from tasks.story import COMPONENTS, MAX_GEN_LEN
from utils import atomic_write

# -----------------------------------------------------------------------------
task = "story"  # story or instruct (the tasks package)
policy = "stories260K/stories260K.pt"  # the model whose samples are judged beside the real continuations
tokenizer = ""  # the policy's sentencepiece model ("": found next to it or named in its checkpoint)
reference = "stories260K/stories260K.pt"  # story task: the frozen model of gold's fluency component
data_dir = ""
n = 200  # held-out prompts (story task)
show = 0  # only print this many held-out prompts with what the judge reads in them
out = ""  # also write the table as JSON here
device = "auto"
compile = "auto"  # compile the sampling decode step
seed = 0
# -----------------------------------------------------------------------------
configurator.configure(globals(), sys.argv[1:], positive=("n",))


def story_pilot(the_task, model, decode_fn):
    """{source: {component: mean, "gold", "tokens"}} for the real continuations and the policy's samples."""
    examples = the_task.heldout_examples(n)
    real = [e.target[:MAX_GEN_LEN] + ([the_task.enc.bos_id] if len(e.target) <= MAX_GEN_LEN else [])
            for e in examples]
    samples = sample_responses(model, examples, the_task.enc, the_task.max_gen_len, seed=seed, decode_fn=decode_fn)
    rows = {}
    for source, responses in (("real continuations", real), ("pre-trained samples", samples)):
        comps = the_task.score(examples, responses)
        rows[source] = {c: sum(x[c] for x in comps if c in x) / max(1, sum(c in x for x in comps))
                        for c in COMPONENTS}
        rows[source]["gold"] = sum(gold_of(x) for x in comps) / len(comps)
        rows[source]["tokens"] = sum(len(r) for r in responses) / len(responses)
    rows["prompts with a name"] = sum(bool(e.info["names"]) for e in examples) / len(examples)
    print(f"| source | {' | '.join(COMPONENTS)} | gold | tokens |\n|---|" + "---|" * (len(COMPONENTS) + 2))
    for source, r in rows.items():
        if isinstance(r, dict):
            print(f"| {source} | " + " | ".join(f"{r[c]:.3f}" for c in COMPONENTS)
                  + f" | {r['gold']:.3f} | {r['tokens']:.0f} |")
    print(f"{rows['prompts with a name']:.0%} of the prompts carry a name")
    return rows


def instruct_check(the_task):
    """{constraint: {"n", "pass_rate", "own_mean", "base_rate"}} (tasks.instruct.check)."""
    data = the_task.data
    print(f"{len(data.train_stories)} training stories, {len(data.heldout_stories)} held-out (shard 0), "
          f"{sum(c >= 1 for c in data.word_stats.df.values()):,} distinct words")
    print("| constraint | stories | pass (own story) | mean score (own) | base rate (shuffled) |\n|---|---|---|---|---|")
    rows = check(data)
    for kind, r in rows.items():
        print(f"| {kind} | {r['n']} | {r['pass_rate']:.1%} | {r['own_mean']:.3f} | {r['base_rate']:.3f} |")
    return rows


def main():
    samples = 0 if show or task != "story" else n
    dev, enc, the_task, model, decode_fn = open_stage(task, policy, tokenizer, data_dir, device, compile, seed,
                                                      reference, samples=samples)
    if show:
        for e in the_task.heldout_examples(show):
            print(repr(e.text), {k: v for k, v in e.info.items() if k != "story"})
        return
    rows = story_pilot(the_task, model, decode_fn) if task == "story" else instruct_check(the_task)
    if out:
        with atomic_write(out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
