"""
Direct Preference Optimisation (Rafailov et al. 2023), the seed's "simpler alternative" to a reward model and
PPO: train the policy on the reward model's preference pairs directly,
    loss = -logsigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)))),
with the SFT model as the frozen reference (its log-probs computed once, before training).

    python -m rlhf.dpo --policy=out/rlhf/sft/ckpt.pt --pairs=out/rlhf/rm/pool_train.jsonl --out_dir=out/rlhf/dpo

CPU: ~2 minutes; one GPU: the same command. Logs the chosen/rejected log-probs, the implicit rewards' margin
and accuracy; writes out_dir/ckpt.pt and metrics.jsonl.
"""
import os
import sys
import time

import torch

import configurator
from rlhf.common import (TASKS, RunState, dpo_loss, load_frozen, load_policy, make_batch, open_tokenizer,
                         preference_pairs, response_logprobs, save_policy, sequence_logprobs, shuffled_batches,
                         train_step)
from utils import MetricsLog, cosine_lr, fail, hold_out_dir, pick_device, read_jsonl, set_lr

# -----------------------------------------------------------------------------
task = "story"  # story or instruct (the tasks package): the task the pool was sampled on
policy = "out/rlhf/sft/ckpt.pt"  # the SFT policy: the initial policy and the frozen reference
tokenizer = ""  # recorded with the policy for the next stage ("": found next to the policy or named in its checkpoint)
pairs = "out/rlhf/rm/pool_train.jsonl"  # the pool rlhf/reward_model.py sampled; its gold-labelled pairs
out_dir = "out/rlhf/dpo"
beta = 0.1
min_margin = 0.1  # use only pairs whose gold differs by more than this (near-ties are mostly sampling noise)
batch_size = 16  # pairs per step
epochs = 2  # over the pairs (two measured best: docs/rlhf-chain.md, "What was measured along the way")
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 5
grad_clip = 1.0
device = "auto"
seed = 1337
resume_every = 60  # save where the run is (out_dir/state.pt) every this many seconds; 0: every iteration
# -----------------------------------------------------------------------------
config = configurator.configure(globals(), sys.argv[1:], positive=("beta", "batch_size", "epochs"))


def main():
    if task not in TASKS:
        fail(f"unknown task {task!r}: use --task=story or --task=instruct")
    torch.manual_seed(seed)
    try:
        dev = pick_device(device)
        records = read_jsonl(pairs)
        model = load_policy(policy, dev)
        reference = load_frozen(policy, dev)
        config["tokenizer"] = open_tokenizer(tokenizer, policy, model.params.vocab_size).model_path
    except (FileNotFoundError, ValueError, KeyError) as e:
        fail(e)
    chosen_rejected = [(c, r) for c, r in preference_pairs(records)
                       if records[c]["gold"] - records[r]["gold"] > min_margin]
    if len(chosen_rejected) < batch_size:
        fail(f"{pairs} gives {len(chosen_rejected)} preference pairs, fewer than --batch_size={batch_size}")
    prompts = [r["prompt_ids"] for r in records]
    responses = [r["response"] for r in records]
    hold_out_dir(out_dir)  # one run per folder
    t_start = time.time()
    ref_lp = sequence_logprobs(reference, prompts, responses)  # once: the reference never changes
    del reference
    print(f"DPO on {len(chosen_rejected)} pairs, beta {beta}; reference log-probs in {time.time() - t_start:.0f} s")

    metrics = MetricsLog(os.path.join(out_dir, "metrics.jsonl"))
    optimizer = model.configure_optimizers(0.0, learning_rate, (0.9, 0.95), dev.split(":")[0])
    steps = epochs * (len(chosen_rejected) // batch_size)
    state = RunState(out_dir, config, resume_every, model=model, optimizer=optimizer)
    start = state.restore(metrics) or 0
    model.train()
    t0 = time.time()
    for it, batch in shuffled_batches(chosen_rejected, batch_size, epochs, seed):
        if it < start:  # a stopped run's steps
            continue
        lr = set_lr(optimizer, cosine_lr(it, learning_rate, min_lr, warmup_iters, steps))
        idx = [c for c, _ in batch] + [r for _, r in batch]
        inputs, targets, _ = make_batch([prompts[j] for j in idx], [responses[j] for j in idx], dev)
        lp = response_logprobs(model, inputs, targets)[1]
        ref = torch.tensor([ref_lp[j] for j in idx], device=dev)
        n = len(batch)
        losses, chosen_reward, rejected_reward = dpo_loss(lp[:n], lp[n:], ref[:n], ref[n:], beta)
        loss = losses.mean()
        train_step(model, optimizer, loss, grad_clip)
        if it % 10 == 0:
            margin = (chosen_reward - rejected_reward).mean().item()
            acc = (chosen_reward > rejected_reward).float().mean().item()
            eta = (time.time() - t0) / (it + 1 - start) * (steps - it - 1)
            print(f"{it}/{steps} | loss {loss.item():.4f} | margin {margin:.3f} | acc {acc:.2f} | "
                  f"logp chosen {lp[:n].mean().item():.1f} rejected {lp[n:].mean().item():.1f} | eta {eta / 60:.1f} min")
            metrics.write(iter=it, loss=loss.item(), margin=margin, reward_acc=acc, lr=lr,
                          logp_chosen=lp[:n].mean().item(), logp_rejected=lp[n:].mean().item(),
                          reward_chosen=chosen_reward.mean().item(), reward_rejected=rejected_reward.mean().item())
        state.save(it + 1)
    path = os.path.join(out_dir, "ckpt.pt")
    save_policy(model, path, task=task, config=config)
    state.finish()
    print(f"saved {path} ({time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
