"""
Small helpers every script shares: one-line errors, atomic file writes, device and dtype selection, the
`--compile=auto` rule, the JSONL metrics log and its reader, the learning-rate schedule, and the repeated-n-gram
rate of a text. (Checkpoints: checkpoint.py; the tokenizer of a model: tokenizer.py; plots and reports: report.py.)
"""
import atexit
import contextlib
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time

import torch

DATA_CACHE_DIR = os.environ.get("DATA_CACHE_DIR", "data")  # downloads, tokenizers, pretokenized shards
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def fail(msg):
    """End a script on bad input: one line naming the problem (and the fix) on stderr, exit code 1."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(1)

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Write to a temporary file in the same folder, then os.replace it onto path: a crash midway
    leaves the previous file (or none) under the final name, never a half-written one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the permissions open() would
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def pick_device(device="auto"):
    """'auto' -> cuda, else mps, else cpu. An explicit device that is not there is a clear error."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device={device} but CUDA is not available here: use --device=cpu (or auto)")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("--device=mps but MPS is not available here: use --device=cpu (or auto)")
    return device


# --compile=auto compiles a step when the run repeats it at least this many times, so that the time it saves repays
# compiling (measured on a 2-core CPU: docs/speed.md, "When --compile=auto compiles"). The training step runs 1.05-1.25x
# faster compiled after 13-65 s of compiling; a decode call saves ~2-3 ms (260K, batch 1 to 32) after 6-29 s. A GPU
# saves more per step, so the same counts are conservative there.
COMPILE_PAYS_AFTER = {"train": 1000, "decode": 8000}


def should_compile(compile, device, step, repeats):
    """The one meaning of --compile: True/False as given; "auto" compiles when the run repeats `step` ("train": a
    training forward + backward, "decode": one decode call of the generator) at least COMPILE_PAYS_AFTER[step]
    times, on CUDA, or on a CPU with a C++ compiler for inductor; never on MPS."""
    if compile not in ("auto", True, False):
        fail(f"--compile must be auto, True or False, got {compile!r}")
    if compile != "auto":
        return compile
    if repeats < COMPILE_PAYS_AFTER[step]:
        return False
    return device.startswith("cuda") or (device == "cpu" and any(
        shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++")))


def pick_dtype(dtype, device):
    """'auto' -> bfloat16 on CUDA when supported, else float32."""
    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return "bfloat16"
        return "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype}")
    return dtype


class MetricsLog:
    """Appends one JSON object per line to out_dir/<name>; each line is flushed as it is written."""

    def __init__(self, path):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, **row):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def lines(self):
        if not os.path.exists(self.path):
            return 0
        with open(self.path) as f:
            return sum(1 for _ in f)

    def cut_back(self, iter_num, keep_first=0):
        """Keep the first keep_first lines (an earlier run's, e.g. the pre-training before a PPO run in the same
        folder), then only the lines of iterations before iter_num: a run resumed there logs the rest again. A line
        cut short by a kill is dropped too."""
        if not os.path.exists(self.path):
            return
        keep = []
        with open(self.path) as f:
            for n, line in enumerate(f):
                try:
                    if n < keep_first or json.loads(line).get("iter", -1) < iter_num:
                        keep.append(line if line.endswith("\n") else line + "\n")
                except json.JSONDecodeError:
                    pass
        with atomic_write(self.path, "w") as f:
            f.writelines(keep)


def read_jsonl(path):
    """The objects of a JSON Lines file, one per non-blank line; a malformed line is named by file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    reason = e.msg.removesuffix(" at")  # "Invalid control character at"
                    raise ValueError(f"{path}, line {n}, column {e.colno}: not valid JSON ({reason})") from None
    return rows


def cosine_lr(it, learning_rate, min_lr, warmup_iters, decay_iters):
    """The learning rate at iteration it: linear warm-up over warmup_iters, then cosine decay to min_lr
    at decay_iters, min_lr after."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


def set_lr(optimizer, lr):
    """Set every parameter group's learning rate to lr (one schedule step); returns lr."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def repeated_ngram_rate(tokens, n=3):
    """The fraction of a sequence's n-grams that repeat an earlier n-gram of it (0 with fewer than two):
    degenerate text that loops scores high, the pre-trained model's stories score what they score."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams) if len(grams) > 1 else 0.0


# -----------------------------------------------------------------------------
# one run per output folder

LOCK_NAME = ".run.lock"


def _process_start(pid):
    """When process pid started (Linux: field 22 of /proc/PID/stat, in clock ticks), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _running(pid, start):
    """Whether the process that wrote a lock still runs (a pid reused by another process does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _process_start(pid)
    return start is None or now is None or now == start


def _read_lock(path):
    for _ in range(20):  # a lock just created may not be written yet
        try:
            with open(path) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            time.sleep(0.05)
    return None  # unreadable: left half-written by a process that died


def hold_out_dir(out_dir):
    """Create out_dir and hold it for this process until it exits: out_dir/.run.lock names the process. A folder
    that a running process holds is refused in one line naming it (two runs writing the same checkpoints would
    overwrite each other); a lock left by a process that is gone (killed, crashed) is taken over, with a note."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LOCK_NAME)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
          "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])[:300]}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            other = _read_lock(path)
            if other == {}:
                continue  # released meanwhile
            if other is not None and other.get("pid") == me["pid"] and other.get("host") == me["host"]:
                return path  # ours already (a second stage in the same process)
            if other is not None and other.get("host") != me["host"]:
                fail(f"{out_dir} is held by process {other.get('pid')} on {other.get('host')} ({path}): use another "
                     f"--out_dir, or delete {path} if that run has ended")
            if other is not None and _running(other.get("pid", -1), other.get("start")):
                fail(f"{out_dir} is in use by process {other['pid']} ({other.get('command', '?')}): wait for it to "
                     f"end or use another --out_dir")
            who = f"process {other.get('pid')}" if other else "a process"
            print(f"note: {out_dir} was held by {who}, which is no longer running; taking it over")
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        atexit.register(_release_lock, path, me["pid"])
        return path
    fail(f"could not take {path}: delete it if no run uses {out_dir}")


def _release_lock(path, pid):
    if os.getpid() == pid and (_read_lock(path) or {}).get("pid") == pid:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
