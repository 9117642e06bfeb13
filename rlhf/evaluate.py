"""
Score any checkpoint on the task's held-out prompts (shard 0, never trained on): one story per prompt at
temperature 1, judged by gold (the tasks package) with a bootstrap 95% CI, per component, the reward model's score, and the
guard: KL to the SFT model (nats/story), reference NLL (nats/token under the frozen pre-trained model) and the
repeated-3-gram rate.

    python -m rlhf.evaluate --policy=out/rlhf/dpo/ckpt.pt --name=dpo --out_dir=out/rlhf
    python -m rlhf.evaluate --policy=stories260K/stories260K.pt --name=pretrained   # the same prompts, no SFT
    python -m rlhf.evaluate --policy=out/rlhf/grpo_rm_long --name=grpo_rm_long   # a run's folder: each ckpt_<iter>.pt
                                                 # as grpo_rm_long@<iter>, then ckpt.pt, in one process
    python -m rlhf.evaluate --report=out/rlhf      # report.json, report.md and the plot from every eval_*.json

Writes out_dir/eval_<name>.json and out_dir/samples_<name>.jsonl (one {"prompt", "story", "gold", "components",
...} per held-out prompt). CPU: ~30 s for 128 prompts; one GPU: the same command.
"""
import json
import os
import re
import sys
import time

import configurator
from rlhf.common import (Reference, guard_metrics, load_frozen, load_policy, load_reward_model, open_stage,
                         reward_scores, sample_record, sample_stories, write_jsonl)
from stats import bootstrap_ci
from utils import atomic_write, fail

# -----------------------------------------------------------------------------
task = "story"  # story or instruct (the tasks package)
policy = "out/rlhf/sft/ckpt.pt"  # the checkpoint to evaluate, or a run's folder (its ckpt_<iter>.pt, then ckpt.pt)
name = ""  # the method's name in the file names and the report (default: the checkpoint's folder)
out_dir = "out/rlhf"
sft = "out/rlhf/sft/ckpt.pt"  # KL to SFT is measured against it ("" to skip)
reference = "stories260K/stories260K.pt"  # the frozen pre-trained model (fluency and the guard's NLL)
reward_model = ""  # a reward model (rm.pt) to report its score ("" to skip)
tokenizer = ""  # the policy's sentencepiece model ("": found next to it or named in its checkpoint)
data_dir = ""
n_prompts = 128
temperature = 1.0
batch_size = 128  # stories per sampling batch (all the prompts at once: eager decoding drops the finished rows)
device = "auto"
compile = "auto"  # compile the decode step
seed = 0
report = ""  # a folder: build report.json / report.md / the plot from its eval_*.json, rm.json and bon.json (report.py)
# -----------------------------------------------------------------------------
configurator.configure(globals(), sys.argv[1:], positive=("n_prompts", "batch_size"))


def summarise(records, components):
    """Means (and gold's bootstrap CI) of the per-story records."""
    n = len(records)
    mean, lo, hi = bootstrap_ci([r["gold"] for r in records])
    out = {"n": n, "gold": mean, "gold_ci": [lo, hi], "components": {}}
    for c in components:
        vals = [r["components"][c] for r in records if c in r["components"]]
        if vals:
            out["components"][c] = {"n": len(vals), "mean": sum(vals) / len(vals)}
    for key in ("kl_sft", "ref_nll", "rep3", "rm_score", "n_tokens", "ended"):
        vals = [float(r[key]) for r in records if key in r]
        if vals:
            out[key] = sum(vals) / len(vals)
    return out


def checkpoints_to_evaluate(path, name_):
    """[(name, checkpoint)]: the checkpoint itself, or for a run's folder its ckpt_<iter>.pt in order of iteration
    (named <name>@<iter>: the report's curves along a run), then its ckpt.pt (<name>)."""
    if not os.path.isdir(path):
        return [(name_ or os.path.basename(os.path.dirname(os.path.abspath(path))), path)]
    name_ = name_ or os.path.basename(os.path.abspath(path))
    steps = sorted(int(f[5:-3]) for f in os.listdir(path) if re.fullmatch(r"ckpt_\d+\.pt", f))
    last = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(last):
        fail(f"no ckpt.pt in {path}: pass a checkpoint, or the folder of a finished run")
    return [(f"{name_}@{i}", os.path.join(path, f"ckpt_{i}.pt")) for i in steps] + [(name_, last)]


def evaluate():
    todo = checkpoints_to_evaluate(policy, name)
    dev, enc, the_task, model, decode_fn = open_stage(task, todo[0][1], tokenizer, data_dir, device, compile, seed,
                                                      reference, samples=n_prompts * len(todo), batch_size=batch_size)
    try:
        sft_model = load_frozen(sft, dev) if sft else None
        ref_model = the_task.reference if task == "story" else Reference(reference, dev) if reference else None
        rm = load_reward_model(reward_model, dev) if reward_model else None
    except (FileNotFoundError, ValueError, KeyError) as e:
        fail(e)
    examples = the_task.heldout_examples(n_prompts)
    for i, (name_, path) in enumerate(todo):
        if i > 0:  # the same architecture: only the weights change (a compiled decode step stays valid)
            try:
                model.load_state_dict(load_policy(path).state_dict())
            except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
                fail(f"{path}: {e}")
        evaluate_one(name_, path, model, the_task, decode_fn, examples, sft_model, ref_model, rm)


def evaluate_one(name_, path, model, the_task, decode_fn, examples, sft_model, ref_model, rm):
    t0 = time.time()
    samples = sample_stories(model, examples, the_task, 1, temperature, batch_size, seed=seed, decode_fn=decode_fn)
    guard = guard_metrics(samples, ref_model, sft_model, model)
    rm_scores = reward_scores(rm, [s.example.prompt for s in samples], [s.response for s in samples]) if rm else None
    records = [sample_record(s, **g, **({"rm_score": rm_scores[i]} if rm else {}))
               for i, (s, g) in enumerate(zip(samples, guard))]
    result = {"name": name_, "task": task, "policy": path, **summarise(records, the_task.components),
              "temperature": temperature, "golds": [r["gold"] for r in records], "seconds": time.time() - t0}
    os.makedirs(out_dir, exist_ok=True)
    write_jsonl(os.path.join(out_dir, f"samples_{name_}.jsonl"), records)
    with atomic_write(os.path.join(out_dir, f"eval_{name_}.json"), "w") as f:
        json.dump(result, f, indent=1)
    per = ", ".join(f"{k} {v['mean']:.3f}" for k, v in result["components"].items())
    print(f"{name_}: gold {result['gold']:.3f} [{result['gold_ci'][0]:.3f}, {result['gold_ci'][1]:.3f}] on "
          f"{len(records)} held-out prompts ({per}); kl_sft {result.get('kl_sft', float('nan')):.2f}, ref_nll "
          f"{result.get('ref_nll', float('nan')):.3f}, rep3 {result['rep3']:.3f}, tokens {result['n_tokens']:.0f}"
          + (f", rm {result['rm_score']:.3f}" if rm else "") + f" ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    if report:
        from report import build_report
        build_report(report)
    else:
        evaluate()
