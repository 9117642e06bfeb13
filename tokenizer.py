"""
A thin wrapper over a sentencepiece model (Llama 2's 32K vocab, or one trained by
`python tinystories.py train_vocab`), plus export to llama2.c's `.bin` tokenizer format.

Export a tokenizer for llama2.c's run.c (writes tok512.bin next to tok512.model):
    python tokenizer.py --tokenizer-model=data/tok512.model
"""
import argparse
import os
import struct
from typing import List

from sentencepiece import SentencePieceProcessor

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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-t", "--tokenizer-model", type=str, help="optional path to a custom tokenizer")
    parser.add_argument("-o", "--output", type=str, help="output .bin path (default: next to the model)")
    args = parser.parse_args()
    try:
        print(f"wrote {Tokenizer(args.tokenizer_model).export(args.output)}")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
