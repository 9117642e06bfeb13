"""Our top-level modules and packages must not take a name that an installed distribution provides.

Python puts the repository root first on sys.path (scripts run from it, and pytest's rootdir), so a module of ours
named like an installed package hides that package from everything that imports it: transformers 5 imports the
`kernels` distribution, and a `kernels.py` here made `from transformers import LlamaForCausalLM` fail."""
import importlib.metadata
import os
import subprocess
import sys

import pytest

from conftest import REPO


def top_level_names(root):
    """The names `import NAME` finds at the repository root: modules (NAME.py) and folders (packages, and
    namespace packages: any folder is importable)."""
    names = set()
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        if entry.startswith((".", "_")):
            continue
        if entry.endswith(".py"):
            names.add(entry[:-3])
        elif os.path.isdir(path) and entry.isidentifier():
            names.add(entry)
    return names


def shadowed(names):
    """{name: [distributions]} for each of `names` that an installed distribution provides."""
    provided = importlib.metadata.packages_distributions()
    return {name: provided[name] for name in sorted(names) if name in provided}


def test_no_module_of_ours_shadows_an_installed_distribution():
    names = top_level_names(REPO)
    assert {"model", "train", "ppo", "cpu_kernels", "tests"} <= names  # the listing sees what it should
    clashes = shadowed(names)
    assert not clashes, ("these top-level names of ours are also provided by installed distributions, which they "
                         f"would hide from every importer: {clashes}; rename ours")


def test_the_check_bites_on_a_name_an_installed_distribution_provides():
    """The check above is only as good as its lookup: pytest, installed to run this, provides `pytest` and
    `_pytest`, so a module of ours with that name must be reported, with the distribution."""
    assert shadowed({"pytest", "model"}) == {"pytest": importlib.metadata.packages_distributions()["pytest"]}


def test_transformers_imports_after_our_model_from_the_repository_root():
    """What a user does in a script at the root: import our model, then transformers' Llama. A module of ours
    with the name of one of transformers' own imports would break the second line."""
    pytest.importorskip("transformers")
    probe = "import model; from transformers import LlamaForCausalLM; print('ok')"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
