"""Shared test helpers. Tests that need ../shared (the published stories260K model, TinyStories excerpt)
skip with a clear reason when it is absent, so the suite also passes on a fresh machine."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("SHARED_DIR", os.path.join(os.path.dirname(REPO), "shared"))
sys.path.insert(0, REPO)


def shared_path(*parts):
    """Path inside ../shared, or skip the test when it is not there."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} not found: this test needs the reference files of ../shared (present in CI)")
    return path


def run(args, cwd=None, env=None, check=True, timeout=600):
    """Run a repository script (`python script.py ...`) as a user would; returns the CompletedProcess."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.run([sys.executable, *args], cwd=cwd or REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-3000:]}")
    return proc


def script(name):
    return os.path.join(REPO, name)


@pytest.fixture(scope="session")
def stories260k():
    """(model, tokenizer) of the published stories260K, in eval mode."""
    from model import Transformer, load_model_state, model_args_from_checkpoint
    from tokenizer import Tokenizer
    from utils import load_checkpoint
    ckpt = load_checkpoint(shared_path("stories260K", "stories260K.pt"))
    model = Transformer(model_args_from_checkpoint(ckpt))
    load_model_state(model, ckpt["model"])
    return model.eval(), Tokenizer(shared_path("stories260K", "tok512.model"))


@pytest.fixture(scope="session")
def greedy_text():
    with open(shared_path("stories260K", "greedy_t0.txt"), encoding="utf-8") as f:
        return f.read()
