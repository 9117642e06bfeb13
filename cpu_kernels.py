"""
The fast paths model.py calls on a CPU (and in compiled decode steps): the decode step's projection in the
orientation that streams the weights fastest, dropout with cheaper random draws, and causal attention in chunks
of query rows for small heads or with dropout. Each computes what its plain PyTorch counterpart computes (to float
rounding, or in distribution for dropout); tests/test_dropout.py and tests/test_generate.py compare them with the
naive paths. model.py reads without them: `linear` is x @ W.T, `dropout` is F.dropout, and attention is SDPA.
Importing it also keeps freed memory in the process (keep_freed_memory below).
"""
import ctypes
import math
import os
import sys

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# The allocator. glibc's malloc serves a block of more than 128 KB to 32 MB (a threshold it adapts) with a fresh
# mmap, and gives freed memory at the top of its heap back to the kernel; the next block then takes a page fault on
# every 4 KB page it writes first, the kernel zeroing each. A training step allocates and frees tensors of megabytes
# thousands of times (each attention chunk's scores, each layer's activations), so a CPU spent much of its time in
# the kernel: attention forward + backward at 32 x 8 heads x 320 tokens, head_dim 8, took 90 ms, 48 ms with the
# memory kept, and the seed's PPO step 46 s instead of 36 s (docs/speed.md). So, with glibc, blocks of up to
# 1 GB come from the heap and the heap is never trimmed: the process keeps its peak memory until it exits, and then
# reuses it without faults (what jemalloc or tcmalloc, which PyTorch's CPU tuning guide suggests, also do). glibc's
# own settings in the environment (MALLOC_*, GLIBC_TUNABLES=glibc.malloc.*), or FULLLLM_SYSTEM_MALLOC=1, leave it be.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)


def keep_freed_memory():
    """Tell glibc's malloc to keep freed memory (above); True when it did, False where it does not apply."""
    told = any(k.startswith("MALLOC_") for k in os.environ) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
    if told or os.environ.get("FULLLLM_SYSTEM_MALLOC") == "1" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
    except (OSError, AttributeError):  # not glibc (musl, ...): its own allocator, left alone
        return False


KEEPS_FREED_MEMORY = keep_freed_memory()

# -----------------------------------------------------------------------------
# A decode step multiplies a few rows by every weight matrix: one matrix-vector product per row, bound by
# how fast the weights stream from memory. The plain x @ W.T is not the fastest form of that on a CPU
# (bench/bench_generate.py; 2-core AMD EPYC, MKL: the 32000x288 classifier takes 3.8 ms at batch 1 as
# x @ W.T, 1.2 ms for the same bytes in the other orientation). So linear() computes one position per row:
#   - compiled, up to FUSED_MATVEC_MAX_ROWS rows: a broadcast multiply-sum, which inductor fuses into one
#     loop streaming each weight row once (attention over the cache uses it at any batch: each row reads only
#     its own keys and values, so there is nothing for a GEMM to reuse, and per-head batched GEMMs of one
#     query row cost more than the math: 260K batch 32, the compiled step 3.5 instead of 4.3 ms);
#   - more than FUSED_MATVEC_MAX_ROWS rows: W @ x.T, the GEMM orientation MKL runs ~1.5x faster here;
#   - otherwise (eager, few rows) F.linear: the multiply-sum would materialise rows x out x in.
# All forms compute the same sums; results agree to float rounding (tested eager against compiled).
FUSED_MATVEC_MAX_ROWS = 8


def linear(x, weight):
    """x @ weight.T for x (B, T, in), the projection every layer uses (the weights are bias-free nn.Linear
    modules, for their names). Several positions per row (training, prefill) run as F.linear; one position per
    row (a decode step) in the form above for its row count. A plain function, not a module call: a decode
    step makes 36 of them for the 260K model, and eager generation feels every microsecond of overhead."""
    if x.size(1) != 1:
        return F.linear(x, weight)
    if x.size(0) > FUSED_MATVEC_MAX_ROWS:
        return (weight @ x[:, 0].t()).t()[:, None]
    if torch.compiler.is_compiling():
        return (x[:, :, None, :] * weight).sum(-1)
    return F.linear(x, weight)


# -----------------------------------------------------------------------------
# Attention and dropout on a CPU. PyTorch draws one number per element from a serial Mersenne Twister (F.dropout
# on the 16 x 8 x 512 x 512 attention probabilities of the seed's pre-training: ~445 ms per layer per forward),
# and scaled_dot_product_attention leaves its fused kernel for the math path when dropout_p > 0, materialising
# every B x H x T x T score and three more tensors of that size. Its fused kernel, in turn, is slow for the small
# heads of small models (head_dim 8: 250 ms per layer fwd+bwd at 16 x 8 x 512, of which our chunks below take
# 150). So on a CPU, attention with dropout or with small heads runs over chunks of query rows against the keys
# up to the chunk's end: the causal part only, a chunk at a time in cache, its probabilities kept for backward
# when there is one (recomputing them cost 20% more time); dropout draws one 64-bit number per four elements
# (drop_mask). The meaning is unchanged: each attention probability of the causal part is dropped independently
# and the kept ones scaled so that the expectation is exact (tests/test_dropout.py checks the statistics and both
# passes against the naive computation). The path does not depend on the grad mode: PPO's no-grad log-probs
# must equal its training forward's bit for bit (the first minibatch's ratio is exactly 1). On CUDA, SDPA's
# fused kernels. Under torch.compile the elementwise dropouts are F.dropout (inductor fuses its own Philox
# draws) and attention still runs in chunks (a graph break).
ATTENTION_CHUNK = 32  # query rows per chunk
CHUNKED_MAX_HEAD_DIM = 32  # above it SDPA's fused kernel is as fast, and keeps no T x T memory for backward


def quantised_p(p):
    """The drop probability drop_mask realises: p to the nearest multiple of 2^-16 (0.05 -> 0.0500031)."""
    return round(p * 65536) / 65536


def drop_mask(shape, p, device=None):
    """A bool tensor of shape, each element True (dropped) independently with probability quantised_p(p):
    a 16-bit uniform per element, four from each 64-bit draw. (Exact 24-bit uniforms from one byte per element
    plus 16 more bits on the 1-in-256 ties cost more here: finding the ties is itself a pass.)"""
    n = math.prod(shape)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2 ** 63, None)  # all 64 bits
    return (bits.view(torch.int16)[:n] < round(p * 65536) - 32768).view(shape)


def dropout(x, p: float, training: bool):
    """F.dropout(x, p, training), with drop_mask's cheaper draws on a CPU."""
    if not (training and p > 0 and x.device.type == "cpu") or torch.compiler.is_compiling():
        return F.dropout(x, p, training)
    return x.masked_fill(drop_mask(x.shape, p, x.device), 0.0) * (1.0 / (1.0 - quantised_p(p)))


class ChunkedCausalAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(D) + causal mask) with dropout p (0: none) on the probabilities, @ v.
    q (B, H_kv, R, T, D): the R query heads sharing each key/value head grouped, so k, v (B, H_kv, T, D) are
    read, never repeated. Every pass over a (rows x keys) tensor counts here, so the scale is folded into q and
    the causal mask touches only the chunk's diagonal block. The products with D outputs run transposed,
    (D x keys) @ (keys x rows): MKL takes 0.21 ms for what costs it 0.54 ms as (rows x keys) @ (keys x D) at D = 8."""

    @staticmethod
    def rows(x, s, e):
        """Rows s:e of x (B, H_kv, R, T, d) as (B, H_kv, R * (e - s), d): one matrix per key/value head."""
        B, Hk, R, _, d = x.shape
        return x[:, :, :, s:e].reshape(B, Hk, R * (e - s), d)

    @staticmethod
    def chunk_probs(qs, k, s, e):
        """The probabilities of query rows s:e (of the scaled queries qs) against keys 0:e:
        (B, H_kv, R * (e - s), e)."""
        B, Hk, R = qs.shape[:3]
        scores = torch.matmul(ChunkedCausalAttention.rows(qs, s, e), k[:, :, :e].transpose(-1, -2))
        future = torch.ones(e - s, e - s, dtype=torch.bool, device=qs.device).triu(1)
        scores.view(B, Hk, R, e - s, e)[..., s:].masked_fill_(future, float("-inf"))
        return torch.softmax(scores, dim=-1)

    @staticmethod
    def forward(ctx, q, k, v, p, keep_for_backward=True):
        B, Hk, R, T, D = q.shape
        qs = q * (1.0 / math.sqrt(D))
        k, v = k.contiguous(), v.contiguous()  # else every chunk's product copies its (growing) key prefix
        yT = q.new_empty(B, Hk, v.size(-1), R, T)  # y transposed: the layout the products write
        probs, drops = [], []
        for s in range(0, T, ATTENTION_CHUNK):
            e = min(T, s + ATTENTION_CHUNK)
            kept = ChunkedCausalAttention.chunk_probs(qs, k, s, e)
            if keep_for_backward:
                probs.append(kept)
            if p > 0:
                drop = drop_mask(kept.shape, p, q.device)
                if keep_for_backward:
                    drops.append(drop)
                kept = kept.masked_fill(drop, 0.0)
            yT[..., s:e] = torch.matmul(v[:, :, :e].transpose(-1, -2), kept.transpose(-1, -2)).view(B, Hk, -1, R, e - s)
        y = yT.permute(0, 1, 3, 4, 2)  # (B, H_kv, R, T, D_v)
        if p > 0:
            y.mul_(1.0 / (1.0 - quantised_p(p)))
        if keep_for_backward:  # (without, each chunk's probabilities are freed as soon as they are used)
            ctx.save_for_backward(qs, k, v, y, *probs, *drops)
        ctx.p = p
        return y

    @staticmethod
    def backward(ctx, dy):
        qs, k, v, y, *saved = ctx.saved_tensors
        p = ctx.p
        B, Hk, R, T, D = qs.shape
        n_chunks = (T + ATTENTION_CHUNK - 1) // ATTENTION_CHUNK
        all_probs, drops = saved[:n_chunks], saved[n_chunks:]
        dqT = qs.new_empty(B, Hk, D, R, T)
        dkT, dvT = k.new_zeros(B, Hk, D, T), v.new_zeros(B, Hk, v.size(-1), T)
        # softmax backward: dS = P * (dP - sum_j P_j dP_j), and sum_j P_j dP_j = dy . y for every row
        row_dot = (dy * y).sum(-1, keepdim=True)
        if p > 0:
            dy = dy * (1.0 / (1.0 - quantised_p(p)))
        for i, s in enumerate(range(0, T, ATTENTION_CHUNK)):
            e = min(T, s + ATTENTION_CHUNK)
            probs, dyc = all_probs[i], ChunkedCausalAttention.rows(dy, s, e)
            kept = probs.masked_fill(drops[i], 0.0) if p > 0 else probs
            dvT[..., :e] += torch.matmul(dyc.transpose(-1, -2), kept)
            # dS = P * (dP - row_dot), where dP = dy v^T on kept entries and 0 on dropped ones
            ds = torch.matmul(dyc, v[:, :, :e].transpose(-1, -2)).mul_(kept)
            ds.view(B, Hk, R, e - s, e).addcmul_(probs.view(B, Hk, R, e - s, e), row_dot[:, :, :, s:e], value=-1)
            dqT[..., s:e] = torch.matmul(k[:, :, :e].transpose(-1, -2), ds.transpose(-1, -2)).view(B, Hk, D, R, e - s)
            dkT[..., :e] += torch.matmul(ChunkedCausalAttention.rows(qs, s, e).transpose(-1, -2), ds)
        dq = dqT.permute(0, 1, 3, 4, 2).mul_(1.0 / math.sqrt(D))
        return dq, dkT.transpose(-1, -2), dvT.transpose(-1, -2), None, None


def chunked_causal_attention(q, k, v, p):
    if torch.compiler.is_compiling():  # eager under torch.compile too: inductor would materialise the scores
        return _eager_under_compile(q, k, v, p)  # (a graph break per layer)
    B, H, T, D = q.shape
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    y = ChunkedCausalAttention.apply(q.view(B, k.size(1), H // k.size(1), T, D), k, v, p, keep)
    return y.reshape(B, H, T, -1)


_eager_chunked = None


def _eager_under_compile(q, k, v, p):
    # torch.compiler.disable is applied here, on first use under compile, not as a decorator: decorating imports
    # torch._dynamo, ~1.5 s of every script's start even when nothing is compiled
    global _eager_chunked
    if _eager_chunked is None:
        _eager_chunked = torch.compiler.disable(chunked_causal_attention)
    return _eager_chunked(q, k, v, p)
