import pytest

from conftest import run, script, shared_path
from tokenizer import Tokenizer


def test_round_trip_and_special_ids():
    enc = Tokenizer(shared_path("stories260K", "tok512.model"))
    assert (enc.n_words, enc.bos_id, enc.eos_id) == (512, 1, 2)
    text = "Once upon a time, Lily found 42 shiny stones. \"Wow!\" she said."
    ids = enc.encode(text, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and all(0 <= i < 512 for i in ids)
    assert enc.decode(ids) == text
    assert enc.encode("héllo ☃", bos=False, eos=False)  # unseen characters go through byte fallback
    assert enc.decode(enc.encode("héllo ☃", bos=False, eos=False)) == "héllo ☃"


def test_llama2_tokenizer():
    enc = Tokenizer(shared_path("llama2", "tokenizer.model"))
    assert enc.n_words == 32000
    assert enc.decode(enc.encode("The cat sat.", bos=True, eos=False)) == "The cat sat."


def test_export_is_byte_identical_to_llama2c(tmp_path):
    out = Tokenizer(shared_path("stories260K", "tok512.model")).export(str(tmp_path / "tok512.bin"))
    with open(out, "rb") as a, open(shared_path("stories260K", "tok512.bin"), "rb") as b:
        assert a.read() == b.read()


def test_export_command_line(tmp_path):
    out = tmp_path / "t.bin"
    run([script("tokenizer.py"), "-t", shared_path("stories260K", "tok512.model"), "-o", str(out)])
    assert out.stat().st_size > 4 * 512


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_vocab"):
        Tokenizer(str(tmp_path / "nope.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        Tokenizer(str(bad))


def test_find_tokenizer_prefers_the_one_beside_the_checkpoint(tmp_path, monkeypatch):
    """The checkpoint's config first, then tok{V}.model beside the checkpoint, then the data folder: the seed's
    PPO command names no tokenizer, and stories260K/tok512.model (not the user's own data/tok512.model) is its."""
    import tokenizer
    import utils
    data, run_dir = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    run_dir.mkdir()
    monkeypatch.setattr(utils, "DATA_CACHE_DIR", str(data))
    (data / "tok512.model").write_bytes(b"x")
    assert tokenizer.find_tokenizer(512, near=str(run_dir / "ckpt.pt")) == str(data / "tok512.model")
    (run_dir / "tok512.model").write_bytes(b"x")
    assert tokenizer.find_tokenizer(512, near=str(run_dir / "ckpt.pt")) == str(run_dir / "tok512.model")
    named = tmp_path / "named.model"
    named.write_bytes(b"x")
    assert tokenizer.find_tokenizer(512, near=str(run_dir / "ckpt.pt"), config={"tokenizer": str(named)}) == str(named)
    with pytest.raises(FileNotFoundError, match="pass --tokenizer"):
        tokenizer.find_tokenizer(300, near=str(run_dir / "ckpt.pt"))
    with pytest.raises(ValueError, match="has 512 tokens but the model has vocab_size=300"):
        tokenizer.load_tokenizer(shared_path("stories260K", "tok512.model"), 300)
