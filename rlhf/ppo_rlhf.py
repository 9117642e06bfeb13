"""
PPO on the RLHF chain's tasks (the seed's step 3 with a learned reward): ppo.PPOTrainer (TRL's legacy PPO, with a
value head, GAE, the clipped policy and value losses) on the task's training prompts, each rollout scored by a
reward model (rlhf/reward_model.py) or by gold itself; the KL reference is the SFT policy, read by path. The
seed's own length experiment stays in `python train.py --ppo=True`.

    python -m rlhf.ppo_rlhf --policy=out/rlhf/sft/ckpt.pt --reward=out/rlhf/rm/rm.pt --out_dir=out/rlhf/ppo_rm
    python -m rlhf.ppo_rlhf --reward=gold ...        # on the gold judge (no proxy)
    python -m rlhf.ppo_rlhf --init_kl_coef=0 ...     # no KL: the proxy alone

CPU: ~12 s per iteration of 64 rollouts; one GPU: the same command. Writes out_dir/ckpt.pt (the policy after
max_iters), ckpt_<iter>.pt every save_interval (the over-optimisation curve), and metrics.jsonl (one line per
iteration: reward, gold, KL to the reference, length, the PPO statistics).
"""
import sys
import time

import torch

import configurator
from generate import compile_decode
from ppo import PPOConfig, PPOTrainer, ppo_iteration
from rlhf.common import (PromptStream, RunLog, RunState, load_frozen, load_policy, open_reward, open_stage,
                         reward_scores)
from tasks.common import gold_of
from utils import cosine_lr, fail, hold_out_dir, set_lr, should_compile

# -----------------------------------------------------------------------------
task = "story"  # story, instruct or arithmetic (the tasks package)
policy = "out/rlhf/sft/ckpt.pt"  # the initial policy, and the KL reference unless kl_reference says otherwise
kl_reference = ""  # the frozen model of the KL penalty ("" = policy)
reward = "gold"  # gold (the judge itself) or the path of a reward model (rlhf/reward_model.py's rm.pt)
tokenizer = ""  # the policy's sentencepiece model ("": found next to it or named in its checkpoint)
reference = "stories260K/stories260K.pt"  # story task: the frozen model of gold's fluency component
data_dir = ""
out_dir = "out/rlhf/ppo"
rollouts = 64  # rollouts per iteration, each on its own prompt
mini_batch_size = 32
forward_batch_size = 16  # rollouts per forward, in order of length within a minibatch (PPOConfig)
ppo_epochs = 2
max_iters = 12
learning_rate = 1e-4
min_lr = 1e-5
weight_decay = 0.0
beta2 = 0.99
init_kl_coef = 0.05
adap_kl_ctrl = False
kl_penalty = "kl"  # the per-token KL estimator (ppo.kl_estimate)
kl_mode = "loss"  # loss: the k3 KL in the loss (no pressure towards shorter stories); reward: TRL's -beta * KL per token
lam = 1.0
vf_coef = 0.1
detach_value = True  # the value loss trains the value head only, never the policy's trunk (it drove the KL up)
cliprange = 0.2
grad_clip = 1.0  # PPOConfig.max_grad_norm (0: no clipping)
save_interval = 0  # also keep ckpt_<iter>.pt every this many iterations (0: only the last)
resume_every = 60  # save where the run is (out_dir/state.pt) every this many seconds; 0: every iteration
device = "auto"
compile = "auto"  # compile the rollouts' decode step
seed = 1337  # the value head's initialisation; iteration i samples its rollouts from seed + i
# -----------------------------------------------------------------------------
config = configurator.configure(globals(), sys.argv[1:], positive=("max_iters",))


def main():
    try:
        ppoconf = PPOConfig(seed=seed, adap_kl_ctrl=adap_kl_ctrl, init_kl_coef=init_kl_coef, kl_penalty=kl_penalty,
                            kl_mode=kl_mode, lam=lam, vf_coef=vf_coef, cliprange=cliprange, batch_size=rollouts,
                            mini_batch_size=mini_batch_size, forward_batch_size=forward_batch_size, ppo_epochs=ppo_epochs,
                            max_grad_norm=grad_clip or None)
    except ValueError as e:
        fail(e)
    rm = open_reward(reward, device)  # before the slower opening of the stage: a wrong path fails at once
    dev, enc, the_task, _, _ = open_stage(task, policy, tokenizer, data_dir, device, False, seed, reference,
                                          config=config)
    try:
        # after open_stage has seeded the RNG: the fresh value head's initialisation is reproducible
        model = load_policy(policy, dev, value_head=True)
        model.detach_value = detach_value
        ref_model = load_frozen(kl_reference or policy, dev)
    except (FileNotFoundError, ValueError, KeyError) as e:
        fail(e)
    if ref_model.params.vocab_size != model.params.vocab_size:
        fail(f"vocab mismatch: {kl_reference} has {ref_model.params.vocab_size} tokens, {policy} "
             f"{model.params.vocab_size}")
    # the rollouts: one batch, up to max_gen_len decode calls per iteration
    decode_fn = compile_decode(model) if should_compile(compile, dev, "decode", max_iters * the_task.max_gen_len) \
        else None
    optimizer = model.configure_optimizers(weight_decay, learning_rate, (0.9, beta2), dev.split(":")[0])
    trainer = PPOTrainer(ppoconf, model, ref_model, optimizer)
    stream = PromptStream(the_task)
    hold_out_dir(out_dir)  # one run per folder
    print(f"PPO on reward {reward}: {max_iters} iterations of {rollouts} rollouts, kl_coef {init_kl_coef} "
          f"({kl_mode})")
    state = RunState(out_dir, config, resume_every, model=model, optimizer=optimizer, prompts=stream, trainer=trainer)
    log = RunLog(out_dir, max_iters, save_interval, state, task=task, config=config)
    t_start = log.t_start
    for it in range(log.first_iteration(), max_iters + 1):
        examples = stream.next(rollouts)

        def score_fn(responses, ended):
            components = the_task.score(examples, responses)
            golds = [gold_of(c) for c in components]
            n = len(golds)
            texts = [the_task.story_text(e, r[:-1] if r[-1:] == [enc.bos_id] else r)
                     for e, r in zip(examples, responses)]
            per_task = {**{c: sum(x.get(c, 0.0) for x in components) / n for c in the_task.components},
                        **the_task.response_stats(texts)}  # the task's own means, logged as they are named
            task_stats = {"gold_mean": sum(golds) / n, **{f"task/{k}": v for k, v in per_task.items()},
                          # length_mean counts the prompt too (the seed's story length); this, the response alone
                          "response_length_mean": sum(len(r) - e for r, e in zip(responses, ended)) / n}
            if rm is None:
                return golds, task_stats
            scores = reward_scores(rm, [e.prompt for e in examples], responses)
            return scores, {**task_stats, "rm_score_mean": sum(scores) / n}

        lr = set_lr(optimizer, cosine_lr(it - 1, learning_rate, min_lr, 0, max_iters))
        torch.manual_seed(seed + it)  # the rollouts' sampling
        stats = ppo_iteration(trainer, model, [e.prompt for e in examples], None, the_task.max_gen_len,
                              stop_id=enc.bos_id, decode_fn=decode_fn, score_fn=score_fn)
        model.eval()
        row = {"iter": it, "reward_mean": stats["reward_mean"], "gold_mean": stats["gold_mean"],
               "kl_ref": stats["ppo/kl_ref"], "length_mean": stats["length_mean"],
               "response_length_mean": stats["response_length_mean"], "ended_frac": stats["ended_frac"],
               "entropy": stats["objective/entropy"], "rep3_rate": stats["rep3_rate"], "lr": lr,
               "kl_coef": stats["objective/kl_coef"], "value_error": stats["ppo/val/error"],
               "clipfrac": stats["ppo/policy/clipfrac"], "time_s": time.time() - t_start,
               **{k.removeprefix("task/"): v for k, v in stats.items() if k.startswith("task/")}}
        line = (f"{it} | reward {row['reward_mean']:.4f} | gold {row['gold_mean']:.3f} | kl_ref {row['kl_ref']:.2f} | "
                f"length {row['length_mean']:.0f} | ended {row['ended_frac']:.2f} | entropy {row['entropy']:.0f} | "
                f"rollout {stats['rollout_s']:.1f}s")
        log.end_iteration(model, it, row, line)


if __name__ == "__main__":
    main()
