"""Tests for ppo.py: whitening, rewards, action/value alignment, rollout bookkeeping, the loop's
rewards and advantages (read off the batch that ppo.train hands to update), the critic's warm-up,
and small end-to-end updates. GAE against a plain loop and the clipped loss on hand-computed
cases are the exercises' graders (exercises/checks.py), run on ppo.py by tests/test_exercises.py."""
import copy
import os
import random
import sys

import pytest
import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import tiny  # noqa: E402
import ppo  # noqa: E402
from machinery.batching import ByLength  # noqa: E402
from model import token_logprobs  # noqa: E402
import reward  # noqa: E402
from ppo import ActorCritic, PPOConfig, compute_gae, kl_penalty_rewards, whiten  # noqa: E402
from reward import final_token_rewards  # noqa: E402
from tokenizer import pad_first  # noqa: E402
from exercises.checks import response_masks  # noqa: E402

torch.set_num_threads(1)

PAD, EOT = 0, 1
STAT_KEYS = {"pg_loss", "v_loss", "approx_kl", "clipfrac", "entropy"}  # update's; explained_var is the log's


def actor_critic(seed=0, **kw):
    """ActorCritic on a tiny GPT, with a random (non-zero) value head so values mean something."""
    ac = ActorCritic(tiny(seed, **kw))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        ac.critic.head.weight.copy_(torch.randn(ac.critic.head.weight.shape, generator=g))
        ac.critic.head.bias.fill_(0.3)
    return ac.eval()


def reference(gpt, cfg=None):
    """The frozen reference as ppo.rollout and ppo.train take it: ref(idx, real)[0] = log pi_ref."""
    return ActorCritic(gpt, critic=False, temperature=(cfg or PPOConfig()).temperature).eval()


def random_prompts(n, seed=0, lo=1, hi=6):
    """n prompts of random lengths, tokens in [2, 50) (never PAD or EOT)."""
    rng = random.Random(seed)
    return [[rng.randrange(2, 50) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


# -----------------------------------------------------------------------------
# Whitening

def test_whiten_valid_mean_zero_var_one_masked_zero():
    """Whitened valid tokens have mean 0 and (population) variance 1; masked tokens are 0."""
    g = torch.Generator().manual_seed(9)
    x = 3.0 + 5.0 * torch.randn(6, 15, generator=g, dtype=torch.float64)
    mask = response_masks(6, 15, seed=10)
    w = whiten(x, mask.double())
    valid = w[mask]
    assert abs(valid.mean().item()) < 1e-10
    assert abs(valid.var(unbiased=False).item() - 1) < 1e-6
    assert (w[~mask] == 0).all()
    # an affine map of the inputs does not change the result
    torch.testing.assert_close(whiten(2 * x - 7, mask.double()), w, atol=1e-6, rtol=0)


# -----------------------------------------------------------------------------
# Reward shaping

def test_kl_penalty_zero_when_equal_and_exact_otherwise():
    """-beta * (logp - ref_logp) on valid tokens: exactly 0 when the log-probs agree."""
    g = torch.Generator().manual_seed(11)
    logp = -torch.rand(4, 10, generator=g) * 5
    mask = response_masks(4, 10, seed=12).float()
    assert (kl_penalty_rewards(logp, logp.clone(), mask, 0.1) == 0).all()
    ref = -torch.rand(4, 10, generator=g) * 5
    r = kl_penalty_rewards(logp, ref, mask, 0.1)
    assert torch.equal(r, torch.where(mask.bool(), -0.1 * (logp - ref), 0.0))


# -----------------------------------------------------------------------------
# ActorCritic alignment

def _left_padded(prompts):
    P = max(map(len, prompts))
    idx = torch.full((len(prompts), P), PAD, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, P - len(p):] = torch.tensor(p)
    return idx, idx != PAD


def test_actor_critic_logprobs_match_gpt():
    """ActorCritic's log-probs are token_logprobs of the GPT's own logits and its entropies those
    of the same distributions (at any temperature), whole or in micro-batches by length (ByLength)."""
    ac = actor_critic()
    idx, mask = _left_padded(random_prompts(4, seed=3, lo=3, hi=10))
    acted = mask & F.pad(mask[:, :-1], (1, 0), value=False)  # real tokens after a real one
    with torch.no_grad():
        for temp in (1.0, 0.7):
            ac.temperature = temp
            gpt_logits = ac.policy(idx, real=mask)[0]
            lp_all = F.log_softmax(gpt_logits[:, :-1].float() / temp, dim=-1)
            gpt_ent = F.pad(-(lp_all.exp() * lp_all).sum(-1), (1, 0))  # position t-1 -> token t
            _, whole_values, _ = ac(idx, mask)
            for net in (ac, ByLength(ac)):
                logp, values, ent = net(idx, mask)
                torch.testing.assert_close(logp[acted], token_logprobs(gpt_logits, idx, temp)[acted], atol=1e-6,
                                           rtol=0)
                torch.testing.assert_close(ent[acted], gpt_ent[acted], atol=1e-5, rtol=0)
                torch.testing.assert_close(values[acted], whole_values[acted], atol=1e-6, rtol=0)
                assert logp.shape == values.shape == ent.shape == idx.shape
                assert (values[:, 0] == 0).all() and (logp[:, 0] == 0).all()


def test_actor_critic_values_are_causal():
    """Values at column t depend only on tokens < t: changing token t leaves columns <= t unchanged;
    the critic-only forward gives the same values and nothing else."""
    ac = actor_critic()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(2, 50, (2, 12), generator=g)
    mask = torch.ones_like(idx, dtype=torch.bool)
    with torch.no_grad():
        _, v, _ = ac(idx, mask)
        logp, v_only, ent = ac(idx, mask, critic_only=True)
        assert logp is None and ent is None and torch.equal(v_only, v)
        for t in (0, 4, 10):
            idx2 = idx.clone()
            idx2[:, t] = (idx2[:, t] + 7 - 2) % 48 + 2
            _, v2, _ = ac(idx2, mask)
            assert torch.equal(v2[:, :t + 1], v[:, :t + 1])
            assert (v2[:, t + 1] - v[:, t + 1]).abs().min() > 0  # and the next column does see it


# -----------------------------------------------------------------------------
# RLOO: the leave-one-out advantages, against a plain loop

def reference_rloo(rewards, mask, k):
    """Plain Python RLOO in double precision: rows b of group b // k; a valid token's advantage
    is the row's return-to-go from it minus the mean whole return of the group's other rows."""
    B, T = rewards.shape
    valid = [[t for t in range(T) if bool(mask[b, t])] for b in range(B)]
    R = [sum(float(rewards[b, t]) for t in valid[b]) for b in range(B)]
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        baseline = sum(R[j] for j in range(b // k * k, b // k * k + k) if j != b) / (k - 1)
        for t in valid[b]:
            adv[b][t] = sum(float(rewards[b, s]) for s in valid[b] if s >= t) - baseline
    return torch.tensor(adv, dtype=torch.float64)


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("dense", [True, False])
def test_rloo_advantages_match_reference_loop(k, dense):
    """rloo_advantages equals the loop for k = 2 and 4, dense rewards and a final score (NaN
    junk off the responses, an empty response); with a final score every token of a response
    gets R_i - mean_{j != i} R_j, Ahmadian et al.'s RLOO."""
    B, T = 3 * k, 9
    mask = response_masks(B, T, seed=k)
    g = torch.Generator().manual_seed(k)
    if dense:
        rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    else:
        rewards = final_token_rewards(torch.randn(B, generator=g), mask.float()).double()
    rewards = torch.where(mask, rewards, float("nan"))
    adv = ppo.rloo_advantages(rewards, mask, k)
    torch.testing.assert_close(adv, reference_rloo(rewards, mask, k), atol=1e-12, rtol=0)
    assert (adv[~mask] == 0).all()
    if not dense:
        R = torch.where(mask, rewards, 0.0).sum(1).view(-1, k)  # (B/k, k)
        loo = (R - (R.sum(1, keepdim=True) - R) / (k - 1)).reshape(-1)  # (B,)
        for b in range(B):
            torch.testing.assert_close(adv[b][mask[b]], loo[b].expand(int(mask[b].sum())))


def test_rloo_baseline_ignores_the_samples_own_return():
    """The baseline of sample i is the other samples' returns only: changing sample i's rewards
    moves its own advantages by exactly that change, and the others' by the change / (k-1)."""
    k, T = 4, 6
    mask = torch.ones(k, T, dtype=torch.bool)
    rewards = torch.randn(k, T, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    bumped = rewards.clone()
    bumped[1, 2] += 3.0
    a, b = ppo.rloo_advantages(rewards, mask, k), ppo.rloo_advantages(bumped, mask, k)
    torch.testing.assert_close(b[1] - a[1], torch.tensor([3.0, 3.0, 3.0, 0, 0, 0], dtype=torch.float64))
    for j in (0, 2, 3):
        torch.testing.assert_close(b[j] - a[j], torch.full((T,), -1.0, dtype=torch.float64))


# -----------------------------------------------------------------------------
# Rollout, and the loop's rewards and advantages

CFG = PPOConfig(rollout_batch=8, minibatch=4, ppo_epochs=2, ppo_lr=1e-3, beta=0.05)


def dense_reward(idx, real, resp):
    return resp.float() * 0.1


def _rollout(policy, ref, cfg=CFG, seed=0, reward_fn=dense_reward, max_new_tokens=8, prompts=None, net=None):
    """ppo.rollout of ActorCritic policy against the GPT ref, both read in micro-batches by length
    (as train.py hands them over) unless net says what policy's forward passes go through."""
    prompts = prompts if prompts is not None else random_prompts(cfg.rollout_batch, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    return ppo.rollout(policy, net if net is not None else ByLength(policy), ByLength(reference(ref, cfg)),
                       reward_fn, prompts, gen, cfg, EOT, PAD, max_new_tokens)


def rewards(b, cfg):
    """ppo.train's step 2: the KL penalty to the reference plus the rollout's task rewards."""
    return kl_penalty_rewards(b["logp"], b["ref_logp"], b["resp_mask"], cfg.beta) + b["task_rewards"]


def advantages(b, cfg):
    """ppo.train's step 3 on rollout b, in place (b is returned): GAE's returns and whitened
    advantages, or without a critic whitened RLOO advantages. The test of the loop below checks
    that these lines give what ppo.train hands to update."""
    r = rewards(b, cfg)
    if b["values"] is None:
        adv = ppo.rloo_advantages(r, b["resp_mask"], cfg.rloo_k)
    else:
        adv, b["returns"] = compute_gae(r, b["values"], b["resp_mask"], cfg.gamma, cfg.lam)
    b["advantages"] = whiten(adv, b["resp_mask"])
    return b


def _log_row(b):
    """The row ppo.train's log writes for rollout b (its per-response statistics)."""
    state = {"curve": [], "log": []}
    ppo.log(state, 1, b, {"clipfrac": 0.0, "entropy": 0.0}, "test", False, None, 0.0, 0.0)
    return state["log"][-1]


def _capture_update(monkeypatch):
    """ppo.update patched to keep a copy of every batch ppo.train hands it (after the loop's steps 2-3)."""
    seen, update = [], ppo.update

    def spy(net, opt, b, cfg, generator):
        seen.append({k: v.clone() if torch.is_tensor(v) else v for k, v in b.items()})
        return update(net, opt, b, cfg, generator)
    monkeypatch.setattr(ppo, "update", spy)
    return seen


def test_rollout_ratio_is_one_on_first_minibatch():
    """Recomputing the policy on a minibatch of the rollout gives back its log-probs (ratio 1)."""
    policy = actor_critic()
    ref = copy.deepcopy(policy.policy)
    batch = _rollout(policy, ref)
    mb = torch.randperm(CFG.rollout_batch, generator=torch.Generator().manual_seed(0))[:CFG.minibatch]
    m = batch["resp_mask"][mb].bool()
    with torch.no_grad():
        logp, values, _ = ByLength(policy)(batch["idx"][mb], batch["real"][mb])
    ratio = (logp - batch["logp"][mb]).exp()
    torch.testing.assert_close(ratio[m], torch.ones_like(ratio[m]), atol=1e-6, rtol=0)
    torch.testing.assert_close(values[m], batch["values"][mb][m], atol=1e-6, rtol=0)
    assert m.any()


def test_critic_warmup_moves_only_the_critic_and_learns():
    """warm_up_critic: the policy's weights stay bit-identical (AdamW counts no step for them), the
    critic's change, and repeated passes on one rollout raise the explained variance; the critic
    is its own trunk, so a policy-gradient step leaves it alone and vice versa."""
    torch.manual_seed(0)
    policy, ref = ActorCritic(tiny(0)).eval(), tiny(0).eval()
    assert policy.critic.trunk is not policy.policy
    assert not set(map(id, policy.policy.parameters())) & set(map(id, policy.critic.parameters()))
    cfg = PPOConfig(rollout_batch=8, minibatch=4, vf_lr=3e-3)

    def reward_fn(idx, real, resp):  # a final score that depends on the first response token
        first = torch.where(resp.cumsum(1) == 1, idx, 0).sum(1)
        return reward.final_token_rewards((first % 2).float() * 2 - 1, resp.float())
    batch = advantages(_rollout(policy, ref, cfg, reward_fn=reward_fn), cfg)
    net, m = ByLength(policy), batch["resp_mask"].bool()
    opt = ppo.make_optimizer(policy, cfg)
    before, critic_before = copy.deepcopy(policy.policy.state_dict()), copy.deepcopy(policy.critic.state_dict())

    def explained(values):
        return (1 - (batch["returns"][m] - values[m]).var() / batch["returns"][m].var()).item()
    ev = [explained(batch["values"])]
    assert ppo.explained_variance(batch["returns"], batch["values"], batch["resp_mask"]) == pytest.approx(ev[0])
    ppo.warm_up_critic(net, opt, batch, cfg, torch.Generator().manual_seed(0))
    for _ in range(15):
        with torch.no_grad():
            _, values, _ = net(batch["idx"], batch["real"], critic_only=True)
        ev.append(explained(values))
        ppo.warm_up_critic(net, opt, batch, cfg, torch.Generator().manual_seed(0))
    assert all(torch.equal(v, before[k]) for k, v in policy.policy.state_dict().items())
    assert not any(p in opt.state for p in policy.policy.parameters())
    assert any(not torch.equal(v, critic_before[k]) for k, v in policy.critic.state_dict().items())
    assert ev[-1] > ev[0] + 0.2, ev


def test_rollout_kl_zero_when_policy_equals_ref():
    """Before any update (policy == ref) the KL stat is 0 and rewards are the task rewards only."""
    policy = actor_critic()
    ref = copy.deepcopy(policy.policy)
    batch = _rollout(policy, ref)
    assert _log_row(batch)["kl"] == 0.0
    mask = batch["resp_mask"]
    truncated = ~(batch["idx"] == EOT).any(1)
    task = dense_reward(batch["idx"], batch["real"], mask.bool())
    task = task + final_token_rewards(truncated.float() * CFG.trunc_penalty, mask)
    assert torch.equal(batch["task_rewards"], task)
    assert torch.equal(rewards(batch, CFG), task)
    # response mask and real-token mask are consistent with the padding
    assert (batch["real"] == ((batch["idx"] != PAD) | mask.bool())).all()
    assert not (mask.bool() & ~batch["real"]).any()


def test_rollout_kl_penalty_against_different_ref():
    """With a different reference, rewards = task rewards - beta * (logp - ref_logp) per token."""
    policy = actor_critic()
    ref = tiny(seed=5)
    batch = _rollout(policy, ref)
    idx, real, mask = batch["idx"], batch["real"], batch["resp_mask"]
    with torch.no_grad():
        ref_logp = token_logprobs(ref(idx, real=real)[0], idx, CFG.temperature)
    truncated = ~(idx == EOT).any(1)
    task = dense_reward(idx, real, mask.bool()) + final_token_rewards(truncated.float() * CFG.trunc_penalty, mask)
    expected = task + torch.where(mask.bool(), -CFG.beta * (batch["logp"] - ref_logp), 0.0)
    torch.testing.assert_close(rewards(batch, CFG), expected, atol=1e-6, rtol=0)
    kl = torch.where(mask.bool(), batch["logp"] - ref_logp, 0.0).sum(1).mean().item()
    row = _log_row(batch)
    assert row["kl"] == pytest.approx(kl, abs=1e-5)
    assert row["kl"] != 0.0


def test_rollout_returns_before_whitening_and_advantages_whitened(tmp_path, monkeypatch):
    """The batch ppo.train hands to update: returns = GAE returns of the rollout's own rewards (KL
    penalty + task rewards) and values, unwhitened; advantages = whitened GAE advantages. This
    file's advantages(b, cfg) gives the same."""
    seen = _capture_update(monkeypatch)
    policy = actor_critic()
    cfg = PPOConfig(ppo_iters=1, vf_warmup=0, rollout_batch=8, minibatch=4, ppo_lr=1e-3, beta=0.05)
    ppo.train(policy, ByLength(reference(tiny(seed=5), cfg)), dense_reward,
              lambda rng, gen: (random_prompts(cfg.rollout_batch, seed=0), gen), cfg, EOT, PAD, 8, 0,
              str(tmp_path / "g.pt"), "gae test", lambda it: {"iter": it}, eval_every=1, ckpt_every=1,
              net=ByLength(policy), save=False)
    (batch,) = seen
    mask = batch["resp_mask"]
    r = batch["task_rewards"] + torch.where(mask.bool(), -cfg.beta * (batch["logp"] - batch["ref_logp"]), 0.0)
    assert (r != batch["task_rewards"]).any()  # the KL penalty is in
    adv, ret = compute_gae(r, batch["values"], mask, cfg.gamma, cfg.lam)
    assert torch.equal(batch["returns"], ret)
    torch.testing.assert_close(batch["advantages"], whiten(adv, mask), atol=1e-6, rtol=0)
    valid = batch["advantages"][mask.bool()]
    assert abs(valid.mean().item()) < 1e-5
    assert abs(valid.var(unbiased=False).item() - 1) < 1e-4
    assert (batch["advantages"][~mask.bool()] == 0).all() and (batch["returns"][~mask.bool()] == 0).all()
    mine = advantages({k: batch[k] for k in ("logp", "ref_logp", "resp_mask", "task_rewards", "values")}, cfg)
    assert torch.equal(mine["returns"], batch["returns"]) and torch.equal(mine["advantages"], batch["advantages"])


def test_rollout_truncation_penalty_on_last_token():
    """Responses cut at the length limit get trunc_penalty on their last token; finished ones do not."""
    policy = actor_critic()
    ref = copy.deepcopy(policy.policy)
    zero = lambda idx, real, resp: torch.zeros(idx.shape)  # noqa: E731
    cfg = PPOConfig(rollout_batch=8, trunc_penalty=-2.5)
    batch = _rollout(policy, ref, cfg, reward_fn=zero, max_new_tokens=3)
    resp, r = batch["resp_mask"].bool(), rewards(batch, cfg)
    for b in range(8):
        cols = resp[b].nonzero().squeeze(1)
        last = cols[-1].item()
        ended = batch["idx"][b, last].item() == EOT
        expected = torch.zeros(batch["idx"].size(1))
        if not ended:
            assert len(cols) == 3
            expected[last] = -2.5
        assert torch.equal(batch["task_rewards"][b], expected) and torch.equal(r[b], expected)
        assert batch["truncated"][b].item() == (not ended)
    assert _log_row(batch)["truncated"] == pytest.approx(
        sum(batch["idx"][b, resp[b]][-1].item() != EOT for b in range(8)) / 8)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_match_recomputed(temperature):
    """Log-probs recorded by GPT.generate equal a full forward pass's (at the same temperature)."""
    policy = actor_critic()
    policy.temperature = temperature
    gen = torch.Generator().manual_seed(1)
    idx, resp, lp = policy.policy.generate(random_prompts(6, seed=2), 10, EOT, PAD,
                                           temperature=temperature, generator=gen)
    real, idx, resp, lp = pad_first((idx != PAD) | resp, idx, resp, lp)  # as ppo.rollout lays a batch out
    for net in (policy, ByLength(policy)):
        with torch.no_grad():
            logp, _, _ = net(idx, real)
        torch.testing.assert_close(logp[resp], lp[resp], atol=1e-5, rtol=0)
    assert (lp[~resp] == 0).all()


# -----------------------------------------------------------------------------
# Update

def _opt(policy, lr):
    return torch.optim.AdamW(policy.parameters(), lr=lr, eps=1e-5, weight_decay=0.0)


def test_update_returns_finite_stats():
    """One tiny iteration returns finite pg_loss, v_loss, approx_kl, clipfrac, entropy (and the
    log's explained_var is finite)."""
    policy = actor_critic()
    ref = copy.deepcopy(policy.policy)
    batch = advantages(_rollout(policy, ref), CFG)
    before = [p.detach().clone() for p in policy.parameters()]
    stats = ppo.update(ByLength(policy), _opt(policy, CFG.ppo_lr), batch, CFG, torch.Generator().manual_seed(0))
    assert set(stats) == STAT_KEYS
    stats["explained_var"] = ppo.explained_variance(batch["returns"], batch["values"], batch["resp_mask"])
    for k, v in stats.items():
        assert isinstance(v, float) and torch.isfinite(torch.tensor(v)), k
    assert 0.0 <= stats["clipfrac"] <= 1.0 and stats["approx_kl"] >= 0.0 and stats["entropy"] > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, policy.parameters()))


class Recorder(ActorCritic):
    """ActorCritic that records the log-probs of each forward call."""

    def forward(self, idx, real, critic_only=False):
        out = super().forward(idx, real, critic_only)
        self.calls.append(None if out[0] is None else out[0].detach().clone())
        return out


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_update_first_minibatch_ratio_is_one(dropout):
    """Inside update, the first minibatch of the first epoch sees ratio 1 (dropout off even if configured)."""
    torch.manual_seed(0)
    policy = Recorder(tiny(dropout=dropout)).train()
    policy.calls = []
    ref = copy.deepcopy(policy.policy).eval()
    batch = advantages(_rollout(policy, ref, net=policy), CFG)
    assert not policy.training
    policy.calls = []
    policy.train()
    ppo.update(policy, _opt(policy, 1e-2), batch, CFG, torch.Generator().manual_seed(3))
    assert not policy.training and not any(m.training for m in policy.modules())
    mb = torch.randperm(CFG.rollout_batch, generator=torch.Generator().manual_seed(3))[:CFG.minibatch]
    m = batch["resp_mask"][mb].bool()
    first = policy.calls[0]
    torch.testing.assert_close(first[m], batch["logp"][mb][m], atol=1e-6, rtol=0)
    assert len(policy.calls) == CFG.ppo_epochs * CFG.rollout_batch // CFG.minibatch


def test_rollout_and_update_turn_dropout_off():
    """A dropout=0.5 policy is in eval mode after rollout and update; two forward passes agree."""
    policy = actor_critic(dropout=0.5).train()
    ref = copy.deepcopy(policy.policy).eval()
    net = ByLength(policy)
    batch = advantages(_rollout(policy, ref, net=net), CFG)
    assert not any(m.training for m in policy.modules())
    policy.train()
    ppo.update(net, _opt(policy, 1e-3), batch, CFG, torch.Generator().manual_seed(0))
    assert not any(m.training for m in policy.modules())
    with torch.no_grad():
        a = policy(batch["idx"], batch["real"])[0]
        b = policy(batch["idx"], batch["real"])[0]
    assert torch.equal(a, b)


def test_update_raises_on_non_finite_loss():
    """NaN advantages make the loss non-finite: update raises FloatingPointError before any step."""
    policy = actor_critic()
    ref = copy.deepcopy(policy.policy)
    batch = advantages(_rollout(policy, ref), CFG)
    batch["advantages"] = torch.where(batch["resp_mask"].bool(), float("nan"), 0.0)
    before = [p.detach().clone() for p in policy.parameters()]
    with pytest.raises(FloatingPointError):
        ppo.update(ByLength(policy), _opt(policy, 1e-3), batch, CFG, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, p) for a, p in zip(before, policy.parameters()))


def test_update_learns_to_emit_rewarded_token():
    """Rewarding token 7 at response positions raises its probability over a few dozen iterations."""
    torch.manual_seed(0)
    policy = ActorCritic(tiny(seed=0)).eval()
    cfg = PPOConfig(rollout_batch=8, minibatch=4, ppo_epochs=2, ppo_lr=3e-3, beta=0.01, trunc_penalty=0.0)
    net, ref = ByLength(policy), ByLength(reference(copy.deepcopy(policy.policy), cfg))
    fn = lambda idx, real, resp: ((idx == 7) & resp).float()  # noqa: E731
    opt = _opt(policy, cfg.ppo_lr)
    gen, cpu_gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    probe_idx, probe_mask = _left_padded(random_prompts(16, seed=99))

    def p7():
        with torch.no_grad():
            logits = policy.policy(probe_idx, real=probe_mask)[0][:, -1]
        return logits.softmax(-1)[:, 7].mean().item()

    p_before, task = p7(), []
    for it in range(30):
        batch = ppo.rollout(policy, net, ref, fn, random_prompts(8, seed=it), gen, cfg, EOT, PAD, 6)
        task.append(batch["task_rewards"].sum(1).mean().item())  # the log's "reward"
        stats = ppo.update(net, opt, advantages(batch, cfg), cfg, cpu_gen)
        assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    p_after = p7()
    assert p_after > 3 * p_before, (p_before, p_after)
    assert sum(task[-5:]) > sum(task[:5]) + 1.0, task


def test_rloo_without_critic_rollout_update_and_loop(tmp_path, monkeypatch):
    """ActorCritic(critic=False): the rollout has no values, and the loop's advantages are the
    whitened RLOO advantages of its rewards, with no returns; an update changes the policy with the
    clipped policy loss alone (no v_loss, no explained_var); the loop runs no critic warm-up."""
    torch.manual_seed(0)
    policy, ref = ActorCritic(tiny(0), critic=False), tiny(5)
    cfg = PPOConfig(rollout_batch=8, minibatch=4, rloo_k=4, ppo_lr=1e-3, vf_warmup=3, ppo_iters=2)
    opt = ppo.make_optimizer(policy, cfg)
    assert policy.critic is None and opt.param_groups[1]["params"] == []
    assert len(list(policy.parameters())) == len(list(policy.policy.parameters()))
    prompts = [p for p in random_prompts(2, seed=3) for _ in range(cfg.rloo_k)]  # 2 prompts x 4 samples
    batch = _rollout(policy, ref, cfg, prompts=prompts)
    assert batch["values"] is None
    batch = advantages(batch, cfg)
    assert "returns" not in batch
    before = copy.deepcopy(policy.state_dict())
    stats = ppo.update(ByLength(policy), opt, batch, cfg, torch.Generator().manual_seed(0))
    assert set(stats) == STAT_KEYS - {"v_loss"}
    assert any(not torch.equal(v, before[k]) for k, v in policy.state_dict().items())
    seen = _capture_update(monkeypatch)
    path = str(tmp_path / "r.pt")
    state = ppo.train(policy, ByLength(reference(ref, cfg)), dense_reward, lambda rng, gen: (prompts, gen), cfg, EOT,
                      PAD, 6, 0, path, "rloo test", lambda it: {"iter": it}, eval_every=1, ckpt_every=1,
                      net=ByLength(policy))
    assert state["iter"] == 2 and state["warmup_explained_var"] == [] and len(seen) == 2
    assert all("explained_var" not in row and "v_loss" not in row for row in state["log"])
    for b in seen:
        assert b["values"] is None and "returns" not in b
        mask = b["resp_mask"]
        r = b["task_rewards"] + torch.where(mask.bool(), -cfg.beta * (b["logp"] - b["ref_logp"]), 0.0)
        expected = whiten(ppo.rloo_advantages(r, mask, cfg.rloo_k), mask)
        torch.testing.assert_close(b["advantages"], expected, atol=1e-6, rtol=0)
    assert torch.load(path, weights_only=True)["critic"] == {}


# -----------------------------------------------------------------------------
# The loop: resuming from a checkpoint equals running straight through


def _train(path, stop_after=0, iters=4):
    policy = actor_critic()
    cfg = PPOConfig(ppo_iters=iters, rollout_batch=6, minibatch=3, ppo_epochs=1, ppo_lr=1e-3)
    ref = reference(tiny(0), cfg)  # the same weights as the policy's
    points = []

    def curve_point(it):
        points.append(it)
        return {"iter": it}

    def next_prompts(rng, gen):
        return random_prompts(cfg.rollout_batch, seed=rng.randrange(10 ** 6)), gen
    state = ppo.train(policy, ByLength(ref), dense_reward, next_prompts, cfg, EOT, PAD, 6, 0, str(path), "test",
                      curve_point, eval_every=2, ckpt_every=1, stop_after=stop_after, net=ByLength(policy))
    return policy, state, points


def test_train_resumed_equals_uninterrupted(tmp_path):
    """ppo.train stopped after 2 of 4 iterations and called again gives the same weights (policy and
    critic), log and curve as 4 iterations in one call: the checkpoint carries every random state."""
    policy_a, state_a, points_a = _train(tmp_path / "a.pt")
    _, half, _ = _train(tmp_path / "b.pt", stop_after=2)
    ck = torch.load(tmp_path / "b.pt", weights_only=True)
    assert half["iter"] == 2 and ck["iter"] == 2
    assert set(ck["policy"]) == set(policy_a.policy.state_dict()) and set(ck["critic"]) == set(
        policy_a.critic.state_dict())
    policy_b, state_b, points_b = _train(tmp_path / "b.pt")
    assert state_a["iter"] == state_b["iter"] == 4
    untimed = [[{k: v for k, v in row.items() if not k.startswith("t_")} for row in s["log"]] for s in (state_a, state_b)]
    assert untimed[0] == untimed[1] and state_a["curve"] == state_b["curve"]
    assert all(row["t_rollout"] > 0 and row["t_update"] > 0 for row in state_b["log"])
    assert points_a == [0, 2, 4] and points_b == [4]  # the resumed call starts where the checkpoint ended
    for (k, a), (_, b) in zip(policy_a.state_dict().items(), policy_b.state_dict().items()):
        assert torch.equal(a, b), k
