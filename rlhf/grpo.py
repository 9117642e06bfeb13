"""
Group-relative policy optimisation (GRPO, Shao et al. 2024) and its REINFORCE-style relatives: no value model;
G stories per prompt, each story's advantage its reward relative to the others of its group, PPO's clipped
surrogate per token (ppo.clipped_policy_loss, the core PPOTrainer uses too).

    python -m rlhf.grpo --policy=out/rlhf/sft/ckpt.pt --reward=gold --out_dir=out/rlhf/grpo_gold
    python -m rlhf.grpo --reward=out/rlhf/rm/rm.pt --out_dir=out/rlhf/grpo_rm      # on the learned reward
    python -m rlhf.grpo --advantage=rloo ...     # RLOO: reward minus the mean of the group's other rewards
    python -m rlhf.grpo --advantage=reinforce    # plain REINFORCE with the batch mean as the baseline
    python -m rlhf.grpo --task=arithmetic --advantage=drgrpo --loss_agg=constant --kl_mode=loss ...  # Dr. GRPO

advantage: grpo (r - mean) / (std + 1e-4) within the group; drgrpo r - mean (Dr. GRPO: no std); rloo; reinforce.
loss_agg: how the per-token loss is reduced (ppo.aggregate): token (the mean over the minibatch's tokens), sequence
(GRPO's paper: each response's mean, then their mean), constant (Dr. GRPO: the sum / (responses x max_gen_len)).
The KL to the initial policy: kl_mode=reward puts k1 in the reward, r - beta * sum_t (log pi - log pi_ref) per
story; kl_mode=loss adds beta x the k3 estimate per token to the loss, aggregated like it (DeepSeek-R1-Zero's
constraint); beta=0: none. ppo_epochs > 1 reuses the rollouts with the ratio clipped to 1 +- cliprange. CPU: ~10 s
per iteration of 64 stories; one GPU: the same command. Writes out_dir/ckpt.pt, ckpt_<iter>.pt every save_interval
(the over-optimisation curve), and metrics.jsonl.
"""
import sys
import time

import torch

import configurator
from ppo import LOSS_AGGREGATIONS, aggregate, clipped_policy_loss, kl_estimate
from rlhf.common import (PromptStream, RunLog, RunState, group_advantages, load_frozen, make_batch, open_reward,
                         open_stage, response_logprobs, reward_scores, sample_stories, train_step)
from utils import cosine_lr, fail, hold_out_dir, repeated_ngram_rate, set_lr

# -----------------------------------------------------------------------------
task = "story"  # story, instruct or arithmetic (the tasks package)
policy = "out/rlhf/sft/ckpt.pt"  # the initial policy and the KL reference
reward = "gold"  # gold (the judge itself) or the path of a reward model (rlhf/reward_model.py's rm.pt)
tokenizer = ""  # the policy's sentencepiece model ("": found next to it or named in its checkpoint)
reference = "stories260K/stories260K.pt"  # story task: the frozen model of gold's fluency component
data_dir = ""
out_dir = "out/rlhf/grpo"
advantage = "grpo"  # grpo, drgrpo, rloo or reinforce
loss_agg = "token"  # token, sequence or constant (ppo.aggregate)
prompts_per_iter = 16
group_size = 4  # G: stories per prompt
max_iters = 20
ppo_epochs = 1
mini_batch_size = 32  # stories per backward
forward_batch_size = 16  # stories per forward, in order of length within a minibatch (>= mini_batch_size: all at once)
cliprange = 0.2
beta = 0.02  # the weight of the KL to the initial policy (0: none)
kl_mode = "reward"  # reward: k1 in the reward; loss: k3 per token in the loss
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 2
grad_clip = 1.0
save_interval = 0  # also keep ckpt_<iter>.pt every this many iterations (0: only the last)
resume_every = 60  # save where the run is (out_dir/state.pt) every this many seconds; 0: every iteration
device = "auto"
compile = "auto"  # compile the rollouts' decode step
seed = 1337
# -----------------------------------------------------------------------------
config = configurator.configure(globals(), sys.argv[1:],
                                positive=("prompts_per_iter", "max_iters", "ppo_epochs", "mini_batch_size",
                                          "forward_batch_size"))


def main():
    if advantage not in ("grpo", "drgrpo", "rloo", "reinforce"):
        fail(f"--advantage must be grpo, drgrpo, rloo or reinforce, got {advantage!r}")
    if loss_agg not in LOSS_AGGREGATIONS:
        fail(f"--loss_agg must be one of {', '.join(LOSS_AGGREGATIONS)}, got {loss_agg!r}")
    if kl_mode not in ("reward", "loss"):
        fail(f"--kl_mode must be reward or loss, got {kl_mode!r}")
    if group_size < 2:
        fail(f"--group_size must be >= 2 (advantages compare a story with its group), got {group_size}")
    if beta < 0:
        fail(f"--beta must be >= 0, got {beta}")
    rm = open_reward(reward, device)  # before the slower opening of the stage: a wrong path fails at once
    dev, enc, the_task, model, decode_fn = open_stage(task, policy, tokenizer, data_dir, device, compile, seed,
                                                      reference, samples=max_iters * prompts_per_iter * group_size,
                                                      config=config)
    ref_model = load_frozen(policy, dev)  # the KL reference: the policy's own checkpoint, already read
    optimizer = model.configure_optimizers(0.0, learning_rate, (0.9, 0.95), dev.split(":")[0])
    hold_out_dir(out_dir)  # one run per folder
    prompts_stream = PromptStream(the_task)  # prompts neither SFT nor the reward model's pool used
    print(f"{advantage} on reward {reward}: {max_iters} iterations of {prompts_per_iter} prompts x {group_size} "
          f"stories, beta {beta} ({kl_mode}), loss over {loss_agg}")
    state = RunState(out_dir, config, resume_every, model=model, optimizer=optimizer, prompts=prompts_stream)
    log = RunLog(out_dir, max_iters, save_interval, state, task=task, config=config)
    for it in range(log.first_iteration(), max_iters + 1):
        t0 = time.time()
        batch_ex = prompts_stream.next(prompts_per_iter)
        samples = sample_stories(model, batch_ex, the_task, group_size, seed=seed + it, decode_fn=decode_fn)
        rollout_s = time.time() - t0
        prompts, responses = [s.example.prompt for s in samples], [s.response for s in samples]
        golds = [s.gold for s in samples]
        scores = golds if rm is None else reward_scores(rm, prompts, responses)
        with torch.no_grad():  # old and reference log-probs per token, in minibatches
            old, ref, kl = [], [], []
            for i in range(0, len(samples), mini_batch_size):
                inputs, targets, _ = make_batch(prompts[i:i + mini_batch_size], responses[i:i + mini_batch_size], dev)
                lp, _ = response_logprobs(model, inputs, targets, forward_batch_size)
                ref.append(response_logprobs(ref_model, inputs, targets, forward_batch_size)[0])
                old.append(lp)
                kl += kl_estimate(lp, ref[-1], "k1").sum(1).tolist()
        rewards = [s - beta * k for s, k in zip(scores, kl)] if kl_mode == "reward" else list(scores)
        adv = group_advantages(rewards, group_size, advantage).to(dev)
        lr = set_lr(optimizer, cosine_lr(it - 1, learning_rate, min_lr, warmup_iters, max_iters))
        model.train()
        losses = []
        for _ in range(ppo_epochs):  # minibatches in sampling order: old log-probs line up with them
            for k, i in enumerate(range(0, len(samples), mini_batch_size)):
                inputs, targets, _ = make_batch(prompts[i:i + mini_batch_size], responses[i:i + mini_batch_size], dev)
                lp, _ = response_logprobs(model, inputs, targets, forward_batch_size)
                mask = (targets != -1).float()
                loss = clipped_policy_loss(lp, old[k][:, : lp.size(1)], adv[i:i + mini_batch_size], mask, cliprange,
                                           loss_agg, the_task.max_gen_len)[0]
                if kl_mode == "loss" and beta:
                    loss = loss + beta * aggregate(kl_estimate(lp, ref[k][:, : lp.size(1)], "k3"), mask, loss_agg,
                                                   the_task.max_gen_len)
                train_step(model, optimizer, loss, grad_clip)
                losses.append(loss.item())
        model.eval()
        n = len(samples)
        row = {"iter": it, "reward": sum(scores) / n, "gold": sum(golds) / n, "kl_sft": sum(kl) / n,
               "length": sum(s.n_tokens for s in samples) / n, "ended": sum(s.ended for s in samples) / n,
               "rep3": sum(repeated_ngram_rate(s.response[:s.n_tokens]) for s in samples) / n,
               "loss": sum(losses) / len(losses), "lr": lr, "rollout_s": rollout_s, "time_s": time.time() - t0,
               **{c: sum(s.components.get(c, 0.0) for s in samples) / n for c in the_task.components},
               **the_task.response_stats([s.story for s in samples])}
        line = (f"{it} | reward {row['reward']:.4f} | gold {row['gold']:.3f} | kl_sft {row['kl_sft']:.2f} | length "
                f"{row['length']:.0f} | rep3 {row['rep3']:.3f} | {row['time_s']:.1f}s (rollout {rollout_s:.1f}s)")
        log.end_iteration(model, it, row, line)


if __name__ == "__main__":
    main()
