"""
Training throughput: tokens/s of forward + backward + AdamW step for the 260K config (batch 16 x 512) and a
15M config (dim 288, 6 layers, 6 heads, vocab 32000, seq 256, batch 8), against a straightforward eager
baseline measured in the same run: attention as an explicit masked softmax (scores + mask -> softmax -> @ v)
and a per-parameter AdamW loop (foreach=False, fused=False).

    python bench/bench_train.py           # a few minutes on 2 CPU cores
    python bench/bench_train.py --compile # also torch.compile (adds ~1 minute of compile per config)
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import median_rate, print_table  # noqa: E402
import model as model_module  # noqa: E402
from model import ModelArgs, Transformer, repeat_kv  # noqa: E402

CONFIGS = {
    "260K": (ModelArgs(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=4, max_seq_len=512), 16),
    "15M": (ModelArgs(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=32000, multiple_of=32, max_seq_len=256), 8),
}


def baseline_attention_forward(self, x, cos, sin, input_pos=None, cache_mask=None):
    """The textbook version: materialise a (T, T) causal mask and the full score matrix."""
    B, T, _ = x.shape
    q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
    k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
    v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
    q, k = model_module.apply_rotary_emb(q, cos, sin), model_module.apply_rotary_emb(k, cos, sin)
    q, k, v = q.transpose(1, 2), repeat_kv(k.transpose(1, 2), self.n_rep), repeat_kv(v.transpose(1, 2), self.n_rep)
    causal = torch.full((T, T), float("-inf"), device=x.device).triu(1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + causal
    y = F.dropout(F.softmax(scores.float(), dim=-1).type_as(q), self.dropout, self.training) @ v
    return F.dropout(self.wo(y.transpose(1, 2).reshape(B, T, -1)), self.dropout, self.training)


def make(cfg, kind):
    torch.manual_seed(0)
    model = Transformer(cfg)
    if kind == "baseline":
        for layer in model.layers:
            layer.attention.forward = baseline_attention_forward.__get__(layer.attention)
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    if kind == "baseline":  # the same parameter groups, stepped one tensor at a time
        opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), foreach=False, fused=False)
    else:
        opt = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), "cpu")
    fwd = torch.compile(model) if kind == "compiled" else model
    return model, fwd, opt


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile", action="store_true", help="add a torch.compile column")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    kinds = ["baseline", "ours"] + (["compiled"] if args.compile else [])
    rows = []
    for name, (cfg, batch) in CONFIGS.items():
        x = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len), generator=torch.Generator().manual_seed(0))
        y = torch.roll(x, -1, dims=1)
        rates, losses = {}, {}
        for kind in kinds:
            model, fwd, opt = make(cfg, kind)

            def step():
                loss = fwd(x, y).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss

            rates[kind] = median_rate(step, batch * cfg.max_seq_len, runs=args.runs, warmup=2)
            losses[kind] = step().item()  # same init, data and number of steps: the losses must agree
        row = [name, f"{batch} x {cfg.max_seq_len}"] + [f"{rates[k]:,.0f}" for k in kinds]
        row += [f"{rates[k] / rates['baseline']:.2f}x" for k in kinds[1:]]
        row += [" / ".join(f"{losses[k]:.4f}" for k in kinds)]
        rows.append(row)
        print(" | ".join(row), flush=True)
    header = ["config", "batch"] + [f"{k} tok/s" for k in kinds] + [f"{k} / baseline" for k in kinds[1:]]
    header += [f"loss at step {args.runs + 3} (" + " / ".join(kinds) + ")"]
    print_table(f"Training throughput, forward + backward + AdamW, float32 (median of {args.runs})", header, rows)


if __name__ == "__main__":
    main()
