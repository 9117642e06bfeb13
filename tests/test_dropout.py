"""Attention and dropout on a CPU (model.py): the chunked causal attention against SDPA (alone and in a model's
training step) and, with dropout, against the naive computation with the same keep mask; its statistics (drop
rate, independence across heads, positions and steps); that a seed reproduces it and a saved RNG state resumes
it; and which path attention takes."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import cpu_kernels
import model as model_module
from cpu_kernels import ChunkedCausalAttention, dropout, drop_mask, quantised_p
from model import ModelArgs, Transformer, causal_attention


def qkv(B=2, H=4, Hk=2, T=37, D=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(B, h, T, D, generator=g, dtype=dtype).requires_grad_(True)
    return make(H), make(Hk), make(Hk)


def grouped(q, k, v, p):
    B, H, T, D = q.shape
    return ChunkedCausalAttention.apply(q.view(B, k.size(1), H // k.size(1), T, D), k, v, p).reshape(B, H, T, -1)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "ATTENTION_CHUNK", 8)  # 37 positions: 5 chunks, the last one partial


def test_without_drops_it_is_sdpa_forward_and_backward(small_chunks):
    q, k, v = qkv()
    y = grouped(q, k, v, 0.0)  # p = 0: the drop mask drops nothing
    n_rep = q.size(1) // k.size(1)
    y0 = F.scaled_dot_product_attention(q, k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1),
                                        is_causal=True)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (q, k, v), dy)
    grads0 = torch.autograd.grad(y0, (q, k, v), dy)
    assert torch.allclose(y, y0, atol=1e-12)
    for a, b in zip(grads, grads0):
        assert torch.allclose(a, b, atol=1e-12)


def naive(q, k, v, keep, p):
    """The textbook computation with a given keep mask: materialised scores, mask, softmax, dropout, @ v."""
    n_rep = q.size(1) // k.size(1)
    T = q.size(2)
    scores = q @ k.repeat_interleave(n_rep, 1).transpose(-1, -2) / math.sqrt(q.size(-1))
    probs = torch.softmax(scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")), -1)
    return (probs * keep / (1 - quantised_p(p))) @ v.repeat_interleave(n_rep, 1), probs


def test_with_drops_it_matches_the_naive_computation_with_the_same_mask(small_chunks):
    """An identity appended to v makes the output reveal the dropped probabilities themselves, hence the mask;
    the naive computation with that mask must give the same output and the same gradients."""
    p = 0.3
    q, k, v = qkv()
    B, Hk, T, D = v.shape
    v_eye = torch.cat([v.detach(), torch.eye(T, dtype=v.dtype).expand(B, Hk, T, T)], -1).requires_grad_(True)
    y = grouped(q, k, v_eye, p)
    dropped_probs = y[..., D:].detach()
    keep = dropped_probs != 0
    y_naive, probs = naive(q, k, v_eye, keep, p)
    assert torch.allclose(dropped_probs, probs.detach() * keep / (1 - quantised_p(p)), atol=1e-12)
    assert torch.allclose(y, y_naive, atol=1e-12)
    dy = torch.cat([torch.randn(*y.shape[:-1], D, dtype=y.dtype), torch.zeros(*y.shape[:-1], T, dtype=y.dtype)], -1)
    for a, b in zip(torch.autograd.grad(y, (q, k, v_eye), dy), torch.autograd.grad(y_naive, (q, k, v_eye), dy)):
        assert torch.allclose(a, b, atol=1e-12)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    assert 0.2 < 1 - keep[..., causal].double().mean() < 0.4


def revealed_keep_mask(p, B=4, H=8, Hk=4, T=96, seed=None):
    """The keep mask of one call on the causal part: (B, H, n_causal) bool, drawn from the global generator."""
    q = torch.zeros(B, H, T, 1)  # uniform attention: every causal probability is 1 / (row + 1) > 0
    v = torch.eye(T).expand(B, Hk, T, T)
    y = causal_attention(q, torch.zeros(B, Hk, T, 1), v, p)
    return (y != 0)[..., torch.ones(T, T, dtype=torch.bool).tril()]


def within(observed, expected, n, sigmas=5):
    return abs(observed - expected) <= sigmas * math.sqrt(expected * (1 - expected) / n)


def test_drop_rate_and_independence_across_heads_positions_and_steps():
    p = 0.05
    torch.manual_seed(0)
    a, b = revealed_keep_mask(p), revealed_keep_mask(p)  # two consecutive steps
    drop_a, drop_b = ~a, ~b
    n = drop_a.numel()
    assert within(drop_a.double().mean().item(), quantised_p(p), n)
    pairs = {  # each pair is two different attention probabilities; both dropped with probability p^2
        "heads": (drop_a[:, 1:], drop_a[:, :-1]),
        "batch rows": (drop_a[1:], drop_a[:-1]),
        "neighbouring positions": (drop_a[..., 1:], drop_a[..., :-1]),
        "steps": (drop_a, drop_b),
    }
    for name, (x, y) in pairs.items():
        both = (x & y).double().mean().item()
        assert within(both, quantised_p(p) ** 2, x.numel()), (name, both)
    assert not torch.equal(a, b)


def test_each_16_bit_lane_of_a_draw_drops_at_the_rate():
    """drop_mask takes four 16-bit uniforms from each 64-bit draw; a draw that left a sign bit at 0 would keep
    one lane (almost) always. p = 0.05 is realised as 3277 / 65536."""
    torch.manual_seed(1)
    drops = drop_mask((800_000,), 0.5)
    for lane in range(4):
        assert within(drops[lane::4].double().mean().item(), 0.5, drops[lane::4].numel())
    drops = drop_mask((1_000, 1_000), 0.05)
    assert within(drops.double().mean().item(), quantised_p(0.05), drops.numel())
    assert quantised_p(0.05) == 3277 / 65536
    assert not drop_mask((10_000,), 0.0).any()


def test_a_seed_reproduces_it_and_a_saved_rng_state_resumes_it():
    torch.manual_seed(3)
    first = revealed_keep_mask(0.1)
    state = torch.get_rng_state()
    second = revealed_keep_mask(0.1)
    torch.manual_seed(3)
    assert torch.equal(revealed_keep_mask(0.1), first)
    torch.set_rng_state(state)
    assert torch.equal(revealed_keep_mask(0.1), second)


def test_elementwise_dropout_keeps_the_expectation():
    torch.manual_seed(4)
    x = torch.ones(1000, 1000)
    y = dropout(x, 0.05, True)
    assert within((y == 0).double().mean().item(), quantised_p(0.05), x.numel())
    assert torch.allclose(y[y != 0], torch.tensor(1 / (1 - quantised_p(0.05))))
    assert abs(y.mean().item() - 1) < 5 * math.sqrt(0.05 / 0.95 / x.numel())
    assert dropout(x, 0.05, False) is x


def test_a_model_with_dropout_trains_and_is_deterministic_in_eval_mode():
    torch.manual_seed(0)
    cfg = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=8, max_seq_len=80,
                    dropout=0.1)
    m = Transformer(cfg)
    x = torch.randint(0, 64, (3, 80))
    losses = [m(x, x).loss for _ in range(2)]
    assert losses[0].item() != losses[1].item()  # training mode draws new masks
    losses[0].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    m.eval()
    assert m(x, x).loss.item() == m(x, x).loss.item()


def test_attention_takes_the_chunks_where_they_pay_whatever_the_grad_mode(monkeypatch):
    """Chunks on a CPU with dropout or at head_dim <= CHUNKED_MAX_HEAD_DIM (SDPA's fused kernel is slow for small
    heads), SDPA above it; with or without gradients alike, and bit for bit the same output both ways (PPO's
    no-grad log-probs must equal its training forward's)."""
    calls = []
    real = model_module.chunked_causal_attention
    monkeypatch.setattr(model_module, "chunked_causal_attention", lambda *a: calls.append(1) or real(*a))
    for D, p, chunked in [(8, 0.0, True), (32, 0.0, True), (48, 0.0, False), (48, 0.1, True)]:
        outputs = []
        for grad in (True, False):
            calls.clear()
            q, k, v = qkv(D=D, dtype=torch.float32)
            torch.manual_seed(0)
            with torch.set_grad_enabled(grad):
                outputs.append(causal_attention(q, k, v, p))
            assert bool(calls) == chunked, (D, grad, p)
        assert outputs[0].requires_grad and not outputs[1].requires_grad
        assert torch.equal(outputs[0].detach(), outputs[1]), (D, p)


def test_training_through_the_chunks_gives_sdpa_loss_and_gradients(monkeypatch):
    """The whole model at dropout 0: the same loss and gradients whether attention runs in chunks or in SDPA."""
    monkeypatch.setattr(cpu_kernels, "ATTENTION_CHUNK", 16)  # 80 positions: 5 chunks
    cfg = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=8, max_seq_len=80)
    torch.manual_seed(0)
    m = Transformer(cfg).double()
    x = torch.randint(0, 64, (3, 80))
    results = []
    for max_head_dim in (model_module.CHUNKED_MAX_HEAD_DIM, 0):  # head_dim 8: chunks, then SDPA
        monkeypatch.setattr(model_module, "CHUNKED_MAX_HEAD_DIM", max_head_dim)
        loss = m(x, x).loss
        results.append((loss.detach(), torch.autograd.grad(loss, list(m.parameters()))))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, rtol=0, atol=1e-12)
    for a, b in zip(grads_a, grads_b):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.slow
def test_under_torch_compile_the_chunks_run_eagerly_and_importing_the_model_does_not_load_dynamo():
    """torch.compile traces the model around the chunked attention (one graph break per layer, the chunks run as
    they are) rather than into it; and the marking happens at the first compiled call, so a script that compiles
    nothing never pays the ~1.5 s import of torch._dynamo."""
    import subprocess
    import sys
    probe = "import sys, model, generate, ppo, checkpoint, tokenizer; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=os.path.dirname(cpu_kernels.__file__))
    assert out.stdout.strip() == "False", out.stderr
    import torch._dynamo
    cfg = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=8, max_seq_len=16)
    m = Transformer(cfg)
    x = torch.randint(0, 64, (2, 16))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(m)(x, x)
    reasons = [str(r.reason) for r in explained.break_reasons]
    assert len(reasons) == cfg.n_layers and all("skipped" in r for r in reasons), reasons
    traced = " ".join(str(n.target) for g in explained.graphs for n in g.graph.nodes)
    assert "softmax" not in traced  # the attention probabilities were never traced
    torch._dynamo.reset()
