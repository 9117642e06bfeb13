"""
A Llama-style Transformer in plain PyTorch: RMSNorm pre-norm, SwiGLU, RoPE, grouped-query attention,
a static KV cache for fast generation, and a value head for PPO.

Parameter names are Meta's / llama2.c's (tok_embeddings, layers.N.attention.wq/wk/wv/wo,
feed_forward.w1/w2/w3, attention_norm, ffn_norm, norm, output), so checkpoints map 1:1.

Read it top to bottom: ModelArgs -> RMSNorm -> RoPE -> KVCache -> Attention -> FeedForward ->
TransformerBlock -> Transformer (training forward, optimizer, generation) -> TransformerWithValueHead.
"""
import contextlib
import copy
import inspect
import math
from dataclasses import dataclass
from typing import List, Optional

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
    max_batch_size: int = 32  # default batch of the KV cache in generation (PPO rollouts)
    dropout: float = 0.0
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                     "max_seq_len", "max_batch_size"):
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
        shape = (batch_size, n_kv_heads, seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        """Prefill: write k, v (B, H_kv, T, D) at positions input_pos (T,), the same for every row."""
        self.k[: k.size(0)].index_copy_(2, input_pos, k)
        self.v[: v.size(0)].index_copy_(2, input_pos, v)

    def update_rows(self, input_pos, k, v):
        """Decode: write one position per row, k, v (B, H_kv, 1, D) at input_pos (B,) (ragged rows each
        advance from their own prompt end). Returns the whole cache."""
        rows = torch.arange(k.size(0), device=k.device)
        self.k[rows, :, input_pos] = k[:, :, 0]
        self.v[rows, :, input_pos] = v[:, :, 0]
        return self.k, self.v


def decode_linear(x, weight):
    """x @ weight.T for the few rows of a decode step, x (B, in) -> (B, out), in the form that runs
    fastest. A decode step is one matrix-vector product per row, and the plain x @ weight.T call
    is not the fastest form of it (bench/bench_generate.py; 2-core AMD EPYC, MKL):
    - compiled, up to 8 rows: a broadcast multiply-sum, which inductor turns into one fused kernel
      streaming each weight row once (MKL's gemv reads a (out, in) weight at a third of memory speed);
    - more than 8 rows: weight @ x.T, the GEMM orientation MKL runs ~1.5x faster here.
    All forms compute the same sums; results agree to float rounding."""
    if x.size(0) > 8:
        return (weight @ x.t()).t()
    if torch.compiler.is_compiling():
        return (x[:, None, :] * weight).sum(-1)
    return F.linear(x, weight)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.n_rep = self.n_heads // self.n_kv_heads
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.resid_dropout = nn.Dropout(args.dropout)
        self.dropout = args.dropout
        self.kv_cache: Optional[KVCache] = None  # created by Transformer.setup_caches, only to generate

    def forward(self, x, cos, sin, input_pos=None):
        """Causal attention over the T positions of x (B, T, dim): training, and prefill, which also
        writes the keys/values at input_pos (T,) into the cache."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if input_pos is not None:
            self.kv_cache.update(input_pos, k, v)
        # no materialised mask: SDPA picks its fused causal kernel
        y = F.scaled_dot_product_attention(q, repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep),
                                           dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.resid_dropout(self.wo(y))

    def decode(self, x, cos, sin, input_pos, mask):
        """One new token per row: x (B, dim) at per-row positions input_pos (B,), attending to the
        whole cache through mask (B, 1, 1, cache_len). No dropout: this is generation."""
        B = x.size(0)
        q = decode_linear(x, self.wq.weight).view(B, 1, self.n_heads, self.head_dim)
        k = decode_linear(x, self.wk.weight).view(B, 1, self.n_kv_heads, self.head_dim)
        v = decode_linear(x, self.wv.weight).view(B, 1, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        k_all, v_all = self.kv_cache.update_rows(input_pos, k.transpose(1, 2), v.transpose(1, 2))
        # the n_rep query heads that share a key/value head are grouped, so the cache is read in
        # place (repeat_kv would copy all of it every step)
        qg = q.view(B, self.n_kv_heads, self.n_rep, self.head_dim)
        few_rows = torch.compiler.is_compiling() and B <= 8  # as in decode_linear: fused loops beat bmm calls
        if few_rows:
            scores = (qg[:, :, :, None, :] * k_all[:, :, None]).sum(-1)
        else:
            scores = qg @ k_all.transpose(-1, -2)
        scores = (scores * (1.0 / math.sqrt(self.head_dim))).masked_fill(~mask, float("-inf"))  # beyond each row
        probs = F.softmax(scores.float(), dim=-1).type_as(qg)
        y = (probs[..., None] * v_all[:, :, None]).sum(-2) if few_rows else probs @ v_all
        return decode_linear(y.view(B, self.n_heads * self.head_dim), self.wo.weight)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))  # SwiGLU

    def decode(self, x):
        return decode_linear(F.silu(decode_linear(x, self.w1.weight)) * decode_linear(x, self.w3.weight),
                             self.w2.weight)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim, args.dropout)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, cos, sin, input_pos=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))

    def decode(self, x, cos, sin, input_pos, mask):
        h = x + self.attention.decode(self.attention_norm(x), cos, sin, input_pos, mask)
        return h + self.feed_forward.decode(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.dropout = nn.Dropout(params.dropout)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        self.output.weight = self.tok_embeddings.weight  # weight tying (llama2.c); one tensor in state_dict

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

    # --- training ------------------------------------------------------------------------------
    def hidden_states(self, tokens):
        """Final normalised hidden states (B, T, dim) of a full causal forward, no cache."""
        T = tokens.size(1)
        if T > self.params.max_seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than max_seq_len={self.params.max_seq_len}")
        h = self.dropout(self.tok_embeddings(tokens))
        cos, sin = self.freqs_cos[:T].view(1, T, 1, -1), self.freqs_sin[:T].view(1, T, 1, -1)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.norm(h)

    def forward(self, tokens, targets=None):
        """Returns (logits (B, T, vocab), loss). loss is the mean next-token cross entropy over targets
        != -1 when targets are given, else None."""
        logits = self.output(self.hidden_states(tokens))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1), ignore_index=-1)
        return logits, loss

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

    # --- generation ----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, eos_id=None):
        """The slow reference: a full forward over the whole context for every new token (no cache).
        idx: (B, T) LongTensor; returns (B, T + n) with n <= max_new_tokens (stops early when every
        row has produced eos_id)."""
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.params.max_seq_len:])
            next_token = sample_top_k_top_p(logits[:, -1], top_k, top_p, temperature)
            idx = torch.cat((idx, next_token), dim=1)
            if eos_id is not None:
                done |= next_token[:, 0] == eos_id
                if done.all():
                    break
        return idx

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
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.cache_shape = None

    def __deepcopy__(self, memo):
        """A copy without the KV cache (e.g. a frozen PPO reference): caches belong to one generator."""
        caches, shape = [layer.attention.kv_cache for layer in self.layers], self.cache_shape
        self.clear_caches()
        self.__deepcopy__ = None  # take the default deepcopy path for this one call
        try:
            twin = copy.deepcopy(self, memo)
        finally:
            del self.__deepcopy__
            for layer, cache in zip(self.layers, caches):
                layer.attention.kv_cache = cache
            self.cache_shape = shape
        del twin.__deepcopy__
        return twin

    def prefill(self, tokens, last_pos):
        """Run right-padded prompts (B, T) through the model at positions 0..T-1, filling the cache.
        Returns the logits (B, vocab) at each row's last prompt position last_pos (B,)."""
        B, T = tokens.shape
        input_pos = torch.arange(T, device=tokens.device)
        cos, sin = self.freqs_cos[:T].view(1, T, 1, -1), self.freqs_sin[:T].view(1, T, 1, -1)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin, input_pos)
        h = h[torch.arange(B, device=h.device), last_pos]  # only the positions we sample from
        return decode_linear(self.norm(h), self.output.weight).float()

    def decode_step(self, tokens, input_pos):
        """One new token per row: tokens (B, 1) at per-row positions input_pos (B,). Returns the logits
        (B, vocab). Static shapes (a cache-sized mask), so it compiles once and replays for every step
        and call. Rows past the end of the cache (finished rows that keep decoding) write its last slot."""
        seq_len = self.cache_shape[1]
        input_pos = input_pos.clamp(max=seq_len - 1)
        mask = (torch.arange(seq_len, device=tokens.device) <= input_pos[:, None]).view(-1, 1, 1, seq_len)
        cos = self.freqs_cos[input_pos].view(-1, 1, 1, self.freqs_cos.size(-1))
        sin = self.freqs_sin[input_pos].view(-1, 1, 1, self.freqs_sin.size(-1))
        h = self.tok_embeddings(tokens[:, 0])
        for layer in self.layers:
            h = layer.decode(h, cos, sin, input_pos, mask)
        return decode_linear(self.norm(h), self.output.weight).float()

    def decode_tokens(self, tokens, input_pos, uniforms, temperature=0.0, top_k=0, top_p=1.0):
        """K = uniforms.size(1) decode steps in one call: feed tokens (B, 1) at per-row positions input_pos
        (B,), sample the next token of each row with its uniform of that step (uniforms (B, K), ignored when
        greedy), feed that, and so on. Returns the K new tokens (B, K). Sampling happens here, inside what
        compile_decode compiles, so a compiled call is the whole step; K > 1 also spreads torch.compile's
        fixed cost per call (~0.2 ms on a 2-core CPU) over K tokens."""
        new_tokens = []
        for i in range(uniforms.size(1)):
            logits = self.decode_step(tokens, input_pos + i)
            tokens = sample_top_k_top_p(logits, top_k, top_p, temperature, uniform=uniforms[:, i])
            new_tokens.append(tokens)
        return torch.cat(new_tokens, dim=1)

    @torch.inference_mode()
    def generate_withcache(self, prompt_tokens: List[List[int]], max_gen_len: int, temperature: float = 0.6,
                           top_k: int = 0, top_p: float = 1.0, eos_id: Optional[int] = None,
                           echo: bool = False, device=None, decode_fn=None, generator=None,
                           tokens_per_call: int = 1) -> List[List[int]]:
        """Batched KV-cache generation for prompts of different lengths.

        Each row gets at most max_gen_len new tokens, stops at eos_id (an id or a list of ids; not
        included in the output) or
        when the context (max_seq_len) is full, and equals what its prompt produces alone under greedy
        decoding. Rows are right-padded; every row decodes at its own position, so no row waits for or
        is padded by another. Returns new tokens per row (prompt + new tokens with echo=True).
        decode_fn: optional replacement for self.decode_tokens, e.g. compile_decode(model).
        tokens_per_call: decode steps per decode_fn call (the same tokens for any value; a compiled
        decode_fn compiles once per value). Sampling draws one uniform per row and token from generator
        (default: torch's global generator), so a seed gives the same stories eager or compiled."""
        check_sampling_args(temperature, top_k, top_p)
        if max_gen_len < 1:
            raise ValueError(f"max_gen_len must be >= 1, got {max_gen_len}")
        if tokens_per_call < 1:
            raise ValueError(f"tokens_per_call must be >= 1, got {tokens_per_call}")
        if not prompt_tokens or any(len(p) == 0 for p in prompt_tokens):
            raise ValueError("every prompt needs at least one token (e.g. BOS)")
        device = device or self.tok_embeddings.weight.device
        ctx = self.params.max_seq_len
        lens = [len(p) for p in prompt_tokens]
        if max(lens) >= ctx:
            raise ValueError(f"prompt of {max(lens)} tokens leaves no room in the context of max_seq_len={ctx} tokens")
        B = len(prompt_tokens)
        n_new = [min(max_gen_len, ctx - n) for n in lens]  # tokens each row may add
        steps = max(n_new)
        # positions ever fed: prompt, then every new token but the last; keep the size stable across
        # calls (multiple of 64) so a compiled decode step is not recompiled for every batch
        need = max(n + k - 1 for n, k in zip(lens, n_new))
        self.setup_caches(B, min(ctx, 64 * math.ceil(need / 64)), device=device)
        decode = decode_fn or self.decode_tokens

        tokens = torch.zeros(B, max(lens), dtype=torch.long, device=device)
        for i, p in enumerate(prompt_tokens):
            tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        lens_t = torch.tensor(lens, device=device)
        logits = self.prefill(tokens, lens_t - 1)

        def uniforms(k):  # (B, k), drawn step by step so that any tokens_per_call sees the same numbers;
            # greedy decoding draws nothing, so it leaves the generator as it was
            return (torch.zeros(B, k, device=device) if temperature == 0.0
                    else torch.rand(k, B, device=device, generator=generator).t())

        stop_ids = None if eos_id is None else torch.tensor(
            [eos_id] if isinstance(eos_id, int) else list(eos_id), device=device)
        K = tokens_per_call
        out = torch.zeros(B, steps + K, dtype=torch.long, device=device)  # + K: the last call may overshoot
        limit = torch.tensor(n_new, device=device)  # per-row budget of new tokens
        # the token fed next; one tensor for the whole loop, so every decode call sees the same strides
        next_token = sample_top_k_top_p(logits, top_k, top_p, temperature, uniform=uniforms(1)[:, 0]).contiguous()
        out[:, :1] = next_token
        with contextlib.ExitStack() as stack:
            for s in range(1, steps, K):  # s: new tokens so far
                # finished rows keep decoding harmlessly in place (their output is cut below)
                new_tokens = decode(next_token, lens_t + s - 1, uniforms(K), temperature, top_k, top_p)
                out[:, s: s + K] = new_tokens
                next_token.copy_(new_tokens[:, -1:])
                if s == 1 and decode_fn is not None and CAN_SKIP_GUARDS:
                    # dynamo checked its guards on this first call; the later calls pass tensors of the
                    # same shapes to the same model, so re-checking dozens of guards per call is pure overhead
                    stack.enter_context(torch.compiler.set_stance(skip_guard_eval_unsafe=True))
                if (s + K) // 8 > s // 8 and all_rows_done(out[:, : s + K], stop_ids, limit):
                    break  # checked every 8 tokens: the loop's only host sync

        result = []
        out = out.tolist()
        for i, p in enumerate(prompt_tokens):
            row = out[i][: n_new[i]]
            for stop in ([] if stop_ids is None else stop_ids.tolist()):
                if stop in row:
                    row = row[: row.index(stop)]
            result.append(list(p) + row if echo else row)
        return result


# newer torch (2.7+) can skip guard evaluation; generate_withcache does so after the first step of a call
CAN_SKIP_GUARDS = hasattr(torch.compiler, "set_stance") and \
    "skip_guard_eval_unsafe" in inspect.signature(torch.compiler.set_stance).parameters


def all_rows_done(out, stop_ids, limit):
    """out (B, s): the tokens so far. True when every row has emitted a stop id or used its budget."""
    done = limit <= out.size(1)
    if stop_ids is not None:
        done |= torch.isin(out, stop_ids).any(1)
    return bool(done.all())


def compile_decode(model: Transformer):
    """torch.compile the decode steps (Transformer.decode_tokens: forward and sampling) for
    generate_withcache(decode_fn=...). Static shapes: it compiles once per (batch, cache bucket,
    tokens_per_call, sampling settings) and replays for every call. cpp_wrapper moves the per-call
    launch code from Python to C++, which matters when each step is only microseconds of math."""
    options = {"cpp_wrapper": True} if model.tok_embeddings.weight.device.type == "cpu" else None
    return torch.compile(model.decode_tokens, fullgraph=True, dynamic=False, options=options)


class TransformerWithValueHead(Transformer):
    """The PPO policy: the language model plus a scalar value per position."""

    def __init__(self, params: ModelArgs):
        super().__init__(params)
        self.value_head = nn.Linear(params.dim, 1)
        nn.init.normal_(self.value_head.weight, std=0.02)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, tokens, targets=None):
        """Returns (logits (B, T, vocab), values (B, T), loss or None)."""
        h = self.hidden_states(tokens)
        logits = self.output(h)
        values = self.value_head(h).squeeze(-1)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1), ignore_index=-1)
        return logits, values, loss


# -----------------------------------------------------------------------------
# sampling

def check_sampling_args(temperature, top_k, top_p):
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p}")


def sample_top_k_top_p(logits, top_k=0, top_p=1.0, temperature=1.0, generator=None, uniform=None):
    """Draw one token per row from logits (B, V) -> (B, 1).

    temperature 0 is greedy; otherwise keep the top_k logits (0: all), then the smallest set of tokens
    whose probability reaches top_p (1.0: all), renormalise, and draw once. logits are not modified.
    The draw is inverse transform sampling with one uniform per row in [0, 1): uniform (B,), or drawn
    from generator when None. Taking the uniforms as an input lets a compiled decode step sample inside
    its graph and still follow the caller's generator."""
    check_sampling_args(temperature, top_k, top_p)
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    logits = logits.float() / temperature  # a new tensor: the caller's logits stay as they were
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if uniform is None:
        uniform = torch.rand(probs.size(0), device=probs.device, generator=generator)
    if top_p < 1.0:
        probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
        # drop a token when the tokens ranked above it already hold more than top_p
        probs_sort = probs_sort.masked_fill(probs_sort.cumsum(-1) - probs_sort > top_p, 0.0)
        return torch.gather(probs_idx, -1, inverse_cdf(probs_sort, uniform))
    return inverse_cdf(probs, uniform)


def inverse_cdf(weights, uniform):
    """The index (B, 1) of the first token whose cumulative weight exceeds uniform * total weight: a draw
    from weights (B, V), which need not sum to 1. A zero-weight token is never chosen: its cumulative
    weight equals its predecessor's, and the count never reaches past the last token with weight."""
    cdf = weights.cumsum(-1)
    total = cdf[:, -1:]
    target = uniform.to(cdf.dtype)[:, None] * total
    return ((cdf <= target) & (cdf < total)).sum(-1, keepdim=True)


# -----------------------------------------------------------------------------
# checkpoints

def clean_state_dict(state_dict):
    """Strip the prefixes that torch.compile ("_orig_mod.") and DDP ("module.") add to keys."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def model_args_from_checkpoint(checkpoint) -> ModelArgs:
    fields = ModelArgs.__dataclass_fields__
    return ModelArgs(**{k: v for k, v in checkpoint["model_args"].items() if k in fields})


def load_model_state(model: Transformer, state_dict):
    """Load a checkpoint's weights into model. A plain Transformer checkpoint loads into a
    TransformerWithValueHead (the value head keeps its fresh init) and vice versa (it is dropped)."""
    state_dict = clean_state_dict(state_dict)
    if "output.weight" not in state_dict:  # tied: some exporters keep only the embedding
        state_dict["output.weight"] = state_dict["tok_embeddings.weight"]
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not k.startswith("value_head.")]
    unexpected = [k for k in unexpected if not k.startswith("value_head.")]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
