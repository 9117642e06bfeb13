"""
Download, tokenize and serve the TinyStories dataset.

    python tinystories.py download                      # ~1.5 GB archive -> data/TinyStories_all_data/
    python tinystories.py download --data_url=/path/to/TinyStories_all_data.tar.gz   # offline copy
    python tinystories.py train_vocab --vocab_size=512  # sentencepiece BPE -> data/tok512.model
    python tinystories.py pretokenize --vocab_size=512  # -> data/tok512/data00.bin ... (uint16)
    python tinystories.py pretokenize                   # Llama 2 vocab -> data/TinyStories_all_data/*.bin
    python tinystories.py train_vocab --vocab_size=320 --data_dir=DIR   # any folder of JSON shards, e.g. a
    python tinystories.py pretokenize --vocab_size=320 --data_dir=DIR   # generated corpus (rlhf/reason_cpu.sh)

The data folder is data/ unless the DATA_CACHE_DIR environment variable says otherwise.
Shard 0 is the validation split, the rest is training (as llama2.c). Train.py reads the .bin shards
through Task.iter_batches: random windows of max_seq_len+1 tokens from memory-mapped files.
"""
import argparse
import glob
import hashlib
import itertools
import json
import os
import random
import shutil
import tarfile
import time

import numpy as np
import requests
import torch
import torch.distributed as dist
from tqdm import tqdm

from tokenizer import Tokenizer, get_tokenizer_model_path
from utils import DATA_CACHE_DIR, atomic_write

DATA_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz"


class DataError(RuntimeError):
    """A problem with the data the user can fix (missing folder, unreachable URL, bad archive)."""


# -----------------------------------------------------------------------------
# download

def download_file(url: str, fname: str, chunk_size=1 << 20, retries=5, sha256=None):
    """Stream url (http(s), file:// or a local path) to fname with a progress bar. A partial
    fname.part is resumed with an HTTP Range request; connection errors are retried with back-off;
    the size is checked against Content-Length; fname appears only once complete."""
    local = url[len("file://"):] if url.startswith("file://") else url
    part = fname + ".part"
    if "://" not in local:  # a local archive: copy it
        if not os.path.isfile(local):
            raise DataError(f"--data_url {url}: no such file")
        with open(local, "rb") as src, open(part, "wb") as dst, \
                tqdm(total=os.path.getsize(local), unit="iB", unit_scale=True, desc=os.path.basename(fname)) as bar:
            for chunk in iter(lambda: src.read(chunk_size), b""):
                bar.update(dst.write(chunk))
    else:
        for attempt in range(retries + 1):
            have = os.path.getsize(part) if os.path.exists(part) else 0
            headers = {"Range": f"bytes={have}-"} if have else {}
            try:
                with requests.get(url, stream=True, timeout=30, headers=headers) as resp:
                    if resp.status_code == 416:  # nothing left to fetch: the part is complete
                        break
                    resp.raise_for_status()
                    if have and resp.status_code != 206:  # server ignored Range: start over
                        have = 0
                    length = resp.headers.get("content-length")
                    total = have + int(length) if length is not None else None
                    with open(part, "ab" if have else "wb") as f, \
                            tqdm(total=total, initial=have, unit="iB", unit_scale=True,
                                 desc=os.path.basename(fname)) as bar:
                        for chunk in resp.iter_content(chunk_size=chunk_size):
                            bar.update(f.write(chunk))
                    if total is not None and os.path.getsize(part) != total:
                        raise requests.ConnectionError(f"got {os.path.getsize(part)} of {total} bytes")
                    break
            except requests.HTTPError as e:
                raise DataError(f"--data_url {url}: HTTP {e.response.status_code}") from None
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
                if attempt == retries:
                    raise DataError(f"--data_url {url} is unreachable after {retries + 1} attempts "
                                    f"({type(e).__name__}); check the URL or pass a local file") from None
                wait = min(2 ** attempt, 30) * 0.5
                print(f"download interrupted ({type(e).__name__}), retrying in {wait:.1f}s ...")
                time.sleep(wait)
    if sha256:
        h = hashlib.sha256()
        with open(part, "rb") as f:
            for chunk in iter(lambda: f.read(chunk_size), b""):
                h.update(chunk)
        if h.hexdigest() != sha256.lower():
            os.remove(part)
            raise DataError(f"sha256 mismatch for {url}: got {h.hexdigest()}, expected {sha256}")
    os.replace(part, fname)


def safe_extract(archive: str, dest: str):
    """Unpack a tar archive into dest, refusing any member that would land outside it: absolute
    paths, '..' components, and links pointing elsewhere. Only files and folders are unpacked.
    The archive is unpacked beside dest and moved into place when complete."""
    dest = os.path.abspath(dest)
    tmp = dest + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tar = tarfile.open(archive)
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{archive} is not a tar archive ({str(e).splitlines()[0].rstrip(':')}); check --data_url") from None
    with tar:
        members = tar.getmembers()
        for m in members:
            target = os.path.realpath(os.path.join(tmp, m.name))
            if os.path.isabs(m.name) or ".." in m.name.replace("\\", "/").split("/") or \
                    not (target == tmp or target.startswith(tmp + os.sep)):
                raise DataError(f"refusing to unpack {archive}: member {m.name!r} escapes the target folder")
            if m.issym() or m.islnk():
                link = os.path.realpath(os.path.join(os.path.dirname(target), m.linkname)) if m.issym() \
                    else os.path.realpath(os.path.join(tmp, m.linkname))
                if not link.startswith(tmp + os.sep):
                    raise DataError(f"refusing to unpack {archive}: link {m.name!r} points outside the target folder")
        files = [m for m in members if m.isfile() or m.isdir()]
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(tmp, members=files, **kwargs)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def download(data_url=DATA_URL, sha256=None, retries=5):
    """Download and unpack the TinyStories archive into DATA_CACHE_DIR/TinyStories_all_data."""
    os.makedirs(DATA_CACHE_DIR, exist_ok=True)
    data_dir = os.path.join(DATA_CACHE_DIR, "TinyStories_all_data")
    if glob.glob(os.path.join(data_dir, "*.json")):
        print(f"{data_dir} already holds the unpacked shards, skipping download")
        return
    archive = os.path.join(DATA_CACHE_DIR, "TinyStories_all_data.tar.gz")
    if not os.path.exists(archive):
        print(f"Downloading {data_url} to {archive}...")
        download_file(data_url, archive, sha256=sha256, retries=retries)
    print(f"Unpacking {archive}...")
    try:
        safe_extract(archive, data_dir)
    except DataError:
        os.remove(archive)  # a bad download: fetch it again next time rather than fail on it forever
        raise
    shards = sorted(glob.glob(os.path.join(data_dir, "*.json")))
    if not shards:
        raise DataError(f"{archive} holds no .json shards: is it the TinyStories archive?")
    with open(shards[0]) as f:
        data = json.load(f)
    print(f"Download done. Number of shards: {len(shards)}; example story from shard 0:\n{data[0]['story'][:300]}")


def shard_paths(data_dir=None):
    """The JSON shards (each a list of {"story": text}) in data_dir, default DATA_CACHE_DIR/TinyStories_all_data."""
    data_dir = data_dir or os.path.join(DATA_CACHE_DIR, "TinyStories_all_data")
    shards = sorted(glob.glob(os.path.join(data_dir, "*.json")))
    if not shards:
        raise DataError(f"no JSON shards in {data_dir}: run `python tinystories.py download` first "
                        f"(or give --data_dir=DIR, a folder of shards)")
    return shards


# -----------------------------------------------------------------------------
# tokenizer training

def train_vocab(vocab_size: int, num_shards: int = 10, data_dir=None):
    """Train a sentencepiece BPE tokenizer with llama2.c's options (digits split) on the first num_shards shards
    of data_dir (default: TinyStories); writes DATA_CACHE_DIR/tok{vocab_size}.model (and .vocab)."""
    import sentencepiece as spm
    if vocab_size <= 0:
        raise DataError(f"--vocab_size must be positive, got {vocab_size}")
    prefix = os.path.join(DATA_CACHE_DIR, f"tok{vocab_size}")
    text_file = os.path.join(DATA_CACHE_DIR, "tiny.txt")
    with atomic_write(text_file, "w") as of:
        for shard in tqdm(shard_paths(data_dir)[:num_shards], desc="collecting text"):
            with open(shard) as f:
                for example in json.load(f):
                    of.write(example["story"].strip() + "\n")
    print(f"Size of the training text: {os.path.getsize(text_file) / 1024 / 1024:.2f} MB")
    tmp_prefix = prefix + ".partial"
    try:
        spm.SentencePieceTrainer.train(
            input=text_file, model_prefix=tmp_prefix, model_type="bpe", vocab_size=vocab_size,
            input_format="text", character_coverage=1.0,
            num_threads=os.cpu_count(), split_digits=True, allow_whitespace_only_pieces=True,
            byte_fallback=True, unk_surface=r" \342\201\207 ", normalization_rule_name="identity",
            minloglevel=2)
    except RuntimeError as e:  # e.g. a vocabulary smaller than the corpus's characters + 256 bytes
        raise DataError(f"sentencepiece could not train a {vocab_size}-token vocabulary: "
                        f"{str(e).splitlines()[0].split('] ')[-1]}") from None
    for ext in (".model", ".vocab"):
        os.replace(tmp_prefix + ext, prefix + ext)
    os.remove(text_file)  # a copy of the corpus; the shards stay
    print(f"Trained tokenizer is in {prefix}.model")


# -----------------------------------------------------------------------------
# pretokenization

def bin_dir(vocab_size):
    return os.path.join(DATA_CACHE_DIR, "TinyStories_all_data" if vocab_size == 0 else f"tok{vocab_size}")


def read_meta(vocab_size):
    """What pretokenize recorded about the tokenizer of the shards in bin_dir(vocab_size), or None."""
    path = os.path.join(bin_dir(vocab_size), "meta.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def write_meta(vocab_size, meta):
    with atomic_write(os.path.join(bin_dir(vocab_size), "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)


def verify_shards(vocab_size):
    """Before training: every .bin shard is the file pretokenize wrote, with the token count and sha256 recorded
    in meta.json (a shard cut short by a crash, or overwritten, would otherwise train on garbage). Shards without
    such a record (made elsewhere, or by an older version) are not checked."""
    meta = read_meta(vocab_size) or {}
    recorded = meta.get("shards")
    if recorded is None:
        return
    itemsize = np.dtype(token_dtype(vocab_size)).itemsize
    redo = f"re-run `python tinystories.py pretokenize{f' --vocab_size={vocab_size}' if vocab_size else ''}`"
    for shard in sorted(glob.glob(os.path.join(bin_dir(vocab_size), "*.bin"))):
        record = recorded.get(os.path.basename(shard))
        if record is None:
            raise DataError(f"{shard} is not recorded in meta.json: pretokenize did not finish it; {redo}")
        size = os.path.getsize(shard)
        if size != record["tokens"] * itemsize:
            raise DataError(f"{shard} has {size:,} bytes but pretokenize wrote {record['tokens'] * itemsize:,} "
                            f"({record['tokens']:,} tokens): it was cut short or replaced; {redo}")
        if file_sha256(shard) != record["sha256"]:
            raise DataError(f"{shard} is not the file pretokenize wrote (its sha256 differs from meta.json's): {redo}")


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 65536 else np.uint32  # vocab 0: Llama 2's 32,000


_tokenizers = {}


def _encode_batch(batch, model_path, model_sha):
    """datasets.map worker: BOS + tokens of each story. model_sha is only there so that the
    datasets cache fingerprint changes when the tokenizer file does."""
    if model_path not in _tokenizers:
        _tokenizers[model_path] = Tokenizer(model_path)
    enc = _tokenizers[model_path]
    return {"ids": [enc.encode(s.strip(), bos=True, eos=False) for s in batch["story"]]}


def pretokenize(vocab_size: int, tokenizer_model=None, num_proc=None, data_dir=None):
    """Tokenize every JSON shard into a flat array of token ids (BOS before each story), one .bin
    per shard, written atomically. Loading and mapping run through the `datasets` library: parallel
    workers, and a cache under DATA_CACHE_DIR/hf_cache that makes a re-run nearly free."""
    from datasets import load_dataset, disable_progress_bars
    import pyarrow.compute as pc
    shards = shard_paths(data_dir)
    model_path = tokenizer_model or get_tokenizer_model_path(vocab_size) or "tokenizer.model"
    enc = Tokenizer(model_path)  # fails early, with a clear message, on a missing tokenizer
    if vocab_size and enc.n_words != vocab_size:
        raise DataError(f"tokenizer {model_path} has {enc.n_words} tokens but --vocab_size={vocab_size}")
    model_sha = file_sha256(model_path)
    out_dir = bin_dir(vocab_size)
    os.makedirs(out_dir, exist_ok=True)
    dtype = token_dtype(enc.n_words)
    num_proc = num_proc or os.cpu_count()
    disable_progress_bars()  # one bar over the shards below instead of one per map
    cache_dir = os.path.join(DATA_CACHE_DIR, "hf_cache")
    # resumable: shards present under the same tokenizer are complete (each is written atomically);
    # under another tokenizer they are stale and redone
    # and a shard is recorded (token count, sha256) once written, so training can check it was not cut or replaced
    old = read_meta(vocab_size)
    same_tokenizer = old is not None and old["tokenizer_sha256"] == model_sha
    meta = {"tokenizer": os.path.abspath(model_path), "tokenizer_sha256": model_sha, "vocab_size": enc.n_words,
            "shards": dict(old.get("shards", {})) if same_tokenizer else {}}
    write_meta(vocab_size, meta)  # which tokenizer makes these shards
    total = skipped = 0
    for shard in tqdm(shards, desc="pretokenize"):
        name = os.path.basename(shard).replace(".json", ".bin")
        out = os.path.join(out_dir, name)
        record = meta["shards"].get(name)
        if record and os.path.exists(out) and os.path.getsize(out) == record["tokens"] * np.dtype(dtype).itemsize:
            skipped += 1
            total += record["tokens"]
            continue
        ds = load_dataset("json", data_files=shard, split="train", cache_dir=cache_dir)
        ds = ds.map(_encode_batch, batched=True, batch_size=256, num_proc=min(num_proc, max(1, len(ds) // 256)),
                    remove_columns=ds.column_names, fn_kwargs={"model_path": model_path, "model_sha": model_sha})
        tokens = pc.list_flatten(ds.data.column("ids")).to_numpy().astype(dtype)
        data = tokens.tobytes()
        with atomic_write(out) as f:
            f.write(data)
        meta["shards"][name] = {"tokens": len(tokens), "sha256": hashlib.sha256(data).hexdigest()}
        write_meta(vocab_size, meta)
        total += len(tokens)
        tqdm.write(f"{out}: {len(ds)} stories, {len(tokens):,} tokens ({len(tokens) / max(1, len(ds)):.0f} per story)")
    if skipped:
        print(f"skipped {skipped} shards already tokenized with this tokenizer")
    print(f"Done: {total:,} tokens in {out_dir}")


# -----------------------------------------------------------------------------
# batches for training

class PretokDataset(torch.utils.data.IterableDataset):
    """Endless random windows of max_seq_len+1 tokens from the memory-mapped .bin shards.

    The order is a pure function of (seed, worker): each pass shuffles the shards, then the windows of each
    shard. `start` skips that many windows by replaying only the shuffles (no data is read), so a resumed
    run continues exactly where the checkpoint left off. DDP ranks share this stream and split it by batches
    (Task.iter_batches), so N processes see the same data as one process accumulating N times as much."""

    def __init__(self, split, max_seq_len, vocab_size, vocab_source, seed=42, start=0):
        super().__init__()
        self.split, self.max_seq_len = split, max_seq_len
        self.vocab_size, self.vocab_source, self.seed, self.start = vocab_size, vocab_source, seed, start

    def shard_filenames(self):
        folder = bin_dir(0 if self.vocab_source == "llama2" else self.vocab_size)
        shards = sorted(glob.glob(os.path.join(folder, "*.bin")))
        if len(shards) < 2:
            what = "" if self.vocab_source == "llama2" else f" --vocab_size={self.vocab_size}"
            raise DataError(f"need at least 2 pretokenized shards in {folder} (shard 0 is validation), found "
                            f"{len(shards)}: run `python tinystories.py pretokenize{what}` first")
        return shards[1:] if self.split == "train" else shards[:1]

    def __iter__(self):
        worker_info = torch.utils.data.get_worker_info()
        worker_id = worker_info.id if worker_info else 0
        rng = random.Random(self.seed + worker_id)  # a different stream per DataLoader worker
        shards = self.shard_filenames()
        dtype = token_dtype(0 if self.vocab_source == "llama2" else self.vocab_size)
        itemsize = np.dtype(dtype).itemsize
        skip = self.start
        while True:
            rng.shuffle(shards)
            for shard in shards:
                num_windows = (os.path.getsize(shard) // itemsize - 1) // self.max_seq_len
                if num_windows <= 0:
                    raise DataError(f"{shard} holds fewer than max_seq_len+1={self.max_seq_len + 1} tokens")
                ixs = list(range(num_windows))
                rng.shuffle(ixs)
                if skip >= num_windows:  # resuming: this shard was consumed before the checkpoint
                    skip -= num_windows
                    continue
                m = np.memmap(shard, dtype=dtype, mode="r")
                for ix in ixs[skip:]:
                    start = ix * self.max_seq_len
                    chunk = torch.from_numpy(m[start: start + self.max_seq_len + 1].astype(np.int64))
                    yield chunk[:-1], chunk[1:]
                skip = 0


class Task:
    @staticmethod
    def iter_batches(batch_size, device, num_workers=0, start_batch=0, **dataset_kwargs):
        """Yield (X, Y) LongTensors (batch_size, max_seq_len) on device; Y is X shifted by one.

        start_batch skips the batches this process drew before (exact resume). With num_workers=0 (the
        default) batches are read in this process, without a DataLoader (whose start draws from torch's global
        RNG and would break bitwise-exact resumes), and under DDP rank r of W takes global batches r, r+W, ...
        With num_workers > 0 a DataLoader reads ahead; each worker and rank then has its own random stream."""
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        pin = str(device).startswith("cuda")
        if num_workers > 0:
            ds = PretokDataset(start=start_batch * batch_size, **{**dataset_kwargs,
                               "seed": dataset_kwargs.get("seed", 42) + 1337 * rank})
            ds.shard_filenames()  # a missing data folder is reported here, not inside a worker
            batches = torch.utils.data.DataLoader(ds, batch_size=batch_size, pin_memory=pin, num_workers=num_workers)
        else:
            ds = PretokDataset(start=start_batch * world * batch_size, **dataset_kwargs)
            ds.shard_filenames()

            def collate(it):
                for g in itertools.count():
                    samples = [next(it) for _ in range(batch_size)]
                    if g % world == rank:
                        x, y = torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])
                        yield (x.pin_memory(), y.pin_memory()) if pin else (x, y)
            batches = collate(iter(ds))
        for x, y in batches:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


class BatchStream:
    """A run's training batches and its position in them, for exact resume: position counts the batches
    handed out, and BatchStream(start=state["position"], ...) continues with exactly the batches that would
    have come next. The first batch is read at construction, so missing data is reported at start-up."""

    def __init__(self, start=0, **iter_batches_kwargs):
        self.position = start
        self._batches = Task.iter_batches(start_batch=start, **iter_batches_kwargs)
        self._ahead = next(self._batches)  # one batch read ahead, copied to the device while it works

    def next(self):
        """The next (X, Y) batch."""
        batch, self._ahead = self._ahead, next(self._batches)
        self.position += 1
        return batch

    def state_dict(self):
        return {"position": self.position}


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", type=str, choices=["download", "train_vocab", "pretokenize"])
    parser.add_argument("--data_url", type=str, default=DATA_URL, help="URL or local path of the archive")
    parser.add_argument("--sha256", type=str, default=None, help="expected sha256 of the archive")
    parser.add_argument("--retries", type=int, default=5, help="download retries on connection errors")
    parser.add_argument("--vocab_size", type=int, default=0, help="custom vocab size; 0 = Llama 2's tokenizer")
    parser.add_argument("--tokenizer", type=str, default=None, help="pretokenize with this .model file")
    parser.add_argument("--num_shards", type=int, default=10, help="shards of text used by train_vocab")
    parser.add_argument("--num_proc", type=int, default=None, help="pretokenize workers (default: all cores)")
    parser.add_argument("--data_dir", type=str, default=None,
                        help="train_vocab/pretokenize: a folder of JSON shards (lists of {\"story\": text}) instead "
                             "of TinyStories, e.g. a generated corpus")
    args = parser.parse_args()
    if args.vocab_size < 0:
        parser.error(f"--vocab_size must be >= 0, got {args.vocab_size}")
    try:
        if args.stage == "download":
            download(args.data_url, args.sha256, args.retries)
        elif args.stage == "train_vocab":
            if args.vocab_size == 0:
                parser.error("train_vocab needs --vocab_size=N (e.g. 512)")
            train_vocab(args.vocab_size, args.num_shards, args.data_dir)
        elif args.stage == "pretokenize":
            pretokenize(args.vocab_size, args.tokenizer, args.num_proc, args.data_dir)
    except (DataError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
