"""The reasoning study's one command, in miniature (QUICK=1: a 2,000-document corpus, a 30-iteration base, 2 RL
iterations per method, a few samples): every stage runs, every file the study promises is written in its format,
and a second run skips every finished stage."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

METHODS = ("grpo", "grpo_kl", "drgrpo", "drgrpo_kl", "rloo", "rloo_kl", "ppo", "ppo_kl")


def reason_cpu(out):
    env = dict(os.environ, QUICK="1", PYTHONUNBUFFERED="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run(["bash", "rlhf/reason_cpu.sh", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_the_whole_command_in_miniature(tmp_path):
    out = tmp_path / "reason"
    reason_cpu(out)
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"base", *METHODS}
    for t in report["targets"]:
        assert set(t) == {"target", "measured", "met"}
    assert (out / "report.md").read_text().startswith("# Reasoning from scratch")
    for name in ("base", *METHODS):
        rows = [json.loads(line) for line in (out / f"samples_{name}.jsonl").read_text().splitlines()]
        assert len(rows) == 8 * 4  # QUICK: 8 held-out problems x 4 samples
        for r in rows:
            assert {"question", "response", "answer", "correct"} <= set(r)
            assert isinstance(r["correct"], bool) and isinstance(r["answer"], str)
            assert r["answer"] == "" or r["answer"].lstrip("-").isdigit()
        e = json.loads((out / f"eval_{name}.json").read_text())
        assert sorted(map(int, e["pass_at_k"])) == [1, 2, 3, 4]
        assert all(0 <= v <= 1 for v in e["pass_at_k"].values())
    for method in METHODS:  # the curves: every RL iteration's rollouts, from the run's metrics.jsonl
        curve = report["curves"][method]
        assert curve["iter"] == [1, 2]  # QUICK: 2 RL iterations
        for key in ("pass1", "tokens", "working"):
            assert len(curve[key]) == 2 and all(v >= 0 for v in curve[key]), (method, key, curve[key])
    stages = [line.split("\t")[0] for line in (out / "timings.tsv").read_text().splitlines()]
    assert {"corpus", "tokenizer", "pretokenize", "base", "eval_base", *METHODS} <= set(stages)
    # resumable: a second run skips every stage and rebuilds only the report
    second = reason_cpu(out)
    assert "exists, skipped" in second and second.count("=== ") == second.count("exists, skipped")
