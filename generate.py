"""
Generation with the model of model.py: sampling (temperature, top-k, top-p), the plain no-cache loop, and
the fast batched KV-cache generator (gpt-fast style: prefill once, then one compiled decode step per token).

    from generate import generate_withcache, compile_decode
    stories = generate_withcache(model, [[bos], [bos, 14, 29]], max_gen_len=200, temperature=0.8, eos_id=bos)
    fast = generate_withcache(model, prompts, 200, decode_fn=compile_decode(model))   # decode step compiled

sample.py is the command line for it; train.py uses it for PPO rollouts. Runs the same on CPU, CUDA and MPS.
"""
import contextlib
import inspect
import math
from typing import List, Optional

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# sampling


def check_sampling_args(temperature, top_k, top_p):
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p}")


def inverse_cdf(weights, uniform):
    """The index (B, 1) of the first token whose cumulative weight exceeds uniform * total weight: a draw
    from weights (B, V), which need not sum to 1. A zero-weight token is never chosen: its cumulative
    weight equals its predecessor's, and the count never reaches past the last token with weight."""
    cdf = weights.cumsum(-1)
    total = cdf[:, -1:]
    target = uniform.to(cdf.dtype)[:, None] * total
    return ((cdf <= target) & (cdf < total)).sum(-1, keepdim=True)


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


# -----------------------------------------------------------------------------
# the plain loop: the slow reference the fast generator is tested against


@torch.inference_mode()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, eos_id=None):
    """A full forward over the whole context for every new token (no cache). idx: (B, T) LongTensor;
    returns (B, T + n) with n <= max_new_tokens (stops early when every row has produced eos_id)."""
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        logits = model(idx[:, -model.params.max_seq_len:]).logits
        next_token = sample_top_k_top_p(logits[:, -1], top_k, top_p, temperature)
        idx = torch.cat((idx, next_token), dim=1)
        if eos_id is not None:
            done |= next_token[:, 0] == eos_id
            if done.all():
                break
    return idx


# -----------------------------------------------------------------------------
# the KV-cache generator


def prefill(model, tokens, last_pos):
    """Run right-padded prompts (B, T) through the model at positions 0..T-1, filling the cache. Returns
    the logits (B, vocab) at each row's last prompt position last_pos (B,) (the only ones sampled from)."""
    B, T = tokens.shape
    input_pos = torch.arange(T, device=tokens.device).expand(B, T)
    h = model.hidden_states(tokens, input_pos)
    h = h[torch.arange(B, device=h.device), last_pos][:, None]  # (B, 1, dim)
    return model.head(h).logits[:, 0].float()


def decode_step(model, tokens, input_pos, cache_positions=None):
    """One new token per row: tokens (B, 1) at per-row positions input_pos (B,), attending to the cache
    positions cache_positions (arange(L), L > every input_pos; default the whole cache). Returns the logits
    (B, vocab). Static shapes but L, which generate_withcache marks dynamic, so it compiles once and replays
    for every step and call. Rows past the end of the cache (finished rows that keep decoding) write its last slot."""
    input_pos = input_pos.clamp(max=model.cache_shape[1] - 1)
    h = model.hidden_states(tokens, input_pos[:, None], cache_positions)  # (B, 1, dim); hidden_states + head,
    return model.head(h).logits[:, -1].float()  # as prefill: a policy's forward would also compute values nobody reads


def decode_tokens(model, tokens, input_pos, uniforms, temperature=0.0, top_k=0, top_p=1.0, cache_positions=None):
    """K = uniforms.size(1) decode steps in one call: feed tokens (B, 1) at per-row positions input_pos
    (B,), sample the next token of each row with its uniform of that step (uniforms (B, K), ignored when
    greedy), feed that, and so on. Returns the K new tokens (B, K). Sampling happens here, inside what
    compile_decode compiles, so a compiled call is the whole step; K > 1 also spreads torch.compile's
    fixed cost per call (~0.2 ms on a 2-core CPU) over K tokens."""
    new_tokens = []
    for i in range(uniforms.size(1)):
        logits = decode_step(model, tokens, input_pos + i, cache_positions)
        tokens = sample_top_k_top_p(logits, top_k, top_p, temperature, uniform=uniforms[:, i])
        new_tokens.append(tokens)
    return torch.cat(new_tokens, dim=1)


def compile_decode(model):
    """torch.compile decode_tokens (forward and sampling) of model, for generate_withcache(decode_fn=...).
    Static shapes: it compiles once per (batch, cache bucket, tokens_per_call, sampling settings) and replays
    for every call. cpp_wrapper moves the per-call launch code from Python to C++, which matters when each
    step is only microseconds of math."""
    options = {"cpp_wrapper": True} if model.tok_embeddings.weight.device.type == "cpu" else None
    # every (batch, tokens per call, sampling settings) is its own graph, and every compile_decode shares this code
    # object: dynamo's default of 8 graphs per code object is soon reached by a process that samples in several ways
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))

    def model_decode_tokens(tokens, input_pos, uniforms, temperature=0.0, top_k=0, top_p=1.0, cache_positions=None):
        return decode_tokens(model, tokens, input_pos, uniforms, temperature, top_k, top_p, cache_positions)
    return torch.compile(model_decode_tokens, fullgraph=True, dynamic=False, options=options)


AUTO_TOKENS_PER_CALL = 4  # decode steps per compiled call where the steps are small ...
SMALL_STEP = 10_000_000  # ... at most this many parameters x rows: 260K up to batch ~38, not 15M (bench/RESULTS.md)


def auto_tokens_per_call(model, batch):
    """Decode steps per compiled call when the caller names none: AUTO_TOKENS_PER_CALL where a step is so little
    work (parameters x rows) that the call's fixed cost is a large part of it, else 1 (the compile takes ~2.5x longer
    at 4, so it is spent only where it pays)."""
    n_params = sum(p.numel() for p in model.parameters())
    return AUTO_TOKENS_PER_CALL if n_params * batch <= SMALL_STEP else 1


# newer torch (2.7+) can skip guard evaluation; generate_withcache does so after the first step of a call
CAN_SKIP_GUARDS = hasattr(torch.compiler, "set_stance") and \
    "skip_guard_eval_unsafe" in inspect.signature(torch.compiler.set_stance).parameters
STOP_CHECK_EVERY = 8  # decode steps between the checks of whether all rows are done (each is a host sync)
ATTEND_BUCKET = 64  # a decode step reads the cache up to the furthest row's position, rounded up to this


COMPACT_AT = 0.75  # eager decoding drops the finished rows once at most this fraction of the batch is live


def rows_done(out, stop_ids, limit):
    """out (B, s): the tokens so far. (B,) True where a row has emitted a stop id or used its budget."""
    done = limit <= out.size(1)
    if stop_ids is not None:
        done |= torch.isin(out, stop_ids).any(1)
    return done


@torch.inference_mode()
def generate_withcache(model, prompt_tokens: List[List[int]], max_gen_len: int, temperature: float = 0.6,
                       top_k: int = 0, top_p: float = 1.0, eos_id=None, echo: bool = False, device=None,
                       decode_fn=None, generator: Optional[torch.Generator] = None,
                       tokens_per_call: Optional[int] = None,
                       keep_stop_token: bool = False) -> List[List[int]]:
    """Batched KV-cache generation for prompts of different lengths.

    Each row gets at most max_gen_len new tokens, stops at eos_id (an id or a list of ids) or when the
    context (max_seq_len) is full, and equals what its prompt produces alone under greedy decoding. Rows are
    right-padded; every row decodes at its own position, so no row waits for or is padded by another.
    Returns the new tokens per row (prompt + new tokens with echo=True). The stop token is left out, unless
    keep_stop_token=True: then a row ends with a stop id exactly when it stopped at one (rather than running
    out of budget or context).
    decode_fn: optional replacement for decode_tokens(model, ...), e.g. compile_decode(model).
    tokens_per_call: decode steps per decode_fn call (the same tokens for any value; a compiled decode_fn
    compiles once per value); None: auto_tokens_per_call with a decode_fn, else 1. Sampling draws one uniform
    per row and token from generator (default: torch's global generator), so a seed gives the same stories eager
    or compiled. Eager decoding (no decode_fn) drops the
    rows that finished from the batch as it goes, each row keeping its own uniforms: the same stories, fewer steps'
    work when lengths vary (a compiled step is compiled for one batch size, so it keeps them all)."""
    check_sampling_args(temperature, top_k, top_p)
    if max_gen_len < 1:
        raise ValueError(f"max_gen_len must be >= 1, got {max_gen_len}")
    if tokens_per_call is None:
        tokens_per_call = auto_tokens_per_call(model, len(prompt_tokens)) if decode_fn is not None else 1
    if tokens_per_call < 1:
        raise ValueError(f"tokens_per_call must be >= 1, got {tokens_per_call}")
    if not prompt_tokens or any(len(p) == 0 for p in prompt_tokens):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    device = device or model.tok_embeddings.weight.device
    ctx = model.params.max_seq_len
    lens = [len(p) for p in prompt_tokens]
    if max(lens) >= ctx:
        raise ValueError(f"prompt of {max(lens)} tokens leaves no room in the context of max_seq_len={ctx} tokens")
    B = len(prompt_tokens)
    n_new = [min(max_gen_len, ctx - n) for n in lens]  # tokens each row may add
    steps = max(n_new)
    # positions ever fed: prompt, then every new token but the last; keep the size stable across
    # calls (multiple of 64) so a compiled decode step is not recompiled for every batch
    need = max(n + k - 1 for n, k in zip(lens, n_new))
    model.setup_caches(B, min(ctx, 64 * math.ceil(need / 64)), device=device)
    decode = decode_fn or (lambda *args: decode_tokens(model, *args))

    tokens = torch.zeros(B, max(lens), dtype=torch.long, device=device)
    for i, p in enumerate(prompt_tokens):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    lens_t = torch.tensor(lens, device=device)
    logits = prefill(model, tokens, lens_t - 1)

    def uniforms(k):  # (B, k), drawn step by step so that any tokens_per_call sees the same numbers;
        # greedy decoding draws nothing, so it leaves the generator as it was
        return (torch.zeros(B, k, device=device) if temperature == 0.0
                else torch.rand(k, B, device=device, generator=generator).t())

    stop_ids = None if eos_id is None else torch.tensor(
        [eos_id] if isinstance(eos_id, int) else list(eos_id), device=device)
    K = tokens_per_call
    # a step attends to the cache up to the furthest row's position, rounded up to ATTEND_BUCKET (not to the
    # whole cache: half the reads on average); compiled, that length is one dynamic dimension, so no recompiles
    cache_len, longest = model.cache_shape[1], max(lens)
    all_positions, positions = torch.arange(cache_len, device=device), None
    out = torch.zeros(B, steps + K, dtype=torch.long, device=device)  # + K: the last call may overshoot
    limit = torch.tensor(n_new, device=device)  # per-row budget of new tokens
    # the token fed next; one tensor for the whole loop, so every decode call sees the same strides
    next_token = sample_top_k_top_p(logits, top_k, top_p, temperature, uniform=uniforms(1)[:, 0]).contiguous()
    out[:, :1] = next_token
    rows = None  # the rows still in the batch, once eager decoding has dropped finished ones (None: all B)
    with contextlib.ExitStack() as stack:
        for s in range(1, steps, K):  # s: new tokens so far
            # finished rows keep decoding harmlessly in place until dropped (their output is cut below)
            attend = min(cache_len, ATTEND_BUCKET * math.ceil((longest + s - 1 + K) / ATTEND_BUCKET))
            if positions is None or positions.size(0) != attend:
                positions = all_positions[:attend]
                if decode_fn is not None and attend > 1:  # dynamo specialises lengths 0 and 1 anyway
                    torch._dynamo.mark_dynamic(positions, 0)
            u = uniforms(K)
            new_tokens = decode(next_token, lens_t + s - 1, u if rows is None else u[rows], temperature, top_k, top_p,
                                positions)
            if rows is None:
                out[:, s: s + K] = new_tokens
            else:
                out[rows, s: s + K] = new_tokens
            next_token.copy_(new_tokens[:, -1:])
            if s == 1 and decode_fn is not None and CAN_SKIP_GUARDS:
                # dynamo checked its guards on this first call; the later calls pass tensors of the
                # same shapes to the same model, so re-checking dozens of guards per call is pure overhead
                stack.enter_context(torch.compiler.set_stance(skip_guard_eval_unsafe=True))
            if (s + K) // STOP_CHECK_EVERY > s // STOP_CHECK_EVERY:  # the loop's only host syncs
                live = ~rows_done(out[:, : s + K], stop_ids, limit)
                if rows is not None:
                    live = live[rows]
                n_live = int(live.sum())
                if n_live == 0:
                    break
                if decode_fn is None and n_live <= COMPACT_AT * live.size(0):
                    keep = live.nonzero()[:, 0]
                    model.keep_cache_rows(keep)
                    rows = keep if rows is None else rows[keep]
                    next_token, lens_t = next_token[keep], lens_t[keep]
                    longest = max(lens[i] for i in rows.tolist())

    result = []
    out = out.tolist()
    stops = [] if stop_ids is None else stop_ids.tolist()
    for i, p in enumerate(prompt_tokens):
        row = out[i][: n_new[i]]
        first_stop = min((row.index(t) for t in stops if t in row), default=None)
        if first_stop is not None:
            row = row[: first_stop + 1] if keep_stop_token else row[:first_stop]
        result.append(list(p) + row if echo else row)
    return result
