"""
Sample stories from a trained model with the KV-cache generator (generate.py).

    python sample.py                                     # out/ckpt.pt, or the bundled stories260K without it
    python sample.py --checkpoint=stories260K/stories260K.pt --tokenizer=stories260K/tok512.model \\
        --temperature=0.0 --max_new_tokens=500          # greedy: the seed's story, byte for byte
    python sample.py --checkpoint=out/ckpt.pt --start="Once upon a time" --num_samples=8 --batch=True
    python sample.py --checkpoint=out/ckpt.pt --start=FILE:prompts.txt   # one prompt per line, batched

Works the same on CPU, CUDA and MPS (--device=auto picks one). --compile=auto (the default) compiles the decode
step (forward and sampling) when the run is long enough to pay for compiling (utils.should_compile);
--compile=True always; a compiled call runs several decode steps where they are small (--tokens_per_call=K sets it).
Stories go to stdout (separated by a line of dashes); speed and settings go to stderr.
"""
import os
import sys
import time
from contextlib import nullcontext

import torch

import configurator
from export import FormatError, load_model
from generate import auto_tokens_per_call, compile_decode, generate_withcache
from tokenizer import find_tokenizer, load_tokenizer
from utils import DTYPES, fail, pick_device, pick_dtype, should_compile

BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stories260K", "stories260K.pt")

# -----------------------------------------------------------------------------
checkpoint = "out/ckpt.pt"  # a .pt, a llama2.c .bin (versions 0-2) or a Hugging Face folder
tokenizer = ""  # default: tok{vocab}.model next to the checkpoint, then data/tok{vocab}.model (or Llama 2's)
start = ""  # prompt text (BOS is always prepended), or FILE:path (with --batch: one prompt per line)
num_samples = 1  # samples per prompt
batch = True  # generate all samples in one batched call (False: one at a time)
max_new_tokens = 256
temperature = 1.0  # 0.0 is greedy; < 1.0 is more conservative, > 1.0 more random
top_k = 300  # keep only the top_k most likely tokens (0: no limit)
top_p = 1.0  # nucleus sampling: keep the smallest set of tokens holding top_p of the mass (1.0: all)
seed = 1337
device = "auto"
dtype = "auto"
compile = "auto"  # torch.compile the decode step: auto = for 8,000 decode steps or more (utils.should_compile)
tokens_per_call = 0  # decode steps per compiled call; 0: auto (4 for small models at small batches, else 1)
# -----------------------------------------------------------------------------
overridden = configurator.apply_or_exit(globals(), sys.argv[1:])


def main():
    ckpt_path = checkpoint
    if "checkpoint" not in overridden and not os.path.exists(ckpt_path) and os.path.exists(BUNDLED):
        print(f"{ckpt_path} not found: sampling from the bundled stories260K ({os.path.relpath(BUNDLED)})",
              file=sys.stderr)
        ckpt_path = BUNDLED
    should_compile(compile, "cpu", "decode", 0)  # refuses a bad --compile before loading
    for name in ("max_new_tokens", "num_samples"):
        if globals()[name] < 1:
            fail(f"--{name} must be >= 1, got {globals()[name]}")
    if tokens_per_call < 0:
        fail(f"--tokens_per_call must be >= 1, or 0 for auto, got {tokens_per_call}")
    try:
        dev = pick_device(device)
        ptdtype = DTYPES[pick_dtype(dtype, dev)]
        model, config = load_model(ckpt_path)
    except (FormatError, ValueError, FileNotFoundError, KeyError, TypeError) as e:
        fail(e)
    model.eval().to(dev)
    if ptdtype != torch.float32 and dev != "cpu":
        model.to(ptdtype)  # inference only: keep weights and cache in the low-precision dtype
    try:
        tok_path = tokenizer or find_tokenizer(model.params.vocab_size, near=ckpt_path, config=config)
        enc = load_tokenizer(tok_path, model.params.vocab_size)
    except (FileNotFoundError, ValueError) as e:
        fail(e)

    if start.startswith("FILE:"):
        try:
            with open(start[5:], encoding="utf-8") as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()] or [""]
        except OSError as e:
            fail(f"cannot read prompts from {start[5:]}: {e.strerror}")
    else:
        prompts = [start]
    prompt_tokens = [enc.encode(p, bos=True, eos=False) for p in prompts for _ in range(num_samples)]

    torch.manual_seed(seed)
    generator = torch.Generator(device=dev).manual_seed(seed) if dev != "mps" else None
    stop = [t for t in (enc.bos_id, enc.eos_id) if t >= 0]  # a TinyStories story ends where the next begins
    groups = [prompt_tokens] if batch else [[p] for p in prompt_tokens]
    use_compile = should_compile(compile, dev, "decode", len(groups) * max_new_tokens)
    decode_fn = compile_decode(model) if use_compile else None
    per_call = tokens_per_call or (auto_tokens_per_call(model, len(groups[0])) if use_compile else 1)
    outputs, t0 = [], time.time()
    try:
        with torch.autocast(device_type="cuda", dtype=ptdtype) if dev.startswith("cuda") and ptdtype != torch.float32 \
                else nullcontext():
            for group in groups:
                outputs += generate_withcache(model, group, max_new_tokens, temperature=temperature, top_k=top_k,
                                              top_p=top_p, eos_id=stop, echo=False, device=dev,
                                              decode_fn=decode_fn, generator=generator,
                                              tokens_per_call=per_call)
    except ValueError as e:
        fail(e)
    dt = time.time() - t0
    for i, (p, out) in enumerate(zip(prompt_tokens, outputs)):
        if i:
            print("---------------")
        print(enc.decode(p + out))
    n_tokens = sum(len(o) for o in outputs)
    print(f"[{len(outputs)} samples, {n_tokens} tokens in {dt:.2f}s: {n_tokens / dt:,.0f} tok/s on {dev}"
          f"{', compiled (the time includes compiling)' if use_compile else ''}"
          f"{f', {per_call} tokens per call' if per_call > 1 else ''}]",
          file=sys.stderr)


if __name__ == "__main__":
    main()
