"""
PPO for a language model, with either a dense (fine-grained) or a final (sequence) reward.

Each iteration: the policy samples a response per prompt (KV cache); the frozen SFT
reference scores the same tokens; every response token t gets the reward

    r_t = -beta * (log pi(y_t) - log pi_ref(y_t))            per-token KL penalty
          + token RM reward r_t                                fine-grained PPO (dense)
          + sequence RM score, on the <|endoftext|> token only standard PPO (final)

then GAE turns rewards and values into advantages and the clipped PPO objective is
optimised for a few epochs over minibatches (Schulman et al., 2017; names as in
CleanRL's ppo.py; the LM specifics follow Ouyang et al., 2022, and Huang et al., "The 37
implementation details of PPO" (2022) and "The N implementation details of RLHF with
PPO" (2023)). The task reward of each method (the r_t of the token RM, the sequence
score) comes from reward.reward_fn. `train` at the bottom is the whole loop, rollout ->
update -> log -> checkpoint; it runs as stage 4 of `python train.py`, and
tests/test_ppo.py checks the pieces.

RLOO (rloo, rloo_fg) is this loop without the critic: each prompt is sampled rloo_k times,
and rloo_advantages (REINFORCE with a leave-one-out baseline, per-token return-to-go) replaces
GAE; the rewards, the KL penalty, whitening and the clipped policy loss are PPO's. It
separates "dense rewards" from "a critic that learns" (ActorCritic(critic=False); no warm-up).

Alignment. All per-token tensors are (B, T) over the full sequence (prompt + response)
and indexed by the *action* token: column t holds log pi(idx[t] | idx[<t]) and the value
of the state before idx[t] — both read from the model at position t-1, because the
logit at position t scores token t+1. `real` (B, T) is True on real tokens (prompt and
response, not padding); `resp_mask` (B, T) is True on response tokens only (the eot included).
Each row's padding is in front of it (model.pad_first), as in the reward models' batches, so
that every forward runs in micro-batches of similar lengths (model.by_length): about half of
a rollout's (B, T) positions are padding.

Choices and simplifications, said plainly:
- The critic is a second GPT trunk, initialised from the same SFT weights as the policy,
  with a linear value head, its own learning rate and a warm-up: vf_warmup rollouts of
  the unchanged SFT policy train the critic alone before the first policy step. A value
  head on the policy's own trunk (half the compute) learned dense returns but hardly a
  final score (explained variance ~0.02 for standard PPO over 60 iterations), and with
  V ~ 0 and lam < 1 a score at the eot reaches a token d steps earlier with weight lam^d:
  a handicap of the sequence-level methods that has nothing to do with density.
- Responses cut at max_new_tokens without <|endoftext|> are treated the same way for both
  methods: the last generated token is terminal (no bootstrap), and it gets the reward the
  method gives at the end (the sequence RM score, read at that last token) plus
  `trunc_penalty`.
- Rewards are normalised once, on SFT samples (reward.fit_norm), not per batch; no adaptive KL
  controller, no entropy bonus, no minibatch-size-independent normalisation beyond
  masked means.
- Under torchrun (distributed.py) each rank samples its share of every rollout batch and
  trains on its share of every minibatch; whitening and the logged rollout statistics are
  over all ranks, and each rank's minibatch loss (a mean over its own tokens) has its
  gradient averaged over the ranks by DDP, as in CleanRL's multi-GPU PPO.
"""

import copy
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from tqdm import tqdm

import distributed as dist
from model import by_length, pad_first, save_atomic, token_logprobs
from reward import final_token_rewards


@dataclass
class PPOConfig:
    ppo_iters: int = 80         # policy updates (each one rollout batch); the tuned runs flatten by 60-80
    rollout_batch: int = 64     # responses sampled per iteration (RLOO: rollout_batch / rloo_k prompts, rloo_k each)
    ppo_epochs: int = 2         # passes over each rollout batch
    minibatch: int = 16         # sequences per gradient step
    ppo_lr: float = 2e-5
    vf_lr: float = 1e-4         # learning rate of the critic (its own trunk and value head)
    vf_warmup: int = 5          # rollouts of the SFT policy that train only the critic, before iteration 1 (0: none)
    beta: float = 0.05          # weight of the per-token KL penalty to the SFT reference
    gamma: float = 1.0          # discount; 1 for episodic text
    lam: float = 0.95           # GAE lambda
    clip_eps: float = 0.2       # policy ratio clip
    clip_vf: float = 0.2        # value clip, around the rollout's values
    ppo_grad_clip: float = 1.0  # max gradient norm, of the policy and of the critic each
    temperature: float = 1.0    # the same in rollout, reference and training passes
    trunc_penalty: float = -1.0  # added at the last token of a response cut at the length limit
    rloo_k: int = 4             # rloo, rloo_fg: samples per prompt; rollout_batch / rloo_k prompts per iteration


class ActorCritic(nn.Module):
    """The policy GPT, and a critic: a copy of it as a trunk plus a scalar value head
    (critic=False, for RLOO: no critic, and forward's values are None)."""

    def __init__(self, gpt, critic=True):
        super().__init__()
        self.gpt, self.critic, self.v_head = gpt, None, None
        if critic:
            self.critic = copy.deepcopy(gpt)
            self.v_head = nn.Linear(gpt.config.n_embd, 1)
            nn.init.zeros_(self.v_head.weight)  # V = 0 until the warm-up has taught it something
            nn.init.zeros_(self.v_head.bias)

    def critic_parameters(self):
        return [*self.critic.parameters(), *self.v_head.parameters()] if self.critic is not None else []

    def forward(self, idx, real, temperature=1.0):
        """Action log-probs and values, both (B, T), aligned to action tokens (see docstring);
        plus the logits (B, T, V) for the entropy. idx is padded on the left (pad_first), and
        runs in micro-batches of similar lengths (by_length)."""
        return by_length(lambda i, r: self.logprobs_and_values(i, r, temperature), idx, real)

    def logprobs_and_values(self, idx, real, temperature):
        logits = self.gpt.lm_head(self.gpt.hidden(idx, real))  # (B, T, V)
        if self.critic is None:
            return token_logprobs(logits, idx, temperature), None, logits
        h = self.critic.hidden(idx, real)  # (B, T, C)
        values = F.pad(self.v_head(h).squeeze(-1)[:, :-1], (1, 0))  # (B, T): V(state before idx[t])
        return token_logprobs(logits, idx, temperature), values.float(), logits


def masked_mean(x, mask, all_ranks=False):
    """Mean of x over the valid tokens; all_ranks: of every rank's x together (torchrun; no gradient)."""
    total, count = torch.where(mask.bool(), x, 0.0).sum(), mask.sum()  # where, not *: NaN * 0 is NaN
    if all_ranks:
        total, count = dist.all_reduce_sum(total), dist.all_reduce_sum(count)
    return total / count.clamp(min=1)


def whiten(x, mask, eps=1e-8):
    """Zero mean, unit variance over the valid tokens (of every rank's rollouts); 0 at masked positions."""
    mean = masked_mean(x, mask, all_ranks=True)
    var = masked_mean((x - mean) ** 2, mask, all_ranks=True)
    return torch.where(mask.bool(), (x - mean) * torch.rsqrt(var + eps), 0.0)


def compute_gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (Schulman et al., 2016) on (B, T) tensors:

        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1}

    where t+1 is the next *valid* token of the row (V = 0 and A = 0 after the last one).
    Masked positions get A = 0 and are skipped: their rewards and values never reach a
    valid token, even if they are NaN. Returns (advantages, returns = A + V)."""
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros(B, device=rewards.device)
    nextvalue = torch.zeros(B, device=rewards.device)
    for t in reversed(range(T)):
        m = mask[:, t].bool()
        delta = rewards[:, t] + gamma * nextvalue - values[:, t]
        gae = delta + gamma * lam * lastgaelam
        lastgaelam = torch.where(m, gae, lastgaelam)  # carry across masked positions unchanged
        nextvalue = torch.where(m, values[:, t], nextvalue)
        advantages[:, t] = torch.where(m, gae, 0.0)
    returns = torch.where(mask.bool(), advantages + values, 0.0)
    return advantages, returns


def rloo_advantages(rewards, mask, k):
    """REINFORCE with a leave-one-out baseline, no critic (RLOO: Kool et al., 2019; Ahmadian et
    al., "Back to Basics", 2024), per token as PRIME does with dense rewards (Cui et al.,
    "Process Reinforcement through Implicit Rewards", 2025, sec. 3.3). Rows g*k .. g*k+k-1 are
    k samples of one prompt; with G_{i,t} = sum_{s>=t} r_{i,s} the return-to-go of sample i
    (gamma = 1) and R_i its whole return,

        A_{i,t} = G_{i,t} - 1/(k-1) * sum_{j != i} R_j

    A final score alone gives every token R_i - mean_{j != i} R_j: RLOO exactly. Dense rewards
    give each token only the rewards at and after it, as GAE with lam = 1 and V = 0 would, with
    the other samples' mean return as the baseline. PRIME subtracts its baseline from every
    token's process reward instead (sum_{s>=t} (r_{i,s} - b)): that pays -b per token, a length
    bonus or penalty with the sign of the others' mean reward; here the baseline is taken once
    per response, so it does not depend on the sample's own actions, leaves the objective
    unchanged, and pays nothing for length (the fair protocol of the README). Masked positions
    get 0; (B, T) -> (B, T). The rollout then whitens these advantages over all tokens, as it
    does GAE's: subtracting their token-weighted mean shifts a response's summed advantage by
    its length times that mean, for RLOO and PPO alike."""
    r = torch.where(mask.bool(), rewards, 0.0)  # where, not *: NaN * 0 is NaN
    G = r.flip(1).cumsum(1).flip(1)  # (B, T) return-to-go
    R = r.sum(1).view(-1, k)  # (B/k, k) whole returns, a row per prompt
    baseline = (R.sum(1, keepdim=True) - R) / (k - 1)  # (B/k, k) the mean return of the k-1 others
    return torch.where(mask.bool(), G - baseline.reshape(-1, 1), 0.0)


def kl_penalty_rewards(logp, ref_logp, mask, beta):
    """-beta * (log pi - log pi_ref) per response token (the k1 estimator of the KL)."""
    return torch.where(mask.bool(), -beta * (logp - ref_logp), 0.0)


def policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2):
    """The clipped policy loss over valid tokens (PPO's and RLOO's), with CleanRL's stats."""
    logratio = logp - old_logp
    ratio = logratio.exp()
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    pg_loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)  # pessimistic bound
    with torch.no_grad():
        stats = {"pg_loss": pg_loss.item(),
                 "approx_kl": masked_mean((ratio - 1) - logratio, mask).item(),  # k3, Schulman 2020
                 "clipfrac": masked_mean(((ratio - 1).abs() > clip_eps).float(), mask).item()}
    return pg_loss, stats


def ppo_loss(logp, old_logp, advantages, values, old_values, returns, mask, clip_eps=0.2, clip_vf=0.2):
    """Clipped policy loss and clipped value loss over valid tokens, with CleanRL's stats."""
    pg_loss, stats = policy_loss(logp, old_logp, advantages, mask, clip_eps)
    v_clipped = old_values + torch.clamp(values - old_values, -clip_vf, clip_vf)
    v_loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (v_clipped - returns) ** 2), mask)
    stats["v_loss"] = v_loss.item()
    return pg_loss, v_loss, stats


def entropy(logits, mask, temperature=1.0):
    """Mean entropy of the next-token distributions that produced the valid tokens."""
    logp = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)  # (B, T-1, V) position t-1 -> token t
    ent = -(logp.exp() * logp).sum(-1)  # (B, T-1)
    return masked_mean(F.pad(ent, (1, 0)), mask)


class Stopwatch:
    """Seconds per named part of an iteration: lap(name) charges the time since the previous
    lap to name (after the GPU has finished its queued work: CUDA runs asynchronously)."""

    def __init__(self, device):
        self.cuda, self.times, self.t = device.type == "cuda", {}, time.perf_counter()

    def lap(self, name):
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + now - self.t
        self.t = now


@torch.no_grad()
def rollout(policy, ref, prompts, reward_fn, cfg, eot, pad, max_new_tokens, generator=None):
    """Sample responses and compute everything the update needs, as a dict of (B, T) tensors.
    reward_fn(idx, real, resp_mask) -> (B, T) task rewards (dense, or on the last token)."""
    policy.eval(), ref.eval()  # no dropout in any model during RL
    watch = Stopwatch(policy.gpt.lm_head.weight.device)
    idx, resp_mask, _ = policy.gpt.generate(prompts, max_new_tokens, eot, pad,
                                            temperature=cfg.temperature, generator=generator)
    # (B, T) real tokens (prompt and response), each row's padding moved in front: a batch
    # laid out as chat.batch lays out the RMs' training batches, which by_length cuts by length
    real, idx, resp_mask = pad_first((idx != pad) | resp_mask, idx, resp_mask)
    watch.lap("t_sample")
    logp, values, _ = policy(idx, real, cfg.temperature)  # recomputed, not taken from sampling
    watch.lap("t_policy")
    ref_logp = by_length(lambda i, r: token_logprobs(ref(i, mask=r)[0], i, cfg.temperature), idx, real)
    watch.lap("t_ref")
    kl = torch.where(resp_mask, logp - ref_logp, 0.0)
    score = by_length(reward_fn, idx, real, resp_mask)  # (B, T)
    watch.lap("t_reward")
    resp_mask = resp_mask.float()
    truncated = ~((idx == eot) & resp_mask.bool()).any(1)  # (B,) no <|endoftext|> within the limit
    score = score + final_token_rewards(truncated.float() * cfg.trunc_penalty, resp_mask)
    rewards = kl_penalty_rewards(logp, ref_logp, resp_mask, cfg.beta) + score
    if values is None:  # no critic: RLOO over the rloo_k samples of each prompt (consecutive rows)
        advantages, critic = rloo_advantages(rewards, resp_mask, cfg.rloo_k), {}
    else:
        advantages, returns = compute_gae(rewards, values, resp_mask, cfg.gamma, cfg.lam)  # returns before whitening
        critic = {"values": values, "returns": returns}
    advantages = whiten(advantages, resp_mask)
    return dict(idx=idx, real=real, resp_mask=resp_mask, logp=logp, rewards=rewards, advantages=advantages, **critic,
                stats={"reward": dist.mean(score.sum(1)).item(), "kl": dist.mean(kl.sum(1)).item(),  # of all ranks
                       "length": dist.mean(resp_mask.sum(1)).item(), "truncated": dist.mean(truncated.float()).item(),
                       **watch.times})


def update(policy, optimizer, batch, cfg, generator=None, critic_only=False):
    """Several epochs of clipped PPO over minibatches of a rollout; mean stats of the last
    epoch. critic_only: the value loss alone (the warm-up); the policy is left unchanged."""
    policy.eval()  # dropout stays off: the ratio must be exactly 1 before the first step
    B, mb_size = batch["idx"].size(0), cfg.minibatch // dist.world_size  # torchrun: a rank's share of each
    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(B, generator=generator)
        stats = []
        for start in range(0, B, mb_size):
            mb = perm[start:start + mb_size]
            mb_resp_mask = batch["resp_mask"][mb]
            logp, values, logits = policy(batch["idx"][mb], batch["real"][mb], cfg.temperature)
            if values is None:  # no critic (RLOO): the clipped policy term alone
                (pg_loss, s), v_loss = policy_loss(logp, batch["logp"][mb], batch["advantages"][mb], mb_resp_mask,
                                                   cfg.clip_eps), 0.0
            else:
                pg_loss, v_loss, s = ppo_loss(logp, batch["logp"][mb], batch["advantages"][mb], values,
                                              batch["values"][mb], batch["returns"][mb], mb_resp_mask,
                                              cfg.clip_eps, cfg.clip_vf)
            # separate parameters: no weight needed. The warm-up keeps 0 x the policy loss, so that
            # every parameter has a gradient (as DDP requires), and then drops the policy's below
            loss = (0.0 if critic_only else 1.0) * pg_loss + v_loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite PPO loss ({loss.item()})")
            optimizer.zero_grad(set_to_none=True)  # a parameter without a gradient is not stepped
            loss.backward()
            for p in optimizer.param_groups[0]["params"] if critic_only else []:  # group 0: the policy (make_optimizer)
                p.grad = None  # no gradient: AdamW neither moves the policy nor counts a step for it
            for group in optimizer.param_groups:  # the policy and the critic, each clipped on its own
                nn.utils.clip_grad_norm_(group["params"], cfg.ppo_grad_clip)
            optimizer.step()
            with torch.no_grad():
                s["entropy"] = entropy(logits, mb_resp_mask, cfg.temperature).item()
            stats.append(s)
    out = dist.average({k: sum(s[k] for s in stats) / len(stats) for k in stats[0]})  # and over the ranks
    if "returns" not in batch:  # no critic (RLOO), nothing to explain
        return out
    b_returns, b_values, m = batch["returns"], batch["values"], batch["resp_mask"].bool()
    var_y = dist.var(b_returns[m])  # over every rank's rollouts
    out["explained_var"] = float("nan") if var_y == 0 else (1 - dist.var(b_returns[m] - b_values[m]) / var_y).item()
    return out


def make_optimizer(policy, cfg):
    """AdamW with two groups: 0 the policy (ppo_lr), 1 the critic (vf_lr); eps as CleanRL."""
    return torch.optim.AdamW([{"params": policy.gpt.parameters(), "lr": cfg.ppo_lr},
                             {"params": policy.critic_parameters(), "lr": cfg.vf_lr}], eps=1e-5, weight_decay=0.0)


# -----------------------------------------------------------------------------
# The loop: rollout -> update -> log -> checkpoint, resumable.

def train(policy, ref, reward_fn, next_prompts, cfg, eot, pad, max_new_tokens, seed, path, name,
          curve_point, eval_every, ckpt_every, stop_after=0):
    """cfg.ppo_iters PPO iterations of policy against the frozen reference ref, resumed from
    the checkpoint at path if there is one. next_prompts(rng) -> the prompt ids of one
    rollout; curve_point(it) -> a learning-curve point. Stops early after stop_after
    iterations of this call (0: never). Returns the state {"iter", "log", "curve", "t_curve0",
    "t_warmup", "warmup_explained_var"};
    each log row holds the iteration's statistics and its seconds per part (t_*)."""
    opt = make_optimizer(policy, cfg)
    # Everything random in a run is drawn from these three, saved in each checkpoint.
    torch.manual_seed(seed)
    gen = torch.Generator(device=policy.gpt.lm_head.weight.device).manual_seed(seed)  # sampling
    cpu_gen = torch.Generator().manual_seed(seed)  # minibatch order
    rng = random.Random(seed)                      # prompts
    state = load_state(path, policy, opt, gen, cpu_gen, rng)
    ddp_policy = dist.wrap(policy)  # torchrun: update() through it averages the gradients over the ranks
    if state is None:
        watch = Stopwatch(gen.device)
        state = {"iter": 0, "log": [], "curve": [curve_point(0)], "warmup_explained_var": []}
        watch.lap("t_curve0")  # the learning curve's first point, before iteration 1
        for _ in range(cfg.vf_warmup if policy.critic is not None else 0):  # the critic learns the SFT policy's values before any policy step
            batch = rollout(policy, ref, next_prompts(rng), reward_fn, cfg, eot, pad, max_new_tokens,
                            dist.rank_generator(gen))
            state["warmup_explained_var"].append(
                update(ddp_policy, opt, batch, cfg, cpu_gen, critic_only=True)["explained_var"])
        watch.lap("t_warmup")
        state.update(watch.times)
    else:
        print(f"{name}: resuming at iteration {state['iter']}")
    start = state["iter"]
    for it in tqdm(range(start, cfg.ppo_iters), desc=name, dynamic_ncols=True):
        # the method: sample and score a batch, then a few epochs of clipped updates on it
        batch = rollout(policy, ref, next_prompts(rng), reward_fn, cfg, eot, pad, max_new_tokens,
                        dist.rank_generator(gen))
        watch = Stopwatch(gen.device)
        stats = update(ddp_policy, opt, batch, cfg, cpu_gen)
        watch.lap("t_update")
        # the plumbing: learning curve, log, checkpoint
        last = it + 1 == cfg.ppo_iters
        if (it + 1) % eval_every == 0 or last:
            state["curve"].append(curve_point(it + 1))
        watch.lap("t_curve")
        row = {"iter": it + 1, **batch["stats"], **stats, **watch.times}
        state["log"].append(row)
        state["iter"] = it + 1
        tqdm.write(f"{name} iter {it + 1} | reward {row['reward']:.3f} | kl {row['kl']:.3f} | "
                   f"clipfrac {row['clipfrac']:.3f} | entropy {row['entropy']:.3f} | len {row['length']:.1f} | "
                   f"s: sample {row['t_sample']:.2f} policy {row['t_policy']:.2f} ref {row['t_ref']:.2f} "
                   f"reward {row['t_reward']:.2f} update {row['t_update']:.2f} curve {row['t_curve']:.2f}")
        if ((it + 1) % ckpt_every == 0 or last) and dist.master:
            save_state(path, policy, opt, gen, cpu_gen, rng, state)
        if stop_after and it + 1 == start + stop_after:
            break
    return state


def save_state(path, policy, opt, gen, cpu_gen, rng, state):
    """A resumable checkpoint: weights, optimizer, the three random states, log and curve."""
    save_atomic({"policy": policy.state_dict(), "optimizer": opt.state_dict(), "gen": gen.get_state(),
                 "cpu_gen": cpu_gen.get_state(), "rng": rng.getstate(), **state}, path)


def load_state(path, policy, opt, gen, cpu_gen, rng):
    """Restore what save_state wrote into the given objects; the state, or None without a checkpoint."""
    if not os.path.exists(path):
        return None
    ck = torch.load(path, weights_only=True)
    policy.load_state_dict(ck["policy"])
    opt.load_state_dict(ck["optimizer"])
    gen.set_state(ck["gen"].cpu())  # a generator's state is a CPU byte tensor, whatever its device
    cpu_gen.set_state(ck["cpu_gen"])
    rng.setstate(ck["rng"])
    return {k: ck[k] for k in ("iter", "log", "curve", "t_curve0", "t_warmup", "warmup_explained_var")}
