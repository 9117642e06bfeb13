"""
The seed's length experiment as a task: PPO teaches the pre-trained model to write stories of target_len tokens.
A query is BOS + the first 0..start_len-1 tokens of a training story (LengthSampler draws how many, story_queries
cuts them from the token batches), the policy writes the rest, and the reward is the seed's
r = -|target_len - story_length| / 100 (LengthReward). `python train.py --ppo=True` runs it with ppo.PPOTrainer;
config/ppo_length_cpu.py is the recipe that holds the length in target_len +- 10 on a CPU, with
length_error_lr (the learning rate as a controller on the length error) and stop_diagnostics (what acts on the
decision to stop near the target). docs/ppo-length.md is the study.
"""
import random
from typing import Callable, List

import torch


class LengthSampler:
    """Uniform integer in [min_value, max_value), seeded and resumable (state_dict)."""

    def __init__(self, min_value, max_value, seed=0):
        if max_value <= min_value:
            raise ValueError(f"LengthSampler needs min_value < max_value, got {min_value}, {max_value}")
        self.min_value, self.max_value = min_value, max_value
        self.rng = random.Random(seed)

    def __call__(self):
        return self.rng.randrange(self.min_value, self.max_value)

    def state_dict(self):
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state):
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))


class LengthReward:
    """The seed's reward: r = -|target_length - story_length| / 100."""

    def __init__(self, target_length):
        self.target_length = target_length

    def __call__(self, length):
        return -abs(self.target_length - length) / 100


def length_error_lr(length, target_length, learning_rate, min_lr, band, scale):
    """The learning rate as a controller on the length error (docs/ppo-length.md, "Holding the band"): min_lr while the mean
    length of the rollouts about to be learnt from is within target_length +- band, rising linearly with the error
    beyond the band to learning_rate at band + scale and above. Every seed approaches at the full rate however fast
    its policy moves, and the rate is at its floor, never below, once there."""
    excess = max(0.0, abs(length - target_length) - band)
    return min_lr + (learning_rate - min_lr) * min(1.0, excess / scale)


def story_queries(next_batch: Callable, n: int, query_length: Callable[[], int], bos_id: int) -> List[List[int]]:
    """n queries for the length experiment: BOS + the first query_length() tokens of a story, one per row of the
    token batches next_batch() -> (X, Y) returns (the first story that begins in the row)."""
    queries = []
    while len(queries) < n:
        X, _ = next_batch()
        for row in X.tolist():
            if bos_id in row:
                begin = row.index(bos_id)
                queries.append(row[begin: begin + query_length() + 1])
    return queries[:n]


def stop_diagnostics(batch, target_length, kl_on_stop=True, kl_mode="loss", width=10):
    """What acts on the decision to stop near a target story length, from one step's batch (PPOTrainer.last_batch,
    before the step's updates): at response positions where stopping gives a story within target_length +- width,
    the policy's and the reference's probability of stopping, and the derivative of the loss with respect to the
    stop logit summed there (per response token, as the losses average), split into the policy gradient's part
    -A (1[stop] - p) and the k3 KL-in-the-loss part kl_coef (pi_ref/pi - 1)(p - 1[stop]) (0 with kl_on_stop=False:
    the stop logit has no gradient). Positive: gradient descent lowers the stop logit, i.e. stories get longer.
    Also the mean advantage of the stop tokens by where they end, the value error over each response's last 10
    tokens, the exact KL of the stop decisions per story, and kl_coef x the KL per response token (beta * k)."""
    masks, is_stop = batch["masks"], batch["is_stop"].float()
    p, q = batch["stop_logprobs"].exp(), batch["ref_stop_logprobs"].exp()
    story_len = torch.arange(1, masks.size(1) + 1, device=masks.device).expand_as(masks)  # stopping after token t
    near = masks * ((story_len - target_length).abs() <= width)
    n_tokens = masks.sum().clamp(min=1)
    adv, beta = batch["advantages"], batch["kl_coef"]
    grad_pg = (-adv * (is_stop - p) * near).sum() / n_tokens
    ratio = torch.exp(batch["ref_logprobs"] - batch["logprobs"])
    grad_kl = (beta * (ratio - 1) * (p - is_stop) * near).sum() / n_tokens if kl_on_stop and kl_mode == "loss" \
        else torch.zeros(())
    ended = masks * is_stop

    def mean_adv(where):
        return (adv * where).sum().item() / max(1.0, where.sum().item())
    last10 = masks * (masks.flip(1).cumsum(1).flip(1) <= 10)
    eps = 1e-12
    stop_kl = torch.where(masks > 0, p * (torch.log(p + eps) - torch.log(q + eps))
                          + (1 - p) * (torch.log1p(-p + eps) - torch.log1p(-q + eps)), 0.0)  # padding: p = q = 1
    kl_per_story = ((batch["logprobs"] - batch["ref_logprobs"]) * masks).sum(1).mean()
    return {"stop/p_policy_near_target": (p * near).sum().item() / max(1.0, near.sum().item()),
            "stop/p_ref_near_target": (q * near).sum().item() / max(1.0, near.sum().item()),
            "stop/grad_pg_near_target": grad_pg.item(), "stop/grad_kl_near_target": grad_kl.item(),
            "stop/adv_end_short": mean_adv(ended * (story_len < target_length - width)),
            "stop/adv_end_near": mean_adv(ended * ((story_len - target_length).abs() <= width)),
            "stop/adv_end_long": mean_adv(ended * (story_len > target_length + width)),
            "stop/value_error_last10": (((batch["values"] - batch["returns"]) ** 2 * last10).sum()
                                        / last10.sum().clamp(min=1)).item(),
            "stop/kl_stop_decisions": stop_kl.sum(1).mean().item(),
            "stop/beta_k": beta * (kl_per_story / masks.sum(1).mean().clamp(min=1)).item()}
