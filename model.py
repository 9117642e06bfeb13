"""
A Llama-style Transformer in plain PyTorch: RMSNorm pre-norm, SwiGLU, RoPE, grouped-query attention,
a static KV cache for generation, and a value head for PPO. The model only: sampling and the generation
loops are in generate.py, checkpoint loading in export.py.

Parameter names are Meta's / llama2.c's (tok_embeddings, layers.N.attention.wq/wk/wv/wo,
feed_forward.w1/w2/w3, attention_norm, ffn_norm, norm, output), so checkpoints map 1:1.

Read it top to bottom: ModelArgs -> ModelOutput -> RMSNorm -> RoPE -> KVCache -> Attention -> FeedForward ->
TransformerBlock -> Transformer -> TransformerWithValueHead. The fast paths it calls on a CPU (the decode step's
projection `linear`, `dropout`, attention in chunks) are cpu_kernels.py; read each as x @ W.T, F.dropout and SDPA.

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

from cpu_kernels import CHUNKED_MAX_HEAD_DIM, chunked_causal_attention, dropout, linear


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
    model.to() but never enter a state_dict, so checkpoints stay the same with or without a cache.
    Keys are stored transposed, (B, H_kv, D, L): a decode step's scores q @ k^T are then one query row times a
    matrix whose rows run along the positions, the form a small head reads fastest (head_dim 8, batch 64: 3x
    faster than over (B, H_kv, L, D)); values stay (B, H_kv, L, D), the form probs @ v reads fastest."""

    def __init__(self, batch_size, seq_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        # one spare position: a decode step reads a prefix of the positions (L <= seq_len), never the whole buffer,
        # so that a compiled step treats L as one dynamic length (a full-buffer slice would specialise it)
        self.register_buffer("k", torch.zeros(batch_size, n_kv_heads, head_dim, seq_len + 1, dtype=dtype,
                                              device=device), persistent=False)
        self.register_buffer("v", torch.zeros(batch_size, n_kv_heads, seq_len + 1, head_dim, dtype=dtype,
                                              device=device), persistent=False)

    def update(self, input_pos, k, v):
        """Write k, v (B, T, H_kv, D) at positions input_pos (B, T): each row at its own positions (ragged
        rows each advance from their own prompt end). Advanced indices around slices select (B, T, H_kv, D):
        the layout k and v come in."""
        rows = torch.arange(k.size(0), device=k.device)
        if k.size(1) == 1:  # a decode step, the hot path: 1-d indices are the cheapest scatter
            self.k[rows, :, :, input_pos[:, 0]] = k[:, 0]
            self.v[rows, :, input_pos[:, 0]] = v[:, 0]
        else:
            self.k[rows[:, None], :, :, input_pos] = k
            self.v[rows[:, None], :, input_pos] = v


def causal_attention(q, k, v, dropout_p=0.0):
    """Causal attention of q (B, H, T, D) over k, v (B, H_kv, T, D), dropout on the probabilities: on a CPU with
    dropout or small heads in chunks (cpu_kernels.py), else PyTorch's fused kernel."""
    if q.device.type == "cpu" and (dropout_p > 0 or q.size(-1) <= CHUNKED_MAX_HEAD_DIM):
        return chunked_causal_attention(q, k, v, dropout_p)
    n_rep = q.size(1) // k.size(1)
    return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), dropout_p=dropout_p,
                                          is_causal=True)



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

    def forward(self, x, cos, sin, input_pos=None, cache_bias=None):
        """x (B, T, dim). With input_pos (B, T) the keys/values are also written into the cache; a decode
        step (T == 1) then attends to the cache through cache_bias (B, 1, 1, L): 0 where allowed, else -inf."""
        B, T, _ = x.shape
        q = linear(x, self.wq.weight).view(B, T, self.n_heads, self.head_dim)
        k = linear(x, self.wk.weight).view(B, T, self.n_kv_heads, self.head_dim)
        v = linear(x, self.wv.weight).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        if input_pos is not None:
            self.kv_cache.update(input_pos, k, v)
        if cache_bias is None:
            # training, or a prefill from position 0: the T positions here are all there is to attend to.
            # No materialised mask: SDPA picks its fused causal kernel (with dropout on a CPU: see above).
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
            y = causal_attention(q, k, v, self.dropout if self.training else 0.0)
            y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        else:
            y = self.attend_to_cache(q, cache_bias)
        return dropout(linear(y, self.wo.weight), self.dropout, self.training)

    def attend_to_cache(self, q, cache_bias):
        """One query per row, q (B, 1, H, D), against the first L cached positions, cache_bias (B, 1, 1, L) added
        to the scores (0 where a row may attend, -inf past its own position); returns (B, 1, H * D). The n_rep
        query heads sharing a key/value head are grouped, so the cache is read in place (repeat_kv would copy all
        of it every step). The scale is folded into q, and the mask is an added bias: each a pass over B x H
        numbers instead of B x H x L (an added -inf gives the same probabilities as masked_fill, faster)."""
        B = q.size(0)
        L = cache_bias.size(-1)  # the positions worth reading: up to the furthest row's
        kT, v = self.kv_cache.k[..., :L], self.kv_cache.v[:, :, :L]  # (B, H_kv, D, L), (B, H_kv, L, D)
        qg = q.view(B, self.n_kv_heads, self.n_rep, self.head_dim) * (1.0 / math.sqrt(self.head_dim))
        fused = torch.compiler.is_compiling()
        scores = (qg[..., None] * kT[:, :, None]).sum(-2) if fused else qg @ kT  # (B, H_kv, n_rep, L)
        probs = F.softmax(scores.float() + cache_bias, dim=-1).type_as(qg)
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

    def forward(self, x, cos, sin, input_pos=None, cache_bias=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, input_pos, cache_bias)
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
        cache_bias = None
        if input_pos is not None and T == 1:  # a decode step: attend to every cached position up to its own
            cached = cache_positions
            if cached is None:
                cached = torch.arange(self.cache_shape[1], device=tokens.device)
            cache_bias = torch.where(cached <= input_pos, 0.0, float("-inf")).view(B, 1, 1, -1)  # float32
        h = dropout(self.tok_embeddings(tokens), self.params.dropout, self.training)
        for layer in self.layers:
            h = layer(h, cos, sin, input_pos, cache_bias)
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

    def keep_cache_rows(self, rows):
        """Keep only the cache rows rows (1-d LongTensor), in that order: a generator drops the rows that finished,
        so the decode steps left work on the live rows only."""
        for layer in self.layers:
            c = layer.attention.kv_cache
            c.k, c.v = c.k[rows], c.v[rows]
        self.cache_shape = (rows.numel(), self.cache_shape[1])

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
