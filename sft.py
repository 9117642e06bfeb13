"""
Instruction fine-tuning (SFT), the first step of RLHF: teach the pre-trained story model to follow
TinyStoriesInstruct-style prompts (instruct.py) rebuilt from the training shards by hindsight relabelling.
The loss covers only the story tokens and the end token; each epoch draws new prompts for the same stories.

    python sft.py --out_dir=out/rlhf/sft                      # CPU: ~3 minutes from the bundled stories260K
    python sft.py --kinds=words,dialogue,length --max_iters=60  # a pilot on some constraints

One GPU: the same command (--device=auto picks CUDA). The model is tiny; several GPUs would not pay.
Writes out_dir/ckpt.pt (train.py's checkpoint layout: `python sample.py` and `train.py --ppo=True` read it)
and out_dir/metrics.jsonl.
"""
import os
import random
import sys
import time

import torch

import configurator
from instruct import KINDS, InstructData
from rlhf import load_policy, make_batch, save_policy
from utils import MetricsLog, cosine_lr, fail, load_tokenizer, pick_device

# -----------------------------------------------------------------------------
init_from = "stories260K/stories260K.pt"  # the pre-trained model
tokenizer = "stories260K/tok512.model"
data_dir = ""  # TinyStories JSON shards (default $DATA_CACHE_DIR/TinyStories_all_data)
out_dir = "out/rlhf/sft"
kinds = ",".join(KINDS)  # the constraints prompts may carry
batch_size = 32
max_iters = 240
learning_rate = 5e-4
min_lr = 5e-5
warmup_iters = 10
weight_decay = 0.0
grad_clip = 1.0
eval_interval = 60  # held-out SFT loss every this many iterations
log_interval = 10
device = "auto"
seed = 1337
# -----------------------------------------------------------------------------
configurator.apply_or_exit(globals(), sys.argv[1:])
config = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, str, bool))}


def main():
    kind_list = [k for k in kinds.split(",") if k]
    if not kind_list or set(kind_list) - set(KINDS):
        fail(f"--kinds must be a comma-separated subset of {','.join(KINDS)}, got {kinds!r}")
    for name in ("batch_size", "max_iters"):
        if globals()[name] < 1:
            fail(f"--{name} must be >= 1, got {globals()[name]}")
    torch.manual_seed(seed)
    try:
        dev = pick_device(device)
        enc = load_tokenizer(tokenizer, 512)
        data = InstructData(enc, data_dir or None, kind_list, seed=seed)
        model = load_policy(init_from, dev)
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    if model.params.vocab_size != enc.n_words:
        fail(f"vocab mismatch: {init_from} has {model.params.vocab_size} tokens, {tokenizer} {enc.n_words}")
    heldout = data.heldout_examples(64)
    optimizer = model.configure_optimizers(weight_decay, learning_rate, (0.9, 0.95), dev.split(":")[0])
    os.makedirs(out_dir, exist_ok=True)
    metrics = MetricsLog(os.path.join(out_dir, "metrics.jsonl"))

    def batches():  # epoch after epoch, each with freshly drawn prompts, shuffled
        epoch = 0
        while True:
            rng = random.Random(epoch)
            ex = data.train_examples(epoch)
            rng.shuffle(ex)
            # batches of similar lengths (sorted within windows of 8 batches), in random order: less padding
            window = 8 * batch_size
            ex = [e for i in range(0, len(ex), window)
                  for e in sorted(ex[i: i + window], key=lambda e: len(e.prompt) + len(e.story_ids))]
            starts = list(range(0, len(ex) - batch_size + 1, batch_size))
            rng.shuffle(starts)
            for i in starts:
                yield epoch, ex[i: i + batch_size]
            epoch += 1

    @torch.no_grad()
    def heldout_loss():
        model.eval()
        losses = [model(*make_batch([e.prompt for e in heldout[i:i + 16]],
                                    [e.story_ids + [enc.bos_id] for e in heldout[i:i + 16]], dev)[:2]).loss.item()
                  for i in range(0, len(heldout), 16)]
        model.train()
        return sum(losses) / len(losses)

    print(f"SFT on {len(data.train_stories)} training stories, constraints {kind_list}, "
          f"{max_iters} iterations of {batch_size}")
    model.train()
    stream = batches()
    t0 = t_start = time.time()
    tokens = 0
    for it in range(max_iters + 1):
        if it % eval_interval == 0 or it == max_iters:
            loss = heldout_loss()
            print(f"iter {it}: held-out SFT loss {loss:.4f}")
            metrics.write(iter=it, heldout_loss=loss)
        if it == max_iters:
            break
        lr = cosine_lr(it, learning_rate, min_lr, warmup_iters, max_iters)
        for g in optimizer.param_groups:
            g["lr"] = lr
        epoch, ex = next(stream)
        inputs, targets, _ = make_batch([e.prompt for e in ex], [e.story_ids + [enc.bos_id] for e in ex], dev)
        loss = model(inputs, targets).loss
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int((targets != -1).sum())
        if it % log_interval == 0:
            dt = time.time() - t_start
            eta = dt / (it + 1) * (max_iters - it - 1)
            print(f"{it} | loss {loss.item():.4f} | lr {lr:.2e} | epoch {epoch} | {tokens / dt:,.0f} story tok/s | "
                  f"eta {eta / 60:.1f} min")
            metrics.write(iter=it, loss=loss.item(), lr=lr, epoch=epoch, time_s=time.time() - t0)
            t0 = time.time()
    path = os.path.join(out_dir, "ckpt.pt")
    save_policy(model, path, config=config, kinds=kind_list)
    print(f"saved {path} ({time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
