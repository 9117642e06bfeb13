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


def run_in_process(args):
    """run(args, check=False) for a command line that a script refuses before doing any work (a bad flag, a
    missing or wrong file): the script runs here as __main__ (runpy) with that argv, and the result has the
    exit status, stdout and stderr a process would give (an uncaught exception: status 1 and its traceback),
    without a Python start and `import torch` per case. Environment variables are not applied: modules read
    them once at import."""
    import contextlib
    import runpy
    import traceback
    out, err, code = io.StringIO(), io.StringIO(), 0
    argv, cwd = sys.argv, os.getcwd()
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
