"""The repository's shape: no import cycle among our modules (function-level imports included), and every
`python ...` command in README.md and docs/ names a script or module that exists, with flags it defines."""
import ast
import glob
import os
import re

import pytest

from conftest import REPO

PACKAGES = ("rlhf", "tasks")


def our_modules():
    """{dotted name: path} of the importable code: the root's modules and the packages' modules."""
    mods = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(REPO, "*.py"))}
    for pkg in PACKAGES:
        for p in glob.glob(os.path.join(REPO, pkg, "*.py")):
            name = os.path.basename(p)[:-3]
            mods[pkg if name == "__init__" else f"{pkg}.{name}"] = p
    return mods


def imports_of(path, mods):
    """The modules of ours that the file imports anywhere (module level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in mods}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module in mods:
                out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods}
    return out


def find_cycle(graph):
    """One cycle of the directed graph {node: set of nodes} as a list, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_among_our_modules():
    mods = our_modules()
    assert {"model", "ppo", "rlhf.common", "tasks.story", "tasks.length"} <= set(mods)
    graph = {name: imports_of(path, mods) - {name} for name, path in mods.items()}
    assert "tasks.story" in graph["rlhf.common"]  # the graph sees imports (here: the chain opens its tasks)
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


# -----------------------------------------------------------------------------
# the documented commands

def documented_commands():
    """(file, command) for every command line in README.md and docs/*.md (code blocks and `inline code`) that runs
    one of our scripts: `python script.py ...`, `python -m package.module ...`, `torchrun ... script.py ...`, `bash x.sh`."""
    out = []
    for path in [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md"))):
        in_code = False
        for line in open(path, encoding="utf-8"):
            if line.startswith("```"):
                in_code = not in_code
                continue
            # a code block's lines (without their comments), or the `inline code` of a prose line
            spans = [line.split(" #", 1)[0]] if in_code else re.findall(r"`([^`]+)`", line)
            for span in spans:
                for part in re.split(r"[;&|]+", span):
                    m = re.search(r"(?:^|\s)(python3? |torchrun |bash )(.*)", part)
                    if m:
                        out.append((os.path.relpath(path, REPO), (m.group(1) + m.group(2)).strip()))
    return out


def script_and_flags(command):
    """(path of the script or module run, [flags set as --key=value]) of a command line; (None, []) for one that
    runs nothing of ours (pip, pytest)."""
    words = command.split()
    if words[0] in ("python", "python3") and words[1:2] == ["-m"]:
        if words[2] in ("pytest", "pip"):
            return None, []
        target, rest = os.path.join(*words[2].split(".")) + ".py", words[3:]
    else:
        k = next((i for i, w in enumerate(words) if w.endswith((".py", ".sh"))), None)
        if k is None:
            return None, []
        target, rest = words[k], words[k + 1:]
    flags = [w[2:].split("=", 1)[0].replace("-", "_") for w in rest if w.startswith("--") and "=" in w]
    return target, flags


def defined_flags(path):
    """The settings a script takes: its module-level globals (configurator) and its argparse options."""
    tree = ast.parse(open(path).read())
    names = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
             if isinstance(t, ast.Name)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            names |= {a.value.lstrip("-").replace("-", "_") for a in node.args
                      if isinstance(a, ast.Constant) and str(a.value).startswith("--")}
    return names


def test_documented_commands_name_scripts_and_flags_that_exist():
    commands = documented_commands()
    assert len(commands) >= 20  # the README's journeys and the docs' commands were found
    problems = []
    for where, command in commands:
        target, flags = script_and_flags(command)
        if target is None or "<" in target:  # not ours, or a template (`python -m rlhf.<stage>`)
            continue
        path = os.path.join(REPO, target)
        if not os.path.isfile(path):
            problems.append(f"{where}: `{command}` runs {target}, which does not exist")
            continue
        unknown = [f for f in flags if f not in defined_flags(path)] if path.endswith(".py") else []
        if unknown:
            problems.append(f"{where}: `{command}` sets {', '.join('--' + f for f in unknown)}, not defined in {target}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("command, expected", [
    ("python -m rlhf.grpo --reward=gold --max_iters=3", ("rlhf/grpo.py", ["reward", "max_iters"])),
    ("python train.py config/ppo_length_cpu.py --seed=2", ("train.py", ["seed"])),
    ("torchrun --standalone --nproc_per_node=2 train.py --compile=False", ("train.py", ["compile"])),
    ("python tinystories.py pretokenize --vocab_size=512", ("tinystories.py", ["vocab_size"])),
    ("python -m pytest -m 'not slow'", (None, [])),
])
def test_commands_are_read_as_written(command, expected):
    assert script_and_flags(command) == expected


def test_the_flags_of_a_script_are_its_settings_and_options():
    assert {"reward", "max_iters", "beta"} <= defined_flags(os.path.join(REPO, "rlhf", "grpo.py"))
    assert {"vocab_size", "data_url"} <= defined_flags(os.path.join(REPO, "tinystories.py"))
    assert "nope" not in defined_flags(os.path.join(REPO, "train.py"))
