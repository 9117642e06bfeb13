"""Exact round trips between this repository, llama2.c's .bin formats and Hugging Face."""
import struct

import numpy as np
import pytest
import torch

from conftest import run, run_in_process, script, shared_path
from export import FormatError, export_bin, export_hf, load_bin, load_hf, load_model
from generate import generate_withcache
from model import ModelArgs, Transformer


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_version0_export_reproduces_the_published_bin(tmp_path, stories260k):
    model, _ = stories260k
    out = tmp_path / "v0.bin"
    export_bin(model, str(out), 0)
    ours = out.read_bytes()
    theirs = open(shared_path("stories260K", "stories260K.bin"), "rb").read()
    assert len(ours) == len(theirs)
    p = model.params
    rope_floats = 2 * p.max_seq_len * p.head_dim // 2
    split = len(theirs) - 4 * rope_floats
    assert ours[:split] == theirs[:split]  # the header and every weight, byte for byte
    a, b = np.frombuffer(ours[split:], "<f4"), np.frombuffer(theirs[split:], "<f4")
    assert np.abs(a - b).max() <= 1e-6  # the RoPE tables


def test_published_bin_loads_to_identical_logits_and_samples_the_golden_story(stories260k, greedy_text, tmp_path):
    model, _ = stories260k
    from_bin = load_bin(shared_path("stories260K", "stories260K.bin"))
    x = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(from_bin, x), logits(model, x))
    proc = run([script("sample.py"), f"--checkpoint={shared_path('stories260K', 'stories260K.bin')}",
                f"--tokenizer={shared_path('stories260K', 'tok512.model')}", "--temperature=0.0",
                "--max_new_tokens=500"])
    assert proc.stdout == greedy_text + "\n"


def test_version1_round_trip_is_exact_and_version2_is_close(tmp_path, stories260k):
    model, enc = stories260k
    x = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    export_bin(model, str(tmp_path / "v1.bin"), 1)
    assert torch.equal(logits(load_model(str(tmp_path / "v1.bin"))[0], x), logits(model, x))
    max_err = export_bin(model, str(tmp_path / "v2.bin"), 2)
    assert 0 < max_err < 0.02  # half an int8 step of the largest group
    q8 = load_bin(str(tmp_path / "v2.bin"))
    assert (logits(q8, x) - logits(model, x)).abs().max() < 0.5
    greedy = generate_withcache(model, [[1]], 400, temperature=0.0, eos_id=1)[0]
    greedy_q8 = generate_withcache(q8, [[1]], 400, temperature=0.0, eos_id=1)[0]
    agree = next((i for i, (a, b) in enumerate(zip(greedy, greedy_q8)) if a != b), min(len(greedy), len(greedy_q8)))
    print(f"Q8_0 greedy story: the first {agree} of {len(greedy)} tokens agree with fp32")
    assert agree >= 20


def test_untied_and_gqa_models_round_trip_through_bin(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=100, multiple_of=16,
                                  max_seq_len=32, tie_embeddings=False)).eval()  # its own classifier
    x = torch.randint(0, 100, (2, 16))
    for v in (0, 1):
        export_bin(model, str(tmp_path / f"u{v}.bin"), v)
        assert torch.equal(logits(load_bin(str(tmp_path / f"u{v}.bin")), x), logits(model, x))


@pytest.mark.slow
def test_hugging_face_parity_and_lossless_round_trip(tmp_path, stories260k):
    transformers = pytest.importorskip("transformers", reason="transformers is optional: pip install transformers")
    torch.manual_seed(0)
    gqa = Transformer(ModelArgs(dim=96, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=300, multiple_of=32,
                                max_seq_len=64)).eval()
    for name, model in (("stories260K", stories260k[0]), ("gqa", gqa)):
        folder = tmp_path / name
        export_hf(model, str(folder))
        hf = transformers.LlamaForCausalLM.from_pretrained(str(folder)).eval()
        x = torch.randint(0, model.params.vocab_size, (2, 40))
        with torch.no_grad():
            assert (hf(x).logits - logits(model, x)).abs().max() < 1e-4
        back = load_hf(str(folder))
        assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))
        hf.save_pretrained(str(tmp_path / f"{name}_saved"))  # written by transformers itself
        again = load_model(str(tmp_path / f"{name}_saved"))[0]
        assert torch.equal(logits(again, x), logits(model, x))


@pytest.mark.slow
def test_export_command_line(tmp_path):
    ckpt = shared_path("stories260K", "stories260K.pt")
    run([script("export.py"), str(tmp_path / "m.bin"), "--version", "1", "--checkpoint", ckpt])
    proc = run([script("export.py"), str(tmp_path / "q.bin"), "--version", "2", "--checkpoint", ckpt])
    assert "max quantization error" in proc.stdout
    assert (tmp_path / "m.bin").stat().st_size > (tmp_path / "q.bin").stat().st_size


@pytest.mark.slow
def test_bad_files_get_one_line_errors(tmp_path, stories260k):
    model, _ = stories260k
    good = tmp_path / "good.bin"
    export_bin(model, str(good), 1)
    truncated = tmp_path / "trunc.bin"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(FormatError, match="truncated or inconsistent"):
        load_bin(str(truncated))
    wrong_header = tmp_path / "hdr.bin"
    data = bytearray(good.read_bytes())
    data[8:12] = struct.pack("i", 128)  # dim 128: the data no longer fits the header
    wrong_header.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="truncated or inconsistent"):
        load_bin(str(wrong_header))
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"hello world, not a model")
    with pytest.raises(FormatError, match="unknown format"):
        load_model(str(junk))
    future = tmp_path / "v9.bin"
    future.write_bytes(struct.pack("Ii", 0x616B3432, 9) + b"\0" * 300)
    with pytest.raises(FormatError, match="version 9 is not supported"):
        load_bin(str(future))
    for bad in (truncated, junk):
        proc = run_in_process([script("sample.py"), f"--checkpoint={bad}"])
        assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error:")
        assert "Traceback" not in proc.stderr
