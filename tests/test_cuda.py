"""What runs only on a GPU: bf16 autocast training and sampling, PyTorch's SDPA kernels, torch.compile on CUDA, the
golden story on the GPU, and a 2-process NCCL DDP run when there are two GPUs. Every test skips without CUDA;
`bash bench/cuda_check.sh` runs them with the seed's commands on a GPU machine."""
import json
import os
import re
import shutil

import pytest
import torch

from conftest import REPO, run, script

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
BUNDLED = os.path.join(REPO, "stories260K", "stories260K.pt")
TOKENIZER = os.path.join(REPO, "stories260K", "tok512.model")
MODEL = ["--vocab_source=custom", "--vocab_size=300", "--dim=64", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2",
         "--multiple_of=4", "--max_seq_len=128", "--batch_size=16", "--gradient_accumulation_steps=1",
         "--eval_iters=2", "--learning_rate=3e-3", "--warmup_iters=5", "--device=cuda"]


def losses(out_dir):
    return [r["loss"] for r in map(json.loads, open(out_dir / "metrics.jsonl")) if "loss" in r]


@pytest.mark.parametrize("dtype, compile", [("bfloat16", False), ("bfloat16", True), ("float32", False)])
def test_training_on_cuda_lowers_the_loss_and_resumes(synthetic_data, tmp_path, dtype, compile):
    """bf16 autocast (and fp32), eager and compiled: the loss falls over 60 iterations, the checkpoint is fp32
    weights that load on the CPU, and --init_from=resume continues."""
    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    _, env = synthetic_data
    out = tmp_path / "out"
    args = [script("train.py"), f"--out_dir={out}", *MODEL, f"--dtype={dtype}", f"--compile={compile}",
            "--eval_interval=30", "--always_save_checkpoint=True", "--log_interval=1"]
    run([*args, "--max_iters=60"], env=env)
    seen = losses(out)
    assert sum(seen[-10:]) / 10 < sum(seen[:10]) / 10 - 0.5, seen
    ck = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float32 for v in ck["model"].values()) and ck["iter_num"] == 61
    proc = run([*args, "--max_iters=70", "--init_from=resume"], env=env)
    assert "Resuming training from" in proc.stdout and torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 71


def test_sdpa_on_cuda_matches_the_cpu():
    """The model on the GPU (PyTorch's fused SDPA kernels, fp32) gives the CPU's logits, and in bf16 autocast the same
    next tokens almost everywhere."""
    from export import load_model
    model, _ = load_model(BUNDLED)
    tokens = torch.randint(3, 512, (4, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cpu = model(tokens).logits
        gpu_model = model.to("cuda")
        gpu = gpu_model(tokens.cuda()).logits.cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = gpu_model(tokens.cuda()).logits.float().cpu()
    torch.testing.assert_close(gpu, cpu, atol=2e-4, rtol=2e-4)
    assert (bf16.argmax(-1) == cpu.argmax(-1)).float().mean() > 0.95


@pytest.mark.parametrize("compile", [False, True])
def test_golden_story_on_the_gpu(greedy_text, compile):
    """Greedy from BOS on the GPU in fp32, eager and with the compiled decode step: the golden story to the byte."""
    proc = run([script("sample.py"), f"--checkpoint={BUNDLED}", f"--tokenizer={TOKENIZER}", "--temperature=0.0",
                "--max_new_tokens=500", "--device=cuda", "--dtype=float32", f"--compile={compile}"])
    assert proc.stdout == greedy_text + "\n"


def test_bf16_sampling_on_the_gpu_is_seeded():
    """Sampling in bf16 on the GPU: stories, the same for the same seed."""
    args = [script("sample.py"), f"--checkpoint={BUNDLED}", f"--tokenizer={TOKENIZER}", "--temperature=0.8",
            "--max_new_tokens=200", "--num_samples=2", "--device=cuda", "--dtype=bfloat16", "--seed=7"]
    first, again = run(args).stdout, run(args).stdout
    assert first == again and len(first.split()) > 50


def test_compiled_decode_equals_eager_on_cuda():
    from export import load_model
    from generate import compile_decode, generate_withcache
    model, _ = load_model(BUNDLED)
    model = model.to("cuda").eval()
    prompts = [[1], [1, 403, 29], [1, 77]]
    eager = generate_withcache(model, prompts, 100, temperature=0.0)
    compiled = generate_withcache(model, prompts, 100, temperature=0.0, decode_fn=compile_decode(model))
    assert compiled == eager


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_ddp_two_processes_keep_identical_weights(synthetic_data, tmp_path):
    """torchrun on 2 GPUs (NCCL): the run ends and both ranks hold identical weights (train.py checks them)."""
    _, env = synthetic_data
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    common = [*[a for a in MODEL if not a.startswith("--gradient_accumulation_steps")], "--max_iters=20",
              "--eval_interval=1000", "--dtype=float32", "--compile=False", "--dropout=0.0"]
    import subprocess
    import sys
    two = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           script("train.py"), f"--out_dir={two}", *common, "--gradient_accumulation_steps=2",
                           "--always_save_checkpoint=True"],
                          cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"all 2 ranks hold identical weights", proc.stdout), proc.stdout[-2000:]
