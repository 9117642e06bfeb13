import math
import shutil

import pytest
import torch

from conftest import first_difference, killed_run, logged, run, script
from generate import generate_withcache
from model import ModelArgs, Transformer, TransformerWithValueHead
from ppo import (AdaptiveKLController, DualKLController, FixedKLController, PPOConfig, PPOTrainer, clip_by_value,
                 entropy_from_logits, forward_by_length, logprobs_from_logits, masked_mean, masked_var, masked_whiten,
                 ppo_iteration, without_stop)
from tasks.length import LengthReward, LengthSampler, length_error_lr, stop_diagnostics
from utils import cosine_lr, repeated_ngram_rate

SMALL = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32, multiple_of=4, max_seq_len=64)


def make_trainer(config=None, seed=0, **kw):
    torch.manual_seed(seed)
    policy = TransformerWithValueHead(ModelArgs(**SMALL))
    ref = Transformer(ModelArgs(**SMALL))
    ref.load_state_dict({k: v for k, v in policy.state_dict().items() if not k.startswith("value_head")})
    ref.eval().requires_grad_(False)
    config = config or PPOConfig(batch_size=8, mini_batch_size=4)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    return PPOTrainer(config, policy, ref, optimizer, **kw)


def rollouts(n, seed=0, q_len=(1, 5), r_len=(1, 12)):
    g = torch.Generator().manual_seed(seed)
    queries = [torch.randint(3, 32, (int(torch.randint(*q_len, (1,), generator=g)),), generator=g) for _ in range(n)]
    responses = [torch.randint(3, 32, (int(torch.randint(*r_len, (1,), generator=g)),), generator=g) for _ in range(n)]
    scores = [torch.tensor(float(torch.randn(1, generator=g))) for _ in range(n)]
    return queries, responses, scores


# --- helpers -------------------------------------------------------------------------------------

def test_masked_statistics_on_tiny_masks():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert masked_mean(x, torch.tensor([[0, 1, 1, 0.0]])).item() == 2.5
    assert masked_mean(x, torch.zeros(1, 4)).item() == 0.0  # empty mask: 0, not NaN
    assert masked_var(x, torch.tensor([[0, 1, 1, 0.0]])).item() == pytest.approx(0.5)  # unbiased
    assert masked_var(x, torch.tensor([[0, 1, 1, 0.0]]), unbiased=False).item() == pytest.approx(0.25)
    assert masked_var(x, torch.tensor([[0, 0, 1, 0.0]])).item() == 0.0  # one element: no crash, no NaN
    assert masked_var(x, torch.zeros(1, 4)).item() == 0.0
    w = masked_whiten(x, torch.ones(1, 4))
    assert abs(w.mean().item()) < 1e-6 and w.std().item() == pytest.approx(1.0, abs=1e-3)
    assert torch.isfinite(masked_whiten(x, torch.tensor([[0, 0, 1, 0.0]]))).all()
    assert clip_by_value(torch.tensor([-2.0, 0.5, 3.0]), torch.tensor(-1.0), torch.tensor(1.0)).tolist() == [-1, 0.5, 1]


def test_logprobs_and_entropy():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    assert logprobs_from_logits(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.75))
    p = torch.tensor([0.25, 0.75])
    assert entropy_from_logits(logits).item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-6)


def test_gae_by_hand():
    cfg = PPOConfig(batch_size=1, mini_batch_size=1, gamma=0.9, lam=0.8)
    trainer = make_trainer(cfg)
    values = torch.tensor([[9.0, 1.0, 2.0, 3.0, 9.0]])  # position 0 (query) and 4 (padding) are masked
    rewards = torch.tensor([[9.0, 0.5, -1.0, 2.0, 9.0]])
    mask = torch.tensor([[0.0, 1, 1, 1, 0]])
    v, adv, ret = trainer.compute_advantages(values, rewards, mask)
    g, lam = 0.9, 0.8
    d3 = 2.0 + g * 0 - 3.0  # the last response token: no next value
    d2 = -1.0 + g * 3.0 - 2.0
    d1 = 0.5 + g * 2.0 - 1.0
    a3, a2 = d3, d2 + g * lam * d3
    a1 = d1 + g * lam * a2
    torch.testing.assert_close(ret[0, 1:4], torch.tensor([a1 + 1, a2 + 2, a3 + 3]))
    raw = torch.tensor([a1, a2, a3])
    torch.testing.assert_close(adv[0, 1:4], (raw - raw.mean()) / raw.std(), atol=1e-4, rtol=1e-4)
    assert v[0, 0] == 0 and v[0, 4] == 0


@pytest.mark.parametrize("kind", ["kl", "abs", "mse", "full"])
def test_rewards_for_each_kl_penalty(kind):
    trainer = make_trainer(PPOConfig(batch_size=1, mini_batch_size=1, kl_penalty=kind, init_kl_coef=0.5))
    mask = torch.tensor([[0.0, 1, 1, 0]])
    if kind == "full":
        lp = torch.log_softmax(torch.tensor([[[1.0, 0.0]] * 4]), -1)
        ref = torch.log_softmax(torch.tensor([[[0.0, 1.0]] * 4]), -1)
        p = lp.exp()
        per_token = (p * (lp - ref)).sum(-1)[0]
    else:
        lp = torch.tensor([[-1.0, -0.5, -2.0, -1.0]])
        ref = torch.tensor([[-1.0, -1.5, -1.0, -3.0]])
        d = (lp - ref)[0]
        per_token = {"kl": d, "abs": d.abs(), "mse": 0.5 * d ** 2}[kind]
    rewards, non_score = trainer.compute_rewards(torch.tensor([2.0]), lp, ref, mask)
    want = -0.5 * per_token * mask[0]
    torch.testing.assert_close(non_score[0], want)
    want = want.clone()
    want[2] += 2.0  # the score lands on the last response token
    torch.testing.assert_close(rewards[0], want)


def test_kl_estimators_by_hand():
    """The one KL function every method uses: k1, abs, k2, k3 per token against hand values; k1 and k3 are
    unbiased for KL(p || q) on samples from p, k3 is never negative."""
    from ppo import kl_estimate
    lp, ref = torch.tensor([-1.0, -0.5]), torch.tensor([-1.5, 0.0])
    d = [0.5, -0.5]
    assert kl_estimate(lp, ref, "k1").tolist() == pytest.approx(d)
    assert kl_estimate(lp, ref, "kl").tolist() == pytest.approx(d)
    assert kl_estimate(lp, ref, "abs").tolist() == pytest.approx([0.5, 0.5])
    assert kl_estimate(lp, ref, "k2").tolist() == pytest.approx([0.125, 0.125])
    assert kl_estimate(lp, ref, "k3").tolist() == pytest.approx([math.exp(-x) + x - 1 for x in d])
    with pytest.raises(ValueError, match="KL estimator"):
        kl_estimate(lp, ref, "k4")
    # on samples of p, the means of k1 and k3 approach the exact KL of the two distributions
    torch.manual_seed(0)
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    x = torch.multinomial(p, 200_000, replacement=True)
    exact = (p * (p / q).log()).sum().item()
    assert kl_estimate(p.log()[x], q.log()[x], "k1").mean().item() == pytest.approx(exact, abs=5e-3)
    assert kl_estimate(p.log()[x], q.log()[x], "k3").mean().item() == pytest.approx(exact, abs=5e-3)
    full = kl_estimate(p.log()[None], q.log()[None], "full")
    assert full.item() == pytest.approx(exact, abs=1e-6)


def test_detached_value_head_leaves_the_trunk_to_the_policy():
    """detach_value: the value loss trains the value head and nothing else; by default it reaches the trunk."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 32, (2, 6))
    for detach in (False, True):
        model = TransformerWithValueHead(ModelArgs(**SMALL), detach_value=detach)
        model(tokens).values.square().mean().backward()
        trunk = model.layers[0].attention.wq.weight.grad
        assert model.value_head.weight.grad.abs().sum() > 0
        assert (trunk is None or trunk.abs().sum() == 0) == detach
        logits = model(tokens).logits  # the policy itself is the same either way
        model.detach_value = not detach
        torch.testing.assert_close(model(tokens).logits, logits)


def test_kl_in_the_loss_by_hand():
    """kl_mode="loss": the reward is the score alone, and the loss gains kl_coef * mean k3 over response tokens,
    k3 = exp(r) - r - 1 with r = log pi_ref - log pi (GRPO's estimator)."""
    trainer = make_trainer(PPOConfig(batch_size=1, mini_batch_size=1, kl_mode="loss", init_kl_coef=0.5))
    mask = torch.tensor([[0.0, 1, 1, 0]])
    lp = torch.tensor([[-1.0, -0.5, -2.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.5, -1.0, -3.0]])
    rewards, non_score = trainer.compute_rewards(torch.tensor([2.0]), lp.detach(), ref, mask)
    assert non_score.abs().sum() == 0 and rewards.tolist() == [[0.0, 0.0, 2.0, 0.0]]
    zeros = torch.zeros(1, 4)
    args = (lp.detach(), zeros, lp, torch.zeros(1, 4, 3), zeros, mask, zeros, zeros)  # zero advantages and returns
    loss, stats = trainer.compute_loss(*args, ref_logprobs=ref)
    r1, r2 = -1.0, 1.0  # log ratios of the two response tokens
    k3 = ((math.exp(r1) - r1 - 1) + (math.exp(r2) - r2 - 1)) / 2
    assert stats["loss"]["kl"].item() == pytest.approx(k3)
    assert loss.item() == pytest.approx(0.5 * k3)  # policy and value losses are 0 here
    loss.backward()  # d/d logp of k3 = 1 - exp(r), averaged over the 2 tokens, times kl_coef
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, 0.25 * (1 - math.exp(r1)), 0.25 * (1 - math.exp(r2)), 0.0]]))
    # in the default mode the same call adds nothing
    plain = make_trainer(PPOConfig(batch_size=1, mini_batch_size=1, init_kl_coef=0.5))
    assert plain.compute_loss(*args, ref_logprobs=ref)[0].item() == 0.0


def test_kl_without_the_stop_token_by_hand():
    """kl_on_stop=False: the k3 KL in the loss is taken between the next-token distributions renormalised without
    the stop token, over the tokens that are not the stop; the stop logit gets no gradient from it at all, while
    the other logits do, and with the stop token included (the default) the stop logit is pulled."""
    stop = 2
    logits = torch.tensor([[[0.3, -0.2, 1.0, 0.5], [0.1, 0.4, -0.5, 0.2], [0.0, 0.0, 2.0, 0.0]]], requires_grad=True)
    ref_logits = torch.tensor([[[0.0, 0.1, -1.0, 0.3], [0.2, -0.1, 0.5, 0.0], [0.0, 0.5, 0.0, 0.0]]])
    tokens = torch.tensor([[1, 3, stop]])  # the third position samples the stop
    mask = torch.ones(1, 3)
    ref_lp = logprobs_from_logits(ref_logits, tokens)
    ref_stop = torch.log_softmax(ref_logits, -1)[..., stop]
    zeros = torch.zeros(1, 3)
    for kl_on_stop in (False, True):
        lp = logprobs_from_logits(logits, tokens)
        trainer = make_trainer(PPOConfig(batch_size=1, mini_batch_size=1, kl_mode="loss", init_kl_coef=1.0,
                                         vf_coef=0.0, stop_token_id=stop, kl_on_stop=kl_on_stop))
        loss, stats = trainer.compute_loss(lp.detach(), zeros, lp, logits, zeros, mask, zeros, zeros, ref_lp,
                                           ref_stop, tokens == stop)
        logits.grad = None
        loss.backward()
        if not kl_on_stop:  # by hand: renormalise both over the tokens 0, 1, 3; k3 at the first two positions
            want = 0.0
            for t in range(2):
                q = torch.softmax(logits[0, t, [0, 1, 3]].detach(), -1)
                q_ref = torch.softmax(ref_logits[0, t, [0, 1, 3]], -1)
                i = [0, 1, 3].index(int(tokens[0, t]))
                r = math.log(q_ref[i]) - math.log(q[i])
                want += (math.exp(r) - r - 1) / 2
            assert stats["loss"]["kl"].item() == pytest.approx(want, rel=1e-5)
            assert logits.grad[..., stop].abs().max() < 1e-7 and logits.grad[0, :2].abs().sum() > 1e-3
            assert logits.grad[0, 2].abs().max() < 1e-7  # the stop position itself is not in the KL
        else:
            assert logits.grad[..., stop].abs().max() > 1e-3
    assert without_stop(torch.tensor([math.log(0.3)]), torch.tensor([math.log(0.4)])).item() == \
        pytest.approx(math.log(0.5))
    with pytest.raises(ValueError, match="kl_mode='loss'"):
        PPOConfig(kl_on_stop=False)
    with pytest.raises(ValueError, match="stop_token_id"):
        make_trainer(PPOConfig(batch_size=1, mini_batch_size=1, kl_mode="loss", kl_on_stop=False))


def test_policy_gradient_on_the_stop_decision_only_by_hand():
    """pg_on_content=False: the clipped loss is on the decision to stop or go on, log p(stop) at the end token and
    log(1 - p(stop)) elsewhere. Its gradient on the logits is then the same as the binary decision's: at a
    position that went on, every other token's logit moves in proportion to its probability (what to write is
    untouched: the distribution without the stop token does not change to first order). The old policy, the
    reference and the current policy all differ, and the clip acts at one position."""
    stop = 2
    logits = torch.tensor([[[0.3, -0.2, 1.0, 0.5], [0.1, 0.4, -0.5, 0.2], [0.0, 0.0, 2.0, 0.0]]], requires_grad=True)
    old_logits = torch.tensor([[[0.3, -0.2, 2.0, 0.5], [0.1, 0.4, -0.3, 0.2], [0.0, 0.0, 2.3, 0.0]]])
    ref_logits = torch.zeros(1, 3, 4)  # the reference: with the KL weight 0 it must not matter
    tokens = torch.tensor([[1, 3, stop]])
    mask, zeros = torch.ones(1, 3), torch.zeros(1, 3)
    advantages = torch.tensor([[0.7, -1.3, 0.4]])
    trainer = make_trainer(PPOConfig(batch_size=1, mini_batch_size=1, kl_mode="loss", init_kl_coef=0.0,
                                     value_baseline=False, stop_token_id=stop, pg_on_content=False))
    lp, old_lp = logprobs_from_logits(logits, tokens), logprobs_from_logits(old_logits, tokens)
    p, p_old = torch.softmax(logits.detach(), -1), torch.softmax(old_logits, -1)
    ps, ps_old = p[0, :, stop], p_old[0, :, stop]
    # the ratio of the stop decisions: (1 - p) / (1 - p_old) where the story went on, p / p_old where it stopped
    ratio = torch.cat([(1 - ps[:2]) / (1 - ps_old[:2]), ps[2:] / ps_old[2:]])
    assert ratio[0] > 1.2 and 0.8 < ratio[1] < 1.2 and ratio[2] < 1  # A > 0 above 1.2 is clipped; the rest not
    loss, stats = trainer.compute_loss(old_lp, zeros, lp, logits, zeros, mask, advantages, zeros,
                                       logprobs_from_logits(ref_logits, tokens), torch.log_softmax(ref_logits, -1)[
                                           ..., stop], tokens == stop, torch.log_softmax(old_logits, -1)[..., stop])
    loss.backward()
    a = advantages[0]
    want_loss = (-a[0] * 1.2 - a[1] * ratio[1] - a[2] * ratio[2]) / 3
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    assert stats["policy"]["clipfrac"].item() == pytest.approx(1 / 3)
    # position 0: clipped, no gradient. Position 1 went on: d/dz of -A r log(1 - p) / 3 = -A r p_j p / ((1 - p) 3)
    # for the other tokens j and A r p / 3 for the stop's own logit. Position 2 stopped: -A r (1[j = stop] - p_j) / 3
    assert torch.all(logits.grad[0, 0] == 0)
    want = -a[1] * ratio[1] * p[0, 1] * ps[1] / ((1 - ps[1]) * 3)
    want[stop] = a[1] * ratio[1] * ps[1] / 3
    torch.testing.assert_close(logits.grad[0, 1], want, atol=1e-6, rtol=1e-5)
    want = -a[2] * ratio[2] * (torch.nn.functional.one_hot(torch.tensor(stop), 4) - p[0, 2]) / 3
    torch.testing.assert_close(logits.grad[0, 2], want, atol=1e-6, rtol=1e-5)
    # with the content in the policy gradient (the default) the loss is on the sampled token, its ratio
    # p(token) / p_old(token): -A r (1[j = token] - p_j) / 3 where unclipped
    logits.grad = None
    trainer = make_trainer(PPOConfig(batch_size=1, mini_batch_size=1, kl_mode="loss", init_kl_coef=0.0,
                                     value_baseline=False, stop_token_id=stop))
    trainer.compute_loss(old_lp, zeros, logprobs_from_logits(logits, tokens), logits, zeros, mask, advantages,
                         zeros, logprobs_from_logits(ref_logits, tokens), None, tokens == stop, None)[0].backward()
    r = (lp - old_lp).exp().detach()[0]
    assert r[0] > 1.2 and 0.8 < r[1] < 1.2  # position 0 (A > 0) clipped, position 1 not
    assert torch.all(logits.grad[0, 0] == 0)
    want = -a[1] * r[1] * (torch.nn.functional.one_hot(tokens[0, 1], 4) - p[0, 1]) / 3
    torch.testing.assert_close(logits.grad[0, 1], want, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="stop_token_id"):
        make_trainer(PPOConfig(batch_size=1, mini_batch_size=1, pg_on_content=False))


def test_stop_diagnostics_by_hand():
    """The stop diagnostics of one row: response positions 1..4 (story lengths 2..5), target length 4 +- 1."""
    masks = torch.tensor([[0.0, 1, 1, 1, 1]])
    p = torch.tensor([[0.5, 0.1, 0.2, 0.4, 0.8]])
    q = torch.tensor([[0.5, 0.1, 0.1, 0.2, 0.5]])
    logprobs = torch.tensor([[0.0, -1.0, -1.0, -2.0, math.log(0.8)]])
    ref_logprobs = torch.tensor([[0.0, -1.0, -1.5, -1.0, math.log(0.5)]])
    is_stop = torch.tensor([[False, False, False, False, True]])  # stops after 5 tokens
    adv = torch.tensor([[0.0, 0.3, -0.2, 0.5, -1.0]])
    batch = dict(logprobs=logprobs, ref_logprobs=ref_logprobs, stop_logprobs=p.log(), ref_stop_logprobs=q.log(),
                 is_stop=is_stop, masks=masks, values=torch.tensor([[0.0, 1, 1, 1, 1]]),
                 returns=torch.tensor([[0.0, 1, 1, 1, 3]]), advantages=adv, kl_coef=0.5)
    d = stop_diagnostics(batch, target_length=4, width=1)
    # near the target: story lengths 3, 4, 5 (positions 2, 3, 4)
    assert d["stop/p_policy_near_target"] == pytest.approx((0.2 + 0.4 + 0.8) / 3)
    assert d["stop/p_ref_near_target"] == pytest.approx((0.1 + 0.2 + 0.5) / 3)
    assert stop_diagnostics(batch, 4, kl_on_stop=False, width=1)["stop/grad_kl_near_target"] == 0.0
    assert d["stop/adv_end_near"] == pytest.approx(-1.0) and d["stop/adv_end_short"] == 0.0
    assert d["stop/value_error_last10"] == pytest.approx(4 / 4)
    binary = sum(a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))
                 for a, b in zip(p[0, 1:].tolist(), q[0, 1:].tolist()))
    assert d["stop/kl_stop_decisions"] == pytest.approx(binary, rel=1e-4)
    k1 = (logprobs - ref_logprobs)[0, 1:].sum().item()
    assert d["stop/beta_k"] == pytest.approx(0.5 * k1 / 4, rel=1e-5)


def test_stop_diagnostics_are_the_losss_gradient_on_the_stop_logit():
    """grad_pg/grad_kl_near_target equal autograd's derivative of the step's loss (policy part, k3 KL part) with
    respect to the stop logit, summed over the positions near the target, on two rows of different lengths."""
    stop, beta = 2, 0.3
    g = torch.Generator().manual_seed(0)
    logits, ref_logits = torch.randn(2, 6, 5, generator=g), torch.randn(2, 6, 5, generator=g)
    masks = torch.tensor([[1.0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    tokens = torch.tensor([[1, 3, 4, stop, 0, 0], [4, 1, 3, 0, 1, stop]])
    adv = torch.randn(2, 6, generator=g) * masks
    zeros = torch.zeros(2, 6)
    lp, ref_lp = logprobs_from_logits(logits, tokens), logprobs_from_logits(ref_logits, tokens)

    def stop_logit_grad(kl_coef, advantages):  # d loss / d stop logit at the old policy (ratio 1)
        z = logits.clone().requires_grad_(True)
        trainer = make_trainer(PPOConfig(batch_size=2, mini_batch_size=2, kl_mode="loss", init_kl_coef=kl_coef,
                                         value_baseline=False))
        trainer.compute_loss(lp, zeros, logprobs_from_logits(z, tokens), z, zeros, masks, advantages, zeros,
                             ref_lp)[0].backward()
        return z.grad[..., stop]
    batch = dict(logprobs=lp, ref_logprobs=ref_lp, stop_logprobs=torch.log_softmax(logits, -1)[..., stop],
                 ref_stop_logprobs=torch.log_softmax(ref_logits, -1)[..., stop], is_stop=tokens == stop, masks=masks,
                 values=zeros, returns=zeros, advantages=adv, kl_coef=beta)
    d = stop_diagnostics(batch, target_length=4, width=1)
    near = torch.zeros(2, 6)
    near[:, 2:5] = 1  # stories of 3..5 tokens: columns 2..4
    near *= masks  # row 0 has columns 2, 3; row 1 columns 2, 3, 4
    assert d["stop/grad_pg_near_target"] == pytest.approx((stop_logit_grad(0.0, adv) * near).sum().item(), rel=1e-5)
    assert d["stop/grad_kl_near_target"] == pytest.approx((stop_logit_grad(beta, zeros) * near).sum().item(),
                                                          rel=1e-5)
    p = torch.softmax(logits, -1)[..., stop]
    assert d["stop/p_policy_near_target"] == pytest.approx(((p * near).sum() / 5).item())


def test_empty_response_gets_no_score_and_does_not_crash():
    trainer = make_trainer(PPOConfig(batch_size=1, mini_batch_size=1))
    rewards, _ = trainer.compute_rewards(torch.tensor([5.0]), torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 3))
    assert rewards.abs().sum() == 0


def _loss_inputs(ratio, adv, vpred=0.0, value=0.0, ret=1.0):
    old = torch.zeros(1, 1)
    return dict(old_logprobs=old, values=torch.full((1, 1), value), logprobs=old + math.log(ratio),
                logits=torch.zeros(1, 1, 4), vpreds=torch.full((1, 1), vpred), mask=torch.ones(1, 1),
                advantages=torch.full((1, 1), adv), returns=torch.full((1, 1), ret))


@pytest.mark.parametrize("ratio, adv, clipped", [
    (1.1, 1.0, False),   # inside the trust region: plain -A * ratio
    (1.5, 1.0, True),    # positive advantage, ratio above 1 + eps: clipped to 1.2
    (0.5, -1.0, True),   # negative advantage, ratio below 1 - eps: clipped to 0.8
    (0.5, 1.0, False),   # pessimistic bound picks the unclipped term
])
def test_clipped_policy_loss(ratio, adv, clipped):
    trainer = make_trainer(PPOConfig(batch_size=1, mini_batch_size=1, cliprange=0.2, vf_coef=0.0))
    loss, stats = trainer.compute_loss(**_loss_inputs(ratio, adv))
    want = -adv * (min(max(ratio, 0.8), 1.2) if clipped else ratio)
    assert stats["loss"]["policy"].item() == pytest.approx(want, rel=1e-5)
    assert stats["policy"]["clipfrac"].item() == float(clipped)


@pytest.mark.parametrize("vpred, clipped", [(0.1, False), (0.5, True)])
def test_clipped_value_loss(vpred, clipped):
    trainer = make_trainer(PPOConfig(batch_size=1, mini_batch_size=1, cliprange_value=0.2, vf_coef=0.1))
    loss, stats = trainer.compute_loss(**_loss_inputs(1.0, 0.0, vpred=vpred, value=0.0, ret=-1.0))
    # returns -1: moving vpred up is wrong; clipping can only make the loss larger (max of the two)
    unclipped, clipped_term = (vpred + 1) ** 2, (min(vpred, 0.2) + 1) ** 2
    assert stats["loss"]["value"].item() == pytest.approx(0.5 * max(unclipped, clipped_term), rel=1e-5)
    assert stats["val"]["clipfrac"].item() == 0.0  # vf_losses2 > vf_losses1 never holds here
    loss2, stats2 = trainer.compute_loss(**_loss_inputs(1.0, 0.0, vpred=vpred, value=0.0, ret=1.0))
    # returns +1: the clipped prediction is further from the target, the clipped loss counts
    assert stats2["val"]["clipfrac"].item() == float(clipped)
    assert loss2.item() == pytest.approx(0.1 * 0.5 * (1 - min(vpred, 0.2)) ** 2, rel=1e-5)


def test_ratio_threshold_skips_the_minibatch():
    trainer = make_trainer(PPOConfig(batch_size=1, mini_batch_size=1, ratio_threshold=2.0))
    loss, stats = trainer.compute_loss(**_loss_inputs(5.0, 1.0))
    assert loss.item() == 0.0 and stats["policy"]["skipped"] == 1.0


def test_repeated_ngram_rate_by_hand():
    assert repeated_ngram_rate([1, 2, 3, 4, 5]) == 0.0  # 3 distinct 3-grams
    assert repeated_ngram_rate([1, 2, 3, 1, 2, 3]) == pytest.approx(1 / 4)  # (1,2,3) twice among 4
    assert repeated_ngram_rate([7, 7, 7, 7, 7]) == pytest.approx(2 / 3)  # (7,7,7) three times: 2 repeats
    assert repeated_ngram_rate([1, 2, 1, 2, 1], n=2) == pytest.approx(2 / 4)
    assert repeated_ngram_rate([1, 2, 3]) == 0.0 and repeated_ngram_rate([]) == 0.0  # fewer than two 3-grams


def test_reference_nll_and_rollout_metrics_by_hand():
    """rollout/ref_nll is the mean negative log-likelihood of the response tokens under the frozen reference;
    ended_frac, length_std and rep3_rate describe the stories ppo_iteration generated."""
    trainer = make_trainer(PPOConfig(batch_size=8, mini_batch_size=4, ppo_epochs=1))
    queries, responses, scores = rollouts(8)
    stats = trainer.step(queries, responses, scores)
    total, count = 0.0, 0
    for q, r in zip(queries, responses):
        ids = torch.cat([q, r])
        logp = torch.log_softmax(trainer.ref_model(ids[None]).logits[0].double(), -1)
        for t in range(len(q), len(ids)):
            total -= logp[t - 1, ids[t]].item()
            count += 1
    assert stats["rollout/ref_nll"] == pytest.approx(total / count, rel=1e-5)
    # before the first update the policy is the reference
    assert stats["rollout/policy_nll"] == pytest.approx(stats["rollout/ref_nll"], rel=1e-5)

    # ppo_iteration: two rollouts end with the stop token (2), two run out of budget
    trainer = make_trainer(PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=1))
    canned = [[5, 6, 5, 6, 5, 2], [7, 8, 9], [4, 2], [3, 3, 3, 3, 3, 3, 3]]
    import ppo as ppo_module
    real = ppo_module.generate_withcache
    ppo_module.generate_withcache = lambda *a, **k: [list(r) for r in canned]
    try:
        lengths = []
        stats = ppo_iteration(trainer, trainer.model, [[1], [1], [1, 4], [1]], lambda n: lengths.append(n) or -n / 10,
                              max_gen_len=4, stop_id=2)
    finally:
        ppo_module.generate_withcache = real
    assert lengths == [6, 4, 3, 8]  # query + response, the end token not counted
    # a median apart from the mean: a swap of the two would show
    assert stats["ended_frac"] == 0.5 and stats["length_mean"] == 5.25 and stats["length_median"] == 5.0
    assert stats["length_std"] == pytest.approx(math.sqrt((0.75 ** 2 + 1.25 ** 2 + 2.25 ** 2 + 2.75 ** 2) / 3))
    # stories [1,5,6,5,6,5] (3-grams 156 565 656 565: one repeat of 4), [1,7,8,9] (0), [1,4,4] (0),
    # [1,3,3,3,3,3,3,3] (133 and five 333: four repeats of 6)
    assert stats["rep3_rate"] == pytest.approx((1 / 4 + 0 + 0 + 4 / 6) / 4)


def test_adaptive_kl_controller_moves_both_ways():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(12.0, n_steps=400)
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 400 / 10000))  # error clipped at +20%
    up = ctl.value
    ctl.update(3.0, n_steps=400)
    assert ctl.value < up
    # a horizon suited to the batch: 512 rollouts, 128 per step, so at most 5% per step
    ctl = AdaptiveKLController(0.2, target=8.0, horizon=512)
    ctl.update(4.0, n_steps=128)  # error 4/8 - 1 = -0.5, clipped to -0.2: 0.2 * (1 - 0.2 * 128/512)
    assert ctl.value == pytest.approx(0.19)
    ctl.update(9.0, n_steps=128)  # error +0.125: * (1 + 0.125 / 4)
    assert ctl.value == pytest.approx(0.19 * 1.03125)
    fixed = FixedKLController(0.3)
    fixed.update(100.0, 400)
    assert fixed.value == 0.3


def test_dual_kl_controller_by_hand():
    """Dual ascent on KL <= target: beta += init_kl_coef x clip(KL / target - 1, -1, 1) x n / horizon, floored at 0,
    and the trainer picks it with adap_kl_rule="dual"."""
    ctl = DualKLController(0.1, target=8.0, horizon=512)
    ctl.update(12.0, n_steps=128)  # error +0.5: 0.1 + 0.1 * 0.5 / 4
    assert ctl.value == pytest.approx(0.1125)
    ctl.update(40.0, n_steps=128)  # error +4, clipped to +1: + 0.025
    assert ctl.value == pytest.approx(0.1375)
    ctl.update(6.0, n_steps=256)  # error -0.25: - 0.1 * 0.25 / 2
    assert ctl.value == pytest.approx(0.125)
    for _ in range(6):  # no KL at all: -0.025 per step, then stuck at 0 rather than negative
        ctl.update(0.0, n_steps=128)
    assert ctl.value == 0.0
    ctl.update(16.0, n_steps=128)  # and back up from 0 when the KL is over its budget
    assert ctl.value == pytest.approx(0.025)
    trainer = make_trainer(PPOConfig(batch_size=8, mini_batch_size=4, adap_kl_rule="dual", init_kl_coef=0.05))
    assert isinstance(trainer.kl_ctl, DualKLController) and trainer.kl_ctl.value == 0.05
    with pytest.raises(ValueError, match="adap_kl_rule"):
        PPOConfig(adap_kl_rule="pid")


def test_kl_coefficient_bounds_hold_after_each_update():
    """kl_coef_min/max clamp the adaptive beta after every update, for either rule, and step() updates through them."""
    def trainer(rule, **bounds):
        return make_trainer(PPOConfig(batch_size=8, mini_batch_size=4, adap_kl_rule=rule, init_kl_coef=0.1,
                                      target=8.0, horizon=512, **bounds))
    t = trainer("trl", kl_coef_min=0.09, kl_coef_max=0.105)
    t.update_kl_coef(12.0, 128)  # +0.5, clipped to +0.2: 0.1 x 1.05 = 0.105, at the ceiling
    assert t.kl_ctl.value == pytest.approx(0.105)
    t.update_kl_coef(12.0, 128)  # would be 0.11025: held at 0.105
    assert t.kl_ctl.value == 0.105
    for _ in range(3):  # error -1, clipped to -0.2: x 0.95 each, 0.105 -> 0.09975 -> 0.09476 -> 0.09002
        t.update_kl_coef(0.0, 128)
    assert t.kl_ctl.value == pytest.approx(0.105 * 0.95 ** 3)
    t.update_kl_coef(0.0, 128)  # would be 0.08552
    assert t.kl_ctl.value == 0.09  # held at the floor
    t = trainer("dual", kl_coef_min=0.06, kl_coef_max=0.12)
    t.update_kl_coef(40.0, 512)  # error clipped at +1: 0.1 + 0.1 = 0.2, held at 0.12
    assert t.kl_ctl.value == 0.12
    t.update_kl_coef(4.0, 256)  # error -0.5: 0.12 - 0.1 x 0.5 / 2 = 0.095
    assert t.kl_ctl.value == pytest.approx(0.095)
    t.update_kl_coef(0.0, 512)  # -0.1: held at 0.06
    assert t.kl_ctl.value == 0.06
    t = trainer("trl")  # unbounded, as before
    t.update_kl_coef(12.0, 512)
    assert t.kl_ctl.value == pytest.approx(0.12)
    with pytest.raises(ValueError, match="kl_coef_min <= init_kl_coef <= kl_coef_max"):
        PPOConfig(init_kl_coef=0.2, kl_coef_max=0.1)


def test_kl_coefficient_bounds_hold_through_step():
    """step() moves beta with the KL it measured and clamps it: held at the floor when the KL is 0 (the policy is
    still the reference), at the ceiling when it is far over the target; the next step logs the clamped value."""
    def trainer():
        return make_trainer(PPOConfig(batch_size=8, mini_batch_size=4, adap_kl_rule="trl", init_kl_coef=0.1,
                                      target=0.01, horizon=8, kl_coef_min=0.09, kl_coef_max=0.105))
    t = trainer()
    stats = t.step(*rollouts(8))
    assert stats["objective/kl"] == 0.0 and stats["objective/kl_coef"] == 0.1
    assert t.kl_ctl.value == 0.09  # 0.1 x (1 - 0.2 x 8 / 8) = 0.08 unbounded
    assert t.step(*rollouts(8, seed=1))["objective/kl_coef"] == 0.09
    t = trainer()
    with torch.no_grad():  # a reference far from the policy, and the policy's own samples: KL(policy || ref) >> 0.01
        for p in t.ref_model.parameters():
            p.add_(torch.randn_like(p))
    queries = [torch.tensor([1, 5, 9])] * 8
    responses = [torch.tensor(r) for r in generate_withcache(t.model, [q.tolist() for q in queries], 10,
                                                             temperature=1.0)]
    t.model.clear_caches()
    stats = t.step(queries, responses, [torch.tensor(0.0)] * 8)
    assert stats["objective/kl"] > 1.0
    assert t.kl_ctl.value == 0.105  # 0.1 x 1.2 = 0.12 unbounded
    assert t.step(queries, responses, [torch.tensor(0.0)] * 8)["objective/kl_coef"] == 0.105


def test_length_error_learning_rate_by_hand():
    """ppo.length_error_lr: the floor inside target +- band, linear in the error beyond it, the peak from band + scale
    on, either side of the target."""
    lr = lambda n: length_error_lr(n, 200, 2e-4, 4.5e-5, 10, 50)  # noqa: E731
    assert lr(200) == lr(210) == lr(190) == 4.5e-5  # inside the band: the floor
    assert lr(235) == pytest.approx(4.5e-5 + 1.55e-4 * 25 / 50)  # 25 tokens beyond the band: half way
    assert lr(165) == lr(235)  # the same error below
    assert lr(260) == lr(300) == lr(100) == 2e-4  # 60 or more off: the peak, never above
    assert length_error_lr(230, 200, 2e-4, 2e-4, 10, 50) == 2e-4  # floor = peak: constant


def test_ppo_iteration_reports_the_length_before_the_step():
    """on_length gets the rollouts' mean story length before the step, so a learning rate set there is the one the
    step uses (train.py --lr_length_scale)."""
    trainer = make_trainer(PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=1, seed=0))
    seen = []

    def on_length(n):
        seen.append((n, trainer.optimizer.state_dict()["state"] == {}))  # no step taken yet
        for group in trainer.optimizer.param_groups:
            group["lr"] = 0.0
    before = [p.detach().clone() for p in trainer.model.parameters()]
    stats = ppo_iteration(trainer, trainer.model, [[1]] * 4, lambda n: -abs(8 - n) / 10, max_gen_len=6, stop_id=2,
                          on_length=on_length)
    assert seen == [(stats["length_mean"], True)]
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))  # the step ran at lr 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=10, mini_batch_size=4), "multiple of"),
    (dict(init_kl_coef=-0.1), "init_kl_coef must be >= 0"),
    (dict(cliprange=0.0), "cliprange must be > 0"),
    (dict(kl_penalty="js"), "kl_penalty must be"),
    (dict(kl_mode="both"), "kl_mode must be reward or loss"),
    (dict(horizon=0), "horizon must be > 0"),
    (dict(mini_batch_size=0), "mini_batch_size must be >= 1"),
    (dict(batch_size=8, mini_batch_size=4, gradient_accumulation_steps=2, backward_batch_size=4), "must equal"),
])
def test_invalid_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(**kwargs)


def test_length_sampler_and_reward():
    s = LengthSampler(0, 30, seed=1)
    draws = [s() for _ in range(2000)]
    assert min(draws) == 0 and max(draws) == 29
    state = s.state_dict()
    nxt = [s() for _ in range(5)]
    s2 = LengthSampler(0, 30, seed=99)
    s2.load_state_dict(state)
    assert [s2() for _ in range(5)] == nxt
    assert LengthReward(200)(300) == -1.0 and LengthReward(200)(200) == 0.0 and LengthReward(200)(150) == -0.5


# --- the step --------------------------------------------------------------------------------------

def test_first_minibatch_ratio_is_exactly_one_and_nothing_is_clipped():
    trainer = make_trainer()
    seen = []
    original = trainer.compute_loss

    def spy(*args):
        loss, stats = original(*args)
        seen.append(stats)
        return loss, stats

    trainer.compute_loss = spy
    trainer.step(*rollouts(8))
    first = seen[0]
    assert first["policy"]["ratio"] == 1.0
    assert first["policy"]["clipfrac"].item() == 0.0 and first["val"]["clipfrac"].item() == 0.0
    assert first["policy"]["policykl"].item() == 0.0


def test_forward_pass_by_length_equals_the_full_width_batch():
    """The no-grad pass takes the rows in order of length, each chunk cut to its own width: every response token's
    log-prob, value and stop log-prob is the full-width batch's, bit for bit (it fails if a chunk's width is not a
    multiple of the attention's chunk, or a row's outputs land in another row)."""
    cfg = PPOConfig(batch_size=16, mini_batch_size=4, stop_token_id=3)
    trainer = make_trainer(cfg)
    queries, responses, _ = rollouts(16, r_len=(1, 58))
    inputs = trainer.prepare_model_inputs(queries, responses)
    assert max(len(q) + len(r) for q, r in zip(queries, responses)) - \
        min(len(q) + len(r) for q, r in zip(queries, responses)) > 32  # several widths
    with torch.no_grad():
        logprobs, _, values, masks, stop_logprobs = trainer.batched_forward_pass(trainer.model, queries, responses,
                                                                                 inputs)
        out = trainer.model(inputs["input_ids"])
    logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
    expected = torch.gather(logp, 2, inputs["input_ids"][:, 1:].unsqueeze(2)).squeeze(-1)
    on = masks.bool()
    assert on.sum() == sum(len(r) for r in responses)
    assert torch.equal(logprobs[on], expected[on])
    assert torch.equal(values[on], out.values[:, :-1].float()[on])
    assert torch.equal(stop_logprobs[on], logp[..., 3][on])


def test_forward_by_length_keeps_the_rows_order_and_numbers():
    """Rows in any order, groups of 3 in order of length: each row's logits and values are the full-width batch's,
    bit for bit, in the caller's order; the padding is 0."""
    trainer = make_trainer()
    g = torch.Generator().manual_seed(1)
    lengths = [50, 5, 63, 20, 33, 12, 40, 7, 60, 28]  # out of order; the shortest three fit in 32 columns
    ids = torch.zeros(10, 64, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, 32, (n,), generator=g)
    with torch.no_grad():
        full = trainer.model(ids)
        logits, values = forward_by_length(lambda x: trainer._forward(trainer.model, x), ids, lengths, 3)
    assert logits.shape == full.logits.shape and values.shape == full.values.shape
    for i, n in enumerate(lengths):
        assert torch.equal(logits[i, :n], full.logits[i, :n]) and torch.equal(values[i, :n], full.values[i, :n])
    shortest = sorted(range(10), key=lengths.__getitem__)[:3]  # the first group
    w = -(-max(lengths[i] for i in shortest) // 32) * 32
    assert w < 64 and (logits[shortest, w:] == 0).all() and (values[shortest, w:] == 0).all()


def test_first_minibatch_ratio_is_exactly_one_with_rows_of_many_widths():
    """Each training minibatch is cut to its own width too, and forwarded in groups of similar length: its first
    ratio stays exactly 1."""
    trainer = make_trainer(PPOConfig(batch_size=16, mini_batch_size=4, forward_batch_size=2))
    seen = []
    original = trainer.compute_loss

    def spy(*args):
        loss, stats = original(*args)
        seen.append((args[5].size(1), stats))
        return loss, stats

    trainer.compute_loss = spy
    trainer.step(*rollouts(16, r_len=(1, 58)))
    assert seen[0][1]["policy"]["ratio"] == 1.0 and seen[0][1]["policy"]["policykl"].item() == 0.0
    assert len({width for width, _ in seen}) > 1  # the minibatches were cut to different widths


def test_without_a_critic_every_token_gets_its_storys_whitened_return():
    """value_baseline=False: the advantage of every response token is its story's score, whitened over the batch's
    tokens (kl_mode="loss": the score is the whole return), and the value head is left untrained."""
    cfg = PPOConfig(batch_size=8, mini_batch_size=8, ppo_epochs=1, kl_mode="loss", lam=1.0, value_baseline=False)
    trainer = make_trainer(cfg)
    head = trainer.model.value_head.weight.detach().clone()
    seen = []
    original = trainer.compute_loss

    def spy(*args, **kwargs):
        seen.append((args[5], args[6]))  # mask, advantages
        return original(*args, **kwargs)

    trainer.compute_loss = spy
    queries, responses, scores = rollouts(8)
    trainer.step(queries, responses, scores)
    mask, adv = seen[0]
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(cfg.seed)).tolist()  # the step's shuffle,
    perm = sorted(perm, key=lambda i: len(queries[i]) + len(responses[i]))  # then each minibatch by length
    lengths = torch.tensor([len(responses[i]) for i in perm], dtype=torch.float32)
    s = torch.stack(scores)[perm]
    mean = (s * lengths).sum() / lengths.sum()  # over tokens
    var = ((s - mean) ** 2 * lengths).sum() / (lengths.sum() - 1)
    expected = (s - mean) / var.sqrt()
    for i in range(8):
        on = mask[i] > 0
        torch.testing.assert_close(adv[i][on], expected[i].expand(int(on.sum())), atol=1e-4, rtol=1e-4)
    assert torch.equal(trainer.model.value_head.weight, head)
    # with the critic (the default) the value head learns
    trainer = make_trainer(PPOConfig(batch_size=8, mini_batch_size=8, ppo_epochs=1, kl_mode="loss", lam=1.0))
    trainer.step(*rollouts(8))
    assert not torch.equal(trainer.model.value_head.weight, head)


def test_step_stats_and_kl_coefficient_update():
    trainer = make_trainer(scaler=None)  # no GradScaler: must work
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    stats = trainer.step(*rollouts(8))
    seed_keys = ["ppo/loss/policy", "ppo/loss/value", "ppo/loss/total", "ppo/policy/entropy", "ppo/policy/policykl",
                 "ppo/policy/clipfrac", "ppo/policy/advantages_mean", "ppo/returns/mean", "ppo/returns/var",
                 "ppo/val/vpred", "ppo/val/error", "ppo/val/clipfrac", "ppo/val/mean", "ppo/val/var",
                 "ppo/learning_rate", "ppo/kl_ref", "ppo/reward_all", "objective/kl_coef", "time/ppo/total"]
    assert all(k in stats and math.isfinite(stats[k]) for k in seed_keys), [k for k in seed_keys if k not in stats]
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    # the controller was updated with the measured KL (0 at the first step: below target, so it shrinks)
    assert stats["ppo/kl_ref"] == 0.0 and trainer.kl_ctl.value < 0.2
    stats2 = trainer.step(*rollouts(8, seed=1))
    assert stats2["ppo/kl_ref"] != 0.0  # the policy moved away from the reference (these tokens are not
    # sampled from the policy, so the sampled KL estimate may take either sign)
    assert stats2["objective/kl_coef"] == pytest.approx(trainer.kl_ctl.value / (1 + max(-0.2, min(0.2, stats2["ppo/kl_ref"] / 6 - 1)) * 8 / 10000))


def test_response_masks_and_one_token_responses():
    trainer = make_trainer()
    q, r, s = rollouts(8, r_len=(1, 2))  # one-token responses everywhere
    masks = [torch.ones(len(x)) for x in r]
    stats = trainer.step(q, r, s, response_masks=masks)
    assert math.isfinite(stats["ppo/loss/total"])


def test_early_stopping_uses_the_epoch_mean_kl():
    cfg = PPOConfig(batch_size=8, mini_batch_size=4, ppo_epochs=4, early_stopping=True, target_kl=0.0)
    stats = make_trainer(cfg).step(*rollouts(8))
    assert stats["ppo/epochs"] == 1.0  # any positive KL exceeds 1.5 * 0 after the first epoch
    cfg = PPOConfig(batch_size=8, mini_batch_size=4, ppo_epochs=4, early_stopping=True, target_kl=100.0)
    assert make_trainer(cfg).step(*rollouts(8))["ppo/epochs"] == 4.0


def test_ddp_sync_flag_is_set_before_the_forward_of_the_last_micro_batch():
    cfg = PPOConfig(batch_size=8, mini_batch_size=2, gradient_accumulation_steps=2)
    trainer = make_trainer(cfg)
    trainer.is_ddp = True
    trainer._all_reduce_mean = lambda x: x  # no process group in this test
    model = trainer.model
    flags = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model
            self.require_backward_grad_sync = True

        def forward(self, x):
            if torch.is_grad_enabled():
                flags.append(self.require_backward_grad_sync)
            return self.inner(x)

    trainer.model = Recorder()
    trainer.step(*rollouts(8))
    assert flags[:4] == [False, True, False, True]  # two micro-batches per optimizer step


@pytest.mark.slow
def test_ppo_lowers_the_length_when_short_stories_pay():
    """A few PPO iterations from a small random model, rewarded for short generations, end sooner."""
    torch.manual_seed(0)
    args = ModelArgs(**SMALL)
    policy = TransformerWithValueHead(args)
    ref = Transformer(args)
    ref.load_state_dict({k: v for k, v in policy.state_dict().items() if not k.startswith("value_head")})
    ref.eval().requires_grad_(False)
    cfg = PPOConfig(batch_size=32, mini_batch_size=16, ppo_epochs=4, init_kl_coef=0.05, seed=0)
    trainer = PPOTrainer(cfg, policy, ref, torch.optim.AdamW(policy.parameters(), lr=3e-3))
    eos, gen = torch.Generator().manual_seed(0), 24
    mean_lengths = []
    for it in range(8):
        queries = [[1] for _ in range(32)]
        policy.eval()
        responses = generate_withcache(policy, queries, gen, temperature=1.0, eos_id=2, generator=eos)
        policy.train()
        ended = [len(r) < gen for r in responses]
        lengths = [len(r) for r in responses]
        mean_lengths.append(sum(lengths) / len(lengths))
        responses = [r + [2] if e else r for r, e in zip(responses, ended)]
        trainer.step([torch.tensor(q) for q in queries], [torch.tensor(r) for r in responses],
                     [torch.tensor(-n / 10) for n in lengths])
    assert mean_lengths[-1] < 0.5 * mean_lengths[0], mean_lengths


@pytest.fixture(scope="module")
def length_reference():
    """A small model pre-trained on "stories" of 10-29 random tokens, each ended by the stop token 2 (the next begins
    with 1): a reference with its own length distribution (mean ~19.5) and the position sense to stop anywhere, as
    stories260K is for the seed's experiment. Its state_dict; ~5 s on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        ref, g = Transformer(ModelArgs(**SMALL)), torch.Generator().manual_seed(0)
        optimizer = torch.optim.AdamW(ref.parameters(), lr=3e-3)
        for _ in range(300):
            rows = []
            for _ in range(32):
                row = [1]
                while len(row) < 49:
                    row += torch.randint(3, 32, (int(torch.randint(10, 30, (1,), generator=g)),), generator=g).tolist()
                    row += [2, 1]
                rows.append(row[:49])
            x = torch.tensor(rows)
            loss = ref(x[:, :-1].contiguous(), x[:, 1:].contiguous()).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 3.3  # log(29) = 3.37 for the random tokens; the stops are learnt
    return ref.state_dict()


def run_length_ppo(reference_state, seed, iterations=40, target=14, peak_lr=2e-3, **config):
    """The CPU recipe's control (config/ppo_length_cpu.py) in miniature: KL in the loss without the stop decision,
    beta adaptive within [0.06, 0.12], no critic (each story's whitened score is its tokens' advantage), the policy
    gradient on the stop decisions only, learning rate cosine to 30% of the peak over 8 iterations, then constant.
    64 rollouts of the reference's fine-tuned copy per iteration, reward -|target - length| / 10.
    Returns the mean lengths, betas and learning rates per iteration."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic on every machine
    try:
        ref = Transformer(ModelArgs(**SMALL))
        ref.load_state_dict(reference_state)
        ref.eval().requires_grad_(False)
        torch.manual_seed(seed)
        policy = TransformerWithValueHead(ModelArgs(**SMALL))
        policy.load_state_dict(reference_state, strict=False)  # the value head keeps its fresh initialisation
        settings = dict(batch_size=64, mini_batch_size=32, ppo_epochs=1, lam=1.0, value_baseline=False,
                        pg_on_content=False, kl_mode="loss", kl_on_stop=False,
                        stop_token_id=2, adap_kl_ctrl=True, init_kl_coef=0.1, target=2.0, horizon=640,
                        kl_coef_min=0.06, kl_coef_max=0.12, seed=seed)
        settings.update(config)
        trainer = PPOTrainer(PPOConfig(**settings), policy, ref, torch.optim.AdamW(policy.parameters(), lr=peak_lr))
        lengths, betas, lrs = [], [], []
        for it in range(iterations):
            lr = cosine_lr(it, peak_lr, 0.3 * peak_lr, 0, 8)
            for group in trainer.optimizer.param_groups:
                group["lr"] = lr
            stats = ppo_iteration(trainer, policy, [[1]] * 64, lambda n: -abs(target - n) / 10, max_gen_len=40,
                                  stop_id=2)
            lengths.append(stats["length_mean"])
            betas.append(stats["objective/kl_coef"])
            lrs.append(stats["ppo/learning_rate"])  # the rate the step ran with, as the run logs it
    finally:
        torch.set_num_threads(threads)
    return lengths, betas, lrs


@pytest.mark.parametrize("seed", [0, 1])
def test_ppo_reaches_a_target_length_and_holds_it_by_control(length_reference, seed):
    """The holding property, seeded, on two seeds: from the reference's ~19.5 tokens the mean length reaches
    14 +- 1 within 5 iterations, then stays in that band for >= 30 of the 40 iterations in a row and never leaves
    14 +- 3, while the learning rate stays >= 20% of its peak (held by control, not by freezing) and beta inside its
    bounds."""
    lengths, betas, lrs = run_length_ppo(length_reference, seed)
    assert lengths[0] > 18, lengths
    inside = [abs(n - 14) <= 1 for n in lengths]
    reached = inside.index(True) if any(inside) else None
    assert reached is not None and reached <= 5, lengths
    longest = run = 0
    for ok in inside:
        run = run + 1 if ok else 0
        longest = max(longest, run)
    assert longest >= 30, lengths
    assert all(abs(n - 14) <= 3 for n in lengths[reached:]), lengths
    assert min(lrs) >= 0.2 * max(lrs) and all(0.06 <= b <= 0.12 for b in betas), (lrs, betas)


def test_ppo_length_leaves_the_band_when_the_kl_pulls_the_stop_decision(length_reference):
    """The contrast that shows the test above can fail, one setting changed: with a strong fixed beta (2.0) the
    recipe, whose KL leaves the decision to stop alone, still holds 14 +- 1; the same run with the KL also on the
    stop decisions (kl_on_stop=True) is pulled towards the reference's longer stories and sits above 14 + 1
    (docs/ppo-length.md, "Holding the band": the pull on the stop decisions made the length creep up)."""
    strong = dict(adap_kl_ctrl=False, init_kl_coef=2.0, kl_coef_min=0.0, kl_coef_max=None)
    held, _, _ = run_length_ppo(length_reference, 0, kl_on_stop=False, **strong)
    pulled, _, _ = run_length_ppo(length_reference, 0, kl_on_stop=True, **strong)
    assert abs(sum(held[-20:]) / 20 - 14) <= 1, held
    assert sum(pulled[-20:]) / 20 > 15, pulled


# --- train.py --ppo=True, single process and torchrun ----------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(synthetic_data):
    """The test session's generated TinyStories-like data and tokenizer, and a briefly pre-trained tiny model in
    ppo_base/ckpt.pt."""
    root, env = synthetic_data
    model = ["--vocab_source=custom", "--vocab_size=300", "--dim=32", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2",
             "--multiple_of=4", "--max_seq_len=128", "--device=cpu", "--compile=False"]
    out = root / "ppo_base"
    run([script("train.py"), f"--out_dir={out}", *model, "--batch_size=16", "--gradient_accumulation_steps=1",
         "--max_iters=30", "--eval_interval=30", "--eval_iters=2", "--learning_rate=3e-3", "--warmup_iters=3"], env=env)
    return root, env, model


PPO_FLAGS = ["--ppo=True", "--init_from=resume", "--batch_size=8", "--rollouts=16", "--start_len=8",
             "--max_gen_len=40", "--target_len=30", "--learning_rate=1e-3", "--decay_lr=False", "--eval_iters=1",
             "--ppo_epochs=2", "--gradient_accumulation_steps=1"]


@pytest.mark.slow
def test_train_py_ppo_runs_saves_and_resumes(tiny_run, tmp_path):
    import json
    root, env, model = tiny_run
    out = tmp_path / "out"
    shutil.copytree(root / "ppo_base", out)
    # a cosine schedule over the PPO run's own iterations (30..33), not over the pre-training count
    schedule = ["--decay_lr=True", "--warmup_iters=0", "--min_lr=1e-4"]
    run([script("train.py"), f"--out_dir={out}", *model, *PPO_FLAGS, *schedule, "--max_iters=33", "--eval_interval=2"],
        env=env)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    ppo_rows = [r for r in rows if "reward_mean" in r]
    assert [r["iter"] for r in ppo_rows] == [30, 31, 32, 33]
    assert [r["lr"] for r in ppo_rows] == pytest.approx([1e-3, 1e-4 + 0.75 * 9e-4, 1e-4 + 0.25 * 9e-4, 1e-4])
    assert all(k in ppo_rows[0] for k in ("rollout/ref_nll", "rep3_rate", "ended_frac", "length_std"))
    assert all(k in ppo_rows[0] for k in ("iter", "reward_mean", "length_mean", "kl_ref", "kl_coef", "entropy", "time_s"))
    assert (out / "ppo_ckpt.pt").exists()
    ck = torch.load(out / "ppo_ckpt.pt", weights_only=True)
    assert "value_head.weight" in ck["model"] and ck["ppo_state"]["kl_coef"] > 0
    # resume continues the PPO run (its iteration, policy and KL coefficient), not the pre-training one
    assert ck["ppo_state"]["start_iter"] == 30
    # the end of the run is saved too (ppo_last.pt, the newer file): --max_iters=more continues from there
    last = torch.load(out / "ppo_last.pt", weights_only=True)
    assert last["iter_num"] == 34 and last["ppo_state"]["start_iter"] == 30
    proc = run([script("train.py"), f"--out_dir={out}", *model, *PPO_FLAGS, *schedule, "--max_iters=35",
                "--eval_interval=100"], env=env)
    assert f"Resuming training from {out / 'ppo_last.pt'}" in proc.stdout
    assert "34 | reward" in proc.stdout and "33 | reward" not in proc.stdout
    rows = [r for r in map(json.loads, open(out / "metrics.jsonl")) if "reward_mean" in r]
    assert [r["iter"] for r in rows] == [30, 31, 32, 33, 34, 35]  # the first run's lines, then the new one's
    assert rows[-2]["lr"] == pytest.approx(cosine_lr(34 - 30, 1e-3, 1e-4, 0, 35 - 30))  # still counts from 30


@pytest.mark.slow
def test_train_py_ppo_killed_anywhere_resumes_bitwise(tiny_run, tmp_path):
    """kill -9 three times: halfway through a save of ppo_last.pt, then twice at a random moment, each time followed
    by --init_from=resume. The run ends bitwise where the uninterrupted one ends (weights, optimizer, KL coefficient,
    minibatch order, query sampler, the best policy and the metrics), and each kill costs at most the iteration it
    interrupted (--resume_every=0: where the run is, saved after every iteration)."""
    import random
    import re
    root, env, model = tiny_run
    flags = [*model, *PPO_FLAGS, "--max_iters=37", "--eval_interval=3", "--resume_every=0"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for d in (straight, killed):
        shutil.copytree(root / "ppo_base", d)
    run([script("train.py"), f"--out_dir={straight}", *flags], env=env)
    # then at a random iteration's log line, and a random moment after it (an iteration here takes ~0.1 s)
    rng = random.Random(0)
    kills = [dict(die_at_save=2, save_name="ppo_last.pt")] + [
        dict(kill_at=rf"^{rng.randint(first, first + 1)} \| reward", delay=rng.uniform(0.0, 0.08))
        for first in (32, 34)]
    done = []  # the iterations each run finished, in order
    for kill in kills:
        code, out = killed_run([script("train.py"), f"--out_dir={killed}", *flags], env, **kill)
        assert code in (137, -9), out[-2000:]
        done += re.findall(r"^(\d+) \| reward", out, re.M)
    out = run([script("train.py"), f"--out_dir={killed}", *flags], env=env).stdout
    done += re.findall(r"^(\d+) \| reward", out, re.M)
    assert "Resuming training from" in out
    assert 0 <= len(done) - 8 <= len(kills), done  # iterations 30..37 once, plus at most one per kill
    for name in ("ppo_last.pt", "ppo_ckpt.pt"):
        a, b = (torch.load(d / name, weights_only=True) for d in (straight, killed))
        for ck in (a, b):  # the settings that differ by design
            del ck["config"]["out_dir"], ck["config"]["resume_every"]
        assert first_difference(a, b) is None, (name, first_difference(a, b))
    assert torch.load(killed / "ppo_last.pt", weights_only=True)["iter_num"] == 38
    assert logged(straight / "metrics.jsonl") == logged(killed / "metrics.jsonl")


@pytest.mark.slow
def test_train_py_ppo_takes_hold_rollouts_once_the_length_is_in_the_band(tiny_run, tmp_path):
    """--hold_rollouts: --rollouts per iteration until the mean length first comes within --target_len +-
    --length_band, then hold_rollouts, also after a resume; a band the length never enters changes nothing."""
    import json
    root, env, model = tiny_run
    for band, expected in ((1000.0, [16, 32, 32]), (0.0, [16, 16, 16])):  # every length is in / none is
        out = tmp_path / f"band{band:g}"
        shutil.copytree(root / "ppo_base", out)
        target = 30 if band else 1000  # no story of the 128-token context is 1000 tokens long
        run([script("train.py"), f"--out_dir={out}", *model, *PPO_FLAGS, "--max_iters=32", "--eval_interval=1",
             "--always_save_checkpoint=True", "--hold_rollouts=32", f"--length_band={band}", f"--target_len={target}"],
            env=env)
        rows = [r for r in map(json.loads, open(out / "metrics.jsonl")) if "reward_mean" in r]
        assert [r["rollouts"] for r in rows] == expected
        assert torch.load(out / "ppo_ckpt.pt", weights_only=True)["ppo_state"]["in_band"] == bool(band)
    # the resumed run remembers that the band was reached
    run([script("train.py"), f"--out_dir={tmp_path / 'band1000'}", *model, *PPO_FLAGS, "--max_iters=33",
         "--eval_interval=100", "--hold_rollouts=32", "--length_band=1000"], env=env)
    rows = [r for r in map(json.loads, open(tmp_path / "band1000" / "metrics.jsonl")) if "reward_mean" in r]
    assert [r["rollouts"] for r in rows][-1] == 32


@pytest.mark.slow
def test_train_py_ppo_refuses_a_tokenizer_of_another_vocabulary(tiny_run, tmp_path):
    root, env, model = tiny_run
    out = tmp_path / "out"
    shutil.copytree(root / "ppo_base", out)
    run([script("tinystories.py"), "train_vocab", "--vocab_size=320"], env={"DATA_CACHE_DIR": str(root / "data")})
    proc = run([script("train.py"), f"--out_dir={out}", *model, *PPO_FLAGS, "--max_iters=31",
                f"--tokenizer={root / 'data' / 'tok320.model'}"], env=env, check=False)
    assert proc.returncode == 1 and "has 320 tokens but the model has vocab_size=300" in proc.stderr


@pytest.mark.slow
def test_torchrun_ppo_two_processes_keep_identical_weights(tiny_run, tmp_path):
    root, env, model = tiny_run
    out = tmp_path / "out"
    shutil.copytree(root / "ppo_base", out)
    # train.py under torchrun; at the end it compares every rank's weights and fails if they differ
    proc = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script("train.py"),
                f"--out_dir={out}", *model, *PPO_FLAGS, "--max_iters=31", "--eval_interval=1",
                "--gradient_accumulation_steps=2", "--always_save_checkpoint=True"], env=env, timeout=600)
    assert "31 | reward" in proc.stdout
    assert "all 2 ranks hold identical weights" in proc.stdout
    init = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    after = torch.load(out / "ppo_ckpt.pt", weights_only=True)["model"]
    assert not torch.equal(after["layers.0.attention.wq.weight"], init["layers.0.attention.wq.weight"])


@pytest.mark.slow
def test_train_py_ppo_refuses_max_iters_not_beyond_the_checkpoint(tiny_run, tmp_path):
    """PPO's iterations count on from the checkpoint's: one that is already past --max_iters is refused in one
    line (it was a silent no-op, then a crash in the plot)."""
    root, _, _ = tiny_run
    data = tmp_path / "data"
    shutil.copytree(root / "data" / "TinyStories_all_data", data / "TinyStories_all_data")
    env = {"DATA_CACHE_DIR": str(data)}
    run([script("tinystories.py"), "pretokenize", "--vocab_size=512", "--tokenizer=stories260K/tok512.model"], env=env)
    out = tmp_path / "ppo"
    out.mkdir()
    shutil.copy(script("stories260K/stories260K.pt"), out / "ckpt.pt")
    flags = [f"--out_dir={out}", "--init_from=resume", "--ppo=True", "--vocab_source=custom", "--vocab_size=512",
             "--tokenizer=stories260K/tok512.model", "--device=cpu", "--compile=False"]
    proc = run([script("train.py"), *flags, "--max_iters=1"], env=env, check=False)
    assert proc.returncode == 1 and "--max_iters=1 is not beyond the checkpoint's iteration 98000" in proc.stderr


def test_ppo_summary_checks_each_target_of_a_run(tmp_path):
    """bench/ppo_summary.py --targets: the band reached within 1,000 rollouts, >= 40 consecutive iterations in it,
    none outside target +- 20 after reaching it, final kl_ref <= 10 and entropy >= 1.0, learning rate >= 20% of its
    peak after reaching it, loop <= 900 s; each checked on a hand-made metrics.jsonl."""
    import importlib.util
    import json
    import os
    spec = importlib.util.spec_from_file_location("ppo_summary", os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "ppo_summary.py"))
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)

    def write(name, lengths, lrs, kl=9.0, entropy=1.2, time_s=10.0):
        path = tmp_path / name
        with open(path, "w") as f:
            for i, (n, lr) in enumerate(zip(lengths, lrs)):
                f.write(json.dumps({"iter": 98000 + i, "reward_mean": -abs(n - 200) / 100, "length_mean": n,
                                    "rollouts": 128, "lr": lr, "kl_ref": kl, "entropy": entropy, "time_s": time_s})
                        + "\n")
                if i % 5 == 0:  # evaluation rows have no reward_mean and are skipped
                    f.write(json.dumps({"iter": 98000 + i, "val_loss": 1.6}) + "\n")
        return str(path)

    good = [300, 260, 230, 205] + [200 + (i % 5) for i in range(56)]  # in the band from index 3 (512 rollouts)
    lrs = [1.5e-4, 1.2e-4, 9e-5] + [3.5e-5] * 57
    s = summary.summarise(write("good.jsonl", good, lrs))
    assert (s["reached"], s["rollouts"], s["longest"], s["left_after_reached"]) == (3, 512, 57, [])
    assert s["lr_floor"] == pytest.approx(3.5e-5 / 1.5e-4) and s["seconds"] == 600
    assert all(summary.check_targets(s).values())
    bad = good[:30] + [215] + good[31:40] + [225] + good[41:]  # out of the band at 30, outside +- 20 at 40
    s = summary.summarise(write("bad.jsonl", bad, [1.5e-4] * 3 + [2e-5] * 57, kl=10.5, entropy=0.9, time_s=16))
    ok = summary.check_targets(s)
    assert s["longest"] == 27 and s["left_after_reached"] == [40] and s["lr_floor"] == pytest.approx(2e-5 / 1.5e-4)
    assert not any(ok[k] for k in ("held", "outer", "kl", "entropy", "lr", "time")) and ok["reached"]
    late = summary.summarise(write("late.jsonl", [300] * 8 + good[3:], lrs))  # reached at index 8: 1,152 rollouts
    assert late["rollouts"] == 1152 and not summary.check_targets(late)["reached"]
