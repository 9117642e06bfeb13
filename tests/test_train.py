"""train.py as a user runs it: starting from other weights (tied or not), the context a resumed or initialised
run trains with, and one-line errors for bad PPO settings and unknown flags."""
import pytest
import torch

from conftest import run, run_in_process, script
from export import export_bin, export_gguf, export_hf
from model import ModelArgs, Transformer

pytestmark = pytest.mark.slow  # each test runs train.py (a few seconds to start)

MODEL = ["--vocab_source=custom", "--vocab_size=300", "--dim=32", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2",
         "--multiple_of=4", "--batch_size=4", "--gradient_accumulation_steps=1", "--device=cpu", "--compile=False",
         "--eval_iters=1", "--warmup_iters=2"]


def one_line_error(proc, *words):
    """The run failed with a single `error:` line naming each of words, and no traceback."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(errors) == 1 and len(errors[0]) < 300, proc.stderr[-2000:]
    assert all(w in errors[0] for w in words), errors[0]


def test_init_from_an_untied_model_keeps_its_own_classifier(synthetic_data, tmp_path):
    """A llama2.c .bin with a negative vocab, a Hugging Face folder with tie_word_embeddings=false and a GGUF with an
    output.weight: the embedding and the classifier both arrive as they were (learning rate 0, so training changes
    nothing)."""
    root, env = synthetic_data
    torch.manual_seed(0)
    source = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=4,
                                   max_seq_len=64, tie_embeddings=False))
    assert not torch.equal(source.output.weight, source.tok_embeddings.weight)
    formats = {"untied.bin": lambda p: export_bin(source, p, 0)}
    try:
        import safetensors  # noqa: F401
        formats["untied_hf"] = lambda p: export_hf(source, p)
    except ImportError:
        pass
    try:
        import gguf  # noqa: F401
        formats["untied.gguf"] = lambda p: export_gguf(source, p, str(root / "data" / "tok300.model"))
    except ImportError:
        pass
    for name, write in formats.items():
        write(str(tmp_path / name))
        out = tmp_path / f"out_{name}"
        run([script("train.py"), f"--out_dir={out}", f"--init_from={tmp_path / name}", *MODEL, "--learning_rate=0",
             "--weight_decay=0", "--max_iters=0", "--eval_interval=1"], env=env)
        ckpt = torch.load(out / "ckpt.pt", weights_only=True)
        assert ckpt["model_args"]["tie_embeddings"] is False
        assert torch.equal(ckpt["model"]["tok_embeddings.weight"], source.tok_embeddings.weight), name
        assert torch.equal(ckpt["model"]["output.weight"], source.output.weight), name


def test_a_resumed_run_keeps_its_context_and_init_from_takes_the_window(synthetic_data, tmp_path):
    _, env = synthetic_data
    out = tmp_path / "out"
    run([script("train.py"), f"--out_dir={out}", *MODEL, "--max_seq_len=32", "--max_iters=3", "--eval_interval=2"],
        env=env)
    # no --max_seq_len (the default is 256): the checkpoint's 32 is the context and the batches' window
    proc = run([script("train.py"), f"--out_dir={out}", *MODEL, "--init_from=resume", "--max_iters=5",
                "--eval_interval=2", "--always_save_checkpoint=True"], env=env)
    assert "32 max seq len" in proc.stdout
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 6 and ckpt["model_args"]["max_seq_len"] == ckpt["config"]["max_seq_len"] == 32
    # another context on resume is refused, naming both values; nothing is written
    before = (out / "ckpt.pt").read_bytes()
    proc = run([script("train.py"), f"--out_dir={out}", *MODEL, "--init_from=resume", "--max_seq_len=16"],
               env=env, check=False)
    one_line_error(proc, "--max_seq_len=16", "max_seq_len=32")
    assert (out / "ckpt.pt").read_bytes() == before
    # --init_from=PATH: a shorter window becomes the new model's context; a longer one than the source's is refused
    short = tmp_path / "short"
    run([script("train.py"), f"--out_dir={short}", f"--init_from={out / 'ckpt.pt'}", *MODEL, "--max_seq_len=16",
         "--max_iters=1", "--eval_interval=1"], env=env)
    assert torch.load(short / "ckpt.pt", weights_only=True)["model_args"]["max_seq_len"] == 16
    proc = run([script("train.py"), f"--out_dir={tmp_path / 'long'}", f"--init_from={out / 'ckpt.pt'}", *MODEL,
                "--max_seq_len=64"], env=env, check=False)
    one_line_error(proc, "--max_seq_len=64", "32")


@pytest.mark.parametrize("flag, names", [
    ("--start_len=0", ["--start_len"]),
    ("--target_len=0", ["--target_len"]),
    ("--rollouts=-1", ["--rollouts"]),
    ("--rollouts=30", ["batch_size=30", "mini_batch_size"]),  # not a multiple of --batch_size=4
    ("--cliprange=0", ["cliprange"]),
    ("--adap_kl_target=-1", ["target"]),
    ("--lam=2", ["lam"]),
    ("--ppo_epochs=0", ["--ppo_epochs"]),
    ("--kl_horizon=0", ["horizon"]),
    ("--kl_coef_min=0.5", ["kl_coef_min <= init_kl_coef <= kl_coef_max"]),
    ("--kl_mode=both", ["kl_mode", "reward or loss"]),
    ("--min_lr=-1e-4", ["--min_lr"]),
    ("--lr_decay_iters=-5", ["--lr_decay_iters"]),
    ("--lr_length_scale=-1", ["--lr_length_scale"]),
    ("--length_band=-1", ["--length_band"]),
    ("--hold_rollouts=-4", ["--hold_rollouts"]),
    ("--hold_rollouts=6", ["--hold_rollouts", "multiple of --batch_size"]),  # --batch_size=4
])
def test_bad_ppo_settings_get_a_one_line_error(tmp_path, flag, names):
    proc = run_in_process([script("train.py"), f"--out_dir={tmp_path}", *MODEL, "--ppo=True", flag])
    one_line_error(proc, *names)
    assert list(tmp_path.iterdir()) == []


def test_the_length_controller_refuses_a_floor_above_the_peak(tmp_path):
    proc = run_in_process([script("train.py"), f"--out_dir={tmp_path}", *MODEL, "--ppo=True", "--lr_length_scale=50",
                           "--learning_rate=1e-4", "--min_lr=2e-4"])
    one_line_error(proc, "--lr_length_scale needs --min_lr <= --learning_rate")
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_flag_suggests_the_closest_known_ones(tmp_path):
    proc = run_in_process([script("train.py"), f"--out_dir={tmp_path}", "--batch_sise=3"])
    one_line_error(proc, "unknown config key --batch_sise", "did you mean --batch_size")
    proc = run_in_process([script("train.py"), f"--out_dir={tmp_path}", "--no_such_flag=1"])
    one_line_error(proc, "unknown config key --no_such_flag")


def test_cosine_lr_by_hand():
    from utils import cosine_lr
    assert cosine_lr(0, 1e-3, 1e-4, 2, 10) == pytest.approx(1e-3 / 3)  # warm-up: (it + 1) / (warmup + 1)
    assert cosine_lr(1, 1e-3, 1e-4, 2, 10) == pytest.approx(2e-3 / 3)
    assert cosine_lr(2, 1e-3, 1e-4, 2, 10) == pytest.approx(1e-3)  # decay starts at the peak
    assert cosine_lr(6, 1e-3, 1e-4, 2, 10) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way: cos(pi/2) = 0
    assert cosine_lr(10, 1e-3, 1e-4, 2, 10) == pytest.approx(1e-4)
    assert cosine_lr(11, 1e-3, 1e-4, 2, 10) == 1e-4  # after the decay: min_lr
    assert cosine_lr(0, 1e-3, 0.0, 0, 4) == 1e-3 and cosine_lr(1, 1e-3, 0.0, 0, 4) == pytest.approx(1e-3 * (2 + 2 ** 0.5) / 4)
