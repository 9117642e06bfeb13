"""
The library of the RLHF chain's stage scripts (rlhf/sft.py, reward_model.py, dpo.py, ppo_rlhf.py, grpo.py,
best_of_n.py, evaluate.py), in sections: opening a stage (its task, policy and tokenizer), batches and log-probs,
sampling, scoring, preference pairs and the losses, best-of-n, the training step. The tasks and their gold judges
are the tasks package; the policy-gradient core (clipped surrogate, KL estimators) is ppo.py; the statistics
stats.py. It has no command line of its own.
"""
import functools
import itertools
import json
import math
import os
import random
import time
from dataclasses import dataclass, replace
from typing import Dict, List

import torch
import torch.nn.functional as F

from checkpoint import load_checkpoint, model_checkpoint, model_from_checkpoint, save_checkpoint
from export import load_model
from generate import compile_decode, generate_withcache
from ppo import forward_by_length, logprobs_from_logits
from tasks.arithmetic import ArithmeticTask
from tasks.common import Example, gold_of
from tasks.instruct import InstructTask
from tasks.story import StoryTask
from tokenizer import find_tokenizer, load_tokenizer
from utils import MetricsLog, atomic_write, fail, pick_device, repeated_ngram_rate, should_compile

TASKS = ("story", "instruct", "arithmetic")


# -----------------------------------------------------------------------------
# opening a stage: one rule for every script

def load_task(name, enc, data_dir=None, seed=0, reference=None, kinds=None):
    """The task `name` over the TinyStories JSON shards in data_dir (default $DATA_CACHE_DIR/TinyStories_all_data).
    story: reference is the frozen model of gold's fluency component (a Reference); instruct: kinds are the
    constraints its prompts may carry (default all); arithmetic: generated problems, no data (tasks/arithmetic.py)."""
    if name == "story":
        return StoryTask(enc, data_dir, seed=seed, reference=reference)
    if name == "instruct":
        return InstructTask(enc, data_dir, seed=seed, **({"kinds": kinds} if kinds else {}))
    if name == "arithmetic":
        return ArithmeticTask(enc, seed=seed)
    raise ValueError(f"unknown task {name!r}: use --task=story, instruct or arithmetic")


def open_tokenizer(tokenizer, policy, vocab_size):
    """--tokenizer, or when it is "" the one found next to the policy or named in its checkpoint's config (as
    sample.py finds it), its size checked against the policy's vocabulary."""
    if not tokenizer:
        config = read_checkpoint(policy).get("config", {}) if policy.endswith(".pt") else {}
        tokenizer = find_tokenizer(vocab_size, near=policy, config=config)
    return load_tokenizer(tokenizer, vocab_size)


def open_stage(task, policy, tokenizer="", data_dir="", device="auto", compile="auto", seed=0, reference="",
               samples=0, batch_size=64, config=None):
    """The device, tokenizer (found next to the policy unless given; its size checked against the policy's
    vocabulary), task, and policy of a stage, with a one-line error and exit 1 on bad input. Returns (device, enc,
    task, policy, decode_fn): decode_fn is the compiled decode step when the stage's sampling (`samples` responses
    in batches of `batch_size`) is long enough for --compile=auto (utils.should_compile), else None. config: the
    stage's settings, which then record the tokenizer found (its checkpoints carry it, for the next stage)."""
    should_compile(compile, "cpu", "decode", 0)  # refuses a bad --compile before loading
    try:
        dev = pick_device(device)
        model = load_policy(policy, dev)
        enc = open_tokenizer(tokenizer, policy, model.params.vocab_size)
        kinds = read_checkpoint(policy).get("kinds") if task == "instruct" and policy.endswith(".pt") else None
        ref = Reference(reference, dev) if task == "story" and reference else None
        the_task = load_task(task, enc, data_dir or None, seed=0, reference=ref, kinds=kinds)
    except (FileNotFoundError, ValueError, KeyError) as e:
        fail(e)
    if config is not None:
        config["tokenizer"] = enc.model_path
    decode_calls = -(-samples // batch_size) * the_task.max_gen_len
    decode_fn = compile_decode(model) if should_compile(compile, dev, "decode", decode_calls) else None
    torch.manual_seed(seed)
    random.seed(seed)
    return dev, enc, the_task, model, decode_fn


# -----------------------------------------------------------------------------
# policies

@functools.lru_cache(maxsize=4)
def _read_checkpoint(path, mtime_ns, size):
    return load_checkpoint(path)


def read_checkpoint(path):
    """load_checkpoint, read once per file and process: a stage builds its policy, its frozen reference and a value
    head from one read. The dict is shared: build models from it, never change it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    st = os.stat(path)
    return _read_checkpoint(os.path.abspath(path), st.st_mtime_ns, st.st_size)


def load_policy(path, device="cpu", value_head=False, dropout=0.0):
    """A checkpoint as a Transformer (any format export.load_model reads), or as a TransformerWithValueHead
    (a .pt; its value head when it has one, else a fresh one), in eval mode on device. Dropout is set to
    `dropout` (stories260K was trained with 0.05; fine-tuning here uses none, as the seed's PPO command does)."""
    if value_head or path.endswith(".pt"):
        ckpt = read_checkpoint(path)
        if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
            raise ValueError(f"{path}: a PyTorch file, but not a checkpoint of this repository (model, model_args)")
        model = model_from_checkpoint(ckpt, value_head)
        if value_head:
            model.layout = ckpt.get("layout", "prompt_first")  # a reward model's input order (rm_sequence)
    else:
        model = load_model(path)[0]
    model.params = replace(model.params, dropout=dropout)
    for m in model.modules():
        if isinstance(getattr(m, "dropout", None), float):
            m.dropout = dropout
    return model.eval().to(device)


def load_frozen(path, device="cpu", value_head=False):
    """load_policy for a model that is never trained: a KL reference, the fluency judge's model, a reward model."""
    return load_policy(path, device, value_head).requires_grad_(False)


class Reference:
    """The frozen pre-trained model of the story task's fluency component and of the guard's reference NLL,
    read at its first use (a stage that never scores fluency never loads it)."""

    def __init__(self, path, device="cpu"):
        self.path, self.device, self._model, self._last = path, device, None, None

    @property
    def model(self):
        if self._model is None:
            self._model = load_frozen(self.path, self.device)
        return self._model

    def nll(self, prompts, responses, batch_size=32):
        """reference_nll under the frozen model. The last call's answer is kept: a stage that scores gold's
        fluency and then reports the guard's reference NLL of the same samples runs the model over them once."""
        key = (tuple(map(tuple, prompts)), tuple(map(tuple, responses)))
        if self._last is None or self._last[0] != key:
            self._last = (key, reference_nll(self.model, prompts, responses, batch_size))
        return list(self._last[1])


def load_reward_model(path, device="cpu"):
    """A reward model written by rlhf/reward_model.py; anything else is refused (ValueError, one line)."""
    if read_checkpoint(path).get("kind") != "reward_model":
        raise ValueError(f"{path} is not a reward model (rlhf/reward_model.py writes rm.pt): pass --reward=gold or "
                         "the path of an rm.pt")
    return load_frozen(path, device, value_head=True)


def open_reward(reward, device="cpu"):
    """--reward: "gold" (the judge itself: None) or the path of a reward model; anything else ends the script with
    a one-line error."""
    if reward == "gold":
        return None
    if not os.path.isfile(reward):
        fail(f"--reward must be gold or the path of a reward model (rlhf/reward_model.py's rm.pt), got {reward!r}")
    try:
        return load_reward_model(reward, pick_device(device))
    except (ValueError, KeyError) as e:
        fail(e)


def save_policy(model, path, **extra):
    """The checkpoint layout of train.py (model, model_args, iter_num, config), written atomically."""
    model.clear_caches()
    save_checkpoint(model_checkpoint(model, **extra), path)


def save_rl_checkpoint(model, out_dir, it, max_iters, save_interval, **extra):
    """An RL run's checkpoints: ckpt_<it>.pt every save_interval iterations (the over-optimisation curve) and
    ckpt.pt after the last; returns the path written, or None."""
    if it == max_iters:
        path = os.path.join(out_dir, "ckpt.pt")
    elif save_interval and it % save_interval == 0:
        path = os.path.join(out_dir, f"ckpt_{it}.pt")
    else:
        return None
    save_policy(model, path, iter_num=it, **extra)
    return path


class RunLog:
    """An RL stage's iterations 1..max_iters: out_dir/metrics.jsonl, a log line with the ETA per iteration, the
    checkpoints (save_rl_checkpoint, with `extra` in each), and where the run is (a RunState: a killed run continues
    from first_iteration())."""

    def __init__(self, out_dir, max_iters, save_interval, state, **extra):
        self.out_dir, self.max_iters, self.save_interval, self.extra = out_dir, max_iters, save_interval, extra
        self.metrics = MetricsLog(os.path.join(out_dir, "metrics.jsonl"))
        self.state, self.first = state, 1
        self.t_start = time.time()

    def first_iteration(self):
        """1, or where an unfinished run in out_dir stopped (its state restored)."""
        self.first = self.state.restore(self.metrics) or 1
        return self.first

    def end_iteration(self, model, it, row, line):
        self.metrics.write(**row)
        eta = (time.time() - self.t_start) / (it + 1 - self.first) * (self.max_iters - it)
        print(f"{line} | eta {eta / 60:.1f} min")
        path = save_rl_checkpoint(model, self.out_dir, it, self.max_iters, self.save_interval, **self.extra)
        if it < self.max_iters:
            self.state.save(it + 1)
        else:
            self.state.finish()
            print(f"saved {path} ({time.time() - self.t_start:.0f} s)")


class RunState:
    """Where a stage's run is, so that a killed run continues instead of starting over: out_dir/state.pt, written
    atomically at the end of an iteration at most every `every` seconds (0: every iteration), with the next
    iteration, the random generators and the state_dict of each part (model, optimizer, prompt stream, trainer).
    The stage run again in that out_dir with the same settings continues from it (restore), bitwise as if never
    stopped, its metrics.jsonl cut back to match; finish() removes it once the stage has written its result."""
    IGNORED = ("device", "compile", "resume_every")  # settings that may change between a run and its continuation

    def __init__(self, out_dir, config, every, **parts):
        self.path, self.config, self.every, self.parts = os.path.join(out_dir, "state.pt"), config, every, parts
        self.saved_at = time.time()

    def restore(self, metrics=None):
        """Load the saved state into the parts; returns the iteration to continue from (None: nothing saved, a run
        from the start, whose metrics replace those of any earlier run in out_dir)."""
        if not os.path.exists(self.path):
            if metrics is not None:
                metrics.cut_back(0)
            return None
        try:
            state = load_checkpoint(self.path)
        except ValueError as e:
            fail(f"{e}; delete {self.path} to start the stage over")
        differ = [k for k, v in self.config.items() if k not in self.IGNORED and state["config"].get(k) != v]
        if differ:
            k = differ[0]
            fail(f"{self.path} is an unfinished run with other settings ({k}={state['config'].get(k)!r} there, "
                 f"{self.config[k]!r} now): run it with those to continue it, or delete {self.path} to start over")
        for name, part in self.parts.items():
            part.load_state_dict(state[name])
        torch.set_rng_state(state["rng"]["torch"])
        version, internal, gauss = state["rng"]["python"]
        random.setstate((version, tuple(internal), gauss))
        if metrics is not None:
            metrics.cut_back(state["iter"])
        print(f"continuing the unfinished run in {os.path.dirname(self.path)} from iteration {state['iter']}")
        return state["iter"]

    def save(self, next_iter, force=False):
        """At the end of an iteration: save if `every` seconds have passed since the last save (or force)."""
        if not force and time.time() - self.saved_at < self.every:
            return
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        save_checkpoint({"iter": next_iter, "config": self.config, "rng": rng,
                         **{name: part.state_dict() for name, part in self.parts.items()}}, self.path)
        self.saved_at = time.time()

    def finish(self):
        if os.path.exists(self.path):
            os.remove(self.path)


def train_step(model, optimizer, loss, grad_clip):
    """One optimizer step on loss: backward, the gradient norm clipped to grad_clip (0: not clipped), step."""
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# -----------------------------------------------------------------------------
# batches and log-probs

def make_batch(prompts, responses, device="cpu"):
    """Right-padded next-token batch of prompt + response rows: inputs (B, T), targets (B, T) with -1 except
    on the response tokens (the loss and the log-probabilities cover only the response, end token included),
    and last (B,): the index of each row's last real token. A causal model's output at a position never
    depends on what follows it, so the padding needs no attention mask."""
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    T = max(len(s) for s in seqs) - 1
    inputs = torch.zeros(len(seqs), T, dtype=torch.long)
    targets = torch.full((len(seqs), T), -1, dtype=torch.long)
    for i, (s, p) in enumerate(zip(seqs, prompts)):
        inputs[i, : len(s) - 1] = torch.tensor(s[:-1])
        targets[i, len(p) - 1: len(s) - 1] = torch.tensor(s[len(p):])
    last = torch.tensor([len(s) - 2 for s in seqs])  # inputs index of the last real token
    return inputs.to(device), targets.to(device), last.to(device)


def response_logprobs(model, inputs, targets, group_size=0):
    """Per-token log-probabilities of the targets (B, T), zero where targets == -1, and their row sums.
    group_size: forward the rows group_size at a time in order of length, each group at its own width (ppo's
    forward_by_length: the same numbers, less padding); 0: all at once."""
    mask = targets != -1
    if group_size:
        lengths = (mask * torch.arange(1, mask.size(1) + 1, device=mask.device)).amax(1).tolist()
        logits = forward_by_length(lambda ids: (model(ids).logits, None), inputs, lengths, group_size)[0]
    else:
        logits = model(inputs).logits
    lp = logprobs_from_logits(logits, targets.clamp(min=0)) * mask
    return lp, lp.sum(1)


def by_length_batches(seqs, batch_size, score):
    """score(indices) -> one number per index, called on batches of seqs' indices taken in order of length (little
    padding in each); the numbers returned in seqs' order."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = [0.0] * len(seqs)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        for j, v in zip(idx, score(idx)):
            out[j] = v
    return out


@torch.no_grad()
def sequence_logprobs(model, prompts, responses, batch_size=32):
    """Summed log-probability of each response (end token included) given its prompt; the pairs are batched in
    order of length (each batch padded to its own longest), the answers returned in the caller's order."""
    device = model.tok_embeddings.weight.device

    def score(idx):
        inputs, targets, _ = make_batch([prompts[j] for j in idx], [responses[j] for j in idx], device)
        return response_logprobs(model, inputs, targets)[1].tolist()
    return by_length_batches([p + r for p, r in zip(prompts, responses)], batch_size, score)


@torch.no_grad()
def reference_nll(model, prompts, responses, batch_size=32):
    """NLL per token (nats) of each response (its end token included) given its prompt; 0 for an empty one."""
    sums = sequence_logprobs(model, prompts, [r if r else [0] for r in responses], batch_size)
    return [-s / max(1, len(r)) if r else 0.0 for s, r in zip(sums, responses)]


def pad_right(seqs, device="cpu"):
    """Right-padded (B, T) tokens of whole sequences and the index of each row's last real token."""
    tokens = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
    return tokens.to(device), torch.tensor([len(s) - 1 for s in seqs], device=device)


# -----------------------------------------------------------------------------
# sampling

@dataclass
class Sample:
    example: Example
    response: List[int]  # the generated tokens, the end token included when the story ended
    story: str  # the story as a person reads it (the task's story_text)
    components: Dict[str, float]  # the gold judge's components

    @property
    def ended(self):
        return self.response[-1:] == [self.example.prompt[0]]  # the end token is BOS

    @property
    def n_tokens(self):
        return len(self.response) - self.ended

    @property
    def gold(self):
        return gold_of(self.components)


def sample_responses(model, examples, enc, max_gen_len, n_per_prompt=1, temperature=1.0, batch_size=64, seed=0,
                     decode_fn=None, progress=None):
    """n_per_prompt responses per example (consecutive) from model at temperature (no top-k / top-p: the policy's
    own distribution, as RL and the KL measure it), each ending with the end token (BOS) when it stopped; seeded."""
    model.eval()
    gen = torch.Generator(device=model.tok_embeddings.weight.device).manual_seed(seed)
    prompts = [e.prompt for e in examples for _ in range(n_per_prompt)]
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i: i + batch_size]
        if decode_fn is not None:  # a full batch: a compiled decode step is compiled for one batch size
            chunk = chunk + [chunk[0]] * (min(batch_size, len(prompts)) - len(chunk))
        out += generate_withcache(model, chunk, max_gen_len, temperature=temperature, eos_id=enc.bos_id,
                                  generator=gen, decode_fn=decode_fn, keep_stop_token=True)[: len(prompts) - i]
        if progress:
            progress.update(min(batch_size, len(prompts) - i))
    model.clear_caches()
    return out


def score_samples(task, examples, responses):
    """Samples of (example, response) judged by the task's gold."""
    components = task.score(examples, responses)
    return [Sample(e, list(r), task.story_text(e, r[:-1] if r[-1:] == [e.prompt[0]] else r), c)
            for e, r, c in zip(examples, responses, components)]


def sample_stories(model, examples, task, n_per_prompt=1, temperature=1.0, batch_size=64, seed=0, decode_fn=None,
                   progress=None):
    """n_per_prompt judged samples per example (consecutive)."""
    responses = sample_responses(model, examples, task.enc, task.max_gen_len, n_per_prompt, temperature, batch_size,
                                 seed, decode_fn, progress)
    return score_samples(task, [e for e in examples for _ in range(n_per_prompt)], responses)


class PromptStream:
    """Training prompts, epoch after epoch (each epoch redraws the prompts); resumable.
    first_epoch: start past the epochs SFT and the reward model's pool drew, so RL sees fresh prompts."""

    def __init__(self, task, first_epoch=20_000):
        self.task, self.epoch, self.cursor = task, first_epoch, 0
        self.examples = self._shuffled()

    def _shuffled(self):
        ex = self.task.train_examples(self.epoch)
        random.Random(self.epoch).shuffle(ex)
        return ex

    def next(self, n):
        out = []
        while len(out) < n:
            if self.cursor == len(self.examples):
                self.epoch, self.cursor = self.epoch + 1, 0
                self.examples = self._shuffled()
            take = self.examples[self.cursor: self.cursor + n - len(out)]
            self.cursor += len(take)
            out += take
        return out

    def state_dict(self):
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state):
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self.examples = self._shuffled()


def sample_record(s, **extra):
    """One line of a samples or pool file: {"prompt", "story", "gold", "components", ...}."""
    return {"prompt": s.example.text, "story": s.story, "gold": s.gold, "components": s.components,
            "n_tokens": s.n_tokens, "ended": s.ended, "prompt_ids": s.example.prompt, "response": s.response,
            "info": s.example.info, **extra}


def write_jsonl(path, rows):
    with atomic_write(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


# -----------------------------------------------------------------------------
# scoring: the reward model and the guard metrics

def rm_sequence(prompt, response, layout="prompt_first"):
    """A reward model's input. prompt_first: BOS + prompt + response, as the policy sees it. story_first:
    BOS + response + the prompt without its BOS (the prompt next to where the score is read)."""
    if layout == "prompt_first":
        return list(prompt) + list(response)
    if layout == "story_first":
        return list(prompt[:1]) + list(response) + list(prompt[1:])
    raise ValueError(f"layout must be prompt_first or story_first, got {layout!r}")


def rm_forward(rm, seqs):
    """The reward model's score of each token sequence: its value at the last real token (with gradients)."""
    tokens, last = pad_right(seqs, rm.tok_embeddings.weight.device)
    return rm(tokens).values[torch.arange(len(seqs), device=tokens.device), last].float()


@torch.no_grad()
def reward_scores(rm, prompts, responses, batch_size=64):
    """The reward model's score of each prompt + response, in the layout it was trained with."""
    layout = getattr(rm, "layout", "prompt_first")
    seqs = [rm_sequence(p, r, layout) for p, r in zip(prompts, responses)]
    return by_length_batches(seqs, batch_size, lambda idx: rm_forward(rm, [seqs[j] for j in idx]).tolist())


def guard_metrics(samples, reference=None, sft=None, policy=None, batch_size=32):
    """Per sample: reference NLL (nats/token of the response and its end token under the frozen pre-trained model,
    given the prompt), the repeated-3-gram rate, and the KL to the SFT model, log pi(y|x) - log pi_sft(y|x) summed
    over the response (an unbiased per-story estimate of KL(pi || pi_sft) for samples drawn from pi).
    reference: a Reference (the story task's own, whose NLL of these samples gold has already computed)."""
    out = [{"rep3": repeated_ngram_rate(s.response[:s.n_tokens])} for s in samples]
    prompts, responses = [s.example.prompt for s in samples], [s.response for s in samples]
    if reference is not None:
        for o, v in zip(out, reference.nll(prompts, responses, batch_size)):
            o["ref_nll"] = v
    if sft is not None and policy is not None:
        lp_pi = sequence_logprobs(policy, prompts, responses, batch_size)
        lp_sft = sequence_logprobs(sft, prompts, responses, batch_size)
        for o, a, b in zip(out, lp_pi, lp_sft):
            o["kl_sft"] = a - b
    return out


# -----------------------------------------------------------------------------
# preference pairs and the losses of the chain

def shuffled_batches(items, batch_size, epochs, seed):
    """(step, batch) over full batches of items, reshuffled every epoch: epochs * (len(items) // batch_size) steps."""
    rng = random.Random(seed)
    step = 0
    for _ in range(epochs):
        order = items[:]
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield step, order[i: i + batch_size]
            step += 1


def preference_pairs(records, min_margin=1e-9):
    """(chosen, rejected) index pairs within each prompt's group, ordered by gold; pairs whose gold differs by
    less than min_margin (ties) dropped."""
    groups = {}
    for i, r in enumerate(records):
        groups.setdefault(r["group"], []).append(i)
    pairs = []
    for idx in groups.values():
        for a, b in itertools.combinations(idx, 2):
            ga, gb = records[a]["gold"], records[b]["gold"]
            if abs(ga - gb) >= min_margin:
                pairs.append((a, b) if ga > gb else (b, a))
    return pairs


def length_only_predictor(records, bin_size=20):
    """The mean gold of the training stories in each length bin: the best a length-only scorer can learn."""
    bins = {}
    for r in records:
        bins.setdefault(r["n_tokens"] // bin_size, []).append(r["gold"])
    means = {b: sum(v) / len(v) for b, v in bins.items()}
    overall = sum(r["gold"] for r in records) / len(records)
    return lambda n: means.get(n // bin_size, overall)


def pairwise_loss(chosen, rejected):
    """The reward model's loss (the seed's section 3): -logsigmoid(r_chosen - r_rejected), per pair."""
    return -F.logsigmoid(chosen - rejected)


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta):
    """The DPO loss per pair, the pairwise loss on the implicit rewards beta * (log pi - log ref), and those
    rewards."""
    chosen_reward = beta * (pi_chosen - ref_chosen)
    rejected_reward = beta * (pi_rejected - ref_rejected)
    return pairwise_loss(chosen_reward, rejected_reward), chosen_reward, rejected_reward


def group_advantages(rewards, group_size, kind="grpo", eps=1e-4):
    """Advantages of rewards (a flat list, consecutive groups of group_size stories of one prompt)."""
    r = torch.as_tensor(rewards, dtype=torch.float32)
    if kind == "reinforce":
        return r - r.mean()
    g = r.view(-1, group_size)
    if kind == "grpo":
        return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)).flatten()
    if kind == "rloo":
        return (g - (g.sum(1, keepdim=True) - g) / (group_size - 1)).flatten()
    if kind == "drgrpo":  # Dr. GRPO: the group's mean subtracted, no division by its std
        return (g - g.mean(1, keepdim=True)).flatten()
    raise ValueError(f"advantage must be grpo, drgrpo, rloo or reinforce, got {kind!r}")


# -----------------------------------------------------------------------------
# best-of-n from one pool

def best_of_n_weights(keys, n):
    """Draw n of the N pool items without replacement and keep the one with the highest key: the probability
    that each item is the one kept. Sorted ascending (ties by position), item of rank i (1-based) is kept with
    probability C(i-1, n-1) / C(N, n): an unbiased estimate of best-of-n from a pool of N >= n samples."""
    N = len(keys)
    if not 1 <= n <= N:
        raise ValueError(f"best-of-{n} needs 1 <= n <= pool size {N}")
    order = sorted(range(N), key=lambda i: (keys[i], i))
    w = [0.0] * N
    total = math.comb(N, n)
    for rank, i in enumerate(order, start=1):
        w[i] = math.comb(rank - 1, n - 1) / total
    return w


def best_of_n_kl_bound(n):
    """KL(best-of-n || base) <= log n - (n - 1) / n (Stiennon et al. 2020; an upper bound, not the KL)."""
    return math.log(n) - (n - 1) / n
