"""The KV-cache generator: exact against the plain loop, ragged batches, sampling that does what its
flags say, and a compiled decode step that compiles once."""
import copy

import pytest
import torch

from conftest import run, run_in_process, script, shared_path
from generate import compile_decode, decode_step, decode_tokens, generate, generate_withcache, sample_top_k_top_p
from model import ModelArgs, Transformer


def test_ragged_batch_equals_each_prompt_alone(stories260k, greedy_text):
    model, enc = stories260k
    story = enc.encode(greedy_text, bos=True, eos=False)
    prompts = [story[:n] for n in (1, 6, 11, 17, 23, 29, 34, 40)]
    batched = generate_withcache(model, prompts, 60, temperature=0.0)
    alone = [generate_withcache(model, [p], 60, temperature=0.0)[0] for p in prompts]
    assert batched == alone
    assert all(len(row) == 60 for row in batched)  # every row gets max_gen_len, short prompts no more
    assert batched[0] == story[1:61]  # and it is the golden story
    # a stop token that row 0 emits early: row 0 stops there, the other rows are untouched
    stop = batched[0][4]
    stopped = generate_withcache(model, prompts, 60, temperature=0.0, eos_id=stop)
    for row, full in zip(stopped, alone):
        assert row == (full[: full.index(stop)] if stop in full else full)
    assert len(stopped[0]) == 4
    with_prompt = generate_withcache(model, prompts[:2], 5, temperature=0.0, echo=True)
    assert with_prompt[1] == prompts[1] + alone[1][:5]


def test_rows_stop_when_the_context_is_full():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=50, multiple_of=4, max_seq_len=24)).eval()
    out = generate_withcache(model, [[1] * 20, [1, 2]], 10, temperature=0.0)
    assert [len(o) for o in out] == [4, 10]  # 20 + 4 = the whole context of 24
    alone = generate_withcache(model, [[1] * 20], 10, temperature=0.0)[0]
    assert out[0] == alone
    full_seq = torch.tensor([[1] * 20 + out[0][:3]])
    assert model(full_seq).logits[0, -1].argmax().item() == out[0][3]  # the last token saw the whole context
    with pytest.raises(ValueError, match="leaves no room in the context of max_seq_len=24"):
        generate_withcache(model, [[1] * 24], 5)
    with pytest.raises(ValueError, match="max_gen_len must be >= 1"):
        generate_withcache(model, [[1]], 0)


def test_cached_generation_matches_the_plain_loop_on_random_models():
    for n_kv in (1, 2, 4):
        torch.manual_seed(n_kv)
        model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=n_kv, vocab_size=60, multiple_of=4,
                                      max_seq_len=64)).eval()
        prompt = [1, 5, 9]
        cached = generate_withcache(model, [prompt], 30, temperature=0.0)[0]
        plain = generate(model, torch.tensor([prompt]), 30, temperature=0.0)[0, 3:].tolist()
        assert cached == plain


def test_dropping_finished_rows_changes_no_token(stories260k, monkeypatch):
    """Eager decoding drops rows as they stop: every row, sampled or greedy, is what the full batch gives."""
    import generate as gen_module
    model, enc = stories260k
    prompts = [[enc.bos_id, t] for t in range(30, 62)]
    stop = [enc.bos_id, enc.encode(".", bos=False, eos=False)[-1]]  # ends a row at its first sentence
    kept, shapes = {}, []
    real_keep = model.keep_cache_rows
    monkeypatch.setattr(model, "keep_cache_rows", lambda rows: shapes.append(rows.numel()) or real_keep(rows))
    for compact_at in (0.0, gen_module.COMPACT_AT):
        monkeypatch.setattr(gen_module, "COMPACT_AT", compact_at)
        gen = torch.Generator().manual_seed(3)
        kept[compact_at] = [generate_withcache(model, prompts, 80, temperature=t, eos_id=stop, generator=gen,
                                               keep_stop_token=True) for t in (1.0, 0.0)]
    assert kept[0.0] == kept[gen_module.COMPACT_AT]
    lengths = sorted(len(r) for r in kept[0.0][0])
    assert lengths[0] < 20 and lengths[-1] > 40  # rows of very different lengths ...
    assert shapes and min(shapes) < len(prompts) / 2  # ... so the batch did shrink


P = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])


def empirical(top_k, top_p, n=20000, temperature=1.0):
    logits = P.log().repeat(n, 1)
    before = logits.clone()
    draws = sample_top_k_top_p(logits, top_k=top_k, top_p=top_p, temperature=temperature,
                               generator=torch.Generator().manual_seed(0))[:, 0]
    assert torch.equal(logits, before)  # the caller's logits are not modified
    return torch.bincount(draws, minlength=len(P)).float() / n


@pytest.mark.parametrize("top_k, top_p, allowed", [
    (0, 1.0, [0, 1, 2, 3, 4, 5]),
    (3, 1.0, [0, 1, 2]),
    (0, 0.6, [0, 1]),        # 0.4 < 0.6: the second token is needed; 0.65 >= 0.6: the third is not
    (0, 0.7, [0, 1, 2]),
    (2, 0.9, [0, 1]),        # compose: top-k first, then top-p of what is left, one draw
    (4, 0.5, [0, 1]),        # after top-4 the mass renormalises: 0.4/0.9 = 0.44 < 0.5 needs the second
])
def test_sampling_support_and_frequencies(top_k, top_p, allowed):
    freq = empirical(top_k, top_p)
    assert torch.nonzero(freq).flatten().tolist() == allowed
    want = torch.zeros_like(P)
    want[allowed] = P[allowed] / P[allowed].sum()
    assert (freq - want).abs().max() < 0.015


def test_temperature_zero_is_argmax_and_sampling_is_reproducible():
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(3))
    assert torch.equal(sample_top_k_top_p(logits, temperature=0.0)[:, 0], logits.argmax(-1))
    a = sample_top_k_top_p(logits, 10, 0.9, 0.8, generator=torch.Generator().manual_seed(7))
    b = sample_top_k_top_p(logits, 10, 0.9, 0.8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    hot = empirical(0, 1.0, temperature=2.0)  # temperature flattens the distribution
    assert hot[5] > P[5] + 0.03


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be >= 0"),
])
def test_bad_sampling_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_top_k_top_p(torch.zeros(1, 4), **{"top_k": 0, "top_p": 1.0, "temperature": 1.0, **kwargs})


@pytest.mark.slow
def test_sample_py_refuses_bad_sampling_flags():
    ckpt = shared_path("stories260K", "stories260K.pt")
    for flag, message in (("--temperature=-1.0", "temperature must be >= 0"), ("--top_p=0.0", "top_p must be in"),
                          ("--max_new_tokens=0", "--max_new_tokens must be >= 1"),
                          ("--tokens_per_call=-1", "--tokens_per_call must be >= 1, or 0 for auto"),
                          ("--compile=sometimes", "--compile must be auto, True or False")):
        proc = run_in_process([script("sample.py"), f"--checkpoint={ckpt}", flag])
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr


def test_in_process_runs_leave_the_process_as_they_found_it(tmp_path):
    """A script run in-process (run_in_process) that reseeds, installs signal handlers or changes torch's settings,
    then exits, leaves none of it behind: sample.py's refusal of a bad flag (after it seeded) and a script that
    changes everything."""
    import random
    import signal
    torch.manual_seed(11)
    random.seed(11)
    state, py_state, handler = torch.get_rng_state(), random.getstate(), signal.getsignal(signal.SIGINT)
    proc = run_in_process([script("sample.py"), "--temperature=-1", "--seed=5"])
    assert proc.returncode != 0 and "temperature must be >= 0" in proc.stderr
    meddler = tmp_path / "meddler.py"
    meddler.write_text("import random, signal, sys, torch\n"
                       "torch.manual_seed(0); random.seed(0); torch.set_num_threads(1)\n"
                       "torch.set_default_dtype(torch.float64)\n"
                       "signal.signal(signal.SIGINT, lambda *a: None); sys.exit(3)\n")
    threads = torch.get_num_threads()
    assert run_in_process([str(meddler)]).returncode == 3
    assert torch.equal(torch.get_rng_state(), state) and random.getstate() == py_state
    assert signal.getsignal(signal.SIGINT) is handler and torch.get_default_dtype() == torch.float32
    assert torch.get_num_threads() == threads


def test_clear_caches_frees_the_cache_and_generation_sets_it_up_again():
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=50, multiple_of=4, max_seq_len=32))
    first = generate_withcache(model, [[1]], 5, temperature=0.0)
    assert model.cache_shape is not None and "layers.0.attention.kv_cache.k" in dict(model.named_buffers())
    model.clear_caches()
    assert model.cache_shape is None and not any("kv_cache" in n for n, _ in model.named_buffers())
    twin = copy.deepcopy(model)  # e.g. a frozen PPO reference: no cache to copy
    assert twin.output.weight is twin.tok_embeddings.weight  # still tied
    assert generate_withcache(twin, [[1]], 5, temperature=0.0) == first


@pytest.mark.slow
def test_compiled_decode_compiles_once_across_steps_and_calls(stories260k):
    import torch._dynamo
    model, _ = stories260k
    decode = torch.compile(lambda *a: decode_tokens(model, *a), fullgraph=True)
    torch._dynamo.config.error_on_recompile = True
    try:  # the steps read 64, 128, then 192 cache positions (one dynamic length); then other prompts, same
        # batch size and cache bucket: not a single recompilation
        first = generate_withcache(model, [[1], [1, 14]], 150, temperature=0.0, decode_fn=decode, tokens_per_call=1)
        second = generate_withcache(model, [[1, 20, 30], [1]], 151, temperature=0.0, decode_fn=decode,
                                    tokens_per_call=1)
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert first[0] == generate_withcache(model, [[1]], 150, temperature=0.0)[0]
    assert second[1] == first[0] + [second[1][150]]


@pytest.mark.slow
def test_compiled_decode_equals_eager_for_few_and_many_rows():
    """The compiled step uses other forms of the same sums (fused multiply-sums for <= 8 rows, the
    transposed GEMM for more): its logits and tokens must match the eager step. Batch 1 -> 12 -> 1
    through one compiled function also checks that skipping guards inside a call never runs the
    graph of another batch size."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=70, multiple_of=8,
                                  max_seq_len=64)).eval()
    decode = compile_decode(model)
    step = torch.compile(lambda t, p: decode_step(model, t, p), fullgraph=True, dynamic=False, options={"cpp_wrapper": True})
    for batch in (1, 12, 1):
        prompts = [[1 + (i * 7 + j) % 60 for j in range(1 + i % 5)] for i in range(batch)]
        eager = generate_withcache(model, prompts, 40, temperature=0.0)
        assert generate_withcache(model, prompts, 40, temperature=0.0, decode_fn=decode, tokens_per_call=1) == eager
        tokens, pos = torch.tensor([[3]] * batch), torch.arange(batch) + 5
        with torch.inference_mode():
            torch.testing.assert_close(step(tokens, pos), decode_step(model, tokens, pos), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_several_tokens_per_call_and_sampling_in_the_compiled_graph():
    """tokens_per_call=3 (not a divisor of the 8-token stop check nor of the budget) gives the same tokens
    as one per call, eager and compiled, greedy and sampled: a seeded generator supplies the same
    uniforms to every path, and the compiled graph samples with them."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=60, multiple_of=8,
                                  max_seq_len=64)).eval()
    with torch.no_grad():  # an untrained tied model only repeats its last token: make it say something
        for p in model.parameters():
            p.normal_(std=0.3) if p.dim() == 2 else None
    decode = compile_decode(model)
    prompts = [[1, 5, 9], [1], [1, 7]]
    greedy = generate_withcache(model, prompts, 30, temperature=0.0)
    r, first_new = next((r, k) for k in range(5, 30) for r in range(3) if greedy[r][k] not in greedy[r][:k])
    stop = greedy[r][first_new]  # greedy row r stops after first_new tokens
    for sampling in (dict(temperature=0.0), dict(temperature=1.0, top_k=20, top_p=0.9)):
        runs = [generate_withcache(model, prompts, 25, eos_id=stop, generator=torch.Generator().manual_seed(3),
                                         decode_fn=fn, tokens_per_call=k, **sampling)
                for fn, k in ((None, 1), (None, 3), (decode, 3))]
        assert runs[0] == runs[1] == runs[2]
        if sampling["temperature"] == 0.0:
            assert len(runs[0][r]) == first_new and max(map(len, runs[0])) > first_new
        else:
            assert len(set(map(tuple, runs[0]))) == 3  # sampled rows differ
    with pytest.raises(ValueError, match="tokens_per_call must be >= 1"):
        generate_withcache(model, prompts, 5, tokens_per_call=0)


def test_tokens_per_call_is_chosen_by_the_size_of_a_step(stories260k):
    """Unnamed, a compiled decode step runs AUTO_TOKENS_PER_CALL steps per call where a step is little work (260K at
    batch 1 and 32) and one elsewhere (15M; eager decoding); a named value is kept. Every choice gives the same
    tokens."""
    import generate as gen_module
    model, _ = stories260k
    big = Transformer(ModelArgs(dim=288, n_layers=6, n_heads=6, vocab_size=32000, max_seq_len=256))
    assert gen_module.auto_tokens_per_call(model, 1) == gen_module.auto_tokens_per_call(model, 32) == 4
    assert gen_module.auto_tokens_per_call(big, 1) == 1 and gen_module.auto_tokens_per_call(model, 64) == 1
    seen = []

    def decode(tokens, input_pos, uniforms, *rest):  # eager decode_tokens, recording the steps per call
        seen.append(uniforms.size(1))
        return decode_tokens(model, tokens, input_pos, uniforms, *rest)
    prompts = [[1], [1, 14, 29]]
    one = generate_withcache(model, prompts, 40, temperature=0.0)
    assert generate_withcache(model, prompts, 40, temperature=0.0, decode_fn=decode) == one and set(seen) == {4}
    seen.clear()
    assert generate_withcache(model, prompts, 40, temperature=0.0, decode_fn=decode, tokens_per_call=2) == one
    assert set(seen) == {2}


@pytest.mark.slow
def test_golden_story_with_compiled_decode(greedy_text, tmp_path):
    proc = run([script("sample.py"), f"--checkpoint={shared_path('stories260K', 'stories260K.pt')}",
                f"--tokenizer={shared_path('stories260K', 'tok512.model')}", "--temperature=0.0",
                "--max_new_tokens=500", "--compile=True"])
    assert proc.stdout == greedy_text + "\n"
    assert "compiled" in proc.stderr and "4 tokens per call" in proc.stderr  # chosen automatically


@pytest.mark.slow
def test_sample_py_batches_prompts_from_a_file(tmp_path, stories260k):
    model, enc = stories260k
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\nTom had a red ball\n\nThe sun was hot\n")
    proc = run([script("sample.py"), f"--checkpoint={shared_path('stories260K', 'stories260K.pt')}",
                f"--tokenizer={shared_path('stories260K', 'tok512.model')}", f"--start=FILE:{prompts}",
                "--temperature=0.0", "--max_new_tokens=20"])
    stories = proc.stdout.split("---------------\n")
    assert [s.split(" ")[0] for s in stories] == ["Once", "Tom", "The"]
    want = generate_withcache(model, [enc.encode("Tom had a red ball", bos=True, eos=False)], 20, temperature=0.0,
                                    eos_id=[1, 2])[0]
    assert stories[1].rstrip("\n") == enc.decode(enc.encode("Tom had a red ball", bos=True, eos=False) + want)
    assert "3 samples" in proc.stderr and "tok/s" in proc.stderr


def test_keep_stop_token_says_which_rows_stopped():
    """keep_stop_token=True: a row ends with a stop id exactly when it stopped at one; without it the same rows
    lose that token. Rows that ran out of budget or context end without one."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=12, multiple_of=4, max_seq_len=40)).eval()
    prompts = [[1], [1, 3], [1, 4, 5], [1, 6], [1, 8, 9, 10], [1, 11], [1] * 36, [1] * 37]
    gen = lambda keep: generate_withcache(model, prompts, 8, temperature=1.0, eos_id=[7], keep_stop_token=keep,
                                          generator=torch.Generator().manual_seed(5))
    kept, cut = gen(True), gen(False)
    stopped = [bool(r) and r[-1] == 7 for r in kept]
    assert any(stopped) and not all(stopped)
    for k, c, s, p in zip(kept, cut, stopped, prompts):
        assert c == (k[:-1] if s else k)
        assert 7 not in c
        if not s:
            assert len(k) == min(8, 40 - len(p))  # ran out of budget (or of context, for the long prompts)


def test_sample_py_without_flags_uses_the_bundled_model(tmp_path, greedy_text):
    """A fresh clone: no out/ckpt.pt, so sample.py says so on stderr and samples from stories260K/, which is
    karpathy's model (its greedy story is the golden one)."""
    proc = run([script("sample.py"), "--temperature=0.0", "--max_new_tokens=500"], cwd=tmp_path)
    assert "out/ckpt.pt not found: sampling from the bundled stories260K" in proc.stderr
    assert proc.stdout.rstrip("\n") == greedy_text
    assert "compiled" not in proc.stderr  # --compile=auto: 500 decode steps do not pay for compiling
