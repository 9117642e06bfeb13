"""
A Llama-style Transformer in plain PyTorch: RMSNorm pre-norm, SwiGLU, RoPE, grouped-query attention,
a static KV cache for generation, and a value head for PPO. The model only: sampling and the generation
loops are in generate.py, checkpoint loading in export.py.

Parameter names are Meta's / llama2.c's (tok_embeddings, layers.N.attention.wq/wk/wv/wo,
feed_forward.w1/w2/w3, attention_norm, ffn_norm, norm, output), so checkpoints map 1:1.

Read it top to bottom: ModelArgs -> ModelOutput -> RMSNorm -> RoPE -> KVCache -> linear -> Attention ->
FeedForward -> TransformerBlock -> Transformer -> TransformerWithValueHead.

There is one forward path. Without input_pos it is a training forward over positions 0..T-1. With
input_pos, the positions of the tokens, keys and values are written into the KV cache: T > 1 tokens from
position 0 is a prefill, one token per row a decode step that attends to everything cached before it.
"""
import inspect
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelArgs:
    # defaults: llama2.c's 15M "stories15M" shape
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: Optional[int] = None  # None means n_heads (plain multi-head attention)
    vocab_size: int = 32000
    hidden_dim: Optional[int] = None  # None means llama2.c's rule from dim and multiple_of
    multiple_of: int = 32  # SwiGLU hidden size is rounded up to a multiple of this
    norm_eps: float = 1e-5
    max_seq_len: int = 256
    dropout: float = 0.0
    rope_theta: float = 10000.0
    tie_embeddings: bool = True  # the classifier is the embedding matrix (llama2.c's "shared classifier")

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head size dim/n_heads={self.dim // self.n_heads} must be even: RoPE rotates pairs")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.hidden_dim is None:
            # llama2.c / Meta: 2/3 of 4*dim, rounded up to multiple_of (dim 64, multiple_of 4 -> 172)
            hidden_dim = int(2 * (4 * self.dim) / 3)
            self.hidden_dim = self.multiple_of * ((hidden_dim + self.multiple_of - 1) // self.multiple_of)

    @property
    def head_dim(self):
        return self.dim // self.n_heads


class ModelOutput(NamedTuple):
    """What every forward returns; read it by name (out.logits, out.loss, out.values)."""
    logits: torch.Tensor  # (B, T, vocab_size)
    loss: Optional[torch.Tensor] = None  # mean next-token cross entropy over targets != -1, when targets are given
    values: Optional[torch.Tensor] = None  # (B, T) value estimates: TransformerWithValueHead only


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 even under bf16 autocast, as Meta does
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


# -----------------------------------------------------------------------------
# Rotary position embedding, real-valued, over interleaved pairs (x0,x1), (x2,x3), ...:
# the layout of Meta's and llama2.c's weights (Hugging Face permutes wq/wk to "rotate half" instead).

def precompute_freqs_cis(head_dim: int, end: int, theta: float = 10000.0):
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(end).float(), freqs)  # (end, head_dim/2)
    return torch.cos(angles), torch.sin(angles)


def apply_rotary_emb(x, cos, sin):
    """x: (B, T, H, D); cos, sin: broadcastable to (B, T, 1, D/2)."""
    xr, xi = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((xr * cos - xi * sin, xr * sin + xi * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def repeat_kv(x, n_rep: int):
    """(B, H_kv, T, D) -> (B, H_kv * n_rep, T, D): each key/value head serves n_rep query heads."""
    if n_rep == 1:
        return x
    B, H, T, D = x.shape
    return x[:, :, None].expand(B, H, n_rep, T, D).reshape(B, H * n_rep, T, D)


class KVCache(nn.Module):
    """Preallocated keys/values of one layer (gpt-fast style). Non-persistent buffers: they move with
    model.to() but never enter a state_dict, so checkpoints stay the same with or without a cache."""

    def __init__(self, batch_size, seq_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        # one spare position: a decode step reads a prefix k[:, :, :L] (L <= seq_len), never the whole buffer,
        # so that a compiled step treats L as one dynamic length (a full-buffer slice would specialise it)
        shape = (batch_size, n_kv_heads, seq_len + 1, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        """Write k, v (B, T, H_kv, D) at positions input_pos (B, T): each row at its own positions (ragged
        rows each advance from their own prompt end). Two advanced indices around a slice index select
        (B, T, H_kv, D): the layout k and v come in."""
        rows = torch.arange(k.size(0), device=k.device)
        if k.size(1) == 1:  # a decode step, the hot path: 1-d indices are the cheapest scatter
            self.k[rows, :, input_pos[:, 0]] = k[:, 0]
            self.v[rows, :, input_pos[:, 0]] = v[:, 0]
        else:
            self.k[rows[:, None], :, input_pos] = k
            self.v[rows[:, None], :, input_pos] = v


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


def causal_attention(q, k, v, dropout_p=0.0):
    """Causal attention of q (B, H, T, D) over k, v (B, H_kv, T, D), dropout on the probabilities."""
    if q.device.type == "cpu" and (dropout_p > 0 or q.size(-1) <= CHUNKED_MAX_HEAD_DIM):
        return chunked_causal_attention(q, k, v, dropout_p)
    n_rep = q.size(1) // k.size(1)
    return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), dropout_p=dropout_p,
                                          is_causal=True)


@torch.compiler.disable  # under torch.compile too: inductor would materialise the scores (a graph break per layer)
def chunked_causal_attention(q, k, v, p):
    B, H, T, D = q.shape
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    y = ChunkedCausalAttention.apply(q.view(B, k.size(1), H // k.size(1), T, D), k, v, p, keep)
    return y.reshape(B, H, T, -1)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.n_rep = self.n_heads // self.n_kv_heads
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.dropout = args.dropout  # on the attention probabilities and on the output
        self.kv_cache: Optional[KVCache] = None  # created by Transformer.setup_caches, only to generate

    def forward(self, x, cos, sin, input_pos=None, cache_mask=None):
        """x (B, T, dim). With input_pos (B, T) the keys/values are also written into the cache; a decode
        step (T == 1) then attends to the whole cache through cache_mask (B, 1, 1, cache_len)."""
        B, T, _ = x.shape
        q = linear(x, self.wq.weight).view(B, T, self.n_heads, self.head_dim)
        k = linear(x, self.wk.weight).view(B, T, self.n_kv_heads, self.head_dim)
        v = linear(x, self.wv.weight).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        if input_pos is not None:
            self.kv_cache.update(input_pos, k, v)
        if cache_mask is None:
            # training, or a prefill from position 0: the T positions here are all there is to attend to.
            # No materialised mask: SDPA picks its fused causal kernel (with dropout on a CPU: see above).
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
            y = causal_attention(q, k, v, self.dropout if self.training else 0.0)
            y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        else:
            y = self.attend_to_cache(q, cache_mask)
        return dropout(linear(y, self.wo.weight), self.dropout, self.training)

    def attend_to_cache(self, q, cache_mask):
        """One query per row, q (B, 1, H, D), against the cached positions that cache_mask (B, 1, 1, L) allows; returns
        (B, 1, H * D). The n_rep query heads sharing a key/value head are grouped, so the cache is read in
        place (repeat_kv would copy all of it every step)."""
        B = q.size(0)
        L = cache_mask.size(-1)  # the positions worth reading: up to the furthest row's
        k, v = self.kv_cache.k[:, :, :L], self.kv_cache.v[:, :, :L]  # (B, H_kv, L, D)
        qg = q.view(B, self.n_kv_heads, self.n_rep, self.head_dim)
        fused = torch.compiler.is_compiling()
        scores = (qg[:, :, :, None, :] * k[:, :, None]).sum(-1) if fused else qg @ k.transpose(-1, -2)
        scores = (scores * (1.0 / math.sqrt(self.head_dim))).masked_fill(~cache_mask, float("-inf"))
        probs = F.softmax(scores.float(), dim=-1).type_as(qg)
        y = (probs[..., None] * v[:, :, None]).sum(-2) if fused else probs @ v  # (B, H_kv, n_rep, D)
        return y.view(B, 1, self.n_heads * self.head_dim)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.dropout = dropout

    def forward(self, x):
        h = F.silu(linear(x, self.w1.weight)) * linear(x, self.w3.weight)  # SwiGLU
        return dropout(linear(h, self.w2.weight), self.dropout, self.training)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim, args.dropout)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, cos, sin, input_pos=None, cache_mask=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, input_pos, cache_mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        self.params = params
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(params) for _ in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        if params.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight  # one tensor, saved under both names

        cos, sin = precompute_freqs_cis(params.head_dim, params.max_seq_len, params.rope_theta)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)

        self.apply(self._init_weights)
        # GPT-2 scaled init of the residual projections
        for pn, p in self.named_parameters():
            if pn.endswith("w3.weight") or pn.endswith("wo.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * params.n_layers))
        self.cache_shape = None  # (batch, seq_len) of the KV cache, None while there is none

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden_states(self, tokens, input_pos=None, cache_positions=None):
        """The final normalised hidden states (B, T, dim) of tokens (B, T): the one loop over the layers.
        input_pos=None: a causal forward over positions 0..T-1 without the cache (training). input_pos (B, T):
        the tokens' positions, each row its own; keys and values go into the cache (see setup_caches).
        cache_positions (L,): arange(L), the cache positions a decode step may attend to (default: the whole
        cache); a tensor so that a compiled decode step can take its length as a dynamic dimension."""
        B, T = tokens.shape
        if input_pos is None:
            if T > self.params.max_seq_len:
                raise ValueError(f"sequence of {T} tokens is longer than max_seq_len={self.params.max_seq_len}")
            cos, sin = self.freqs_cos[:T].view(1, T, 1, -1), self.freqs_sin[:T].view(1, T, 1, -1)
        else:
            cos, sin = self.freqs_cos[input_pos][:, :, None], self.freqs_sin[input_pos][:, :, None]
        cache_mask = None
        if input_pos is not None and T == 1:  # a decode step: attend to every cached position up to its own
            cached = cache_positions
            if cached is None:
                cached = torch.arange(self.cache_shape[1], device=tokens.device)
            cache_mask = (cached <= input_pos).view(B, 1, 1, -1)
        h = dropout(self.tok_embeddings(tokens), self.params.dropout, self.training)
        for layer in self.layers:
            h = layer(h, cos, sin, input_pos, cache_mask)
        return self.norm(h)

    def head(self, h, targets=None) -> ModelOutput:
        """Logits of hidden states h (B, T, dim), and the cross entropy against targets when given."""
        logits = linear(h, self.output.weight)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1), ignore_index=-1)
        return ModelOutput(logits, loss)

    def forward(self, tokens, targets=None, input_pos=None) -> ModelOutput:
        return self.head(self.hidden_states(tokens, input_pos), targets)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        params = [p for p in self.parameters() if p.requires_grad]
        # decay matrices and embeddings; not norms and biases
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        print(f"num decayed parameter tensors: {len(decay)}, with {sum(p.numel() for p in decay):,} parameters")
        print(f"num non-decayed parameter tensors: {len(no_decay)}, with {sum(p.numel() for p in no_decay):,} parameters")
        # fused AdamW: one kernel for all parameters (CUDA, and CPU since torch 2.4)
        fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused or None)

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops=312e12):
        """Model FLOPs utilisation against peak_flops (default: A100 bf16), PaLM appendix B."""
        N = sum(p.numel() for p in self.parameters())
        cfg = self.params
        L, H, Q, T = cfg.n_layers, cfg.n_heads, cfg.head_dim, cfg.max_seq_len
        flops_per_token = 6 * N + 12 * L * H * Q * T
        return flops_per_token * T * fwdbwd_per_iter / dt / peak_flops

    # --- the KV cache ---------------------------------------------------------------------------
    def setup_caches(self, max_batch_size, max_seq_len, dtype=None, device=None):
        """Allocate a KV cache for max_batch_size rows and max_seq_len positions, or keep the current one when
        it has that many rows and at least that many positions: the cache only grows, so a compiled decode
        step sees few distinct shapes and recompiles rarely."""
        if max_seq_len > self.params.max_seq_len:
            raise ValueError(f"cache of {max_seq_len} positions exceeds max_seq_len={self.params.max_seq_len}")
        if self.cache_shape is not None and self.cache_shape[0] == max_batch_size and self.cache_shape[1] >= max_seq_len:
            return
        dtype = dtype or self.tok_embeddings.weight.dtype
        device = device or self.tok_embeddings.weight.device
        for layer in self.layers:
            a = layer.attention
            a.kv_cache = KVCache(max_batch_size, max_seq_len, a.n_kv_heads, a.head_dim, dtype, device)
        self.cache_shape = (max_batch_size, max_seq_len)

    def clear_caches(self):
        """Drop the KV cache (its memory), e.g. before copy.deepcopy of a model that has generated."""
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.cache_shape = None


class TransformerWithValueHead(Transformer):
    """The PPO policy: the language model plus a scalar value per position (out.values).
    detach_value: the value head reads the trunk's features without its loss flowing back into them, so fitting
    the value never moves the policy (the RLHF chain's PPO; the seed's shares the trunk, as TRL does)."""

    def __init__(self, params: ModelArgs, detach_value: bool = False):
        super().__init__(params)
        self.detach_value = detach_value
        self.value_head = nn.Linear(params.dim, 1)
        nn.init.normal_(self.value_head.weight, std=0.02)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, tokens, targets=None, input_pos=None) -> ModelOutput:
        h = self.hidden_states(tokens, input_pos)
        values = self.value_head(h.detach() if self.detach_value else h).squeeze(-1)
        return self.head(h, targets)._replace(values=values)
