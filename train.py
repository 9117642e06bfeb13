"""
Pre-train a Llama-style model on TinyStories, or align it with PPO (--ppo=True).

Every setting below is a module-level global; override any of them as --key=value or with a config
file (see configurator.py). Reads top to bottom: settings -> checks -> device -> model -> data ->
optimizer -> (PPO: reference model, trainer, queries) -> helpers -> pretrain_loop() or ppo_loop().

CPU (a laptop; tiny model, a couple of minutes):
    python train.py --vocab_source=custom --vocab_size=512 --dim=64 --n_layers=5 --n_heads=8 \\
        --n_kv_heads=4 --multiple_of=4 --max_seq_len=256 --batch_size=16 --max_iters=500 \\
        --eval_interval=100 --eval_iters=10 --warmup_iters=50 --learning_rate=1e-3
One GPU:        python train.py --compile=True
Many GPUs:      torchrun --standalone --nproc_per_node=4 train.py   (DDP; gloo on CPU, NCCL on CUDA)
PPO (RLHF), from out_dir/ckpt.pt (e.g. stories260K.pt copied there):
    python train.py config/ppo_length_cpu.py     # the length experiment on a CPU in ~11-13 minutes
    python train.py --out_dir=stories260K --init_from=resume --ppo=True --batch_size=50 ... (the seed's; README)
The length experiment's reward, query sampler and diagnostics are tasks/length.py (docs/ppo-length.md); the RLHF
chain's PPO (a learned reward on the story or instruction task) is rlhf/ppo_rlhf.py.
"""
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

import configurator
from checkpoint import load_checkpoint, load_model_state, model_args_from_checkpoint, model_checkpoint, save_checkpoint
from export import FormatError, load_model
from model import ModelArgs, Transformer, TransformerWithValueHead
from tinystories import BatchStream, DataError, Task, file_sha256, read_meta, verify_shards
from tokenizer import find_tokenizer, load_tokenizer
from report import plot_ppo_metrics
from utils import (DTYPES, MetricsLog, cosine_lr, fail, hold_out_dir, pick_device, pick_dtype, set_lr,
                   should_compile)

# -----------------------------------------------------------------------------
# I/O
out_dir = "out"
eval_interval = 2000
log_interval = 1
eval_iters = 100
eval_only = False  # if True, exit right after the first evaluation
always_save_checkpoint = False  # if True, save at every evaluation, not only on improvement
init_from = "scratch"  # 'scratch', 'resume' (out_dir/ckpt.pt; with --ppo, out_dir/ppo_ckpt.pt if any), or the
# path of weights to start from: a .pt, a llama2.c .bin or a Hugging Face folder (iteration 0, fresh optimizer)
# data
batch_size = 128  # micro-batch size; with --ppo, mini-batch size (the reference: 8x rollouts per iteration)
max_seq_len = 256  # the context, and the training window; a resumed run keeps its checkpoint's
vocab_source = "llama2"  # llama2|custom: Meta's 32K vocab, or one trained by tinystories.py train_vocab
vocab_size = 32000
tokenizer = ""  # the tokenizer .model; default: tok{vocab_size}.model beside the checkpoint, then in data/
# model
dim = 288
n_layers = 6
n_heads = 6
n_kv_heads = 6
multiple_of = 32
dropout = 0.0
# adamw optimizer
gradient_accumulation_steps = 4  # to simulate larger batches
learning_rate = 5e-4  # max learning rate
max_iters = 100000  # total number of training iterations
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip gradients at this norm, or disable if == 0.0
# learning rate decay
decay_lr = True  # cosine decay after a linear warm-up, to min_lr at max_iters (a PPO run: over its own iterations)
warmup_iters = 1000
lr_decay_iters = 0  # where the cosine reaches min_lr (0: max_iters), as max_iters an absolute iteration number
min_lr = 0.0
# system
device = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps
dtype = "auto"  # auto (bfloat16 on CUDA if supported, else float32), float32, bfloat16, float16
compile = "auto"  # torch.compile the training step (and PPO's decode step): auto = on CUDA, and on a CPU when the run
# is long enough to repay compiling (utils.should_compile)
seed = 1337
# PPO (RLHF): reward = -|target_len - story length| / 100 (tasks/length.py), trained by ppo.py
ppo = False
start_len = 30  # queries are BOS + the first 0..start_len-1 tokens of a story
max_gen_len = 300  # new tokens per rollout at most
target_len = 200  # the story length (query + response tokens) the reward asks for
rollouts = 0  # rollouts per PPO iteration; 0 = 8 * batch_size, as the reference
ppo_epochs = 4
forward_batch_size = 32  # rollouts per forward in a PPO step, taken in order of length (ppo.PPOConfig)
init_kl_coef = 0.2  # beta of the per-token KL penalty against the frozen reference model
adap_kl_ctrl = True  # adapt beta towards adap_kl_target (Ziegler et al. 2019)
adap_kl_target = 6.0  # the KL to the reference (nats per story) the adaptive beta aims at (TRL: target)
adap_kl_rule = "trl"  # trl: beta x (1 +- 20%) per horizon; dual: beta +- init_kl_coef per horizon, down to 0 (ppo.py)
kl_horizon = 10000  # rollouts over which the adaptive beta may change by 20% (TRL: horizon)
kl_coef_min = 0.0  # bounds on the adaptive beta (ppo.PPOConfig): it never leaves [kl_coef_min, kl_coef_max]
kl_coef_max = 0.0  # 0: no upper bound
kl_penalty = "kl"  # the per-token KL in the reward: kl (log p - log q of the sampled token), abs, mse, full (exact)
kl_mode = "reward"  # reward: -beta * KL in every token's reward (TRL); loss: beta * per-token KL in the loss (GRPO)
length_band = 10.0  # the band around target_len that --hold_rollouts and --lr_length_scale act on
# > 0: rollouts per iteration once their mean length has first come within target_len +- length_band (0: rollouts):
# few per iteration to approach the target (how far it moves is set per iteration), more to hold it (less noise)
hold_rollouts = 0
# > 0: each iteration's learning rate follows its rollouts' length error instead of the schedule: min_lr inside
# target_len +- length_band, up to learning_rate at length_band + lr_length_scale tokens off (tasks.length.length_error_lr)
lr_length_scale = 0.0
kl_on_stop = True  # False (with kl_mode=loss): the KL leaves the decision to stop to the reward (ppo.PPOConfig)
early_stop_kl = 1.0  # stop an iteration's PPO epochs once the policy KL exceeds 1.5x this (TRL: target_kl)
vf_coef = 0.1
value_baseline = True  # False: no critic, each story's return whitened over the batch is every token's advantage
pg_on_content = True  # False: the policy gradient trains only the decision to stop (ppo.PPOConfig)
resume_every = 60  # PPO: seconds between saves of where the run is (ppo_last.pt; 0: every iteration)
cliprange = 0.2
cliprange_value = 0.2
gamma = 1.0
lam = 0.95
ptx_coef = 0.0  # PPO-ptx: + ptx_coef x the language-model loss of a pre-training batch in every PPO minibatch
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
overridden = configurator.apply_or_exit(globals(), sys.argv[1:], config_keys)  # the keys the command line set
config = {k: globals()[k] for k in config_keys}  # saved in checkpoints, useful for logging
# -----------------------------------------------------------------------------

# check what the model constructor cannot see
if vocab_source not in ("llama2", "custom"):
    fail(f"--vocab_source must be llama2 or custom, got {vocab_source!r}")
if vocab_source == "llama2" and vocab_size != 32000:
    fail(f"the Llama 2 vocabulary has 32000 tokens, got --vocab_size={vocab_size} (use --vocab_source=custom)")
if init_from not in ("scratch", "resume") and not os.path.exists(init_from):
    fail(f"--init_from must be scratch, resume or an existing checkpoint path, got {init_from!r}")
for _k in ("batch_size", "max_seq_len", "gradient_accumulation_steps", "eval_iters", "eval_interval",
           "log_interval", "max_gen_len", "ppo_epochs", "start_len", "target_len"):
    if globals()[_k] < 1:
        fail(f"--{_k} must be >= 1, got {globals()[_k]}")
if rollouts < 0:
    fail(f"--rollouts must be >= 0 (0: 8 x batch_size), got {rollouts}")
if lr_length_scale < 0 or length_band < 0:
    fail(f"--lr_length_scale and --length_band must be >= 0, got {lr_length_scale} and {length_band}")
if lr_length_scale > 0 and not min_lr <= learning_rate:
    fail(f"--lr_length_scale needs --min_lr <= --learning_rate, got {min_lr} and {learning_rate}")
if min_lr < 0 or lr_decay_iters < 0:
    fail(f"--min_lr and --lr_decay_iters must be >= 0, got --min_lr={min_lr} --lr_decay_iters={lr_decay_iters}")
should_compile(compile, "cpu", "train", 0)  # refuses a bad --compile before anything is loaded
lr_decay_iters = lr_decay_iters or max_iters  # ~= max_iters per Chinchilla

# DDP: one process per device under torchrun
ddp = int(os.environ.get("RANK", -1)) != -1
try:
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
except ValueError as e:
    fail(e)
if ddp:
    init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    ddp_rank, ddp_local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    ddp_world_size = int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{ddp_local_rank}"
        torch.cuda.set_device(device)
    master_process = ddp_rank == 0  # logs and checkpoints
    seed_offset = ddp_rank  # each process draws different data
    if gradient_accumulation_steps % ddp_world_size:
        fail(f"--gradient_accumulation_steps={gradient_accumulation_steps} must be divisible by the "
             f"{ddp_world_size} processes")
    gradient_accumulation_steps //= ddp_world_size
else:
    master_process, seed_offset, ddp_world_size = True, 0, 1

if ppo:  # every PPO setting is checked here, before anything is loaded
    from ppo import PPOConfig, PPOTrainer, ppo_iteration
    from tasks.length import LengthReward, LengthSampler, length_error_lr, stop_diagnostics, story_queries
    try:
        ppoconf = PPOConfig(
            seed=seed + seed_offset, adap_kl_ctrl=adap_kl_ctrl, adap_kl_rule=adap_kl_rule, init_kl_coef=init_kl_coef,
            kl_coef_min=kl_coef_min, kl_coef_max=kl_coef_max or None, target=adap_kl_target, horizon=kl_horizon,
            kl_penalty=kl_penalty, kl_mode=kl_mode, kl_on_stop=kl_on_stop, gamma=gamma, lam=lam,
            cliprange=cliprange, cliprange_value=cliprange_value, vf_coef=vf_coef, value_baseline=value_baseline,
            pg_on_content=pg_on_content,
            batch_size=rollouts or 8 * batch_size,
            mini_batch_size=batch_size, forward_batch_size=forward_batch_size,
            gradient_accumulation_steps=gradient_accumulation_steps, ppo_epochs=ppo_epochs,
            max_grad_norm=grad_clip or None, early_stopping=True, target_kl=early_stop_kl, ptx_coef=ptx_coef)
    except ValueError as e:
        fail(f"invalid PPO setting: {e}")
    # the rollouts of one optimizer step on this process (under DDP the accumulation steps are split over the ranks)
    if hold_rollouts < 0 or hold_rollouts % ppoconf.backward_batch_size:
        fail(f"--hold_rollouts must be 0 or a multiple of --batch_size x the gradient accumulation steps per process "
             f"= {ppoconf.backward_batch_size}, got {hold_rollouts}")

if master_process:
    hold_out_dir(out_dir)  # one run per folder
torch.manual_seed(seed + seed_offset)
random.seed(seed + seed_offset)  # nothing draws from it today; a checkpoint's copy of it is then reproducible too
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
device_type = "cuda" if "cuda" in device else "cpu"  # for torch.autocast
ptdtype = DTYPES[dtype]
ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=device_type, dtype=ptdtype)

# -----------------------------------------------------------------------------
# model: from scratch, resumed from a checkpoint (a PPO run resumes its own ppo_ckpt.pt when present), or
# initialised from other weights. A resumed or initialised model brings its architecture; dropout stays ours.
iter_num = 0
best_val_loss = 1e9
best_reward = -1e9
checkpoint = None
resume_path = None
pretrained = None
model_args = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab_size,
                  multiple_of=multiple_of, max_seq_len=max_seq_len, dropout=dropout)
ckpt_path = os.path.join(out_dir, "ckpt.pt")
ppo_ckpt_path = os.path.join(out_dir, "ppo_ckpt.pt")  # the PPO policy with the best mean reward
ppo_last_path = os.path.join(out_dir, "ppo_last.pt")  # where a PPO run is (saved as it goes; never the best's file)
if init_from == "resume":
    ppo_saved = [p for p in (ppo_ckpt_path, ppo_last_path) if ppo and os.path.exists(p)]
    resume_path = max(ppo_saved, key=os.path.getmtime) if ppo_saved else ckpt_path  # the newer one
    if not os.path.exists(resume_path):
        fail(f"--init_from=resume but {resume_path} does not exist: train from scratch first or copy a checkpoint there")
    print(f"Resuming training from {resume_path}")
    try:
        checkpoint = load_checkpoint(resume_path, map_location=device)
        source_args = model_args_from_checkpoint(checkpoint)
    except (ValueError, KeyError, TypeError) as e:
        fail(f"{resume_path}: {e}")
    # a resumed run continues with its own context: its batches, tokens per iteration and data position
    if "max_seq_len" in overridden and max_seq_len != source_args.max_seq_len:
        fail(f"--max_seq_len={max_seq_len} but {resume_path} was trained with max_seq_len={source_args.max_seq_len}: "
             f"drop --max_seq_len or pass {source_args.max_seq_len} (to change the context, use --init_from={resume_path})")
    model_args = {**asdict(source_args), "dropout": dropout}
    vocab_source = checkpoint.get("config", {}).get("vocab_source", vocab_source)
elif init_from != "scratch":
    try:
        pretrained, _ = load_model(init_from)
    except (FormatError, ValueError, FileNotFoundError) as e:
        fail(e)
    print(f"Initializing from the weights of {init_from}")
    source_ctx = pretrained.params.max_seq_len
    if "max_seq_len" in overridden and max_seq_len > source_ctx:
        fail(f"--max_seq_len={max_seq_len} exceeds the {source_ctx}-position context of {init_from}: "
             f"pass --max_seq_len={source_ctx} or less")
    # RoPE has no learned positions: the model takes the training window as its context
    model_args = {**asdict(pretrained.params), "dropout": dropout,
                  "max_seq_len": max_seq_len if "max_seq_len" in overridden else source_ctx}
try:
    gptconf = ModelArgs(**model_args)
except ValueError as e:
    fail(f"invalid model shape: {e}")
if max_seq_len != gptconf.max_seq_len:
    print(f"max_seq_len = {gptconf.max_seq_len}, the context of {resume_path or init_from}")
max_seq_len = config["max_seq_len"] = gptconf.max_seq_len  # the training window is the model's context
vocab_size = config["vocab_size"] = gptconf.vocab_size
model = (TransformerWithValueHead if ppo else Transformer)(gptconf)
try:
    if pretrained is not None:
        load_model_state(model, pretrained.state_dict())
        pretrained = None
    if checkpoint is not None:
        load_model_state(model, checkpoint["model"])
except (ValueError, KeyError) as e:
    fail(f"{resume_path or init_from}: {e}")
resumed_ppo = resume_path in (ppo_ckpt_path, ppo_last_path)
if checkpoint is not None:
    if not ppo or resumed_ppo:  # a PPO run started from a pre-training checkpoint starts its own count
        best_val_loss = float(checkpoint.get("best_val_loss", best_val_loss))
        best_reward = float(checkpoint.get("best_reward", best_reward))
    iter_num = checkpoint["iter_num"]
model.to(device)

tokens_per_iter = gradient_accumulation_steps * ddp_world_size * batch_size * max_seq_len
if master_process and not ppo:
    print(f"tokens per iteration will be: {tokens_per_iter:,}")
    print(f"breaks down as: {gradient_accumulation_steps} grad accum steps * {ddp_world_size} processes * "
          f"{batch_size} batch size * {max_seq_len} max seq len")

# the tokenizer: PPO needs it (queries, the end token); pre-training only checks it matches the data
data_vocab = 0 if vocab_source == "llama2" else vocab_size  # how tinystories.py names the data folders
meta = read_meta(data_vocab)
weights_path = resume_path or (None if init_from == "scratch" else init_from)  # where the weights came from
try:  # the seed's PPO command names no tokenizer: the one next to its checkpoint (stories260K/tok512.model) is it
    tokenizer_model = tokenizer or find_tokenizer(vocab_size, near=weights_path, config={"vocab_source": vocab_source})
except FileNotFoundError as e:
    if ppo:
        fail(e)
    tokenizer_model = None
config["tokenizer"] = tokenizer_model or ""  # saved with the checkpoints, where sample.py looks first
enc = None
if tokenizer_model is not None:
    try:
        enc = load_tokenizer(tokenizer_model, vocab_size)
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    if meta is not None and meta["tokenizer_sha256"] != file_sha256(tokenizer_model):
        fail(f"the pretokenized data was made with {meta['tokenizer']}, not with {tokenizer_model}: re-run "
             f"`python tinystories.py pretokenize --vocab_size={vocab_size} --tokenizer={tokenizer_model}`")
if meta is not None and meta["vocab_size"] != vocab_size:
    fail(f"the pretokenized data has a {meta['vocab_size']}-token vocabulary but the model has {vocab_size}")

# the data: an exact resume continues the stream and the random number generators where the checkpoint left them
batch_args = dict(batch_size=batch_size, max_seq_len=max_seq_len, vocab_size=vocab_size, vocab_source=vocab_source,
                  device=device, num_workers=0)
resume_state = checkpoint.get("resume") if checkpoint is not None and (not ppo or resumed_ppo) else None
data_position = 0
if resume_state:  # (checkpoints before BatchStream recorded the position as train_batches)
    data_position = resume_state["data"]["position"] if "data" in resume_state else resume_state["train_batches"]
try:
    verify_shards(data_vocab)  # a shard cut short or overwritten is named here, before any training
    train_stream = BatchStream(start=data_position, split="train", seed=seed, **batch_args)
except DataError as e:
    fail(e)

# GradScaler: a no-op unless float16
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
if checkpoint is not None and "optimizer" in checkpoint and (not ppo or resumed_ppo):
    optimizer.load_state_dict(checkpoint["optimizer"])
ppo_state = checkpoint.get("ppo_state") if checkpoint is not None and resumed_ppo else None
checkpoint = None  # free up memory

raw_model = model  # the plain module: checkpoints, generation, MFU
# --compile=auto weighs the run's length: its training forward + backward passes, and PPO rollouts' decode calls
remaining_iters = 0 if eval_only else max(0, max_iters - iter_num + 1)
passes_per_iter = ppo_epochs * -(-ppoconf.batch_size // batch_size) if ppo else gradient_accumulation_steps
use_compile = should_compile(compile, device, "train", remaining_iters * passes_per_iter)
if use_compile:
    print("compiling the model... (takes a ~minute)")
    model = torch.compile(model)
if ddp:
    # buffers (RoPE tables, the generation KV cache) are deterministic or private: never broadcast them
    model = DDP(model, device_ids=[ddp_local_rank] if device_type == "cuda" else None, broadcast_buffers=False)

# -----------------------------------------------------------------------------
# PPO: a frozen reference model, the trainer, the query sampler and the reward
if ppo:
    from generate import compile_decode
    if not os.path.exists(ckpt_path):
        fail(f"--ppo=True needs the pre-trained model at {ckpt_path} as the KL reference")
    # the reference is the pre-trained model (no value head, no cache, eval mode), even on PPO resume
    ref_model = Transformer(gptconf)
    try:
        load_model_state(ref_model, load_checkpoint(ckpt_path, map_location=device)["model"])
    except (ValueError, KeyError) as e:
        fail(f"{ckpt_path}: {e}")
    ref_model.to(device).eval().requires_grad_(False)
    ptx_loss_fn = None
    if ptx_coef > 0:
        def ptx_loss_fn():  # the plain module: under DDP its gradients join the PPO loss's in one backward
            X, Y = train_stream.next()
            return raw_model(X, Y).loss
    ppoconf.stop_token_id = enc.bos_id  # a story ends where the next begins
    ppo_trainer = PPOTrainer(ppoconf, model, ref_model, optimizer, scaler, ddp, autocast_dtype=ptdtype,
                             ptx_loss_fn=ptx_loss_fn)
    query_length = LengthSampler(0, start_len, seed=seed + seed_offset)
    ppo_start_iter = iter_num  # the learning-rate schedule of a PPO run counts its own iterations
    if ppo_state is not None:
        ppo_trainer.kl_ctl.value = ppo_state["kl_coef"]
        if "trainer" in ppo_state:  # the minibatch order too (checkpoints before it had only the KL coefficient)
            ppo_trainer.load_state_dict(ppo_state["trainer"])
        query_length.load_state_dict(ppo_state["query_length"])
        ppo_start_iter = ppo_state.get("start_iter", ppo_start_iter)
    reward_fn = LengthReward(target_len)
    # the rollouts: up to max_gen_len decode calls per iteration (all queries in one batch)
    decode_fn = compile_decode(raw_model) if should_compile(compile, device, "decode", remaining_iters * max_gen_len) \
        else None

# -----------------------------------------------------------------------------
# helpers (they read the setup above; the loops below own the state that changes)


@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters batches of each split (train mode restored afterwards)."""
    out = {}
    model.eval()
    for split in ("train", "val"):
        batch_iter = Task.iter_batches(split=split, seed=seed, **batch_args)
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            X, Y = next(batch_iter)
            with ctx:
                loss = raw_model(X, Y).loss
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def get_lr(it):
    """Linear warm-up, then cosine decay to min_lr at lr_decay_iters (or learning_rate throughout). A PPO run
    counts from its first iteration (a pre-trained checkpoint brings its own iteration count)."""
    if not decay_lr:
        return learning_rate
    origin = ppo_start_iter if ppo else 0
    return cosine_lr(it - origin, learning_rate, min_lr, warmup_iters, lr_decay_iters - origin)


def save(path, iter_num, best_val_loss, **extra):
    """A checkpoint in llama2.c's layout, plus what an exact resume needs: the RNG states and the position in
    the data stream."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device_type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state_all()
    save_checkpoint(model_checkpoint(raw_model, iter_num, best_val_loss, config, optimizer=optimizer.state_dict(),
                                     resume={"data": train_stream.state_dict(), "rng": rng}, **extra), path)
    print(f"saved checkpoint {path}")


def restore_rng(state):
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and device_type == "cuda":
        torch.cuda.set_rng_state_all(state["cuda"])


class GracefulStop:
    """SIGINT / SIGTERM: finish the current step, save a resumable checkpoint, exit 0. A second one quits now."""

    def __init__(self):
        self.signal = None
        signal.signal(signal.SIGINT, self.request)
        signal.signal(signal.SIGTERM, self.request)

    def request(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        print(f"\n{self.signal} received: finishing this step, then saving a checkpoint (again to quit now)", flush=True)

    def requested(self):
        """True on every rank as soon as any rank was signalled, so that all stop at the same iteration."""
        if not ddp:
            return self.signal is not None
        flag = torch.tensor([self.signal is not None], dtype=torch.float32, device=device)
        torch.distributed.all_reduce(flag)
        return flag.item() > 0

    def report(self, iter_num):
        print(f"stopped by {self.signal or 'another rank'} after iteration {iter_num - 1}; continue with the same "
              f"command and --init_from=resume")



def sample_queries(n):
    """n queries: BOS + the first query_length() tokens of stories from the training batches."""
    return story_queries(train_stream.next, n, query_length, enc.bos_id)


# -----------------------------------------------------------------------------
# the pre-training loop


def pretrain_loop(iter_num, best_val_loss):
    """Train iterations iter_num..max_iters (inclusive, as llama2.c), evaluating every eval_interval and
    keeping the checkpoint with the best validation loss."""
    start_iter, running_mfu = iter_num, -1.0
    t0 = t_start = time.time()
    while True:
        lr = set_lr(optimizer, get_lr(iter_num))

        # evaluate, checkpoint
        if (iter_num % eval_interval == 0 or iter_num > max_iters) and master_process:
            losses = estimate_loss()
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            metrics.write(iter=iter_num, train_loss=losses["train"], val_loss=losses["val"])
            if (losses["val"] < best_val_loss or always_save_checkpoint) and iter_num > 0:
                best_val_loss = min(best_val_loss, losses["val"])
                save(ckpt_path, iter_num, best_val_loss)
        if eval_only or iter_num > max_iters:
            break

        # forward, backward, update, with gradient accumulation; DDP syncs on the last micro-step only
        for micro_step in range(gradient_accumulation_steps):
            if ddp:
                model.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
            X, Y = train_stream.next()
            with ctx:
                loss = model(X, Y).loss / gradient_accumulation_steps
            scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip != 0.0 else float("inf"))
        if not scaler.is_enabled() and not torch.isfinite(grad_norm):  # (fp16's scaler skips such steps itself)
            fail(f"non-finite loss or gradient at iteration {iter_num} (loss {loss.item() * gradient_accumulation_steps}, "
                 f"grad norm {grad_norm.item()}); nothing was saved after it: the last good checkpoint is {ckpt_path}. "
                 f"Try a lower --learning_rate or --dtype=float32")
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        # timing and logging
        t1 = time.time()
        dt, t0 = t1 - t0, t1
        if iter_num % log_interval == 0 and master_process:
            eta = (t1 - t_start) / (iter_num + 1 - start_iter) * (max_iters - iter_num)  # through max_iters
            lossf = loss.item() * gradient_accumulation_steps  # a host sync, only when logging
            if iter_num - start_iter >= 5 and device_type == "cuda":
                mfu = raw_model.estimate_mfu(batch_size * gradient_accumulation_steps, dt)
                running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
            tok_s = tokens_per_iter / dt
            print(f"{iter_num} | loss {lossf:.4f} | lr {lr:e} | {dt * 1000:.2f}ms | {tok_s:,.0f} tok/s"
                  + (f" | mfu {running_mfu * 100:.2f}%" if running_mfu > 0 else "") + f" | eta {eta / 60:.1f} min")
            metrics.write(iter=iter_num, loss=lossf, lr=lr, dt_ms=dt * 1000, tok_per_s=tok_s)
        iter_num += 1

        if stop.requested():
            if master_process:
                save(ckpt_path, iter_num, best_val_loss)
                stop.report(iter_num)
            break


# -----------------------------------------------------------------------------
# the PPO loop


def ppo_loop(iter_num, best_reward):
    """PPO iterations iter_num..max_iters: queries from the training stories, then ppo_iteration (rollouts,
    rewards, one PPO step). Keeps the policy with the best mean reward per evaluation interval (ppo_ckpt.pt), and
    where the run is every resume_every seconds (ppo_last.pt): a killed run resumes from there, bitwise."""
    start_iter = iter_num
    rewards_since_eval = list(ppo_state.get("rewards_since_eval", [])) if ppo_state else []
    # the lines in metrics.jsonl before this PPO run (the pre-training's): a resume never cuts them
    metrics_start = ppo_state.get("metrics_start", 0) if ppo_state else metrics.lines() if metrics else 0
    t0 = t_start = saved_at = time.time()

    def ppo_extra():
        state = {"kl_coef": ppo_trainer.kl_ctl.value, "trainer": ppo_trainer.state_dict(),
                 "query_length": query_length.state_dict(), "start_iter": ppo_start_iter, "in_band": in_band,
                 "rewards_since_eval": rewards_since_eval, "metrics_start": metrics_start}
        return {"best_reward": best_reward, "ppo_state": state}

    def on_length(length_mean):  # the rollouts' mean length, before their step
        nonlocal lr, in_band
        length_mean = ppo_trainer._all_reduce_mean(length_mean)  # every rank decides the same
        in_band = in_band or abs(length_mean - target_len) <= length_band  # --hold_rollouts from the next iteration
        if lr_length_scale > 0:  # the length error sets this step's rate
            lr = set_lr(optimizer, length_error_lr(length_mean, target_len, learning_rate, min_lr, length_band,
                                                   lr_length_scale))

    in_band = bool(ppo_state and ppo_state.get("in_band"))

    while True:
        lr = set_lr(optimizer, get_lr(iter_num))

        # evaluate (the language-model loss, to watch forgetting), keep the best-reward policy
        # (not at the PPO run's first iteration: that is the pre-trained model, already evaluated)
        if (iter_num % eval_interval == 0 or iter_num > max_iters) and master_process and \
                (iter_num > ppo_start_iter or eval_only):
            losses = estimate_loss()
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            metrics.write(iter=iter_num, train_loss=losses["train"], val_loss=losses["val"])
            if rewards_since_eval:
                reward = sum(rewards_since_eval) / len(rewards_since_eval)
                rewards_since_eval = []
                if reward > best_reward or always_save_checkpoint:
                    best_reward = max(best_reward, reward)
                    save(ppo_ckpt_path, iter_num, best_val_loss, **ppo_extra())
        if eval_only or iter_num > max_iters:
            if master_process and not eval_only:  # the end of the run: --init_from=resume --max_iters=more goes on
                save(ppo_last_path, iter_num, best_val_loss, **ppo_extra())
            break

        if hold_rollouts and in_band:
            ppoconf.batch_size = hold_rollouts
        stats = ppo_iteration(ppo_trainer, raw_model, sample_queries(ppoconf.batch_size), reward_fn, max_gen_len,
                              stop_id=enc.bos_id, decode_fn=decode_fn,
                              on_length=on_length)
        # what acts on the decision to stop near the target, from the batch the step saw
        stats.update(stop_diagnostics(ppo_trainer.last_batch, target_len, ppoconf.kl_on_stop, ppoconf.kl_mode))
        del ppo_trainer.last_batch
        if not math.isfinite(stats["ppo/loss/total"]):
            fail(f"non-finite PPO loss at iteration {iter_num}; nothing was saved after it: the last good checkpoint "
                 f"is {ppo_ckpt_path if os.path.exists(ppo_ckpt_path) else ckpt_path}. Try a lower --learning_rate")
        rewards_since_eval.append(stats["reward_mean"])

        t1 = time.time()
        dt, t0 = t1 - t0, t1
        if iter_num % log_interval == 0 and master_process:
            eta = (t1 - t_start) / (iter_num + 1 - start_iter) * (max_iters - iter_num)  # through max_iters
            print(f"{iter_num} | reward {stats['reward_mean']:.4f} | length {stats['length_mean']:.1f} | kl_ref "
                  f"{stats['ppo/kl_ref']:.3f} | entropy {stats['ppo/policy/entropy']:.3f} | kl_coef "
                  f"{stats['objective/kl_coef']:.4f} | ref_nll {stats['rollout/ref_nll']:.3f} | rep3 "
                  f"{stats['rep3_rate']:.3f} | ended {stats['ended_frac']:.2f} | "
                  + f"{dt:.1f}s "
                  f"(rollout {stats['rollout_s']:.1f}s, "
                  f"{stats['rollout_tok_per_s']:,.0f} tok/s) | eta {eta / 60:.1f} min")
            metrics.write(iter=iter_num, kl_ref=stats["ppo/kl_ref"], kl_coef=stats["objective/kl_coef"],
                          entropy=stats["ppo/policy/entropy"], time_s=dt, lr=lr,
                          **{k: v for k, v in stats.items() if isinstance(v, (int, float))})
        iter_num += 1

        if stop.requested():
            if master_process:
                save(ppo_last_path, iter_num, best_val_loss, **ppo_extra())
                stop.report(iter_num)
            break
        if master_process and iter_num <= max_iters and time.time() - saved_at >= resume_every:
            save(ppo_last_path, iter_num, best_val_loss, **ppo_extra())
            saved_at = time.time()

    if master_process and plot_ppo_metrics(metrics.path, os.path.join(out_dir, "ppo_curve.png"), target_len):
        print(f"plotted the PPO curves to {os.path.join(out_dir, 'ppo_curve.png')}")


# -----------------------------------------------------------------------------
metrics = MetricsLog(os.path.join(out_dir, "metrics.jsonl")) if master_process else None
if metrics is not None and resume_state:  # the lines of iterations after the checkpoint are from a run cut short
    metrics.cut_back(iter_num, keep_first=ppo_state.get("metrics_start", 0) if ppo_state else 0)
stop = GracefulStop()
if resume_state:
    restore_rng(resume_state["rng"])
model.train()
if iter_num > max_iters and not eval_only:  # iterations count on from the checkpoint's (the seed's PPO: 98000)
    fail(f"--max_iters={max_iters} is not beyond the checkpoint's iteration {iter_num}: nothing to train; pass "
         f"--max_iters={iter_num + max_iters} to train {max_iters} more")
if ppo:
    ppo_loop(iter_num, best_reward)
else:
    pretrain_loop(iter_num, best_val_loss)

if ddp:
    # DDP keeps replicas identical by construction; check it, since a silent divergence wastes a run
    flat = torch.cat([p.detach().double().flatten() for p in raw_model.parameters()])
    fingerprint = torch.stack([flat.sum(), (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64,
                                                                   device=flat.device)).sum()])
    gathered = [torch.zeros_like(fingerprint) for _ in range(ddp_world_size)]
    torch.distributed.all_gather(gathered, fingerprint)
    if not all(torch.equal(g, gathered[0]) for g in gathered):
        fail("the DDP ranks ended with different weights")
    if master_process:
        print(f"all {ddp_world_size} ranks hold identical weights", flush=True)
    torch.distributed.barrier()  # tear down together: a rank leaving early can abort gloo's threads in another
    destroy_process_group()
