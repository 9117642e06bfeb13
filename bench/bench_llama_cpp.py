"""
Generation speed beside llama.cpp: the same weights exported to GGUF (export.py) and run by llama.cpp through
llama-cpp-python, against this repository's KV-cache generator (eager and with the decode step compiled) and Hugging
Face `LlamaForCausalLM.generate`. Greedy, 256 new tokens from BOS, batch 1 (llama-cpp-python decodes one sequence),
tokens/s, median of 3, all in one run. Also checks that llama.cpp's greedy tokens are ours, token for token.

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
    parser.add_argument("--runs", type=int, default=3)
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
    rows, agree = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, tok) in models.items():
            path = os.path.join(tmp, "m.gguf")
            export_gguf(model, path, tok)
            llm = llama_cpp.Llama(model_path=path, n_ctx=NEW + 8, n_threads=threads, n_batch=64, verbose=False)
            ours = generate_withcache(model, [[1]], NEW, temperature=0.0)[0]
            theirs = llama_cpp_tokens(llm, 1, NEW)
            same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
            agree.append(f"{name}: {'identical' if same is None else f'first differs at token {same}'} "
                         f"({len(theirs)} tokens)")
            compiled = compile_decode(model)
            generate_withcache(model, [[1]], NEW, temperature=0.0, decode_fn=compiled)  # compile once, untimed
            hf = hf_model(model)
            rates = [median_rate(lambda: generate_withcache(model, [[1]], NEW, temperature=0.0), NEW, args.runs),
                     median_rate(lambda: generate_withcache(model, [[1]], NEW, temperature=0.0, decode_fn=compiled),
                                 NEW, args.runs),
                     median_rate(lambda: hf.generate(torch.tensor([[1]]), max_new_tokens=NEW, min_new_tokens=NEW,
                                                     do_sample=False), NEW, args.runs),
                     median_rate(lambda: llama_cpp_tokens(llm, 1, NEW), NEW, args.runs)]
            llm.close()
            rows.append([name] + [f"{r:,.0f}" for r in rates]
                        + [f"{rates[3] / rates[1]:.2f}x", f"{rates[3] / rates[2]:.2f}x"])
    print_table(f"Greedy generation, batch 1, {NEW} new tokens from BOS, tokens/s (median of {args.runs}); llama.cpp "
                f"as vendored by llama-cpp-python {llama_cpp.__version__} ({threads} threads, fp32 GGUF, its default "
                f"settings: fp16 KV cache)",
                ["model", "ours, eager", "ours, compiled", "HF generate", "llama.cpp", "llama.cpp / ours compiled",
                 "llama.cpp / HF"], rows)
    print("\nllama.cpp's greedy tokens against ours: " + "; ".join(agree))


if __name__ == "__main__":
    main()
