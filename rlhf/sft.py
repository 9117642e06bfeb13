"""
Supervised fine-tuning (SFT), the first step of RLHF ("instruction fine-tuning" as InstructGPT did it:
demonstrations of what is preferred). On the story task (--task=story, tasks/story.py) the demonstrations are real
training stories continuing their own prompts, keeping the top_fraction of them by gold; on the instruction task
(--task=instruct) every story with prompts rebuilt from it. The loss covers only the continuation and its end token.

    python -m rlhf.sft --out_dir=out/rlhf/sft                           # CPU: ~3 minutes from the bundled stories260K
    python -m rlhf.sft --task=instruct --out_dir=out/rlhf_instruct/sft  # the instruction task

One GPU: the same command (--device=auto picks CUDA). The model is tiny; several GPUs would not pay.
Writes out_dir/ckpt.pt (train.py's checkpoint layout: `python sample.py` reads it), out_dir/sft_data.json (which
stories were kept, with their gold) and out_dir/metrics.jsonl.
"""
import json
import os
import random
import sys
import time

import torch

import configurator
from rlhf.common import RunState, make_batch, open_stage, save_policy, train_step
from tasks.common import gold_of
from tasks.instruct import KINDS
from utils import MetricsLog, atomic_write, cosine_lr, fail, hold_out_dir, set_lr

# -----------------------------------------------------------------------------
task = "story"  # story or instruct (the tasks package)
policy = "stories260K/stories260K.pt"  # the pre-trained model
tokenizer = ""  # the policy's sentencepiece model ("": found next to it or named in its checkpoint)
reference = "stories260K/stories260K.pt"  # story task: the frozen model of gold's fluency component
data_dir = ""  # TinyStories JSON shards (default $DATA_CACHE_DIR/TinyStories_all_data)
out_dir = "out/rlhf/sft"
top_fraction = 0.3  # keep this fraction of the training stories, the best by gold (1.0: all)
kinds = ",".join(KINDS)  # instruct: the constraints prompts may carry
batch_size = 32
max_iters = 80
learning_rate = 5e-4
min_lr = 5e-5
warmup_iters = 5
weight_decay = 0.0
grad_clip = 1.0
eval_interval = 40  # held-out SFT loss every this many iterations
log_interval = 10
device = "auto"
seed = 1337
resume_every = 60  # save where the run is (out_dir/state.pt) every this many seconds; 0: every iteration
# -----------------------------------------------------------------------------
config = configurator.configure(globals(), sys.argv[1:], positive=("batch_size", "max_iters"))


def demonstration(enc, e):
    return e.target + [enc.bos_id]


def main():
    if not 0 < top_fraction <= 1:
        fail(f"--top_fraction must be in (0, 1], got {top_fraction}")
    kind_list = [k for k in kinds.split(",") if k]
    if not kind_list or set(kind_list) - set(KINDS):
        fail(f"--kinds must be a comma-separated subset of {','.join(KINDS)}, got {kinds!r}")
    dev, enc, the_task, model, _ = open_stage(task, policy, tokenizer, data_dir, device, False, seed, reference,
                                              config=config)
    if task == "instruct":
        the_task.data.kinds = tuple(kind_list)
    t_start = time.time()

    # the demonstrations: the training stories whose real continuation scores best by gold (epoch 0's prompts;
    # a continuation longer than the budget is judged as the policy's would be: cut there, not ended)
    first = the_task.train_examples(0)
    budget = the_task.max_gen_len
    judged = [e.target[:budget] + ([enc.bos_id] if len(e.target) < budget else []) for e in first]
    golds = [gold_of(c) for c in the_task.score(first, judged)]
    order = sorted(range(len(first)), key=lambda i: -golds[i])
    keep = sorted(order[: max(batch_size, round(top_fraction * len(first)))])
    kept_gold = sum(golds[i] for i in keep) / len(keep)
    print(f"SFT on {len(keep)} of {len(first)} training stories (top {top_fraction:.0%} by gold: mean gold "
          f"{kept_gold:.3f}, all {sum(golds) / len(golds):.3f}; {time.time() - t_start:.0f} s), {max_iters} "
          f"iterations of {batch_size}")
    hold_out_dir(out_dir)  # one run per folder
    with atomic_write(os.path.join(out_dir, "sft_data.json"), "w") as f:
        json.dump({"kept": len(keep), "of": len(first), "kept_gold": kept_gold,
                   "all_gold": sum(golds) / len(golds)}, f, indent=1)
    heldout = the_task.heldout_examples(64)
    optimizer = model.configure_optimizers(weight_decay, learning_rate, (0.9, 0.95), dev.split(":")[0])
    metrics = MetricsLog(os.path.join(out_dir, "metrics.jsonl"))

    def batches():  # epoch after epoch, each with freshly drawn prompts for the kept stories, shuffled
        epoch = 0
        while True:
            rng = random.Random(epoch)
            ex = the_task.train_examples(epoch)
            ex = [ex[i] for i in keep]
            rng.shuffle(ex)
            for i in range(0, len(ex) - batch_size + 1, batch_size):
                yield epoch, ex[i: i + batch_size]
            epoch += 1

    @torch.no_grad()
    def heldout_loss():
        model.eval()
        losses = [model(*make_batch([e.prompt for e in heldout[i:i + 16]],
                                    [demonstration(enc, e) for e in heldout[i:i + 16]], dev)[:2]).loss.item()
                  for i in range(0, len(heldout), 16)]
        model.train()
        return sum(losses) / len(losses)

    state = RunState(out_dir, config, resume_every, model=model, optimizer=optimizer)
    start = state.restore(metrics) or 0
    model.train()
    stream = batches()
    for _ in range(start):  # the batches a stopped run already trained on
        next(stream)
    t0 = time.time()
    tokens = 0
    for it in range(start, max_iters + 1):
        if it % eval_interval == 0 or it == max_iters:
            loss = heldout_loss()
            print(f"iter {it}: held-out SFT loss {loss:.4f}")
            metrics.write(iter=it, heldout_loss=loss)
        if it == max_iters:
            break
        lr = set_lr(optimizer, cosine_lr(it, learning_rate, min_lr, warmup_iters, max_iters))
        epoch, ex = next(stream)
        inputs, targets, _ = make_batch([e.prompt for e in ex], [demonstration(enc, e) for e in ex], dev)
        loss = model(inputs, targets).loss
        train_step(model, optimizer, loss, grad_clip)
        tokens += int((targets != -1).sum())
        if it % log_interval == 0:
            dt = time.time() - t0
            eta = dt / (it + 1 - start) * (max_iters - it - 1)
            print(f"{it} | loss {loss.item():.4f} | lr {lr:.2e} | epoch {epoch} | {tokens / dt:,.0f} tok/s | "
                  f"eta {eta / 60:.1f} min")
            metrics.write(iter=it, loss=loss.item(), lr=lr, epoch=epoch, time_s=time.time() - t_start)
        state.save(it + 1)
    path = os.path.join(out_dir, "ckpt.pt")
    save_policy(model, path, config=config, task=task, kinds=kind_list)
    state.finish()
    print(f"saved {path} ({time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
