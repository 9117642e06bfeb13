"""
The reasoning study's evaluation: a checkpoint on the arithmetic task's held-out problems (never in the corpus or
among RL's problems, tasks/arithmetic.py): n_samples responses per problem at temperature 1 (pass@k for k = 1 ...
n_samples, the unbiased estimator), one greedy response per problem, the format rate, the response's and the
working's length in tokens, the KL to the base model on the policy's own samples, and the same at temperature 1
and greedy on the out-of-distribution problems (an operand one digit longer than any trained on).

    python -m rlhf.reason_eval --policy=out/reason/base/ckpt.pt --name=base --out_dir=out/reason
    python -m rlhf.reason_eval --policy=out/reason/grpo/ckpt_20.pt --name=grpo@20 --n_samples=8 --n_ood=0  # midway
    python -m rlhf.reason_eval --report=out/reason    # report.md, report.json and the figures from every eval_*.json

Writes out_dir/eval_<name>.json and out_dir/samples_<name>.jsonl: one {"question", "response", "answer", "correct",
"format", "n_tokens", "think_tokens"} per held-out sample at temperature 1 ("answer": the integer the model gave,
as text, "" when it gave none). CPU: ~1 minute for 256 problems x 64 samples with the 0.47M-parameter base.
"""
import json
import os
import sys
import time

from tqdm import tqdm

import configurator
from rlhf.common import load_frozen, open_stage, read_checkpoint, sample_stories, sequence_logprobs, write_jsonl
from stats import bootstrap_ci, pass_at_k
from tasks.arithmetic import answer_of, think_tokens
from utils import atomic_write, fail

# -----------------------------------------------------------------------------
policy = "out/reason/base/ckpt.pt"  # the checkpoint to evaluate
name = ""  # the method's name in the file names and the report (default: the checkpoint's folder)
out_dir = "out/reason"
base = ""  # the base model the KL is measured against ("": the policy itself, KL 0)
tokenizer = ""  # the policy's sentencepiece model ("": found next to it or named in its checkpoint)
n_problems = 256  # held-out problems
n_samples = 64  # responses per problem at temperature 1: pass@k for k = 1 ... n_samples
n_ood = 64  # out-of-distribution problems, ood_samples at temperature 1 and one greedy response each (0: skip)
ood_samples = 4
kl_samples = 2  # the first this many samples of each problem measure the KL to the base (512 responses)
batch_size = 256
device = "auto"
compile = "auto"  # compile the decode step
seed = 0
report = ""  # a folder: build report.json / report.md / the figures from its eval_*.json (report.py)
# -----------------------------------------------------------------------------
configurator.configure(globals(), sys.argv[1:], positive=("n_problems", "n_samples", "ood_samples", "batch_size"))


def record(s, enc):
    """One sample as the study's files write it."""
    return {"question": s.example.text, "response": s.story, "answer": answer_of(s.story),
            "correct": bool(s.components["correct"]), "format": bool(s.components["format"]),
            "n_tokens": s.n_tokens, "think_tokens": think_tokens(s.story, enc)}


def summarise(samples, n_per, enc):
    """pass@k (k = 1 ... n_per), the per-problem pass@1 (for paired intervals), format rate, lengths."""
    correct = [s.components["correct"] for s in samples]
    counts = [int(sum(correct[i:i + n_per])) for i in range(0, len(correct), n_per)]
    records = [record(s, enc) for s in samples]
    per_problem = [c / n_per for c in counts]
    mean, lo, hi = bootstrap_ci(per_problem)
    return records, {
        "problems": len(counts), "samples_per_problem": n_per, "pass1": mean, "pass1_ci": [lo, hi],
        "pass1_per_problem": per_problem,
        "pass_at_k": {k: sum(pass_at_k(n_per, c, k) for c in counts) / len(counts) for k in range(1, n_per + 1)},
        "format": sum(r["format"] for r in records) / len(records),
        "n_tokens": sum(r["n_tokens"] for r in records) / len(records),
        "think_tokens": sum(r["think_tokens"] for r in records) / len(records),
        "no_working": sum(r["think_tokens"] == 0 for r in records) / len(records)}


def evaluate():
    name_ = name or os.path.basename(os.path.dirname(os.path.abspath(policy)))
    total = n_problems * (n_samples + 1) + n_ood * (ood_samples + 1)
    dev, enc, task, model, decode_fn = open_stage("arithmetic", policy, tokenizer, "", device, compile, seed,
                                                  samples=total, batch_size=batch_size)
    try:
        base_model = load_frozen(base, dev) if base else None
    except (FileNotFoundError, ValueError, KeyError) as e:
        fail(e)
    t0 = time.time()
    heldout, ood = task.heldout_examples(n_problems), task.ood_examples(n_ood) if n_ood else []
    with tqdm(total=total, desc=f"{name_}: sampling", unit="response") as bar:
        sampled = sample_stories(model, heldout, task, n_samples, 1.0, batch_size, seed, decode_fn, bar)
        greedy = sample_stories(model, heldout, task, 1, 0.0, batch_size, seed, decode_fn, bar)
        ood_sampled = (sample_stories(model, ood, task, ood_samples, 1.0, batch_size, seed, decode_fn, bar)
                       if ood else [])
        ood_greedy = sample_stories(model, ood, task, 1, 0.0, batch_size, seed, decode_fn, bar) if ood else []
    records, result = summarise(sampled, n_samples, enc)
    result = {"name": name_, "policy": policy, "iters": read_checkpoint(policy).get("iter_num", 0), **result,
              "greedy": sum(s.components["correct"] for s in greedy) / len(greedy),
              "greedy_format": sum(s.components["format"] for s in greedy) / len(greedy)}
    if ood:
        result["ood"] = {"problems": len(ood), "pass1": sum(s.components["correct"] for s in ood_sampled) /
                         len(ood_sampled), "greedy": sum(s.components["correct"] for s in ood_greedy) / len(ood),
                         "format": sum(s.components["format"] for s in ood_sampled) / len(ood_sampled)}
    if base_model is not None:  # KL(policy || base) per response, on the policy's own samples
        sub = [s for i, s in enumerate(sampled) if i % n_samples < kl_samples]
        prompts, responses = [s.example.prompt for s in sub], [s.response for s in sub]
        pol, ref = sequence_logprobs(model, prompts, responses, 128), sequence_logprobs(base_model, prompts,
                                                                                        responses, 128)
        result["kl_base"] = sum(p - r for p, r in zip(pol, ref)) / len(sub)
    result["seconds"] = time.time() - t0
    os.makedirs(out_dir, exist_ok=True)
    write_jsonl(os.path.join(out_dir, f"samples_{name_}.jsonl"), records)
    with atomic_write(os.path.join(out_dir, f"eval_{name_}.json"), "w") as f:
        json.dump(result, f, indent=1)
    k_top = max(result["pass_at_k"])
    print(f"{name_}: pass@1 {result['pass1']:.3f} [{result['pass1_ci'][0]:.3f}, {result['pass1_ci'][1]:.3f}], "
          f"greedy {result['greedy']:.3f}, pass@{k_top} {result['pass_at_k'][k_top]:.3f}, format "
          f"{result['format']:.3f}, tokens {result['n_tokens']:.1f} (working {result['think_tokens']:.1f})"
          + (f", ood pass@1 {result['ood']['pass1']:.3f} greedy {result['ood']['greedy']:.3f}" if ood else "")
          + (f", kl_base {result['kl_base']:.2f}" if "kl_base" in result else "") + f" ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    if report:
        from report import build_reason_report
        build_reason_report(report)
    else:
        evaluate()
