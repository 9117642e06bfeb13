"""GGUF (llama.cpp's format): our writer and reader round trip, the metadata and tokenizer llama.cpp needs, bad files
refused in one line, and, where llama-cpp-python is installed, llama.cpp itself printing our greedy story."""
import os

import numpy as np
import pytest
import torch

from conftest import REPO, run, run_in_process, script
from export import GGUF_QUANT, FormatError, export_gguf, gguf_fields, gguf_tensor_names, load_model
from generate import generate_withcache
from model import ModelArgs, Transformer

gguf = pytest.importorskip("gguf", reason="GGUF needs the optional gguf package: pip install gguf")
TOKENIZER = os.path.join(REPO, "stories260K", "tok512.model")  # shipped with the repository
BUNDLED = os.path.join(REPO, "stories260K", "stories260K.pt")


def small(tied=True, seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=32,
                                 max_seq_len=128, tie_embeddings=tied)).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_bitwise_in_fp32_and_within_rounding_in_fp16_and_q8_0(tmp_path, tied):
    model = small(tied)
    want = model.state_dict()
    for dtype in ("fp32", "fp16", "q8_0"):
        path = str(tmp_path / f"m_{dtype}.gguf")
        export_gguf(model, path, TOKENIZER, dtype)
        back, _ = load_model(path)
        assert back.params == model.params, dtype
        for name, w in back.state_dict().items():
            w0 = want[name]
            if dtype == "fp32" or w0.dim() == 1:  # norms stay fp32 in every file
                assert torch.equal(w, w0), (dtype, name)
            elif dtype == "fp16":
                assert torch.equal(w, w0.half().float()), name
            else:  # Q8_0: a step d = max |block| / 127 per 32 values, stored in fp16 (relative error <= 2^-11), so
                # each value is within d/2 + 127 * d * 2^-11 < 0.57 d of the original
                blocks = w0.reshape(-1, 32)
                step = blocks.abs().amax(1, keepdim=True) / 127
                assert ((w.reshape(-1, 32) - blocks).abs() <= 0.57 * step + 1e-7).all(), name


def test_metadata_and_tokenizer_are_what_llama_cpp_reads(tmp_path):
    from sentencepiece import SentencePieceProcessor
    model, _ = load_model(BUNDLED)
    path = str(tmp_path / "s.gguf")
    export_gguf(model, path, TOKENIZER)
    fields, reader = gguf_fields(path)
    p = model.params
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)
    expected = {"llama.context_length": p.max_seq_len, "llama.embedding_length": p.dim, "llama.block_count": p.n_layers,
                "llama.feed_forward_length": p.hidden_dim, "llama.attention.head_count": p.n_heads,
                "llama.attention.head_count_kv": p.n_kv_heads, "llama.rope.dimension_count": p.head_dim,
                "llama.vocab_size": 512}
    assert {k: fields[k] for k in expected} == expected
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(p.norm_eps)
    assert fields["llama.rope.freq_base"] == pytest.approx(p.rope_theta)
    sp = SentencePieceProcessor(model_file=TOKENIZER)
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(512)]
    assert fields["tokenizer.ggml.scores"] == pytest.approx([sp.get_score(i) for i in range(512)])
    types = fields["tokenizer.ggml.token_type"]
    assert types[sp.unk_id()] == gguf.TokenType.UNKNOWN
    assert types[sp.bos_id()] == types[sp.eos_id()] == gguf.TokenType.CONTROL
    byte_ids = [i for i in range(512) if sp.is_byte(i)]
    assert len(byte_ids) == 256 and all(types[i] == gguf.TokenType.BYTE for i in byte_ids)  # byte fallback
    assert all(types[i] == gguf.TokenType.NORMAL for i in range(512)
               if i not in byte_ids and i not in (sp.unk_id(), sp.bos_id(), sp.eos_id()))
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.unknown_token_id"]) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_eos_token"] is False
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names  # tied: llama.cpp reuses token_embd
    assert {f"blk.{p.n_layers - 1}.{n}.weight" for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                                          "ffn_down", "ffn_up", "attn_norm", "ffn_norm")} <= names


def ggml_shapes(p):
    """Each tensor's shape as llama.cpp reads it (ggml order: the row length first), from the model's sizes."""
    q, kv = p.n_heads * p.head_dim, p.n_kv_heads * p.head_dim
    shapes = {"token_embd.weight": (p.dim, p.vocab_size), "output_norm.weight": (p.dim,)}
    for i in range(p.n_layers):
        shapes.update({f"blk.{i}.{name}.weight": shape for name, shape in (
            ("attn_norm", (p.dim,)), ("ffn_norm", (p.dim,)), ("attn_q", (p.dim, q)), ("attn_k", (p.dim, kv)),
            ("attn_v", (p.dim, kv)), ("attn_output", (q, p.dim)), ("ffn_gate", (p.dim, p.hidden_dim)),
            ("ffn_up", (p.dim, p.hidden_dim)), ("ffn_down", (p.hidden_dim, p.dim)))})
    return shapes


def q8_0_blocks(raw, shape):
    """Q8_0 read by hand from the file's bytes: blocks of an fp16 step then 32 int8 values, the step times each."""
    blocks = np.asarray(raw, dtype=np.uint8).reshape(-1, 34)
    step = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    return torch.from_numpy((step * blocks[:, 2:].copy().view(np.int8)).reshape(shape[::-1]))


def test_every_tensor_in_ggml_order_and_q8_0_logits_close_to_fp32(tmp_path, greedy_text):
    """The file as llama.cpp sees it: every tensor's shape in ggml order and its type; Q8_0 decoded from the bytes by
    hand equals the original within its step, and the Q8_0 model's next-token distribution on the golden story stays
    close to the fp32 model's."""
    from sentencepiece import SentencePieceProcessor
    model, _ = load_model(BUNDLED)
    want = ggml_shapes(model.params)
    names = {theirs: ours for ours, theirs in gguf_tensor_names(model.params.n_layers).items()}
    original = model.state_dict()
    path = str(tmp_path / "q8.gguf")
    export_gguf(model, path, TOKENIZER, "q8_0")
    _, reader = gguf_fields(path)
    assert {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors} == want
    Q8, F16, F32 = (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32)
    for t in reader.tensors:
        shape = want[t.name]
        assert t.tensor_type == (F32 if len(shape) == 1 else Q8 if shape[0] % 32 == 0 else F16), t.name
        if t.tensor_type == Q8:
            w0 = original[names[t.name]]
            step = w0.reshape(-1, 32).abs().amax(1, keepdim=True) / 127
            w = q8_0_blocks(t.data, shape)
            assert ((w - w0).reshape(-1, 32).abs() <= 0.57 * step + 1e-7).all(), t.name
    q8, _ = load_model(path)
    tokens = torch.tensor([SentencePieceProcessor(model_file=TOKENIZER).encode(greedy_text)[:200]])
    with torch.no_grad():
        lp32 = torch.log_softmax(model(tokens).logits.float(), -1)
        lp8 = torch.log_softmax(q8(tokens).logits.float(), -1)
    kl = (lp32.exp() * (lp32 - lp8)).sum(-1)  # KL(fp32 || q8_0) per position
    agree = (lp32.argmax(-1) == lp8.argmax(-1)).float().mean().item()
    assert kl.mean().item() < 1e-3 and kl.max().item() < 1e-2 and agree >= 0.97, (kl.mean(), kl.max(), agree)


@pytest.mark.slow  # runs export.py and sample.py
def test_the_bundled_model_through_gguf_prints_the_golden_story(tmp_path, greedy_text):
    """export.py writes the GGUF (a .gguf path selects the format, the tokenizer found next to the checkpoint) and
    sample.py reads it back: greedy from BOS, the golden story to the byte; q8_0 loads and samples too."""
    for dtype in ("fp32", "q8_0"):
        path = tmp_path / f"s_{dtype}.gguf"
        proc = run([script("export.py"), str(path), "--checkpoint", BUNDLED, f"--dtype={dtype}"])
        assert f"wrote {path}" in proc.stdout
        proc = run([script("sample.py"), f"--checkpoint={path}", f"--tokenizer={TOKENIZER}", "--temperature=0.0",
                    "--max_new_tokens=500"])
        if dtype == "fp32":
            assert proc.stdout == greedy_text + "\n"
        else:
            assert proc.stdout.startswith("Once upon a time")


def _other_arch(path):
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def bad_files(tmp_path, monkeypatch):
    """(good, another architecture, truncated, Q4_0) GGUF files, each bad one checked to raise its FormatError."""
    model = small()
    good = tmp_path / "good.gguf"
    export_gguf(model, str(good), TOKENIZER)
    other = tmp_path / "gpt2.gguf"
    _other_arch(str(other))
    with pytest.raises(FormatError, match="architecture 'gpt2', but only 'llama'"):
        load_model(str(other))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(FormatError, match="not a readable GGUF file, truncated or corrupt"):
        load_model(str(truncated))
    monkeypatch.setitem(GGUF_QUANT, "q8_0", "Q4_0")  # write Q4_0 blocks, which our reader does not take
    q4 = tmp_path / "q4.gguf"
    export_gguf(model, str(q4), TOKENIZER, "q8_0")
    with pytest.raises(FormatError, match="is Q4_0; supported: F32, F16, BF16, Q8_0"):
        load_model(str(q4))
    with pytest.raises(FormatError, match="vocab mismatch"):
        export_gguf(Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=300, multiple_of=4)),
                    str(tmp_path / "v.gguf"), TOKENIZER)
    assert not (tmp_path / "v.gguf").exists() and not (tmp_path / "v.gguf.tmp").exists()
    return good, other, truncated, q4


def test_bad_gguf_files_are_refused_with_a_clear_error(tmp_path, monkeypatch):
    bad_files(tmp_path, monkeypatch)


@pytest.mark.slow  # runs sample.py and export.py on each bad file
def test_bad_gguf_files_get_one_line_errors_from_the_scripts(tmp_path, monkeypatch):
    good, other, truncated, q4 = bad_files(tmp_path, monkeypatch)
    for bad in (other, truncated, q4):
        proc = run_in_process([script("sample.py"), f"--checkpoint={bad}", f"--tokenizer={TOKENIZER}"])
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    proc = run_in_process([script("export.py"), str(tmp_path / "x.gguf"), "--checkpoint", str(good), "--dtype=bf16"])
    assert proc.returncode != 0 and "GGUF takes fp32, fp16, q8_0" in proc.stderr


@pytest.mark.slow
def test_llama_cpp_prints_our_greedy_story_and_agrees_on_logits(tmp_path, stories260k):
    """llama.cpp itself (llama-cpp-python, built from source) on the exported bundled model: greedy from BOS gives our
    tokens, and the logits of a prompt agree within 1e-4 (fp32 weights and an fp32 KV cache: llama.cpp's default
    fp16 cache moves them by ~1e-2)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="needs llama-cpp-python: pip install llama-cpp-python")
    model, enc = stories260k
    path = str(tmp_path / "s.gguf")
    export_gguf(model, path, TOKENIZER)
    f32 = 0  # GGML_TYPE_F32, for the KV cache
    llm = llama_cpp.Llama(model_path=path, n_ctx=512, logits_all=True, verbose=False, type_k=f32, type_v=f32)
    n = 256
    ours = generate_withcache(model, [[enc.bos_id]], n, temperature=0.0)[0]
    theirs = []
    for tok in llm.generate([enc.bos_id], temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
        if len(theirs) == len(ours) or tok == llm.token_eos():
            break
        theirs.append(tok)
    assert theirs == ours[: len(theirs)] and len(theirs) >= min(len(ours), 200)
    prompt = enc.encode("Once upon a time, there was a little girl named Lily.", bos=True, eos=False)
    llm.reset()
    llm.eval(prompt)
    their_logits = torch.tensor(np.array(llm.scores[: len(prompt)]))
    with torch.no_grad():
        our_logits = model(torch.tensor([prompt])).logits[0]
    llm.close()
    assert (their_logits - our_logits).abs().max().item() < 1e-4
