"""Reliability: exact resume after a graceful stop, atomic writes, safe loading, robust downloads,
resumable pretokenization, and one-line errors for bad input that leave out_dir untouched."""
import hashlib
import http.server
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import torch

import checkpoint
import utils
from conftest import REPO, first_difference, killed_run, logged, run, script, shared_path
from tinystories import DataError, download_file

MODEL = ["--vocab_source=custom", "--vocab_size=300", "--dim=32", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2",
         "--multiple_of=4", "--max_seq_len=64", "--batch_size=8", "--gradient_accumulation_steps=2", "--device=cpu",
         "--compile=False", "--dropout=0.1", "--learning_rate=2e-3", "--warmup_iters=5", "--eval_iters=2"]

pytestmark = pytest.mark.slow  # end-to-end runs of the scripts


@pytest.fixture(scope="module")
def data(synthetic_data):
    return synthetic_data


def test_graceful_stop_and_exact_resume(data, tmp_path):
    """SIGTERM midway, resume: bitwise the same weights and optimizer state as an uninterrupted run (float32,
    dropout on, so the RNG state matters; cosine schedule; data position restored)."""
    root, env = data
    args = [*MODEL, "--max_iters=40", "--eval_interval=1000", "--always_save_checkpoint=True", "--log_interval=1"]
    straight = tmp_path / "straight"
    run([script("train.py"), f"--out_dir={straight}", *args], env=env)

    stopped = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, script("train.py"), f"--out_dir={stopped}", *args], cwd=REPO,
                            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("5 | loss"):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM received" in out and "--init_from=resume" in out
    stopped_at = torch.load(stopped / "ckpt.pt", weights_only=True)["iter_num"]
    assert 5 < stopped_at < 40
    run([script("train.py"), f"--out_dir={stopped}", *args, "--init_from=resume"], env=env)

    a = torch.load(straight / "ckpt.pt", weights_only=True)
    b = torch.load(stopped / "ckpt.pt", weights_only=True)
    assert a["iter_num"] == b["iter_num"] == 41
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)


def test_pretraining_killed_anywhere_resumes_bitwise(data, tmp_path):
    """kill -9 halfway through the second save of ckpt.pt, then twice at a random moment after a random iteration's
    log line, each time --init_from=resume: the end is bitwise the uninterrupted run's (weights, optimizer, RNG and
    data position, the metrics), and each kill costs at most the iterations since the last save (every 4 here)."""
    import random
    import re
    root, env = data
    args = [*MODEL, "--max_iters=24", "--eval_interval=4", "--always_save_checkpoint=True", "--log_interval=1"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run([script("train.py"), f"--out_dir={straight}", *args], env=env)
    rng = random.Random(0)
    kills = [dict(die_at_save=2, save_name="ckpt.pt")] + [
        dict(kill_at=rf"^{rng.randint(lo, lo + 3)} \| loss", delay=rng.uniform(0.0, 0.2)) for lo in (9, 17)]
    done = []  # the iterations each run finished
    for i, kill in enumerate(kills):
        resume = ["--init_from=resume"] if i else []
        code, out = killed_run([script("train.py"), f"--out_dir={killed}", *args, *resume], env, **kill)
        assert code in (137, -9), out[-2000:]
        done += re.findall(r"^(\d+) \| loss", out, re.M)
    out = run([script("train.py"), f"--out_dir={killed}", *args, "--init_from=resume"], env=env).stdout
    done += re.findall(r"^(\d+) \| loss", out, re.M)
    assert 0 <= len(done) - 25 <= 4 * len(kills), done  # iterations 0..24 once, plus at most 4 per kill
    a, b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (straight, killed))
    for ck in (a, b):  # the settings that differ by design
        del ck["config"]["out_dir"], ck["config"]["init_from"]
    assert first_difference(a, b) is None, first_difference(a, b)
    assert logged(straight / "metrics.jsonl") == logged(killed / "metrics.jsonl")


def test_atomic_write_keeps_the_old_file_when_a_save_fails(tmp_path, monkeypatch, capsys):
    path = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint({"v": torch.ones(3)}, str(path))
    good = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full (injected between write and replace)")

    monkeypatch.setattr(utils.os, "replace", broken_replace)
    with pytest.raises(SystemExit):
        checkpoint.save_checkpoint({"v": torch.zeros(1000)}, str(path))
    assert f"error: could not save {path} (disk full (injected" in capsys.readouterr().err
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind


def test_a_full_disk_stops_training_in_one_line_and_the_run_resumes(data, tmp_path):
    """ENOSPC injected into the second save (torch.save's writes fail as they would on a full disk): the run stops
    with one line naming the path and the cause, the first checkpoint is intact, no temporary file is left, and
    once space is free --init_from=resume finishes the run where an uninterrupted one ends, bitwise."""
    root, env = data
    args = [*MODEL, "--max_iters=6", "--eval_interval=2", "--always_save_checkpoint=True"]
    straight = tmp_path / "straight"
    run([script("train.py"), f"--out_dir={straight}", *args], env=env)
    out = tmp_path / "full"
    full_disk = ("import errno, runpy, sys, torch\n"
                 "real, saves = torch.save, []\n"
                 "def save(obj, f, *a, **k):\n"
                 "    saves.append(1)\n"
                 "    if len(saves) > 1:\n"
                 "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
                 "    return real(obj, f, *a, **k)\n"
                 "torch.save = save\n"
                 f"sys.argv = ['train.py', '--out_dir={out}', *{args!r}]\n"
                 f"runpy.run_path({script('train.py')!r}, run_name='__main__')\n")
    proc = run(["-c", full_disk], env=env, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-800:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: could not save {out / 'ckpt.pt'} (No space left on device); the previous file"), last
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 2  # the first save, intact
    assert sorted(os.listdir(out)) == ["ckpt.pt", "metrics.jsonl"]  # no temporary file, no lock left
    run([script("train.py"), f"--out_dir={out}", *args, "--init_from=resume"], env=env)
    a = torch.load(straight / "ckpt.pt", weights_only=True)
    b = torch.load(out / "ckpt.pt", weights_only=True)
    assert a["iter_num"] == b["iter_num"] == 7
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/fullllm_pickle_ran"


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    if os.path.exists(MARKER):
        os.remove(MARKER)
    bad = tmp_path / "evil.pt"
    torch.save({"model": Evil(), "model_args": {}}, bad)
    with pytest.raises(ValueError, match="refusing to load"):
        checkpoint.load_checkpoint(str(bad))
    proc = run([script("sample.py"), f"--checkpoint={bad}"], check=False)
    assert proc.returncode == 1 and "refusing to load" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(MARKER)


class FlakyHandler(http.server.BaseHTTPRequestHandler):
    """Serves BLOB; the first full request is cut off halfway, later ones honour Range."""
    BLOB = os.urandom(300_000)
    requests = []

    def do_GET(self):
        rng = self.headers.get("Range")
        FlakyHandler.requests.append(rng)
        if rng is None and len(FlakyHandler.requests) == 1:
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.BLOB)))
            self.end_headers()
            self.wfile.write(self.BLOB[: len(self.BLOB) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)  # drop the connection mid-body
            return
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(self.BLOB) - start))
        self.end_headers()
        self.wfile.write(self.BLOB[start:])

    def log_message(self, *args):
        pass


def test_download_resumes_after_a_dropped_connection(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FlakyHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/blob"
        out = tmp_path / "blob"
        sha = hashlib.sha256(FlakyHandler.BLOB).hexdigest()
        download_file(url, str(out), chunk_size=4096, sha256=sha)
        assert out.read_bytes() == FlakyHandler.BLOB
        assert FlakyHandler.requests[0] is None and FlakyHandler.requests[1].startswith("bytes=")
        with pytest.raises(DataError, match="sha256 mismatch"):
            download_file(url, str(tmp_path / "again"), sha256="0" * 64)
        assert not (tmp_path / "again").exists()
    finally:
        server.shutdown()
        server.server_close()


def test_unreachable_url_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="unreachable after 2 attempts"):
        download_file("http://127.0.0.1:9/none.tar.gz", str(tmp_path / "x"), retries=1)
    assert not (tmp_path / "x").exists()


def copy_of_the_data(data, tmp_path):
    """(data folder, env): a copy of the session's corpus, tokenizer and shards that a test may damage."""
    data_dir = tmp_path / "data"
    shutil.copytree(data[0] / "data", data_dir)
    return data_dir, {"DATA_CACHE_DIR": str(data_dir)}


def test_pretokenize_skips_complete_shards_and_redoes_missing_ones(data, tmp_path):
    data_dir, env = copy_of_the_data(data, tmp_path)
    bins = sorted((data_dir / "tok300").glob("*.bin"))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in bins}
    bins[1].unlink()
    proc = run([script("tinystories.py"), "pretokenize", "--vocab_size=300"], env=env)
    assert "skipped 2 shards" in proc.stdout
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted((data_dir / "tok300").glob("*.bin"))}
    assert after[bins[0].name] == before[bins[0].name] and after[bins[2].name] == before[bins[2].name]
    assert after[bins[1].name][1] == before[bins[1].name][1]  # redone, same tokens


def test_a_cut_or_overwritten_shard_is_named_before_training(data, tmp_path):
    data_dir, env = copy_of_the_data(data, tmp_path)
    bins = sorted((data_dir / "tok300").glob("*.bin"))
    good = bins[1].read_bytes()
    train = [script("train.py"), *MODEL, f"--out_dir={tmp_path / 'out'}", "--max_iters=1"]
    for damage, message in [(good[: len(good) // 2], f"{bins[1]} has {len(good) // 2:,} bytes but pretokenize "
                                                     f"wrote {len(good):,} ({len(good) // 2:,} tokens): it was cut "
                                                     "short or replaced"),
                            (bytes(len(good)), f"{bins[1]} is not the file pretokenize wrote")]:
        bins[1].write_bytes(damage)
        proc = run(train, env=env, check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-800:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: {message}") and last.endswith("pretokenize --vocab_size=300`"), last
    bins[1].write_bytes(good)
    run(train, env=env)


def test_pretokenize_killed_midway_completes_when_run_again(data, tmp_path):
    """pretokenize dies (os._exit, as under kill -9) halfway through writing its second shard: the run again
    skips the recorded first shard, redoes the rest, and training accepts the shards, identical to a clean run's."""
    data_dir, env = copy_of_the_data(data, tmp_path)
    clean = {p.name: p.read_bytes() for p in (data_dir / "tok300").glob("*.bin")}
    shutil.rmtree(data_dir / "tok300")
    dies = ("import os, runpy, sys, contextlib, utils\n"
            "real = utils.atomic_write\n"
            "@contextlib.contextmanager\n"
            "def dying_write(path, mode='wb'):\n"
            "    if path.endswith('data01.bin'):\n"
            "        with real(path, mode) as f:\n"
            "            f.write(b'half a shard')\n"
            "            os._exit(137)\n"
            "    with real(path, mode) as f:\n"
            "        yield f\n"
            "utils.atomic_write = dying_write  # what tinystories.py imports\n"
            "sys.argv = ['tinystories.py', 'pretokenize', '--vocab_size=300']\n"
            f"runpy.run_path({script('tinystories.py')!r}, run_name='__main__')\n")
    proc = run(["-c", dies], env=env, check=False)
    assert proc.returncode == 137
    assert sorted(p.name for p in (data_dir / "tok300").glob("*.bin")) == ["data00.bin"]  # the second never landed
    proc = run([script("tinystories.py"), "pretokenize", "--vocab_size=300"], env=env)
    assert "skipped 1 shards" in proc.stdout
    assert {p.name: p.read_bytes() for p in (data_dir / "tok300").glob("*.bin")} == clean
    run([script("train.py"), *MODEL, f"--out_dir={tmp_path / 'out'}", "--max_iters=1"], env=env)


# --- bad input: one line, non-zero exit, no traceback, nothing in out_dir changed --------------------

def tree_hash(folder):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            p = os.path.join(dirpath, name)
            h.update(p.encode())
            h.update(open(p, "rb").read())
    return h.hexdigest()


BAD_INPUTS = [
    ("train.py", ["--no_such_flag=1"], "unknown config key --no_such_flag"),
    ("train.py", ["--batch_size=big"], "--batch_size expects int"),
    ("train.py", ["--batch_size=0"], "--batch_size must be >= 1"),
    ("train.py", ["--n_heads=4", "--n_kv_heads=3"], "must be divisible by n_kv_heads=3"),
    ("train.py", ["--dim=32", "--n_heads=3", "--n_kv_heads=3"], "must be divisible by n_heads=3"),
    ("train.py", ["--dim=36", "--n_heads=12", "--n_kv_heads=12"], "must be even"),
    ("train.py", ["--device=cuda"], "CUDA is not available"),
    ("train.py", ["--init_from=resume", "--out_dir={empty}"], "does not exist"),
    ("train.py", ["missing_config.py"], "config file missing_config.py not found"),
    ("train.py", ["NODATA"], "run `python tinystories.py pretokenize --vocab_size=300` first"),
    ("sample.py", ["--checkpoint={out}/nope.pt"], "not found"),
    ("sample.py", ["--checkpoint={out}/truncated.pt"], "truncated"),
    ("sample.py", ["--checkpoint={out}/ckpt.pt", "--tokenizer={llama2}"], "has 32000 tokens but the model has vocab_size=300"),
    ("sample.py", ["--checkpoint={out}/ckpt.pt", "--start={long}"], "leaves no room in the context"),
    ("sample.py", ["--checkpoint={out}/ckpt.pt", "--max_new_tokens=0"], "--max_new_tokens must be >= 1"),
    ("sample.py", ["--checkpoint={out}/ckpt.pt", "--device=cuda"], "CUDA is not available"),
    ("tinystories.py", ["download", "--data_url=http://127.0.0.1:9/x.tar.gz", "--retries=0"], "unreachable"),
    ("tinystories.py", ["download", "--data_url={out}/ckpt.pt"], "not a tar archive"),
    ("export.py", ["{out}/x.bin", "--checkpoint={out}/nope.pt"], "not found"),
]


@pytest.mark.parametrize("script_name, args, message", BAD_INPUTS, ids=[f"{s}:{a[-1][:30]}" for s, a, _ in BAD_INPUTS])
def test_bad_input_gets_a_one_line_error_and_changes_nothing(data, tmp_path, script_name, args, message):
    root, env = data
    ckpt = root / "trained" / "ckpt.pt"
    if not ckpt.exists():
        run([script("train.py"), f"--out_dir={ckpt.parent}", *MODEL, "--max_iters=2", "--eval_interval=2",
             "--always_save_checkpoint=True"], env=env)
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(ckpt, out / "ckpt.pt")
    (out / "truncated.pt").write_bytes(ckpt.read_bytes()[:5000])
    values = {"out": out, "empty": tmp_path / "empty", "long": "once upon a time " * 200,
              "llama2": shared_path("llama2", "tokenizer.model") if "{llama2}" in " ".join(args) else ""}
    env = dict(env)
    if "NODATA" in args or script_name == "tinystories.py":  # a data folder of its own, empty
        env["DATA_CACHE_DIR"] = str(tmp_path / "nodata")
    resolved = [a.format(**values) for a in args if a != "NODATA"]
    if script_name == "train.py":
        resolved = [*MODEL, f"--out_dir={out}", "--max_iters=1", *resolved]
    before = tree_hash(out)
    proc = run([script(script_name), *resolved], env=env, check=False, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, proc.stderr[-800:]
    assert tree_hash(out) == before


def test_ddp_two_processes_equal_one_process_with_twice_the_accumulation(data, tmp_path):
    """torchrun, gloo on CPU: 2 processes x gradient accumulation 2 == 1 process x accumulation 4 on the same
    batches (ranks split one global batch stream), after two optimizer steps."""
    root, env = data
    args = [*MODEL, "--dropout=0.0", "--gradient_accumulation_steps=4", "--max_iters=1", "--eval_interval=1000",
            "--always_save_checkpoint=True", "--warmup_iters=0", "--decay_lr=False"]
    run([script("train.py"), f"--out_dir={tmp_path / 'one'}", *args], env=env)
    run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script("train.py"),
         f"--out_dir={tmp_path / 'two'}", *args], env=env, timeout=300)
    one = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)
    assert one["iter_num"] == two["iter_num"] == 2
    a, b = one["model"], two["model"]
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-6, worst


def test_non_finite_gradients_stop_training_before_anything_is_saved(data, tmp_path):
    root, env = data
    out = tmp_path / "out"
    proc = run([script("train.py"), f"--out_dir={out}", *MODEL, "--learning_rate=1e6", "--warmup_iters=0",
                "--grad_clip=0.0", "--max_iters=50", "--eval_interval=1000", "--dropout=0.0"], env=env, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: non-finite loss or gradient at iteration") and "last good checkpoint" in last
    assert not (out / "ckpt.pt").exists()  # no NaN weights written


def test_one_run_per_folder_and_a_dead_runs_lock_is_taken_over(data, tmp_path):
    """A second train.py or stage writing into an out_dir that a running process holds is refused in one line
    naming it; once that process is killed (no chance to clean up), the next run takes its lock over, with a note,
    and releases it at the end."""
    root, env = data
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; sys.path.insert(0, {REPO!r}); "
                               f"from utils import hold_out_dir; hold_out_dir({str(out)!r}); print('held', flush=True); "
                               "time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = [run([script("train.py"), *MODEL, f"--out_dir={out}", "--max_iters=1"], env=env, check=False),
                   run(["-m", "rlhf.grpo", "--task=arithmetic", "--policy=stories260K/stories260K.pt",
                        f"--out_dir={out}", "--max_iters=1", "--device=cpu"], check=False)]
        for proc in refused:
            assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-800:]
            last = proc.stderr.strip().splitlines()[-1]
            assert last.startswith(f"error: {out} is in use by process {holder.pid} ("), last
        assert sorted(os.listdir(out)) == [utils.LOCK_NAME]  # neither wrote anything
    finally:
        holder.kill()
        holder.wait()
    assert (out / utils.LOCK_NAME).exists()  # left behind by the killed process
    proc = run([script("train.py"), *MODEL, f"--out_dir={out}", "--max_iters=2", "--eval_interval=2",
                "--always_save_checkpoint=True"], env=env)
    assert f"{out} was held by process {holder.pid}, which is no longer running; taking it over" in proc.stdout
    assert (out / "ckpt.pt").exists() and not (out / utils.LOCK_NAME).exists()  # released at the end


def test_a_half_written_lock_counts_as_left_by_a_dead_process(tmp_path, capsys):
    (tmp_path / utils.LOCK_NAME).write_text('{"pid": 12')  # a process killed while writing it
    assert utils.hold_out_dir(str(tmp_path)) == str(tmp_path / utils.LOCK_NAME)
    assert "which is no longer running; taking it over" in capsys.readouterr().out
    assert utils.hold_out_dir(str(tmp_path))  # the same process again: its own lock
    utils._release_lock(str(tmp_path / utils.LOCK_NAME), os.getpid())
    assert not (tmp_path / utils.LOCK_NAME).exists()
