"""
Best-of-n with the reward model: draw n stories from the SFT policy, keep the one the reward model scores
highest. One pool of pool_size samples per held-out prompt gives the unbiased expectation for every
n <= pool_size (rlhf.best_of_n_weights); picking by gold instead gives the ceiling. The KL of best-of-n to
SFT is at most log n - (n - 1) / n (a bound, reported as such).

    python best_of_n.py --sft=out/rlhf/sft/ckpt.pt --reward_model=out/rlhf/rm/rm.pt --out_dir=out/rlhf

CPU: ~4 minutes for 96 prompts x 32; one GPU: the same command. Writes out_dir/bon.json, bon_pool.jsonl
and samples_bon<n>.jsonl (the RM's pick among each prompt's first n samples, for the largest n).
"""
import json
import os
import sys
import time

from tqdm import tqdm

import configurator
from generate import compile_decode
from instruct import KINDS, InstructData, bootstrap_ci
from rlhf import (best_of_n_kl_bound, best_of_n_weights, guard_metrics, load_policy, reward_scores, sample_record,
                  sample_stories, write_jsonl)
from utils import atomic_write, fail, load_checkpoint, load_tokenizer, pick_device

# -----------------------------------------------------------------------------
sft = "out/rlhf/sft/ckpt.pt"
reward_model = "out/rlhf/rm/rm.pt"
reference = "stories260K/stories260K.pt"  # for the guard's reference NLL
tokenizer = "stories260K/tok512.model"
data_dir = ""
out_dir = "out/rlhf"
n_prompts = 96
pool_size = 32
temperature = 1.0
batch_size = 64
device = "auto"
compile = "auto"
seed = 7
# -----------------------------------------------------------------------------
configurator.apply_or_exit(globals(), sys.argv[1:])


def main():
    if pool_size < 1 or n_prompts < 1:
        fail(f"--pool_size and --n_prompts must be >= 1, got {pool_size}, {n_prompts}")
    try:
        dev = pick_device(device)
        enc = load_tokenizer(tokenizer, 512)
        data = InstructData(enc, data_dir or None, load_checkpoint(sft).get("kinds") or list(KINDS))
        policy = load_policy(sft, dev)
        rm = load_policy(reward_model, dev, value_head=True)
        ref = load_policy(reference, dev)
    except (FileNotFoundError, ValueError, KeyError) as e:
        fail(e)
    t0 = time.time()
    examples = data.heldout_examples(n_prompts)
    decode_fn = compile_decode(policy) if compile is True or (compile == "auto" and dev == "cpu") else None
    with tqdm(total=len(examples) * pool_size, desc="best-of-n pool", unit="story") as bar:
        pool = sample_stories(policy, examples, enc, pool_size, temperature, batch_size, seed=seed,
                              decode_fn=decode_fn, progress=bar)
    guard = guard_metrics(pool, enc, reference=ref)
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
            per_prompt["ref_nll_by_rm"].append(sum(w * r["ref_nll"] for w, r in zip(by_rm, group)))
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
