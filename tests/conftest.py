"""Shared test helpers. Tests that need the reference data folder (SHARED_DIR, default: `shared` beside the repository,
with the published stories260K files and a TinyStories excerpt) skip with a clear reason when it is absent, so the
suite also passes without it."""
import io
import json
import os
import random
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("SHARED_DIR", os.path.join(os.path.dirname(REPO), "shared"))
sys.path.insert(0, REPO)


def shared_path(*parts):
    """Path inside the reference data folder, or skip the test when it is not there."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} not found: this test needs a reference file (set SHARED_DIR to the folder that holds it)")
    return path


def run(args, cwd=None, env=None, check=True, timeout=600):
    """Run a repository script (`python script.py ...`, or `python -m package.module ...` with args starting
    ["-m", name]) as a user would; returns the CompletedProcess."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.run([sys.executable, *args], cwd=cwd or REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-3000:]}")
    return proc


# the wrapper of killed_run: runs a script, killing itself (os._exit, as under kill -9) halfway through writing the
# die_at-th save of a checkpoint named save_name: the temporary file is left cut short, never renamed
DIES_DURING_A_SAVE = """
import io, os, runpy, sys, checkpoint, torch
save_name, die_at, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
real_save_checkpoint, real_torch_save, seen = checkpoint.save_checkpoint, torch.save, [0]
def half_a_save(obj, f, *a, **k):
    buf = io.BytesIO()
    real_torch_save(obj, buf)
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    f.flush()
    os._exit(137)
def save_checkpoint(obj, path):
    if os.path.basename(path) == save_name:
        seen[0] += 1
        if seen[0] == die_at:
            torch.save = half_a_save
    return real_save_checkpoint(obj, path)
checkpoint.save_checkpoint = save_checkpoint
sys.argv = [args[1] if args[0] == "-m" else args[0], *args[2 if args[0] == "-m" else 1:]]
if args[0] == "-m":
    runpy.run_module(args[1], run_name="__main__", alter_sys=True)
else:
    runpy.run_path(args[0], run_name="__main__")
"""


def killed_run(args, env=None, die_at_save=None, save_name="state.pt", kill_at=None, delay=0.0):
    """Run a script (as run) and kill it: os._exit(137) halfway through its die_at_save-th save of save_name, or
    SIGKILL from outside `delay` seconds after it prints a line matching the regex kill_at (unless it ended first).
    Returns (returncode, everything it printed)."""
    import re
    import time
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    cmd = [sys.executable, *args] if die_at_save is None else \
        [sys.executable, "-c", DIES_DURING_A_SAVE, save_name, str(die_at_save), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    for line in proc.stdout:
        out.append(line)
        if kill_at is not None and re.search(kill_at, line):
            time.sleep(delay)
            proc.kill()
            break
    out.append(proc.communicate(timeout=600)[0])
    return proc.returncode, "".join(out)


def first_difference(a, b, where="checkpoint"):
    """Where two checkpoints (nested dicts, lists, tensors, numbers) first differ, or None when they hold bitwise the
    same tensors and equal values everywhere."""
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return f"{where}: keys {sorted(a)} != {sorted(b) if isinstance(b, dict) else type(b)}"
        return next((d for k in a if (d := first_difference(a[k], b[k], f"{where}[{k!r}]"))), None)
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return f"{where}: lengths differ"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := first_difference(x, y, f"{where}[{i}]"))),
                    None)
    if hasattr(a, "shape") and hasattr(a, "dtype"):
        same = hasattr(b, "shape") and a.shape == b.shape and bool((a == b).all())
        return None if same else f"{where}: tensors differ"
    return None if a == b else f"{where}: {a!r} != {b!r}"


def logged(path):
    """A metrics.jsonl without its wall-clock fields: what two runs of the same settings must agree on."""
    rows = [json.loads(line) for line in open(path)]
    return [{k: v for k, v in r.items() if not (k.endswith("_s") or "time" in k or k in ("dt_ms", "tok_per_s"))}
            for r in rows]


def run_in_process(args):
    """run(args, check=False) for a command line that a script refuses before doing any work (a bad flag, a
    missing or wrong file): the script runs here as __main__ (runpy) with that argv, and the result has the
    exit status, stdout and stderr a process would give (an uncaught exception: status 1 and its traceback),
    without a Python start and `import torch` per case. Environment variables are not applied: modules read
    them once at import. What a script may change for the whole process (the random generators, the signal
    handlers, torch's thread count and default dtype) is put back afterwards, so later tests see none of it."""
    import contextlib
    import random
    import runpy
    import signal
    import traceback

    import numpy as np
    import torch
    out, err, code = io.StringIO(), io.StringIO(), 0
    argv, cwd = sys.argv, os.getcwd()
    rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    as_module = args[0] == "-m"
    try:
        sys.argv = [args[1] if as_module else args[0], *args[2 if as_module else 1:]]
        os.chdir(REPO)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if as_module:
                    runpy.run_module(args[1], run_name="__main__", alter_sys=True)
                else:
                    runpy.run_path(args[0], run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
            except Exception:
                code = 1
                traceback.print_exc()
    finally:
        sys.argv = argv
        os.chdir(cwd)
        torch.set_rng_state(rng[0]), random.setstate(rng[1]), np.random.set_state(rng[2])
        for s, handler in handlers.items():
            signal.signal(s, handler)
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def script(name):
    return os.path.join(REPO, name)


def stage(name):
    """The command line of an RLHF chain stage: `python -m rlhf.<name>`."""
    return ["-m", f"rlhf.{name}"]


def synthetic_archive(path, n_shards=3, stories_per_shard=300, seed=0):
    """A .tar.gz in TinyStories' layout (JSON shards of {"story": ...}) of generated stories."""
    rng = random.Random(seed)
    names = ["Lily", "Tom", "Ben", "Mia", "Sue", "Max", "Anna", "Sam"]
    animals = ["cat", "dog", "bird", "fish", "frog", "bunny", "duck", "bear"]
    things = ["ball", "kite", "box", "cake", "tree", "boat", "hat", "book", "car", "drum"]
    adjs = ["big", "red", "small", "happy", "shiny", "soft", "blue", "funny", "old", "green"]
    verbs = ["played with", "looked at", "found", "liked", "shared", "lost", "painted", "hugged"]

    def story():
        n, a, t = rng.choice(names), rng.choice(animals), rng.choice(things)
        s = [f"Once upon a time, there was a {rng.choice(adjs)} {a} named {n}."]
        for _ in range(rng.randint(3, 7)):
            s.append(f"{n} {rng.choice(verbs)} a {rng.choice(adjs)} {rng.choice(things)} "
                     f"with {rng.choice(names)} and {rng.randint(2, 9)} friends.")
        s.append(f"In the end, the {a} was {rng.choice(adjs)} and the {t} was {rng.choice(adjs)}.")
        return " ".join(s)

    with tarfile.open(path, "w:gz") as tar:
        for i in range(n_shards):
            data = json.dumps([{"story": story()} for _ in range(stories_per_shard)]).encode()
            info = tarfile.TarInfo(f"data{i:02d}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def prepare_synthetic_data(root, vocab_size=300, stories_per_shard=200):
    """A generated archive run through download, train_vocab and pretokenize in root/data; returns the env
    (DATA_CACHE_DIR) the scripts need."""
    env = {"DATA_CACHE_DIR": str(root / "data")}
    synthetic_archive(root / "a.tar.gz", n_shards=3, stories_per_shard=stories_per_shard)
    run([script("tinystories.py"), "download", f"--data_url={root / 'a.tar.gz'}"], env=env)
    run([script("tinystories.py"), "train_vocab", f"--vocab_size={vocab_size}"], env=env)
    run([script("tinystories.py"), "pretokenize", f"--vocab_size={vocab_size}"], env=env)
    return env


@pytest.fixture(scope="session")
def stories260k():
    """(model, tokenizer) of the published stories260K, in eval mode."""
    from checkpoint import load_checkpoint, model_from_checkpoint
    from tokenizer import Tokenizer
    model = model_from_checkpoint(load_checkpoint(shared_path("stories260K", "stories260K.pt")))
    return model, Tokenizer(shared_path("stories260K", "tok512.model"))


@pytest.fixture(scope="session")
def greedy_text():
    with open(shared_path("stories260K", "greedy_t0.txt"), encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """(root, env): a generated corpus, a 300-token tokenizer and its pretokenized shards, shared by the tests
    that run train.py."""
    root = tmp_path_factory.mktemp("synthetic")
    return root, prepare_synthetic_data(root, vocab_size=300, stories_per_shard=150)
