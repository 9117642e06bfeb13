"""
Generation speed: this repo's KV-cache generator (eager, and with the decode step compiled) against the plain
no-cache loop and Hugging Face `LlamaForCausalLM.generate` with the same weights, greedy, 256 new tokens from
a 1-token prompt, at batch 1 and 32, for the 260K and 15M configurations. The compiled generator runs with 1
and with 4 decode steps per compiled call. Prints medians, ratios and the first (compiling) call's time.

    python bench/bench_generate.py            # about 20 minutes on 2 CPU cores (half of it compiling); needs transformers
    python bench/bench_generate.py --quick --tokens_per_call=1    # fewer runs, one compiled column
"""
import argparse
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import median_rate, print_table  # noqa: E402
from generate import compile_decode, generate, generate_withcache  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402

CONFIGS = {
    "260K": ModelArgs(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=4, max_seq_len=512),
    "15M": ModelArgs(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=32000, multiple_of=32, max_seq_len=256),
}
NEW = 256


def hf_model(model):
    import transformers
    from export import hf_config, to_hf_state_dict
    cfg = transformers.LlamaConfig(**{k: v for k, v in hf_config(model.params, tied=True).items()
                                      if k not in ("architectures", "torch_dtype", "dtype")})
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.load_state_dict(to_hf_state_dict(model), strict=False)
    hf.tie_weights()
    return hf


def peak_rss_of_generation():
    """Run in a child process: peak RSS growth of batch-32 15M generation vs the model + cache bytes."""
    code = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
from generate import generate_withcache
from model import ModelArgs, Transformer
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS: imports are not generation
base = status("VmRSS:")
args = ModelArgs(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=32000, multiple_of=32, max_seq_len=256)
model = Transformer(args).eval()
generate_withcache(model, [[1]] * 32, {NEW - 1}, temperature=0.0)
cache = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "kv_cache" in n)
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(status("VmHWM:") - base, weights, cache)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return [int(x) for x in out]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 timed run instead of 3")
    parser.add_argument("--configs", default="260K,15M")
    parser.add_argument("--tokens_per_call", default="1,4", help="compiled columns: decode steps per compiled call")
    args = parser.parse_args()
    runs = 1 if args.quick else 3
    per_call = [int(k) for k in args.tokens_per_call.split(",")]
    try:
        import transformers  # noqa: F401
        have_hf = True
    except ImportError:
        have_hf = False
        print("transformers is not installed: the Hugging Face column is skipped (pip install transformers)")
    rows, compile_times = [], []
    for name in args.configs.split(","):
        torch.manual_seed(0)
        model = Transformer(CONFIGS[name]).eval()
        hf = hf_model(model) if have_hf else None
        compiled = compile_decode(model)
        for batch in (1, 32):
            prompts = [[1]] * batch
            work = NEW * batch
            eager = median_rate(lambda: generate_withcache(model, prompts, NEW, temperature=0.0), work, runs)
            comp = []
            for k in per_call:
                def run_compiled():
                    generate_withcache(model, prompts, NEW, temperature=0.0, decode_fn=compiled, tokens_per_call=k)
                t0 = time.perf_counter()
                run_compiled()  # compiles (or loads from torch's on-disk cache)
                compile_times.append(f"{name} batch {batch}, {k}/call: {time.perf_counter() - t0:.0f} s")
                comp.append(median_rate(run_compiled, work, runs, warmup=0))
            idx = torch.ones(batch, 1, dtype=torch.long)
            plain = median_rate(lambda: generate(model, idx, 64, temperature=0.0), 64 * batch, 1, warmup=0)
            row = [name, batch, f"{plain:,.0f}", f"{eager:,.0f}"] + [f"{c:,.0f}" for c in comp]
            if hf is not None:
                def run_hf():
                    with torch.inference_mode():
                        hf.generate(idx, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, use_cache=True,
                                    pad_token_id=0)
                hf_rate = median_rate(run_hf, work, runs)
                row += [f"{hf_rate:,.0f}"] + [f"{c / hf_rate:.2f}x" for c in comp]
            row += [f"{comp[0] / plain:.1f}x"]
            rows.append(row)
            print(" | ".join(map(str, row)), flush=True)
    header = ["model", "batch", "plain generate (first 64)", "KV cache, eager"]
    header += [f"compiled, {k} token{'s' if k > 1 else ''}/call" for k in per_call]
    if have_hf:
        header += ["HF generate"] + [f"{k}/call / HF" for k in per_call]
    header += [f"{per_call[0]}/call / plain"]
    print_table(f"Greedy generation, {NEW} new tokens from a 1-token prompt, tokens/s (median of {runs})", header, rows)
    print("\nfirst call (compile, or load from the on-disk cache): " + "; ".join(compile_times))
    grown, weights, cache = peak_rss_of_generation()
    print(f"\nmemory, 15M batch 32: peak RSS grew {grown / 2**20:.1f} MiB for {weights / 2**20:.1f} MiB of weights + "
          f"{cache / 2**20:.1f} MiB of KV cache = {grown / (weights + cache):.2f}x")


if __name__ == "__main__":
    main()
