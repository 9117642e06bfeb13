"""The command line: configurator.py's typed overrides and config files, and the one meaning of --compile."""
import shutil

import pytest

import configurator
from conftest import run, script
from utils import COMPILE_PAYS_AFTER, should_compile


def make_config():
    return {"batch_size": 32, "learning_rate": 1e-3, "compile": False, "out_dir": "out", "device": "auto",
            "dropout": 0.0}


def test_overrides_are_typed():
    c = make_config()
    configurator.apply(c, ["--batch_size=8", "--learning_rate=3e-4", "--compile=True", "--out_dir=runs/a",
                           "--dropout=0", "--device=cpu"])
    assert c == {"batch_size": 8, "learning_rate": 3e-4, "compile": True, "out_dir": "runs/a", "device": "cpu",
                 "dropout": 0.0}
    assert isinstance(c["dropout"], float)  # an int is accepted where a float is expected
    configurator.apply(c, ["--compile=false", '--out_dir="quoted"'])
    assert c["compile"] is False and c["out_dir"] == "quoted"


@pytest.mark.parametrize("arg, message", [
    ("--batch_sise=8", "unknown config key --batch_sise"),
    ("--batch_size=eight", "--batch_size expects int"),
    ("--batch_size=8.5", "--batch_size expects int"),
    ("--compile=yes", "--compile expects bool"),
    ("--learning_rate", "malformed argument"),
    ("missing_config.py", "config file missing_config.py not found"),
])
def test_bad_arguments(arg, message):
    with pytest.raises(configurator.ConfigError, match=message):
        configurator.apply(make_config(), [arg])


def test_config_file(tmp_path):
    cfg = tmp_path / "small.py"
    cfg.write_text("batch_size = 4\nlearning_rate = 1e-2\n")
    c = make_config()
    configurator.apply(c, [str(cfg), "--batch_size=2"])  # later arguments win
    assert c["batch_size"] == 2 and c["learning_rate"] == 1e-2


@pytest.mark.parametrize("arg, message", [
    ("--max_itres=10", "error: unknown config key --max_itres"),
    ("--batch_size=1.5", "error: --batch_size expects int"),
    ("--learning_rate=fast", "error: --learning_rate expects float"),
])
def test_train_py_exits_with_one_line_error(tmp_path, arg, message):
    proc = run([script("train.py"), f"--out_dir={tmp_path}", arg], check=False, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_key_suggests_close_ones_in_one_short_line():
    c = {"batch_size": 1, "learning_rate": 1.0, "out_dir": "out"}
    with pytest.raises(configurator.ConfigError) as e:
        configurator.apply(dict(c), ["--batch_sise=3"])
    assert str(e.value) == "unknown config key --batch_sise; did you mean --batch_size?"
    with pytest.raises(configurator.ConfigError) as e:
        configurator.apply(dict(c), ["--zzz=3"])
    assert "zzz" in str(e.value) and "did you mean" not in str(e.value) and len(str(e.value)) < 120
    assert configurator.apply(dict(c), ["--batch_size=3", "--out_dir=x"]) == {"batch_size", "out_dir"}


def test_compile_auto_is_one_rule_on_the_run_length(monkeypatch, capsys):
    """--compile=auto compiles a step only when the run repeats it COMPILE_PAYS_AFTER times, on CUDA or on a CPU
    with a C++ compiler, never on MPS; True and False are obeyed whatever the run; anything else is refused."""
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    for step, pays in COMPILE_PAYS_AFTER.items():
        for device in ("cpu", "cuda", "cuda:1"):
            assert should_compile("auto", device, step, pays) is True
            assert should_compile("auto", device, step, pays - 1) is False
        assert should_compile("auto", "mps", step, 10 * pays) is False
        assert should_compile(True, "cpu", step, 0) is True
        assert should_compile(False, "cuda", step, 10 * pays) is False
    assert COMPILE_PAYS_AFTER == {"train": 1000, "decode": 8000}  # the measured thresholds (docs/speed.md)
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no C++ compiler for inductor
    assert should_compile("auto", "cpu", "train", 10**6) is False
    assert should_compile("auto", "cuda", "train", 10**6) is True
    with pytest.raises(SystemExit):
        should_compile("sometimes", "cpu", "decode", 0)
    assert "--compile must be auto, True or False" in capsys.readouterr().err
