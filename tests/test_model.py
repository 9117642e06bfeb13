import math
import os
import platform
import subprocess
import sys

import pytest
import torch

from checkpoint import load_model_state
from generate import decode_step, generate, generate_withcache, prefill
from model import ModelArgs, Transformer, TransformerWithValueHead, apply_rotary_emb, precompute_freqs_cis

TINY = dict(dim=64, n_layers=2, n_heads=8, vocab_size=97, multiple_of=4, max_seq_len=64)


def test_parameter_count_of_the_260k_config():
    args = ModelArgs(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=4, max_seq_len=512)
    assert args.hidden_dim == 172
    model = Transformer(args)
    assert sum(p.numel() for p in model.parameters()) == 260_032  # output tied to the embedding
    assert model.output.weight is model.tok_embeddings.weight


def test_rope_matches_complex_reference():
    torch.manual_seed(0)
    B, T, H, D = 2, 11, 3, 16
    x = torch.randn(B, T, H, D)
    cos, sin = precompute_freqs_cis(D, T)
    got = apply_rotary_emb(x, cos.view(1, T, 1, -1), sin.view(1, T, 1, -1))
    # Meta's original: pairs as complex numbers times e^{i * pos * theta_j}
    freqs = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))
    freqs_cis = torch.polar(torch.ones(T, D // 2), torch.outer(torch.arange(T).float(), freqs))
    xc = torch.view_as_complex(x.reshape(B, T, H, D // 2, 2))
    want = torch.view_as_real(xc * freqs_cis.view(1, T, 1, D // 2)).flatten(3)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("n_kv_heads", [1, 2, 8])
def test_cached_logits_equal_full_forward_position_by_position(n_kv_heads):
    torch.manual_seed(n_kv_heads)
    model = Transformer(ModelArgs(**TINY, n_kv_heads=n_kv_heads)).eval()
    tokens = torch.randint(0, TINY["vocab_size"], (3, 30))
    with torch.no_grad():
        full = model(tokens).logits
        model.setup_caches(3, 32)
        prompt = 5
        logits = prefill(model, tokens[:, :prompt], torch.full((3,), prompt - 1))
        torch.testing.assert_close(logits, full[:, prompt - 1], atol=1e-5, rtol=0)
        for t in range(prompt, 30):
            logits = decode_step(model, tokens[:, t: t + 1], torch.full((3,), t))
            torch.testing.assert_close(logits, full[:, t], atol=1e-5, rtol=0)


def test_gqa_equals_multi_head_with_repeated_kv_weights():
    """n_kv_heads < n_heads is the same function as full attention whose k/v heads are copies."""
    torch.manual_seed(0)
    gqa = Transformer(ModelArgs(**TINY, n_kv_heads=2)).eval()
    mha = Transformer(ModelArgs(**TINY, n_kv_heads=8)).eval()
    sd = gqa.state_dict()
    hd = 64 // 8
    for k in list(sd):
        if k.endswith(("attention.wk.weight", "attention.wv.weight")):
            sd[k] = sd[k].view(2, hd, 64).repeat_interleave(4, dim=0).reshape(64, 64)
    mha.load_state_dict(sd)
    x = torch.randint(0, 97, (2, 20))
    torch.testing.assert_close(gqa(x).logits, mha(x).logits, atol=1e-5, rtol=1e-5)


def test_loss_is_cross_entropy_and_ignores_minus_one():
    model = Transformer(ModelArgs(**TINY))
    x = torch.randint(0, 97, (2, 10))
    y = x.clone()
    y[:, :3] = -1
    logits, loss, _ = model(x, y)
    want = torch.nn.functional.cross_entropy(logits[:, 3:].reshape(-1, 97), y[:, 3:].reshape(-1))
    torch.testing.assert_close(loss, want)
    torch.manual_seed(1)
    random_targets = torch.randint(0, 97, (2, 10))
    fresh_loss = Transformer(ModelArgs(**TINY))(x, random_targets).loss.item()
    assert abs(fresh_loss - math.log(97)) < 0.1  # a fresh init predicts nearly uniformly


@pytest.mark.parametrize("bad, message", [
    (dict(n_heads=7), "divisible by n_heads"),
    (dict(n_kv_heads=3), "divisible by n_kv_heads"),
    (dict(dim=48, n_heads=16), "must be even"),
    (dict(n_layers=0), "n_layers must be >= 1"),
])
def test_invalid_shapes_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        ModelArgs(**{**TINY, **bad})


def test_value_head_model_loads_a_plain_checkpoint():
    torch.manual_seed(0)
    plain = Transformer(ModelArgs(**TINY))
    sd = {"_orig_mod." + k: v for k, v in plain.state_dict().items()}  # as a compiled model saves it
    policy = TransformerWithValueHead(ModelArgs(**TINY))
    load_model_state(policy, sd)
    x = torch.randint(0, 97, (2, 9))
    logits, loss, values = policy(x)
    torch.testing.assert_close(logits, plain(x).logits)
    assert values.shape == (2, 9) and loss is None
    with pytest.raises(ValueError, match="does not fit"):
        load_model_state(Transformer(ModelArgs(**{**TINY, "n_layers": 3})), plain.state_dict())


def test_no_kv_cache_unless_generating():
    model = Transformer(ModelArgs(**TINY))
    assert all(layer.attention.kv_cache is None for layer in model.layers)
    generate_withcache(model, [[1, 2]], 3, temperature=0.0)
    assert model.cache_shape is not None
    assert not any("kv_cache" in k for k in model.state_dict())  # caches never enter checkpoints
    model.clear_caches()
    assert model.cache_shape is None and not any(b.numel() > 10_000 for b in model.buffers())


def test_golden_story_with_kv_cache(stories260k, greedy_text):
    model, enc = stories260k
    out = generate_withcache(model, [[enc.bos_id]], 500, temperature=0.0, eos_id=enc.bos_id)[0]
    assert len(out) == 345
    assert enc.decode(out) == greedy_text


@pytest.mark.slow
def test_golden_story_without_cache(stories260k, greedy_text):
    model, enc = stories260k
    idx = generate(model, torch.tensor([[enc.bos_id]]), 400, temperature=0.0, eos_id=enc.bos_id)[0].tolist()[1:]
    assert idx[-1] == enc.bos_id
    assert enc.decode(idx[:-1]) == greedy_text


def test_every_forward_returns_named_outputs_and_the_value_head_model_generates():
    """One output convention (ModelOutput): the policy generates like the plain model with the same weights,
    through the plain loop and the KV cache alike (its generate used to fail unpacking three outputs)."""
    torch.manual_seed(0)
    plain = Transformer(ModelArgs(**TINY)).eval()
    policy = TransformerWithValueHead(ModelArgs(**TINY)).eval()
    load_model_state(policy, plain.state_dict())
    x = torch.randint(0, 97, (2, 9))
    out, pout = plain(x, x), policy(x)
    assert out.values is None and out.loss is not None and out.logits.shape == (2, 9, 97)
    assert pout.loss is None and pout.values.shape == (2, 9)
    idx = torch.tensor([[1, 5]])
    assert torch.equal(generate(policy, idx, 12, temperature=0.0), generate(plain, idx, 12, temperature=0.0))
    assert generate_withcache(policy, [[1, 5]], 12, temperature=0.0) == \
        generate_withcache(plain, [[1, 5]], 12, temperature=0.0)


def test_tied_and_untied_classifiers_never_load_into_each_other():
    torch.manual_seed(0)
    untied = Transformer(ModelArgs(**TINY, tie_embeddings=False))
    assert untied.output.weight is not untied.tok_embeddings.weight
    with pytest.raises(ValueError, match="its own classifier"):
        load_model_state(Transformer(ModelArgs(**TINY)), untied.state_dict())
    sd = {k: v for k, v in Transformer(ModelArgs(**TINY)).state_dict().items() if k != "output.weight"}
    with pytest.raises(ValueError, match="no output.weight"):
        load_model_state(Transformer(ModelArgs(**TINY, tie_embeddings=False)), sd)
    twin = Transformer(ModelArgs(**TINY, tie_embeddings=False))
    load_model_state(twin, untied.state_dict())
    assert torch.equal(twin.output.weight, untied.output.weight)
    assert torch.equal(twin.tok_embeddings.weight, untied.tok_embeddings.weight)


RSS_AFTER_FREE = """
import torch, model, cpu_kernels
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MB, above glibc's largest mmap threshold
held = rss()
del x
print(cpu_kernels.KEEPS_FREED_MEMORY, (held - rss()) >> 20)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm") or platform.libc_ver()[0] != "glibc",
                    reason="the allocator setting applies to Linux with glibc")
def test_importing_the_model_keeps_freed_memory_unless_told_not_to():
    """A freed 64 MB tensor stays in the process (no page faults for the next one), and goes back to the system
    with FULLLLM_SYSTEM_MALLOC=1 or a setting of glibc's own in the environment."""
    def run(**env):
        out = subprocess.run([sys.executable, "-c", RSS_AFTER_FREE], capture_output=True, text=True, check=True,
                             env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(__file__)))
        kept, released_mb = out.stdout.split()
        return kept == "True", int(released_mb)
    assert run() == (True, 0)
    told_not_to = ({"FULLLLM_SYSTEM_MALLOC": "1"}, {"MALLOC_ARENA_MAX": "4"},
                   {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"})
    for env in told_not_to:
        kept, released_mb = run(**env)
        assert not kept and released_mb >= 60, env
