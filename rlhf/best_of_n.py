"""
Best-of-n with the reward model: draw n stories from the SFT policy, keep the one the reward model scores
highest. One pool of pool_size samples per held-out prompt gives the unbiased expectation for every
n <= pool_size (rlhf.common.best_of_n_weights); picking by gold instead gives the ceiling. The KL of best-of-n to
SFT is at most log n - (n - 1) / n (a bound, reported as such).

    python -m rlhf.best_of_n --policy=out/rlhf/sft/ckpt.pt --reward=out/rlhf/rm/rm.pt --out_dir=out/rlhf

CPU: ~2-3 minutes for 64 prompts x 64; one GPU: the same command. Writes out_dir/bon.json, bon_pool.jsonl
and samples_bon<n>.jsonl (the RM's pick among each prompt's first n samples, for the largest n).
"""
import json
import os
import sys
import time

from tqdm import tqdm

import configurator
from rlhf.common import (best_of_n_kl_bound, best_of_n_weights, guard_metrics, load_reward_model, open_stage,
                         reward_scores, sample_record, sample_stories, write_jsonl)
from stats import bootstrap_ci
from utils import atomic_write, fail

# -----------------------------------------------------------------------------
task = "story"  # story or instruct (the tasks package)
policy = "out/rlhf/sft/ckpt.pt"  # the SFT policy the pool is drawn from
reward = "out/rlhf/rm/rm.pt"  # the reward model that picks
reference = "stories260K/stories260K.pt"  # the frozen pre-trained model (gold's fluency, the guard's NLL)
tokenizer = ""  # the policy's sentencepiece model ("": found next to it or named in its checkpoint)
data_dir = ""
out_dir = "out/rlhf"
n_prompts = 64
pool_size = 64
temperature = 1.0
batch_size = 256  # stories per sampling batch: eager decoding drops the finished rows, so on a CPU one batch of 256
# beats a compiled step at 64 (docs/speed.md), and --compile=auto then leaves it eager
device = "auto"
compile = "auto"
seed = 7
# -----------------------------------------------------------------------------
configurator.configure(globals(), sys.argv[1:], positive=("n_prompts", "pool_size"))


def main():
    dev, enc, the_task, model, decode_fn = open_stage(task, policy, tokenizer, data_dir, device, compile, seed,
                                                      reference, samples=n_prompts * pool_size, batch_size=batch_size)
    try:
        rm = load_reward_model(reward, dev)
        ref = the_task.reference if task == "story" else None
    except (FileNotFoundError, ValueError, KeyError) as e:
        fail(e)
    t0 = time.time()
    examples = the_task.heldout_examples(n_prompts)
    with tqdm(total=len(examples) * pool_size, desc="best-of-n pool", unit="story") as bar:
        pool = sample_stories(model, examples, the_task, pool_size, temperature, batch_size, seed=seed,
                              decode_fn=decode_fn, progress=bar)
    guard = guard_metrics(pool, reference=ref)
    rm_s = reward_scores(rm, [s.example.prompt for s in pool], [s.response for s in pool])
    records = [sample_record(s, **g, rm_score=r) for s, g, r in zip(pool, guard, rm_s)]
    write_jsonl(os.path.join(out_dir, "bon_pool.jsonl"), records)

    rows = []
    n = 1
    while n <= pool_size:
        per_prompt = {k: [] for k in ("gold_by_rm", "rm_by_rm", "gold_by_gold", "ref_nll_by_rm", "rep3_by_rm")}
        for p in range(len(examples)):
            group = records[p * pool_size: (p + 1) * pool_size]
            by_rm = best_of_n_weights([r["rm_score"] for r in group], n)
            by_gold = best_of_n_weights([r["gold"] for r in group], n)
            per_prompt["gold_by_rm"].append(sum(w * r["gold"] for w, r in zip(by_rm, group)))
            per_prompt["rm_by_rm"].append(sum(w * r["rm_score"] for w, r in zip(by_rm, group)))
            per_prompt["gold_by_gold"].append(sum(w * r["gold"] for w, r in zip(by_gold, group)))
            per_prompt["ref_nll_by_rm"].append(sum(w * r.get("ref_nll", 0.0) for w, r in zip(by_rm, group)))
            per_prompt["rep3_by_rm"].append(sum(w * r["rep3"] for w, r in zip(by_rm, group)))
        m, lo, hi = bootstrap_ci(per_prompt["gold_by_rm"])
        rows.append({"n": n, "kl_bound": best_of_n_kl_bound(n), "gold_by_rm_ci": [lo, hi],
                     **{k: sum(v) / len(v) for k, v in per_prompt.items()}})
        print(f"best-of-{n}: gold {m:.3f} [{lo:.3f}, {hi:.3f}] (by gold {rows[-1]['gold_by_gold']:.3f}), RM "
              f"{rows[-1]['rm_by_rm']:.3f}, ref_nll {rows[-1]['ref_nll_by_rm']:.3f}, KL <= {rows[-1]['kl_bound']:.2f}")
        n *= 2
    n_max = rows[-1]["n"]
    picks = []
    for p in range(len(examples)):
        group = records[p * pool_size: p * pool_size + n_max]
        picks.append(max(group, key=lambda r: r["rm_score"]))
    write_jsonl(os.path.join(out_dir, f"samples_bon{n_max}.jsonl"), picks)
    with atomic_write(os.path.join(out_dir, "bon.json"), "w") as f:
        json.dump({"pool_size": pool_size, "n_prompts": len(examples), "rows": rows, "seconds": time.time() - t0}, f,
                  indent=1)
    print(f"wrote {os.path.join(out_dir, 'bon.json')} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
