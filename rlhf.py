"""
The models of the RLHF chain on the instruction task (instruct.py): loading and saving policies, batches of
prompt + response, log-probabilities, sampling stories, reward-model scores, the guard metrics, sample pools
and the best-of-n expectation. A library for sft.py, reward_model.py, dpo.py, grpo.py, best_of_n.py,
evaluate.py and train.py --ppo=True --reward=...; it has no command line of its own.
"""
import itertools
import json
import math
import os
import random
from dataclasses import asdict, dataclass, replace
from typing import List

import torch
import torch.nn.functional as F

from export import load_model, load_model_state, model_args_from_checkpoint
from generate import generate_withcache
from instruct import MAX_STORY_TOKENS, Example, constraint_scores, gold, prompt_text
from model import TransformerWithValueHead
from ppo import repeated_ngram_rate
from utils import atomic_write, load_checkpoint, save_checkpoint



def load_policy(path, device="cpu", value_head=False, dropout=0.0):
    """A checkpoint as a Transformer (any format export.load_model reads), or as a TransformerWithValueHead
    (a .pt; its value head when it has one, else a fresh one), in eval mode on device. Dropout is set to
    `dropout` (stories260K was trained with 0.05; fine-tuning here uses none, as the seed's PPO command does,
    and attention dropout leaves the fused attention kernel)."""
    if value_head:
        ckpt = load_checkpoint(path)
        model = TransformerWithValueHead(model_args_from_checkpoint(ckpt))
        load_model_state(model, ckpt["model"])
        model.layout = ckpt.get("layout", "prompt_first")  # a reward model's input order (rm_sequence)
    else:
        model = load_model(path)[0]
    model.params = replace(model.params, dropout=dropout)
    for m in model.modules():
        if isinstance(getattr(m, "dropout", None), float):
            m.dropout = dropout
    return model.eval().to(device)


def save_policy(model, path, **extra):
    """The checkpoint layout of train.py (model, model_args, iter_num, config), written atomically."""
    model.clear_caches()
    save_checkpoint({"model": model.state_dict(), "model_args": asdict(model.params), "iter_num": 0,
                     "best_val_loss": 0.0, "config": {}, **extra}, path)


def make_batch(prompts, responses, device="cpu"):
    """Right-padded next-token batch of prompt + response rows: inputs (B, T), targets (B, T) with -1 except
    on the response tokens (the loss and the log-probabilities cover only the response, end token included),
    and last (B,): the index of each row's last real token."""
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    T = max(len(s) for s in seqs) - 1
    inputs = torch.zeros(len(seqs), T, dtype=torch.long)
    targets = torch.full((len(seqs), T), -1, dtype=torch.long)
    for i, (s, p) in enumerate(zip(seqs, prompts)):
        inputs[i, : len(s) - 1] = torch.tensor(s[:-1])
        targets[i, len(p) - 1: len(s) - 1] = torch.tensor(s[len(p):])
    last = torch.tensor([len(s) - 2 for s in seqs])  # inputs index of the last real token
    return inputs.to(device), targets.to(device), last.to(device)


def response_logprobs(model, inputs, targets):
    """Per-token log-probabilities of the targets (B, T), zero where targets == -1, and their row sums."""
    logits = model(inputs).logits.float()
    mask = targets != -1
    lp = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    return lp, lp.sum(1)


@dataclass
class Sample:
    example: Example
    response: List[int]  # the generated tokens, the end token included when the story ended
    story: str
    n_tokens: int  # story tokens (without the end token)
    ended: bool

    @property
    def gold(self):
        return gold(self.story, self.example.constraints, self.n_tokens)


def sample_stories(model, examples, enc, n_per_prompt=1, temperature=1.0, batch_size=64, seed=0,
                   max_gen_len=MAX_STORY_TOKENS + 1, decode_fn=None, progress=None):
    """n_per_prompt stories per example from model at temperature (no top-k / top-p: the policy's own
    distribution, as RL and the KL measure it); seeded, so a method's samples are reproducible."""
    model.eval()
    gen = torch.Generator(device=model.tok_embeddings.weight.device).manual_seed(seed)
    jobs = [e for e in examples for _ in range(n_per_prompt)]
    out = []
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i: i + batch_size]
        prompts = [e.prompt for e in chunk]
        if decode_fn is not None:  # a full batch: a compiled decode step is compiled for one batch size
            prompts += [prompts[0]] * (min(batch_size, len(jobs)) - len(prompts))
        responses = generate_withcache(model, prompts, max_gen_len, temperature=temperature, eos_id=enc.bos_id,
                                       generator=gen, decode_fn=decode_fn, keep_stop_token=True)
        for e, r in zip(chunk, responses):
            ended = bool(r) and r[-1] == enc.bos_id
            ids = r[:-1] if ended else r
            out.append(Sample(e, r, enc.decode(ids).strip(), len(ids), ended))
        if progress:
            progress.update(len(chunk))
    model.clear_caches()
    return out


class PromptStream:
    """Training prompts, epoch after epoch (each epoch redraws every story's constraints); resumable.
    first_epoch: start past the epochs sft.py trained on, so RL sees prompts SFT never saw."""

    def __init__(self, data, first_epoch=20_000):
        self.data, self.epoch, self.cursor = data, first_epoch, 0
        self.examples = data.train_examples(self.epoch)

    def next(self, n):
        out = []
        while len(out) < n:
            if self.cursor == len(self.examples):
                self.epoch, self.cursor = self.epoch + 1, 0
                self.examples = self.data.train_examples(self.epoch)
            take = self.examples[self.cursor: self.cursor + n - len(out)]
            self.cursor += len(take)
            out += take
        return out

    def state_dict(self):
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state):
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self.examples = self.data.train_examples(self.epoch)


def pad_right(seqs, device="cpu"):
    """Right-padded (B, T) tokens of whole sequences and the index of each row's last real token. A causal
    model's output at a position never depends on what follows, so padding cannot change it."""
    tokens = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
    return tokens.to(device), torch.tensor([len(s) - 1 for s in seqs], device=device)


def rm_sequence(prompt, response, layout="prompt_first"):
    """A reward model's input. prompt_first: BOS + prompt + response, as the policy sees it. story_first:
    BOS + response + the prompt without its BOS, so the constraints sit next to the last token, where the score
    is read, and the scorer looks back into the story instead of ~300 positions back to the prompt."""
    if layout == "prompt_first":
        return list(prompt) + list(response)
    if layout == "story_first":
        return list(prompt[:1]) + list(response) + list(prompt[1:])
    raise ValueError(f"layout must be prompt_first or story_first, got {layout!r}")


@torch.no_grad()
def reward_scores(rm, prompts, responses, batch_size=64):
    """The reward model's score of each prompt + response: its value at the last real token of its input
    (rm_sequence in the layout it was trained with)."""
    device = rm.tok_embeddings.weight.device
    layout = getattr(rm, "layout", "prompt_first")
    out = []
    for i in range(0, len(prompts), batch_size):
        tokens, last = pad_right([rm_sequence(p, r, layout) for p, r in zip(prompts[i:i + batch_size],
                                                                          responses[i:i + batch_size])], device)
        values = rm(tokens).values
        out += values[torch.arange(len(last), device=device), last].float().tolist()
    return out


@torch.no_grad()
def sequence_logprobs(model, prompts, responses, batch_size=32):
    """Summed log-probability of each response (end token included) given its prompt, and its token count."""
    device = model.tok_embeddings.weight.device
    sums = []
    for i in range(0, len(prompts), batch_size):
        inputs, targets, _ = make_batch(prompts[i:i + batch_size], responses[i:i + batch_size], device)
        sums += response_logprobs(model, inputs, targets)[1].tolist()
    return sums


def guard_metrics(samples, enc, reference=None, sft=None, policy=None, batch_size=32):
    """Per sample: reference NLL (nats/token of the story and its end token under the frozen pre-trained model,
    given BOS only: how fluent the story is, whatever the prompt), the repeated-3-gram rate, and the KL to the
    SFT model, log pi(y|x) - log pi_sft(y|x) summed over the response (an unbiased per-story estimate of
    KL(pi || pi_sft) for samples drawn from pi)."""
    out = [{"rep3": repeated_ngram_rate(s.response[:s.n_tokens])} for s in samples]
    if reference is not None:
        lp = sequence_logprobs(reference, [[enc.bos_id]] * len(samples), [s.response for s in samples], batch_size)
        for o, s, v in zip(out, samples, lp):
            o["ref_nll"] = -v / max(1, len(s.response))
    if sft is not None and policy is not None:
        prompts, responses = [s.example.prompt for s in samples], [s.response for s in samples]
        lp_pi = sequence_logprobs(policy, prompts, responses, batch_size)
        lp_sft = sequence_logprobs(sft, prompts, responses, batch_size)
        for o, a, b in zip(out, lp_pi, lp_sft):
            o["kl_sft"] = a - b
    return out


def sample_record(s, **extra):
    """One line of a samples or pool file (sample_from_record reads it back)."""
    return {"prompt": prompt_text(s.example.constraints), "constraints": s.example.constraints, "story": s.story,
            "n_tokens": s.n_tokens, "ended": s.ended, "gold": s.gold,
            "scores": constraint_scores(s.story, s.example.constraints, s.n_tokens),
            "prompt_ids": s.example.prompt, "response": s.response, **extra}


def sample_from_record(r):
    return Sample(Example(r["constraints"], r["prompt_ids"], "", []), r["response"], r["story"], r["n_tokens"],
                  r["ended"])


def write_jsonl(path, rows):
    with atomic_write(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def read_jsonl(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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


def preference_pairs(records):
    """(chosen, rejected) index pairs within each prompt's group, ordered by gold; ties dropped."""
    groups = {}
    for i, r in enumerate(records):
        groups.setdefault(r["group"], []).append(i)
    pairs = []
    for idx in groups.values():
        for a, b in itertools.combinations(idx, 2):
            ga, gb = records[a]["gold"], records[b]["gold"]
            if abs(ga - gb) > 1e-9:
                pairs.append((a, b) if ga > gb else (b, a))
    return pairs


def pair_accuracy(pairs, score):
    """Fraction of pairs the score orders like gold (a tie counts half)."""
    return sum(1.0 if score[c] > score[r] else 0.5 if score[c] == score[r] else 0.0 for c, r in pairs) / max(1, len(pairs))


def length_only_predictor(records, bin_size=20):
    """The mean gold of the training stories in each length bin: the best a length-only scorer can learn."""
    bins = {}
    for r in records:
        bins.setdefault(r["n_tokens"] // bin_size, []).append(r["gold"])
    means = {b: sum(v) / len(v) for b, v in bins.items()}
    overall = sum(r["gold"] for r in records) / len(records)
    return lambda n: means.get(n // bin_size, overall)


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta):
    """The DPO loss per pair and the implicit rewards beta * (log pi - log ref) of both answers."""
    chosen_reward = beta * (pi_chosen - ref_chosen)
    rejected_reward = beta * (pi_rejected - ref_rejected)
    return -F.logsigmoid(chosen_reward - rejected_reward), chosen_reward, rejected_reward


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
    raise ValueError(f"advantage must be grpo, rloo or reinforce, got {kind!r}")


def clipped_token_loss(logprobs, old_logprobs, advantages, mask, cliprange):
    """The PPO-clip surrogate per response token, averaged over all tokens of the batch (token-level)."""
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None]
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - cliprange, 1 + cliprange) * adv)
    return -(surrogate * mask).sum() / mask.sum()
