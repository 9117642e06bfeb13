"""
PPO for language models, after Hugging Face TRL's legacy PPOTrainer (<= 0.11): same names, same maths,
so numbers can be compared with it, with its known bugs fixed:
  - the adaptive KL controller is updated every step with the measured KL;
  - old log-probs/values and the training forwards run in the same mode, precision and padding, so with
    dropout 0 the first minibatch has ratio exactly 1 and both clip fractions 0;
  - under DDP the gradient-sync flag is set before the forward of the last micro-batch;
  - masked_var and empty responses do not crash; early stopping looks at the epoch's mean policy KL;
  - scaler=None works.

The RL view (docs/ppo-length.md): the state is query + response so far, the action the next token, the
reward -kl_coef * (log pi - log pi_ref) on every response token plus the score on the last one; GAE turns
rewards and values into advantages; the loss is PPO's clipped policy loss + vf_coef * clipped value loss.

Used by `python train.py --ppo=True` (the seed's length experiment, whose reward, query sampler and diagnostics
are tasks/length.py) and by the RLHF chain's PPO stage (rlhf/ppo_rlhf.py): each calls ppo_iteration() once per
iteration. The policy-gradient core (clipped_policy_loss, kl_estimate) is shared with GRPO (rlhf/grpo.py).
"""
import math
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cpu_kernels import ATTENTION_CHUNK
from generate import generate_withcache
from utils import repeated_ngram_rate


@dataclass
class PPOConfig:
    # TRL's steps and learning_rate are not here: train.py's max_iters decides the steps, and the optimizer
    # passed to PPOTrainer owns the learning rate
    seed: int = 0
    adap_kl_ctrl: bool = True  # adaptive KL coefficient (Ziegler et al.) or a fixed one
    # how the adaptive coefficient moves: "trl" (Ziegler et al.: x (1 +- 20%) per horizon, never reaching 0) or "dual"
    # (the Lagrange multiplier of KL <= target: +- init_kl_coef x the relative error per horizon, down to 0)
    adap_kl_rule: str = "trl"
    init_kl_coef: float = 0.2
    kl_penalty: str = "kl"  # in the reward: kl (k1): log p - log q; abs: |kl|; mse (k2): 0.5 kl^2; k3; full: exact KL
    # where the KL to the reference acts: "reward" (TRL: -kl_coef * kl on every response token, summed into the
    # returns) or "loss" (kl_coef * the k3 estimate per response token added to the loss, as GRPO does; the
    # reward is then the score alone, so the KL never pays a story for being short)
    kl_mode: str = "reward"
    # the end-of-story token (train.py: BOS): needed for kl_on_stop=False and for the stop diagnostics (stop/*)
    stop_token_id: Optional[int] = None
    # False: the KL in the loss compares only what to write, the next-token distributions renormalised without the
    # stop token, so it never pulls the decision to stop (the one a length reward judges) towards the reference's
    # (docs/ppo-length.md: that pull is what made the length creep above the target). Needs kl_mode="loss".
    kl_on_stop: bool = True
    # bounds on the adaptive coefficient (docs/ppo-length.md, "Holding the band"): where the length settles follows beta, so an
    # unbounded controller that winds beta up after an overshoot of the KL, then down, moves the target with it
    kl_coef_min: float = 0.0
    kl_coef_max: Optional[float] = None
    target: float = 6.0  # the adaptive controller's target KL (per sequence)
    horizon: float = 10000.0
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    # False: no critic. Every token's advantage is its story's return, whitened over the batch (with lam = 1: the
    # return minus the batch mean, as RLOO and GRPO do), and the value head is not trained. A critic that knows
    # no better than the batch mean only adds its own noise to every token's advantage (docs/ppo-length.md, finding 19)
    value_baseline: bool = True
    # False: the policy gradient acts only on the decision to stop, log p(stop) at a story's end token and
    # log(1 - p(stop)) at every other response token; what to write is left to the KL. A reward that judges only
    # the length then reaches no token through the choice of a word (docs/ppo-length.md, finding 22). Needs stop_token_id
    pg_on_content: bool = True
    batch_size: int = 128  # rollouts per step
    mini_batch_size: int = 128  # rollouts per backward
    # rows per forward: the no-grad passes and each minibatch take their rows in groups of this many of similar
    # length, each group cut to its own width (a minibatch of 64 stories of ~210 tokens padded to 330 trains ~1.7x
    # faster in sorted groups of 32 on a CPU). The numbers are the same whatever it is, up to float rounding.
    forward_batch_size: int = 32
    gradient_accumulation_steps: int = 1  # mini-batches per optimizer step
    ppo_epochs: int = 4
    max_grad_norm: Optional[float] = None
    early_stopping: bool = False
    target_kl: float = 1.0  # early stopping: stop the epochs once the policy KL exceeds 1.5 * target_kl
    ratio_threshold: float = 10.0  # skip minibatches whose mean ratio exceeds this (loss spikes)
    whiten_rewards: bool = False
    ptx_coef: float = 0.0  # PPO-ptx (InstructGPT): + ptx_coef x a pre-training LM loss in every minibatch
    backward_batch_size: Optional[int] = None  # derived: mini_batch_size * gradient_accumulation_steps

    def __post_init__(self):
        if self.kl_penalty not in KL_ESTIMATORS:
            raise ValueError(f"kl_penalty must be one of {', '.join(KL_ESTIMATORS)}, got {self.kl_penalty!r}")
        if self.kl_mode not in ("reward", "loss"):
            raise ValueError(f"kl_mode must be reward or loss, got {self.kl_mode!r}")
        if self.adap_kl_rule not in ("trl", "dual"):
            raise ValueError(f"adap_kl_rule must be trl or dual, got {self.adap_kl_rule!r}")
        if not self.kl_on_stop and self.kl_mode != "loss":
            raise ValueError("kl_on_stop=False needs kl_mode='loss' (in the reward the KL always charges stopping)")
        for name in ("batch_size", "mini_batch_size", "forward_batch_size", "gradient_accumulation_steps",
                     "ppo_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"PPOConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.horizon <= 0:
            raise ValueError(f"PPOConfig.horizon must be > 0, got {self.horizon}")
        for name in ("init_kl_coef", "vf_coef", "target", "target_kl", "cliprange_value", "ptx_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"PPOConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not self.kl_coef_min <= self.init_kl_coef <= (self.kl_coef_max if self.kl_coef_max is not None else math.inf):
            raise ValueError(f"PPOConfig needs kl_coef_min <= init_kl_coef <= kl_coef_max, got {self.kl_coef_min}, "
                             f"{self.init_kl_coef}, {self.kl_coef_max}")
        if self.cliprange <= 0:
            raise ValueError(f"PPOConfig.cliprange must be > 0, got {self.cliprange}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(f"PPOConfig.gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")
        expected = self.mini_batch_size * self.gradient_accumulation_steps
        if self.backward_batch_size is None:
            self.backward_batch_size = expected
        elif self.backward_batch_size != expected:
            raise ValueError(f"backward_batch_size={self.backward_batch_size} must equal mini_batch_size * "
                             f"gradient_accumulation_steps = {expected}")
        if self.batch_size % self.backward_batch_size:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of mini_batch_size * "
                             f"gradient_accumulation_steps = {self.backward_batch_size}")


# -----------------------------------------------------------------------------
# helpers (TRL's core.py)

def logprobs_from_logits(logits, labels):
    """log p(label) under logits: (B, T, V), (B, T) -> (B, T), in float32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return torch.gather(logp, 2, labels.unsqueeze(2)).squeeze(-1)


def masked_mean(values, mask, axis=None):
    """Mean of values where mask is 1; 0 when the mask is empty (instead of NaN)."""
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis).clamp(min=1)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_var(values, mask, unbiased=True):
    """Variance of values where mask is 1. With fewer than two elements the unbiased estimate is
    undefined: return the biased one (0 for a single element) rather than crash or return NaN."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        variance = variance * n / (n - 1)
    return variance


def masked_whiten(values, mask, shift_mean=True):
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def clip_by_value(x, tensor_min, tensor_max):
    return torch.max(torch.min(x, tensor_max), tensor_min)


def entropy_from_logits(logits):
    pd = F.softmax(logits.float(), dim=-1)
    return torch.logsumexp(logits.float(), dim=-1) - torch.sum(pd * logits.float(), dim=-1)


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al., https://arxiv.org/abs/1909.08593): grows when the
    measured KL exceeds target, shrinks when it is below, by at most 20% per horizon of samples."""

    def __init__(self, init_kl_coef, target, horizon):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current, n_steps):
        proportional_error = min(max(current / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon


class DualKLController:
    """The KL coefficient as the Lagrange multiplier of the constraint KL <= target, by dual ascent: it rises while
    the measured KL is over the target and falls while it is under, by gain x the relative error (clipped to +-1) per
    horizon of samples, and stops at 0. Unlike the multiplicative rule it can reach 0, so once the KL is inside its
    budget the penalty (and the pull towards the reference it brings) fades instead of lingering."""

    def __init__(self, init_kl_coef, target, horizon):
        self.value, self.target, self.horizon, self.gain = init_kl_coef, target, horizon, init_kl_coef

    def update(self, current, n_steps):
        error = min(max(current / self.target - 1, -1.0), 1.0)
        self.value = max(0.0, self.value + self.gain * error * n_steps / self.horizon)


class FixedKLController:
    def __init__(self, kl_coef):
        self.value = kl_coef

    def update(self, current, n_steps):
        pass


def stack_dicts(stats_dicts):
    """[{"a": {"b": t}}, ...] -> {"a/b": mean of t over the list} as floats."""
    flat = {}
    for d in stats_dicts:
        for k, v in flatten_dict(d).items():
            flat.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in flat.items()}


def flatten_dict(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_dict(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


# -----------------------------------------------------------------------------
# the policy-gradient core, shared by PPOTrainer and rlhf/grpo.py

KL_ESTIMATORS = ("kl", "k1", "abs", "mse", "k2", "k3", "full")


def kl_estimate(logprob, ref_logprob, kind="k1"):
    """Per-token estimates of KL(pi || pi_ref) from the log-probs of the sampled tokens (Schulman 2020):
    k1 (TRL's "kl") log pi - log pi_ref, unbiased; abs |k1|; k2 (TRL's "mse") k1^2 / 2; k3 exp(-k1) + k1 - 1,
    unbiased and >= 0. full: the exact KL of the whole next-token distributions (then logprob and
    ref_logprob are log-softmaxed logits, (..., V))."""
    if kind == "full":
        return F.kl_div(ref_logprob, logprob, log_target=True, reduction="none").sum(-1)
    k1 = logprob - ref_logprob
    if kind in ("kl", "k1"):
        return k1
    if kind == "abs":
        return k1.abs()
    if kind in ("mse", "k2"):
        return 0.5 * k1.square()
    if kind == "k3":
        return torch.exp(-k1) + k1 - 1
    raise ValueError(f"KL estimator must be one of {', '.join(KL_ESTIMATORS)}, got {kind!r}")


def log_going_on(stop_logprob):
    """log(1 - p(stop)), from log p(stop), finite as p(stop) -> 1."""
    return torch.log1p(-torch.exp(stop_logprob.clamp(max=-1e-6)))


def without_stop(logprob, stop_logprob):
    """log p(token | not stopping) = log p(token) - log(1 - p(stop)): a token's log-prob in the next-token
    distribution renormalised without the stop token. Its gradient with respect to the stop logit is exactly 0."""
    return logprob - log_going_on(stop_logprob)


def stop_decision(logprob, stop_logprob, is_stop):
    """The log-prob of the decision to stop or go on at each token: log p(stop) where the token is the stop,
    log(1 - p(stop)) elsewhere. Its gradient reaches the logits only through p(stop)."""
    return torch.where(is_stop, logprob, log_going_on(stop_logprob))


LOSS_AGGREGATIONS = ("token", "sequence", "constant")


def aggregate(values, mask, how="token", max_len=None):
    """A per-token loss (B, T) reduced to a scalar over the mask. token: the mean over all the batch's tokens (every
    token weighs the same); sequence: each sequence's mean, then their mean (GRPO's 1/|o_i|, which favours long
    wrong answers and short right ones, Liu et al. 2025); constant: the sum over tokens / (B * max_len), a constant
    (Dr. GRPO's fix, free of either length bias)."""
    if how == "token":
        return masked_mean(values, mask)
    if how == "sequence":
        return masked_mean(values, mask, axis=1).mean()
    if how == "constant":
        return (values * mask).sum() / (values.size(0) * max_len)
    raise ValueError(f"loss aggregation must be one of {', '.join(LOSS_AGGREGATIONS)}, got {how!r}")


def clipped_policy_loss(logprobs, old_logprobs, advantages, mask, cliprange, agg="token", max_len=None):
    """PPO's clipped surrogate -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A), reduced over the mask's tokens by
    aggregate(agg) (the mean over tokens by default; 0, not NaN, for an empty mask). advantages: per token (B, T) or
    per sequence (B,). Returns (loss, clip fraction, ratio, clipped: where the clip took the token's gradient away)."""
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    ratio = torch.exp(logprobs - old_logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = aggregate(torch.max(pg_losses, pg_losses2), mask, agg, max_len)
    clipped = torch.gt(pg_losses2, pg_losses)
    return loss, masked_mean(clipped.float(), mask), ratio, clipped


def trimmed_width(length, width):
    """The columns a group of rows needs: its longest row rounded up to the attention's chunk (so every row's numbers
    are the full width's, bit for bit: the chunks, and the keys each reads, stay the same), at most width."""
    return min(width, -(-length // ATTENTION_CHUNK) * ATTENTION_CHUNK)


def forward_by_length(forward, input_ids, lengths, group_size):
    """forward(ids) -> (logits, values or None) over the rows of input_ids (B, T) in groups of group_size rows of
    similar length (taken in order of length), each group cut to its own width; the outputs padded back with 0 to T,
    in input_ids' row order. Each row's outputs are the full-width batch's, bit for bit (trimmed_width); the padding
    costs nothing. lengths: each row's tokens, padding excluded."""
    width = input_ids.size(1)
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    all_logits, all_values = [], []
    for i in range(0, len(order), group_size):
        rows = order[i: i + group_size]
        w = trimmed_width(max(1, lengths[rows[-1]]), width)
        logits, values = forward(input_ids[torch.tensor(rows, device=input_ids.device), :w])
        all_logits.append(F.pad(logits, (0, 0, 0, width - w)))
        if values is not None:
            all_values.append(F.pad(values, (0, width - w)))
    logits, values = torch.cat(all_logits), torch.cat(all_values) if all_values else None
    if order != sorted(order):  # back to the callers' order
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        inverse = inverse.to(input_ids.device)
        logits, values = logits[inverse], values[inverse] if values is not None else None
    return logits, values


# -----------------------------------------------------------------------------

class PPOTrainer:
    def __init__(self, config: PPOConfig, model, ref_model, optimizer, scaler=None, is_ddp=False,
                 autocast_dtype=None, ptx_loss_fn=None):
        """model: a TransformerWithValueHead (possibly compiled and/or DDP-wrapped) whose output has logits
        and values; ref_model: a frozen Transformer (values None).
        autocast_dtype: bf16/fp16 autocast for every forward (old log-probs and training alike).
        ptx_loss_fn: () -> the language-model loss of a fresh pre-training batch (needed when ptx_coef > 0)."""
        if config.ptx_coef > 0 and ptx_loss_fn is None:
            raise ValueError("PPOConfig.ptx_coef > 0 needs a ptx_loss_fn (the pre-training batches)")
        if not config.kl_on_stop and config.stop_token_id is None:
            raise ValueError("PPOConfig.kl_on_stop=False needs the stop_token_id")
        if not config.pg_on_content and config.stop_token_id is None:
            raise ValueError("PPOConfig.pg_on_content=False needs the stop_token_id (the decision it trains)")
        self.ptx_loss_fn = ptx_loss_fn
        self.config = config
        self.model, self.ref_model, self.optimizer = model, ref_model, optimizer
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler("cpu", enabled=False)
        self.is_ddp = is_ddp
        self.world_size = dist.get_world_size() if is_ddp else 1
        self.device = next(model.parameters()).device
        self.autocast_dtype = autocast_dtype
        if config.adap_kl_ctrl:
            rule = DualKLController if config.adap_kl_rule == "dual" else AdaptiveKLController
            self.kl_ctl = rule(config.init_kl_coef, config.target, config.horizon)
        else:
            self.kl_ctl = FixedKLController(config.init_kl_coef)
        self.rng = torch.Generator().manual_seed(config.seed)  # minibatch order

    def state_dict(self):
        """What steers the next steps beyond the model and optimizer: the KL coefficient and the minibatch order."""
        return {"kl_coef": self.kl_ctl.value, "rng": self.rng.get_state()}

    def load_state_dict(self, state):
        self.kl_ctl.value = state["kl_coef"]
        self.rng.set_state(state["rng"])

    def autocast(self):
        if self.autocast_dtype is None or self.autocast_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def prepare_model_inputs(self, queries: List[torch.Tensor], responses: List[torch.Tensor]):
        """query + response per row, right-padded with 0 to the longest. Causal attention never looks
        right, so padding needs no attention mask; the response mask excludes it from every loss."""
        seqs = [torch.cat([q, r]) for q, r in zip(queries, responses)]
        input_ids = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long, device=self.device)
        for i, s in enumerate(seqs):
            input_ids[i, : len(s)] = s
        return {"input_ids": input_ids}

    def _forward(self, model, input_ids):
        with self.autocast():
            out = model(input_ids)
        return out.logits, out.values  # values: None for the reference model, which has no value head

    def batched_forward_pass(self, model, queries, responses, model_inputs, return_logits=False,
                             response_masks=None):
        """Log-probs of each next token, values, response masks and (with a stop_token_id) the log-prob of
        stopping, for the whole batch, in groups of forward_batch_size rows. Index t of the outputs scores token
        t+1 given tokens 0..t. Returns (logprobs, logits or None, values or None, masks, stop_logprobs or None).
        The groups take the rows in order of length, each cut to its own width (trimmed_width): a row's numbers are
        those of the full-width batch, bit for bit, and the padding's are 0 (every loss masks it). Its own loop rather
        than forward_by_length: each group's logits become log-probs at once, so (n, T, vocab) is never held (400
        rollouts of 300 tokens at a 32,000-token vocabulary would be 15 GB)."""
        fbs, stop = self.config.forward_batch_size, self.config.stop_token_id
        input_ids = model_inputs["input_ids"]
        n, T = input_ids.shape
        lengths = [len(q) + len(r) for q, r in zip(queries, responses)]
        masks = torch.zeros(n, T - 1, device=self.device)
        for j in range(n):
            start = len(queries[j]) - 1  # the logprob of the first response token sits here
            end = start + len(responses[j])
            masks[j, start:end] = 1
            if response_masks is not None:
                masks[j, start:end] *= response_masks[j].to(masks.dtype)
        logprobs = torch.zeros(n, T - 1, device=self.device)
        stop_logprobs = torch.zeros(n, T - 1, device=self.device) if stop is not None else None
        values = all_logits = None
        by_length = sorted(range(n), key=lambda j: lengths[j])
        for i in range(0, n, fbs):
            rows = by_length[i: i + fbs]
            width = trimmed_width(max(lengths[j] for j in rows), T)
            rows = torch.tensor(rows, device=self.device)
            ids = input_ids[rows, :width]
            logits, chunk_values = self._forward(model, ids)
            logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
            logprobs[rows, : width - 1] = torch.gather(logp, 2, ids[:, 1:].unsqueeze(2)).squeeze(-1)
            if stop is not None:
                stop_logprobs[rows, : width - 1] = logp[..., stop]
            del logp
            if chunk_values is not None:
                if values is None:
                    values = torch.zeros(n, T - 1, device=self.device)
                values[rows, : width - 1] = chunk_values[:, :-1].float()
            if return_logits:
                if all_logits is None:
                    all_logits = logits.new_zeros(n, T - 1, logits.size(-1))
                all_logits[rows, : width - 1] = logits[:, :-1]
        return logprobs, all_logits, values, masks, stop_logprobs

    def _kl_penalty(self, logprob, ref_logprob):
        return kl_estimate(logprob, ref_logprob, self.config.kl_penalty)

    def compute_rewards(self, scores, logprobs, ref_logprobs, masks):
        """Per-token reward -kl_coef * kl on response tokens, plus the score on the last one.
        Returns (rewards, non_score_rewards), both (B, T). With kl_mode="loss" the KL is not a reward."""
        kl = self._kl_penalty(logprobs, ref_logprobs) * masks
        non_score_rewards = -self.kl_ctl.value * kl if self.config.kl_mode == "reward" else torch.zeros_like(kl)
        rewards = non_score_rewards.clone()
        last = (masks * torch.arange(masks.size(1), device=masks.device)).argmax(dim=1)  # last response token
        has_response = masks.sum(dim=1) > 0  # an empty response has no token to credit
        rewards[torch.arange(len(rewards), device=masks.device), last] += scores.to(rewards.dtype) * has_response
        return rewards, non_score_rewards

    def compute_advantages(self, values, rewards, mask):
        """GAE: delta_t = r_t + gamma V(s_t+1) - V(s_t); A_t = sum_l (gamma lam)^l delta_t+l;
        returns = A + V; advantages whitened over the batch. Masked positions contribute nothing."""
        values, rewards = values * mask, rewards * mask
        if self.config.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        gamma, lam = self.config.gamma, self.config.lam
        T = rewards.size(1)
        lastgaelam = torch.zeros_like(rewards[:, 0])
        advantages_reversed = []
        for t in reversed(range(T)):
            nextvalues = values[:, t + 1] if t < T - 1 else 0.0
            delta = rewards[:, t] + gamma * nextvalues - values[:, t]
            lastgaelam = delta + gamma * lam * lastgaelam
            advantages_reversed.append(lastgaelam)
        advantages = torch.stack(advantages_reversed[::-1], dim=1)
        returns = advantages + values
        advantages = masked_whiten(advantages, mask).detach()
        return values, advantages, returns

    def compute_loss(self, old_logprobs, values, logprobs, logits, vpreds, mask, advantages, returns,
                     ref_logprobs=None, ref_stop_logprobs=None, is_stop=None, old_stop_logprobs=None):
        """PPO's clipped policy loss + vf_coef * clipped value loss (+ kl_coef * the per-token k3 KL estimate
        to the reference with kl_mode="loss"; with kl_on_stop=False, of the distributions without the stop token,
        over the tokens that are not the stop: ref_stop_logprobs and is_stop, (B, T); with pg_on_content=False the
        policy loss is on the stop decisions, old_stop_logprobs (B, T) the old policy's). Returns (loss, stats)."""
        cfg = self.config
        vpredclipped = clip_by_value(vpreds, values - cfg.cliprange_value, values + cfg.cliprange_value)
        vf_losses1 = (vpreds - returns) ** 2
        vf_losses2 = (vpredclipped - returns) ** 2
        vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
        vf_clipfrac = masked_mean(torch.gt(vf_losses2, vf_losses1).float(), mask)

        stop_logprobs = None
        if not (cfg.kl_on_stop and cfg.pg_on_content):
            stop_logprobs = F.log_softmax(logits.float(), dim=-1)[..., cfg.stop_token_id]
        if cfg.pg_on_content:
            pg_loss, pg_clipfrac, ratio, clipped = clipped_policy_loss(logprobs, old_logprobs, advantages, mask,
                                                                       cfg.cliprange)
        else:
            pg_loss, pg_clipfrac, ratio, clipped = clipped_policy_loss(
                stop_decision(logprobs, stop_logprobs, is_stop),
                stop_decision(old_logprobs, old_stop_logprobs, is_stop), advantages, mask, cfg.cliprange)

        loss = pg_loss + cfg.vf_coef * vf_loss if cfg.value_baseline else pg_loss
        kl_loss = torch.zeros((), device=loss.device)
        if cfg.kl_mode == "loss":
            # k3 >= 0 pulls each token's distribution towards the reference's without crediting a shorter
            # story with less KL
            if cfg.kl_on_stop:
                kl_loss = masked_mean(kl_estimate(logprobs, ref_logprobs, "k3"), mask)
            else:
                kl_loss = masked_mean(kl_estimate(without_stop(logprobs, stop_logprobs),
                                                  without_stop(ref_logprobs, ref_stop_logprobs), "k3"),
                                      mask * ~is_stop)
            loss = loss + self.kl_ctl.value * kl_loss
        avg_ratio = masked_mean(ratio, mask).item()
        skipped = avg_ratio > cfg.ratio_threshold
        if skipped:  # a wildly off-policy minibatch: its gradients would do more harm than good
            pg_loss, vf_loss, kl_loss, loss = pg_loss * 0.0, vf_loss * 0.0, kl_loss * 0.0, loss * 0.0

        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(logits), mask)
            approxkl = 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask)
            policykl = masked_mean(old_logprobs - logprobs, mask)
            # the stop decisions whose step the clip cut short (a story ends once: ~1/200 of the tokens)
            stop_clipfrac = masked_mean(clipped.float(), mask * is_stop) if is_stop is not None else pg_clipfrac
        stats = {
            "loss": {"policy": pg_loss.detach(), "value": vf_loss.detach(), "kl": kl_loss.detach(),
                     "total": loss.detach()},
            "policy": {"entropy": entropy, "approxkl": approxkl, "policykl": policykl, "clipfrac": pg_clipfrac,
                       "clipfrac_stop": stop_clipfrac, "advantages_mean": masked_mean(advantages, mask),
                       "ratio": avg_ratio, "skipped": float(skipped)},
            "returns": {"mean": masked_mean(returns, mask), "var": masked_var(returns, mask)},
            "val": {"vpred": masked_mean(vpreds, mask).detach(), "error": masked_mean(vf_losses1, mask).detach(),
                    "clipfrac": vf_clipfrac, "mean": masked_mean(values, mask), "var": masked_var(values, mask)},
        }
        return loss, stats

    def _all_reduce_mean(self, x: float) -> float:
        if not self.is_ddp:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world_size

    def step(self, queries: List[torch.Tensor], responses: List[torch.Tensor], scores: List[torch.Tensor],
             response_masks: Optional[List[torch.Tensor]] = None) -> dict:
        """One PPO step on a batch of rollouts: old log-probs/values, reference log-probs, rewards,
        advantages, then ppo_epochs passes of clipped-loss updates over shuffled minibatches."""
        cfg = self.config
        bs = len(queries)
        if not (bs == len(responses) == len(scores)) or bs != cfg.batch_size:
            raise ValueError(f"step() expects batch_size={cfg.batch_size} queries, responses and scores, "
                             f"got {bs}, {len(responses)}, {len(scores)}")
        timing = {}
        t_start = t = time.time()
        scores = torch.stack([torch.as_tensor(s, dtype=torch.float32) for s in scores]).to(self.device)
        model_inputs = self.prepare_model_inputs(queries, responses)
        full_kl = cfg.kl_penalty == "full"

        with torch.no_grad():
            logprobs, logits, values, masks, stop_logprobs = self.batched_forward_pass(
                self.model, queries, responses, model_inputs, return_logits=full_kl, response_masks=response_masks)
            ref_logprobs, ref_logits, _, _, ref_stop_logprobs = self.batched_forward_pass(
                self.ref_model, queries, responses, model_inputs, return_logits=full_kl, response_masks=response_masks)
        timing["time/ppo/forward_pass"] = time.time() - t
        t = time.time()
        with torch.no_grad():
            if full_kl:
                rewards, non_score_reward = self.compute_rewards(
                    scores, F.log_softmax(logits.float(), -1), F.log_softmax(ref_logits.float(), -1), masks)
                del logits, ref_logits
            else:
                rewards, non_score_reward = self.compute_rewards(scores, logprobs, ref_logprobs, masks)
            if not cfg.value_baseline:
                values = torch.zeros_like(values)
            values, advantages, returns = self.compute_advantages(values, rewards, masks)
        timing["time/ppo/compute_advantages"] = time.time() - t

        t = time.time()
        input_ids = model_inputs["input_ids"]
        is_stop = input_ids[:, 1:] == cfg.stop_token_id if cfg.stop_token_id is not None else None
        lengths = [len(q) + len(r) for q, r in zip(queries, responses)]
        all_stats = []
        for epoch in range(cfg.ppo_epochs):
            epoch_stats = []
            perm = torch.randperm(bs, generator=self.rng)
            for b_start in range(0, bs, cfg.backward_batch_size):
                for m_start in range(b_start, b_start + cfg.backward_batch_size, cfg.mini_batch_size):
                    rows = sorted(perm[m_start: m_start + cfg.mini_batch_size].tolist(), key=lengths.__getitem__)
                    if self.is_ddp:  # sync gradients in the backward of the last micro-batch only
                        self.model.require_backward_grad_sync = \
                            m_start + cfg.mini_batch_size >= b_start + cfg.backward_batch_size
                    # the minibatch at its own width, its rows forwarded in groups of similar length: each row's
                    # log-probs are the no-grad pass's, bit for bit
                    width = trimmed_width(lengths[rows[-1]], input_ids.size(1))
                    mb, cols = torch.tensor(rows, device=self.device), slice(0, width - 1)
                    mb_ids = input_ids[mb, :width]
                    mb_logits, vpreds = forward_by_length(lambda ids: self._forward(self.model, ids), mb_ids,
                                                          [lengths[j] for j in rows], cfg.forward_batch_size)
                    mb_logprobs = logprobs_from_logits(mb_logits[:, :-1], mb_ids[:, 1:])
                    loss, train_stats = self.compute_loss(
                        logprobs[mb, cols], values[mb, cols], mb_logprobs, mb_logits[:, :-1], vpreds[:, :-1].float(),
                        masks[mb, cols], advantages[mb, cols], returns[mb, cols], ref_logprobs[mb, cols],
                        None if ref_stop_logprobs is None else ref_stop_logprobs[mb, cols],
                        None if is_stop is None else is_stop[mb, cols],
                        None if stop_logprobs is None else stop_logprobs[mb, cols])
                    if cfg.ptx_coef > 0:  # keep the pre-training distribution while chasing the reward
                        with self.autocast():
                            ptx_loss = self.ptx_loss_fn()
                        loss = loss + cfg.ptx_coef * ptx_loss
                        train_stats["loss"]["ptx"] = ptx_loss.detach()
                    self.scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
                    epoch_stats.append(train_stats)
                if cfg.max_grad_norm is not None:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
            all_stats.extend(epoch_stats)
            if cfg.early_stopping:
                # the epoch's mean policy KL, the same on every rank so that all ranks stop together
                policykl = self._all_reduce_mean(
                    sum(float(s["policy"]["policykl"]) for s in epoch_stats) / len(epoch_stats))
                if policykl > 1.5 * cfg.target_kl:
                    break
        timing["time/ppo/optimize_step"] = time.time() - t

        t = time.time()
        stats = self.record_step_stats(scores, logprobs, ref_logprobs, non_score_reward, masks, all_stats)
        if cfg.stop_token_id is not None:  # the batch as the step saw it, for the caller's diagnostics
            self.last_batch = dict(logprobs=logprobs, ref_logprobs=ref_logprobs, stop_logprobs=stop_logprobs,
                                   ref_stop_logprobs=ref_stop_logprobs, is_stop=is_stop, masks=masks, values=values,
                                   returns=returns, advantages=advantages, kl_coef=float(self.kl_ctl.value))
        stats["ppo/epochs"] = float(epoch + 1)
        stats["ppo/learning_rate"] = float(self.optimizer.param_groups[0]["lr"])
        # the measured KL moves the coefficient for the next step (the reference never updated it)
        self.update_kl_coef(stats["objective/kl"], cfg.batch_size * self.world_size)
        timing["time/ppo/calc_stats"] = time.time() - t
        timing["time/ppo/total"] = time.time() - t_start
        stats.update(timing)
        return stats

    def update_kl_coef(self, kl, n_rollouts):
        """The controller's update, then the bounds: the value itself is clamped, so nothing winds up beyond them."""
        cfg = self.config
        self.kl_ctl.update(kl, n_rollouts)
        self.kl_ctl.value = min(max(self.kl_ctl.value, cfg.kl_coef_min),
                                cfg.kl_coef_max if cfg.kl_coef_max is not None else math.inf)

    def record_step_stats(self, scores, logprobs, ref_logprobs, non_score_reward, masks, train_stats):
        kl = ((logprobs - ref_logprobs) * masks).sum(dim=1)  # per sequence
        mean_kl = self._all_reduce_mean(kl.mean().item())
        stats = {
            "objective/kl": mean_kl,
            "objective/kl_coef": float(self.kl_ctl.value),
            "objective/entropy": self._all_reduce_mean((-logprobs * masks).sum(dim=1).mean().item()),
            "ppo/mean_non_score_reward": non_score_reward.sum(dim=1).mean().item(),
            "ppo/mean_scores": self._all_reduce_mean(scores.mean().item()),
            "ppo/std_scores": scores.std().item() if len(scores) > 1 else 0.0,
            "ppo/kl_ref": mean_kl,  # the seed's name for objective/kl
            "ppo/reward_all": (scores + non_score_reward.sum(dim=1)).mean().item(),  # score + KL penalty
            "tokens/responses_len_mean": masks.sum(dim=1).mean().item(),
            # how (un)likely the frozen pre-trained model finds the rollouts: rises when the policy hacks the reward
            "rollout/ref_nll": self._all_reduce_mean(masked_mean(-ref_logprobs, masks).item()),
            "rollout/policy_nll": self._all_reduce_mean(masked_mean(-logprobs, masks).item()),
        }
        for k, v in stack_dicts(train_stats).items():
            stats[f"ppo/{k}"] = v
        return stats


# -----------------------------------------------------------------------------
# one iteration of the seed's loop (section 3.2.1): queries -> rollouts -> rewards -> PPO step

def story_lengths(queries, responses, stop_id):
    """Each story's length (query + response tokens, the end token not counted) and whether it ended (its
    response's last token is stop_id) rather than running out of budget. Returns (lengths, ended)."""
    ended = [len(r) > 0 and r[-1] == stop_id for r in responses]
    return [len(q) + len(r) - e for q, r, e in zip(queries, responses, ended)], ended


def ppo_iteration(trainer: PPOTrainer, policy, queries: List[List[int]], reward_fn: Callable[[int], float],
                  max_gen_len: int, stop_id: int, decode_fn=None, score_fn=None,
                  on_length: Optional[Callable[[float], None]] = None) -> dict:
    """Generate a response to each query with the KV-cache generator (temperature 1, no top-k/top-p, dropout
    off), score each story (query + response, without the end token) with reward_fn(length), and take one
    PPO step. policy: the plain module (trainer.model may be its compiled or DDP wrapper).
    A response that stopped keeps its end token: choosing to stop is the very action the length reward
    judges, so it must receive its share of the advantage. Returns step()'s stats plus the rollouts'.
    score_fn: instead of reward_fn(length), score_fn(responses, ended) -> (scores, extra stats) scores whole
    rollouts (the gold judge or a reward model on the instruction task; responses keep their end token).
    on_length(mean story length) is called before the step (train.py sets the step's learning rate with it)."""
    device = trainer.device
    t0 = time.time()
    policy.eval()
    responses = generate_withcache(policy, queries, max_gen_len, temperature=1.0, top_k=0, top_p=1.0,
                                   eos_id=stop_id, device=device, decode_fn=decode_fn, keep_stop_token=True)
    policy.train()
    rollout_s = time.time() - t0
    lengths, ended = story_lengths(queries, responses, stop_id)
    extra = {}
    if score_fn is None:
        scores = [reward_fn(n) for n in lengths]
    else:
        scores, extra = score_fn(responses, ended)
    n = len(queries)
    length_mean = sum(lengths) / n
    if on_length is not None:
        on_length(length_mean)
    stats = trainer.step([torch.tensor(q, device=device) for q in queries],
                         [torch.tensor(r, device=device) for r in responses],
                         [torch.tensor(s, device=device) for s in scores])
    stories = [q + r[:len(r) - e] for q, r, e in zip(queries, responses, ended)]
    stats.update({"rollouts": n, "reward_mean": sum(scores) / n, "length_mean": length_mean,
                  "length_std": (sum((x - length_mean) ** 2 for x in lengths) / max(1, n - 1)) ** 0.5,
                  # what -|target - length| rewards is the median at the target; the band is on the mean
                  "length_median": statistics.median(lengths),
                  "ended_frac": sum(ended) / n,
                  "rep3_rate": sum(repeated_ngram_rate(s) for s in stories) / n,
                  "rollout_s": rollout_s, "rollout_tok_per_s": sum(len(r) for r in responses) / rollout_s, **extra})
    return stats
