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


def test_pad_right_and_left():
    enc = Tokenizer(shared_path("stories260K", "tok512.model"))
    batch = enc.pad([{"input_ids": [1, 5, 6]}, {"input_ids": [1], "attention_mask": [1]}])
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 2, 2]]  # no pad id: padded with eos
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    left = enc.pad([{"input_ids": [1, 5, 6]}, {"input_ids": [1]}], padding_side="left")
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_vocab"):
        Tokenizer(str(tmp_path / "nope.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        Tokenizer(str(bad))
