"""
Generation speed beside llama.cpp: the same weights exported to GGUF (export.py) and run by llama.cpp through
llama-cpp-python, against this repository's KV-cache generator (eager and with the decode step compiled) and Hugging
Face `LlamaForCausalLM.generate`. Greedy, 256 new tokens from BOS, batch 1 (llama-cpp-python decodes one sequence),
tokens/s, median of 5, all in one run, each side with its default flags and with its best: ours with the decode
steps per compiled call chosen automatically and with the fastest of 1, 2, 4; llama.cpp with its defaults (fp16 KV
cache) and with the fastest of flash attention and an fp32 KV cache. Also checks that llama.cpp's greedy tokens are
ours, token for token.

    pip install gguf llama-cpp-python transformers   # llama-cpp-python builds llama.cpp from source (~10 min on 2 cores)
    python bench/bench_llama_cpp.py                  # stories260K (bundled) and a 15M model (random weights)

The 15M row needs a 32000-token sentencepiece model (--tokenizer_32k, default Llama 2's tokenizer.model at the
repository root, where vocab_source=llama2 looks for it) to embed in its GGUF; without it the row is left out.
"""
import argparse
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_generate import CONFIGS, hf_model  # noqa: E402
from common import median_rate, print_table  # noqa: E402
from export import export_gguf, load_model  # noqa: E402
from generate import compile_decode, generate_withcache  # noqa: E402
from model import Transformer  # noqa: E402

NEW = 256


def llama_cpp_tokens(llm, bos, n):
    out = []
    for tok in llm.generate([bos], temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        out.append(tok)
        if len(out) == n:
            return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokenizer_32k", default=os.path.join(ROOT, "tokenizer.model"))
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("error: needs llama-cpp-python: pip install llama-cpp-python (builds llama.cpp from source)")
    models = {"260K (stories260K)": (load_model(os.path.join(ROOT, "stories260K", "stories260K.pt"))[0],
                                     os.path.join(ROOT, "stories260K", "tok512.model"))}
    if os.path.exists(args.tokenizer_32k):
        torch.manual_seed(0)
        models["15M (random weights)"] = (Transformer(CONFIGS["15M"]).eval(), args.tokenizer_32k)
    threads = torch.get_num_threads()
    # llama.cpp's settings: its defaults (fp16 KV cache), and the best of a few it offers for this kind of run
    best_flags = {"flash attention": dict(flash_attn=True), "fp32 KV cache": dict(type_k=0, type_v=0),
                  "both": dict(flash_attn=True, type_k=0, type_v=0)}
    rows, agree, best_names = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, tok) in models.items():
            path = os.path.join(tmp, "m.gguf")
            export_gguf(model, path, tok)

            def llama(**flags):
                return llama_cpp.Llama(model_path=path, n_ctx=NEW + 8, n_threads=threads, verbose=False, **flags)
            ours = generate_withcache(model, [[1]], NEW, temperature=0.0)[0]
            compiled = compile_decode(model)

            def ours_compiled(k):
                return median_rate(lambda: generate_withcache(model, [[1]], NEW, temperature=0.0, decode_fn=compiled,
                                                              tokens_per_call=k), NEW, args.runs)
            for k in (None, 1, 2, 4):  # compile each, untimed (None: the default, chosen automatically)
                generate_withcache(model, [[1]], NEW, temperature=0.0, decode_fn=compiled, tokens_per_call=k)
            eager = median_rate(lambda: generate_withcache(model, [[1]], NEW, temperature=0.0), NEW, args.runs)
            default = ours_compiled(None)
            per_k = {k: ours_compiled(k) for k in (1, 2, 4)}
            k_best = max(per_k, key=per_k.get)
            hf = hf_model(model)
            hf_rate = median_rate(lambda: hf.generate(torch.tensor([[1]]), max_new_tokens=NEW, min_new_tokens=NEW,
                                                      do_sample=False), NEW, args.runs)
            # llama.cpp only now: an open llama.cpp context keeps threads that would slow the timings above
            llm = llama()
            theirs = llama_cpp_tokens(llm, 1, NEW)
            same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
            agree.append(f"{name}: {'identical' if same is None else f'first differs at token {same}'} "
                         f"({len(theirs)} tokens)")
            cpp_default = median_rate(lambda: llama_cpp_tokens(llm, 1, NEW), NEW, args.runs)
            llm.close()
            cpp_best, flags_best = cpp_default, "defaults"
            for flags_name, flags in best_flags.items():
                other = llama(**flags)
                rate = median_rate(lambda: llama_cpp_tokens(other, 1, NEW), NEW, args.runs)
                other.close()
                if rate > cpp_best:
                    cpp_best, flags_best = rate, flags_name
            best_names.append(f"{name}: ours {k_best} tokens/call, llama.cpp {flags_best}")
            rows.append([name, f"{eager:,.0f}", f"{default:,.0f}", f"{per_k[k_best]:,.0f}", f"{hf_rate:,.0f}",
                         f"{cpp_default:,.0f}", f"{cpp_best:,.0f}", f"{default / cpp_default:.2f}x",
                         f"{per_k[k_best] / cpp_best:.2f}x", f"{cpp_default / hf_rate:.2f}x"])
            print(" | ".join(rows[-1]), flush=True)
    print_table(f"Greedy generation, batch 1, {NEW} new tokens from BOS, tokens/s (median of {args.runs}); llama.cpp "
                f"as vendored by llama-cpp-python {llama_cpp.__version__} ({threads} threads, fp32 GGUF)",
                ["model", "ours, eager", "ours, compiled, default flags", "ours, compiled, best flags", "HF generate",
                 "llama.cpp, default flags", "llama.cpp, best flags", "ours / llama.cpp, default flags",
                 "ours / llama.cpp, best flags", "llama.cpp / HF"], rows)
    print("\nbest flags: " + "; ".join(best_names))
    print("llama.cpp's greedy tokens against ours: " + "; ".join(agree))


if __name__ == "__main__":
    main()
