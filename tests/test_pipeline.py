"""The seed's pipeline end to end, as a user runs it: download -> train_vocab -> pretokenize -> train ->
resume -> sample, on real TinyStories (the reference excerpt) served over HTTP from 127.0.0.1, or on a generated
corpus where it is absent, so the suite means something without it."""
import functools
import http.server
import io
import json
import os
import re
import tarfile
import threading

import pytest

from conftest import SHARED, run, script, synthetic_archive

TINY_MODEL = ["--vocab_source=custom", "--dim=64", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2",
              "--multiple_of=4", "--max_seq_len=128", "--batch_size=16", "--gradient_accumulation_steps=1",
              "--learning_rate=3e-3", "--warmup_iters=5", "--eval_iters=4", "--log_interval=5", "--device=cpu",
              "--compile=False"]

pytestmark = pytest.mark.slow  # end-to-end runs of the scripts


@pytest.fixture
def http_server():
    """Serve a folder on 127.0.0.1 (an ephemeral port); yields a function folder -> base URL."""
    servers = []

    def serve(folder):
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=folder)
        handler.log_message = lambda *a: None
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for s in servers:
        s.shutdown()
        s.server_close()


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def pipeline(tmp_path, url, vocab_size, iters):
    env = {"DATA_CACHE_DIR": str(tmp_path / "data")}
    out = str(tmp_path / "out")
    run([script("tinystories.py"), "download", f"--data_url={url}"], env=env)
    assert (tmp_path / "data" / "TinyStories_all_data" / "data00.json").exists()
    run([script("tinystories.py"), "train_vocab", f"--vocab_size={vocab_size}"], env=env)
    assert (tmp_path / "data" / f"tok{vocab_size}.model").exists()
    run([script("tinystories.py"), "pretokenize", f"--vocab_size={vocab_size}"], env=env)
    assert (tmp_path / "data" / f"tok{vocab_size}" / "data01.bin").stat().st_size > 10_000

    common = [f"--out_dir={out}", f"--vocab_size={vocab_size}", *TINY_MODEL]
    run([script("train.py"), *common, f"--max_iters={iters}", f"--eval_interval={iters}"], env=env)
    rows = [r for r in read_metrics(out) if "loss" in r]
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-2:]) / 2
    assert last < first - 1.0, f"loss did not fall clearly: {first:.3f} -> {last:.3f}"
    evals = [r for r in read_metrics(out) if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    assert all(k in rows[0] for k in ("iter", "lr", "dt_ms", "tok_per_s"))

    # resume for a few more iterations: continues from the saved iteration and loss
    proc = run([script("train.py"), *common, "--init_from=resume", f"--max_iters={iters + 10}",
                "--eval_interval=1000", "--log_interval=1"], env=env)
    assert "Resuming training" in proc.stdout
    start = int(re.search(r"^(\d+) \| loss", proc.stdout, re.M).group(1))
    assert start in (iters, iters + 1)  # the last checkpoint: the eval at iters or the final one
    rows = [r for r in read_metrics(out) if "loss" in r]
    resumed = [r for r in rows if r["iter"] >= start]
    assert resumed[0]["loss"] < first - 1.0  # it did not start over
    # the log holds each iteration once: what the first run logged past the checkpoint was cut on resume
    assert [r["iter"] for r in rows] == sorted({r["iter"] for r in rows}) and rows[-1]["iter"] == iters + 10

    sample = run([script("sample.py"), f"--checkpoint={out}/ckpt.pt", "--start=Once upon a time",
                  "--max_new_tokens=40", "--temperature=0.5", "--num_samples=2"], env=env)
    stories = sample.stdout.split("---------------\n")
    assert len(stories) == 2 and all(s.startswith("Once upon a time") and len(s) > 40 for s in stories)
    assert "tok/s" in sample.stderr


def test_pipeline_over_http(tmp_path, http_server):
    """On the real TinyStories excerpt (the reference data folder) when it is there, else on a generated corpus: the same commands
    either way, so one run covers the pipeline and the suite still means something without it."""
    archive = os.path.join(SHARED, "tinystories", "TinyStories_all_data.tar.gz")
    if os.path.exists(archive):
        pipeline(tmp_path, http_server(os.path.dirname(archive)) + "/TinyStories_all_data.tar.gz", vocab_size=512,
                 iters=50)
    else:
        serve_dir = tmp_path / "www"
        serve_dir.mkdir()
        synthetic_archive(serve_dir / "TinyStories_all_data.tar.gz")
        pipeline(tmp_path, http_server(str(serve_dir)) + "/TinyStories_all_data.tar.gz", vocab_size=300, iters=50)


def test_download_from_a_local_path(tmp_path):
    synthetic_archive(tmp_path / "a.tar.gz", n_shards=2, stories_per_shard=5)
    env = {"DATA_CACHE_DIR": str(tmp_path / "data")}
    proc = run([script("tinystories.py"), "download", f"--data_url={tmp_path / 'a.tar.gz'}"], env=env)
    assert "Number of shards: 2" in proc.stdout


@pytest.mark.parametrize("member", ["../evil.json", "/tmp/evil_abs.json", "a/../../evil.json"])
def test_download_refuses_path_traversal(tmp_path, member):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        data = b'[{"story": "x"}]'
        for name in ("data00.json", member):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    env = {"DATA_CACHE_DIR": str(tmp_path / "data")}
    proc = run([script("tinystories.py"), "download", f"--data_url={archive}"], env=env, check=False)
    assert proc.returncode != 0
    assert "escapes the target folder" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "evil.json").exists() and not os.path.exists("/tmp/evil_abs.json")
    assert not (tmp_path / "data" / "TinyStories_all_data").exists()


def test_download_refuses_a_link_pointing_outside(tmp_path):
    archive = tmp_path / "link.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("data00.json")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    proc = run([script("tinystories.py"), "download", f"--data_url={archive}"],
               env={"DATA_CACHE_DIR": str(tmp_path / "data")}, check=False)
    assert proc.returncode != 0 and "points outside" in proc.stderr


def test_not_an_archive(tmp_path):
    bogus = tmp_path / "x.tar.gz"
    bogus.write_text("<html>not found</html>")
    proc = run([script("tinystories.py"), "download", f"--data_url={bogus}"],
               env={"DATA_CACHE_DIR": str(tmp_path / "data")}, check=False)
    assert proc.returncode == 1 and "is not a tar archive" in proc.stderr


def test_training_without_data_says_what_to_run(tmp_path):
    proc = run([script("train.py"), f"--out_dir={tmp_path / 'out'}", "--vocab_size=512", *TINY_MODEL,
                "--max_iters=1"], env={"DATA_CACHE_DIR": str(tmp_path / "nodata")}, check=False)
    assert proc.returncode == 1
    assert "run `python tinystories.py pretokenize --vocab_size=512` first" in proc.stderr
    assert "Traceback" not in proc.stderr
