"""
A thin wrapper over a sentencepiece model (Llama 2's 32K vocab, or one trained by
`python tinystories.py train_vocab`), export to llama2.c's `.bin` tokenizer format, and finding the tokenizer a
model was trained with (load_tokenizer refuses one of another vocabulary size).

Export a tokenizer for llama2.c's run.c (writes tok512.bin next to tok512.model):
    python tokenizer.py --tokenizer-model=data/tok512.model
"""
import argparse
import os
import struct
from typing import List

from sentencepiece import SentencePieceProcessor

import utils
from utils import atomic_write

TOKENIZER_MODEL = "tokenizer.model"  # the Llama 2 tokenizer


class Tokenizer:
    def __init__(self, tokenizer_model=None):
        model_path = tokenizer_model if tokenizer_model else TOKENIZER_MODEL
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model {model_path} not found: train one with "
                                    f"`python tinystories.py train_vocab` or pass the path of a .model file")
        self.model_path = model_path
        try:
            self.sp_model = SentencePieceProcessor(model_file=model_path)
        except Exception as e:  # sentencepiece raises a bare RuntimeError/OSError on a bad file
            raise ValueError(f"{model_path} is not a sentencepiece model ({e})") from None
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        assert isinstance(s, str)
        t = self.sp_model.encode(s)
        if bos:
            t = [self.bos_id] + t
        if eos:
            t = t + [self.eos_id]
        return t

    def decode(self, t: List[int]) -> str:
        return self.sp_model.decode(t)

    def export(self, path=None):
        """Write llama2.c's tokenizer format: uint32 max_token_length, then per token float32 score,
        uint32 byte length, UTF-8 bytes (with '▁' shown as a space, BOS/EOS as readable markers)."""
        tokens, scores = [], []
        for i in range(self.n_words):
            t = self.sp_model.id_to_piece(i)
            if i == self.bos_id:
                t = "\n<s>\n"
            elif i == self.eos_id:
                t = "\n</s>\n"
            tokens.append(t.replace("▁", " ").encode("utf-8"))
            scores.append(self.sp_model.get_score(i))
        out = bytearray(struct.pack("I", max(len(t) for t in tokens)))
        for b, score in zip(tokens, scores):
            out += struct.pack("fI", score, len(b)) + b
        path = path or self.model_path.replace(".model", ".bin")
        with atomic_write(path) as f:
            f.write(bytes(out))
        return path


# -----------------------------------------------------------------------------
# which tokenizer a model was trained with

def get_tokenizer_model_path(vocab_size):
    """Where train_vocab writes a custom tokenizer; vocab_size 0 means Llama 2's (tokenizer.model): None."""
    if vocab_size == 0:
        return None
    return os.path.join(utils.DATA_CACHE_DIR, f"tok{vocab_size}.model")


def find_tokenizer(vocab_size, near=None, config=None):
    """The tokenizer .model of a model with vocab_size tokens: the one its checkpoint's config names, Llama 2's
    tokenizer.model for the llama2 vocabulary, tok{vocab_size}.model or tokenizer.model in the folder of the
    checkpoint `near`, then data/tok{vocab_size}.model. The first that exists, else FileNotFoundError."""
    config = config or {}
    if config.get("tokenizer"):
        candidates = [config["tokenizer"]]
    elif config.get("vocab_source") == "llama2" or vocab_size == 32000:
        candidates = ["tokenizer.model"]
    else:
        candidates = []
    if near:
        folder = near if os.path.isdir(near) else os.path.dirname(near)
        candidates += [os.path.join(folder, f"tok{vocab_size}.model"), os.path.join(folder, "tokenizer.model")]
    candidates.append(get_tokenizer_model_path(vocab_size))
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no tokenizer found (tried {', '.join(candidates)}): pass --tokenizer=path/to/tok.model")


def load_tokenizer(path, vocab_size):
    """Tokenizer(path), refusing one whose vocabulary is not the model's (ValueError, one line)."""
    enc = Tokenizer(path)
    if enc.n_words != vocab_size:
        raise ValueError(f"tokenizer {path} has {enc.n_words} tokens but the model has vocab_size={vocab_size}: "
                         f"pass the tokenizer the model was trained with (--tokenizer=...)")
    return enc


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-t", "--tokenizer-model", type=str, help="optional path to a custom tokenizer")
    parser.add_argument("-o", "--output", type=str, help="output .bin path (default: next to the model)")
    args = parser.parse_args()
    try:
        print(f"wrote {Tokenizer(args.tokenizer_model).export(args.output)}")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
