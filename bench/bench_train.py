"""
Training throughput: tokens/s of one forward + backward + AdamW step, this repository's model against the
seed's reference implementation (schinger/FullLLM's model.py, run from a clone) in the same run, same
config, batch, data and optimizer settings. Configs: the 260K model (batch 16 x 512) and a 15M model
(dim 288, 6 layers, vocab 32000, batch 8 x 256), each at dropout 0 and at the seed's pre-training 0.05.

    git clone https://github.com/schinger/FullLLM /tmp/FullLLM    # the baseline (nothing is copied from it)
    python bench/bench_train.py                      # ~5 minutes on 2 CPU cores
    python bench/bench_train.py --compile            # also our model under torch.compile (+ compile time)
    python bench/bench_train.py --configs=260K --dropouts=0.05 --runs=3

Both models run in this one process, so the reference gets this repository's allocator setting too (memory freed
is kept: cpu_kernels.keep_freed_memory); FULLLLM_SYSTEM_MALLOC=1 runs both with the system's malloc as it comes.
Without the clone the baseline column is left out (and says so). The steps' losses are printed side by side:
at dropout 0 the two models start from the same weights (ours loads the reference's state dict), so the losses
must agree to float rounding.
"""
import argparse
import importlib.util
import os
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import median_rate, print_table  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402

CONFIGS = {  # name: (model args, batch size)
    "260K": (dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=4, max_seq_len=512), 16),
    "15M": (dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=32000, multiple_of=32, max_seq_len=256), 8),
}


def load_reference(path):
    """The reference's model.py as a module, or None when there is no clone at path."""
    file = os.path.join(path, "model.py")
    if not os.path.isfile(file):
        return None
    spec = importlib.util.spec_from_file_location("reference_model", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ReferenceStep(torch.nn.Module):
    """The reference's forward returns (logits, h, loss); ours a ModelOutput. Both give .loss here."""
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return SimpleNamespace(loss=self.model(x, y)[2])


def make(kind, cfg, dropout, reference):
    """(model, callable forward, optimizer) with the same initial weights for every kind."""
    torch.manual_seed(0)
    ref = reference.Transformer(reference.ModelArgs(**cfg, dropout=dropout))
    if kind == "reference":
        opt = ref.configure_optimizers(0.1, 1e-4, (0.9, 0.95), "cpu")
        return ref, ReferenceStep(ref), opt
    model = Transformer(ModelArgs(**cfg, dropout=dropout))
    model.load_state_dict(ref.state_dict(), strict=False)  # same names (Meta's); the reference ties the classifier
    opt = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), "cpu")
    fwd = torch.compile(model) if kind == "compiled" else model
    return model, fwd, opt


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default="/tmp/FullLLM", help="a clone of github.com/schinger/FullLLM")
    parser.add_argument("--compile", action="store_true", help="add our model under torch.compile")
    parser.add_argument("--configs", default="260K,15M")
    parser.add_argument("--dropouts", default="0,0.05")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        parser.error(f"--configs: unknown {','.join(sorted(unknown))}; choose from {','.join(CONFIGS)}")
    reference = load_reference(args.reference)
    if reference is None:
        print(f"no reference at {args.reference}: `git clone https://github.com/schinger/FullLLM {args.reference}` "
              "for the baseline column", file=sys.stderr)
        sys.exit(1)
    kinds = ["reference", "ours"] + (["compiled"] if args.compile else [])
    rows = []
    for name in args.configs.split(","):
        cfg, batch = CONFIGS[name]
        T = cfg["max_seq_len"]
        for dropout in (float(d) for d in args.dropouts.split(",")):
            x = torch.randint(0, cfg["vocab_size"], (batch, T), generator=torch.Generator().manual_seed(0))
            y = torch.roll(x, -1, dims=1)
            rates, losses, compile_s = {}, {}, None
            for kind in kinds:
                model, fwd, opt = make(kind, cfg, dropout, reference)

                def step():
                    loss = fwd(x, y).loss
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    return loss

                torch.manual_seed(1)
                t0 = time.perf_counter()
                first = step().item()  # the loss of the first step: same weights, same data
                if kind == "compiled":
                    compile_s = time.perf_counter() - t0
                losses[kind] = first
                rates[kind] = median_rate(step, batch * T, runs=args.runs, warmup=1)
            row = [name, f"{batch} x {T}", f"{dropout:g}"] + [f"{rates[k]:,.0f}" for k in kinds]
            row += [f"{rates[k] / rates['reference']:.2f}x" for k in kinds[1:]]
            row += [" / ".join(f"{losses[k]:.4f}" for k in kinds)]
            if args.compile:
                row += [f"{compile_s:.0f}"]
            rows.append(row)
            print(" | ".join(row), flush=True)
    header = ["config", "batch", "dropout"] + [f"{k} tok/s" for k in kinds] + [f"{k} / reference" for k in kinds[1:]]
    header += ["first-step loss (" + " / ".join(kinds) + ")"] + (["compile s"] if args.compile else [])
    print_table(f"Training throughput, forward + backward + AdamW, float32 (median of {args.runs} steps)",
                header, rows)


if __name__ == "__main__":
    main()
