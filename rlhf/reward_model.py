"""
The reward model, the second step of RLHF: a scorer of (prompt, story) trained on preference pairs with the
seed's pairwise loss -logsigmoid(r_chosen - r_rejected).mean() (rlhf.common.pairwise_loss), the pairs labelled by
the task's gold judge (the tasks package).

    python -m rlhf.reward_model --policy=out/rlhf/sft/ckpt.pt --out_dir=out/rlhf/rm     # CPU: ~4 minutes

1. samples_per_prompt stories for n_train_prompts training prompts and n_heldout_prompts held-out prompts
   (shard 0) from the SFT policy at temperature 1 -> out_dir/pool_train.jsonl, pool_heldout.jsonl
   (rlhf/dpo.py trains on the same training pairs);
2. every pair of stories of a prompt whose gold differs is a preference pair (ties dropped);
3. a TransformerWithValueHead initialised from the SFT weights, its score the value at the last real token;
4. held-out pairwise accuracy (all pairs, clear-margin pairs, and per gold component: on the pairs that component
   orders, does the score order them the same way) against trivial predictors (longer wins, shorter wins, ended
   wins, a length-only regressor), and the rank correlation with gold -> out_dir/rm.json, rm.pt.
One GPU: the same command. Progress: a tqdm bar while sampling, log lines while training.
"""
import json
import os
import sys
import time

from tqdm import tqdm

import configurator
from rlhf.common import (RunState, length_only_predictor, load_policy, open_stage, pairwise_loss, preference_pairs,
                         reward_scores, rm_forward, rm_sequence, sample_record, sample_stories, save_policy,
                         shuffled_batches, train_step, write_jsonl)
from stats import pair_accuracy, spearman
from utils import MetricsLog, atomic_write, cosine_lr, fail, hold_out_dir, read_jsonl, set_lr

# -----------------------------------------------------------------------------
task = "story"  # story or instruct (the tasks package)
policy = "out/rlhf/sft/ckpt.pt"  # the SFT policy: samples the pool and initialises the scorer
tokenizer = ""  # the policy's sentencepiece model ("": found next to it or named in its checkpoint)
reference = "stories260K/stories260K.pt"  # story task: the frozen model of gold's fluency component
data_dir = ""
out_dir = "out/rlhf/rm"
n_train_prompts = 256
n_heldout_prompts = 96
samples_per_prompt = 4
temperature = 1.0
batch_size = 16  # pairs per step
epochs = 2
learning_rate = 5e-4
min_lr = 5e-5
warmup_iters = 10
weight_decay = 0.0
grad_clip = 1.0
clear_margin = 0.25  # "clear" pairs: gold differs by at least this much
layout = "prompt_first"  # the scorer's input: prompt_first (as the policy reads it) or story_first (rm_sequence)
reuse_pool = True  # keep an existing pool (same settings) instead of sampling it again
device = "auto"
compile = "auto"  # compile the sampling decode step
seed = 1337
resume_every = 60  # save where the run is (out_dir/state.pt) every this many seconds; 0: every iteration
# -----------------------------------------------------------------------------
config = configurator.configure(globals(), sys.argv[1:],
                                positive=("n_train_prompts", "n_heldout_prompts", "batch_size", "epochs"))


def sample_pool(model, examples, the_task, path, seed_, decode_fn):
    if reuse_pool and os.path.isfile(path):
        rows = read_jsonl(path)
        if len(rows) == len(examples) * samples_per_prompt:
            print(f"reusing {path} ({len(rows)} stories)")
            return rows
    with tqdm(total=len(examples) * samples_per_prompt, desc=f"sampling {os.path.basename(path)}", unit="story") as bar:
        samples = sample_stories(model, examples, the_task, samples_per_prompt, temperature, seed=seed_,
                                 decode_fn=decode_fn, progress=bar)
    rows = [sample_record(s, group=i // samples_per_prompt) for i, s in enumerate(samples)]
    write_jsonl(path, rows)
    return rows


def component_accuracy(records, score, components):
    """Per component: on the pairs of one prompt's stories that the component orders, the fraction the score
    orders the same way (which preferences the scorer learnt), and how many such pairs there are."""
    out = {}
    for c in components:
        rows = [dict(r, gold=r["components"].get(c, float("nan"))) for r in records]
        pairs = [(a, b) for a, b in preference_pairs(rows, min_margin=1e-6) if rows[a]["gold"] == rows[a]["gold"]]
        if pairs:
            out[c] = {"pairs": len(pairs), "accuracy": pair_accuracy(pairs, score)}
    return out


def main():
    if layout not in ("prompt_first", "story_first"):
        fail(f"--layout must be prompt_first or story_first, got {layout!r}")
    if samples_per_prompt < 2:
        fail(f"--samples_per_prompt must be >= 2 to make pairs, got {samples_per_prompt}")
    dev, enc, the_task, model, decode_fn = open_stage(
        task, policy, tokenizer, data_dir, device, compile, seed, reference,
        samples=(n_train_prompts + n_heldout_prompts) * samples_per_prompt, config=config)
    hold_out_dir(out_dir)  # one run per folder
    t_start = time.time()

    # 1. the pools
    train_ex = the_task.train_examples(epoch=10_000)[:n_train_prompts]  # prompts SFT did not see in its epochs
    train = sample_pool(model, train_ex, the_task, os.path.join(out_dir, "pool_train.jsonl"), seed, decode_fn)
    heldout = sample_pool(model, the_task.heldout_examples(n_heldout_prompts), the_task,
                          os.path.join(out_dir, "pool_heldout.jsonl"), seed + 1, decode_fn)
    del model, decode_fn

    # 2. pairs
    train_pairs, heldout_pairs = preference_pairs(train), preference_pairs(heldout)
    print(f"{len(train_pairs)} training pairs from {len(train)} stories, {len(heldout_pairs)} held-out pairs "
          f"({time.time() - t_start:.0f} s)")
    if len(train_pairs) < batch_size:
        fail(f"only {len(train_pairs)} training pairs, fewer than --batch_size={batch_size}: sample more prompts")

    # 3. the scorer
    rm = load_policy(policy, dev, value_head=True)
    rm.layout = layout
    optimizer = rm.configure_optimizers(weight_decay, learning_rate, (0.9, 0.95), dev.split(":")[0])
    metrics = MetricsLog(os.path.join(out_dir, "metrics.jsonl"))
    steps = epochs * (len(train_pairs) // batch_size)
    state = RunState(out_dir, config, resume_every, model=rm, optimizer=optimizer)
    start = state.restore(metrics) or 0
    rm.train()
    t0 = time.time()
    for it, batch in shuffled_batches(train_pairs, batch_size, epochs, seed):
        if it < start:  # a stopped run's steps
            continue
        lr = set_lr(optimizer, cosine_lr(it, learning_rate, min_lr, warmup_iters, steps))
        scores = rm_forward(rm, [rm_sequence(train[j]["prompt_ids"], train[j]["response"], layout)
                                 for j in [c for c, _ in batch] + [r for _, r in batch]])
        chosen, rejected = scores[: len(batch)], scores[len(batch):]
        loss = pairwise_loss(chosen, rejected).mean()
        train_step(rm, optimizer, loss, grad_clip)
        acc = (chosen > rejected).float().mean().item()
        if it % 20 == 0:
            eta = (time.time() - t0) / (it + 1 - start) * (steps - it - 1)
            print(f"{it}/{steps} | loss {loss.item():.4f} | batch acc {acc:.2f} | lr {lr:.2e} | eta {eta / 60:.1f} min")
            metrics.write(iter=it, loss=loss.item(), batch_acc=acc, lr=lr)
        state.save(it + 1)
    rm.eval()

    # 4. held-out evaluation
    score = reward_scores(rm, [r["prompt_ids"] for r in heldout], [r["response"] for r in heldout])
    golds = [r["gold"] for r in heldout]
    clear = [(c, r) for c, r in heldout_pairs if golds[c] - golds[r] >= clear_margin]
    length_fn = length_only_predictor(train)
    trivial = {
        "longer_wins": [r["n_tokens"] for r in heldout],
        "shorter_wins": [-r["n_tokens"] for r in heldout],
        "ended_wins": [float(r["ended"]) for r in heldout],
        "length_only": [length_fn(r["n_tokens"]) for r in heldout],
    }
    report = {
        "task": task, "train_pairs": len(train_pairs), "heldout_pairs": len(heldout_pairs),
        "heldout_clear_pairs": len(clear),
        "accuracy": pair_accuracy(heldout_pairs, score), "accuracy_clear": pair_accuracy(clear, score),
        "train_accuracy": pair_accuracy(train_pairs, reward_scores(rm, [r["prompt_ids"] for r in train],
                                                                   [r["response"] for r in train])),
        "per_component": component_accuracy(heldout, score, the_task.components),
        "trivial": {k: {"accuracy": pair_accuracy(heldout_pairs, v), "accuracy_clear": pair_accuracy(clear, v)}
                    for k, v in trivial.items()},
        "spearman_gold": spearman(score, golds), "seconds": time.time() - t_start, "config": config,
    }
    report["best_trivial"] = max(v["accuracy"] for v in report["trivial"].values())
    with atomic_write(os.path.join(out_dir, "rm.json"), "w") as f:
        json.dump(report, f, indent=1)
    # the stage's output last: a run killed before it continues, and rm.json is never missing beside it
    save_policy(rm, os.path.join(out_dir, "rm.pt"), kind="reward_model", layout=layout, task=task, config=config)
    state.finish()
    per = ", ".join(f"{c} {v['accuracy']:.3f} ({v['pairs']})" for c, v in report["per_component"].items())
    print(f"held-out accuracy {report['accuracy']:.3f} on {len(heldout_pairs)} pairs, {report['accuracy_clear']:.3f} "
          f"on {len(clear)} clear pairs (gold margin >= {clear_margin}); best trivial predictor {report['best_trivial']:.3f}; "
          f"Spearman with gold {report['spearman_gold']:.3f}; train accuracy {report['train_accuracy']:.3f}; "
          f"per component: {per}")
    print(f"saved {os.path.join(out_dir, 'rm.pt')} and rm.json ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
