"""
PPO for a language model with a dense (fine-grained) or a final (sequence) reward, and RLOO,
the same loop without a critic (Schulman et al., 2017; for LMs Ouyang et al., 2022, and Huang
et al., "The N implementation details of RLHF with PPO", 2023). One iteration of `train`:
1. rollout: a response per prompt, every token read by the policy, critic, reference and reward;
2. rewards r_t = KL penalty + task reward per response token (the whole equation, with its
   normalisation and truncation term, is written once, in reward.py's docstring);
3. advantages: GAE over the critic's values, or without a critic RLOO's leave-one-out baseline
   over the rloo_k samples of each prompt; whitened; 4. clipped minibatch epochs; 5. a log line.

Names: the statistics are CleanRL's (pg_loss, v_loss, approx_kl, clipfrac, explained_var, mb_
for a minibatch). The config's, as CleanRL's / TRL's: ppo_epochs = update_epochs / num_ppo_epochs,
clip_eps = clip_coef / cliprange, clip_vf = clip_coef / cliprange_value, lam = gae_lambda / lam,
beta = - / kl_coef; minibatch is a size (both give num_minibatches, a count).

Alignment: every per-token tensor is (B, T) over prompt + response and indexed by the *action*
token: column t holds log pi(idx[t] | idx[<t]) and V(state before idx[t]), both read at
position t-1, whose logit scores token t. `real` is True at real tokens, `resp_mask` at response
tokens (the eot included); each row's padding is in front (tokenizer.pad_first).

Said plainly: the critic is its own GPT trunk (a head on the policy's trunk hardly learned a
final score), warmed up before the first policy step; rewards are normalised once, on SFT
samples; no adaptive KL controller, no entropy bonus. Written for one process: train.py hands it
`net` (micro-batches by length; DDP under torchrun, where each process whitens and logs its own
share). Stage 4 of `python train.py`; tests/test_ppo.py checks it.
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

from data import save_atomic
from reward import final_token_rewards
from tokenizer import pad_first


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
    seq_weight: float = 1.0     # fg_ppo_seq: the weight of ppo's task reward beside fg_ppo's (reward.py)
    rloo_k: int = 4             # rloo, rloo_fg: samples per prompt; rollout_batch / rloo_k prompts per iteration


class Critic(nn.Module):
    """V(state before token t): a copy of the SFT policy as its trunk, a linear value head (V = 0 at first)."""

    def __init__(self, policy):
        super().__init__()
        self.trunk, self.head = copy.deepcopy(policy), nn.Linear(policy.config.n_embd, 1)
        nn.init.zeros_(self.head.weight), nn.init.zeros_(self.head.bias)

    def forward(self, idx, real):  # (B, T): column t = V(state before idx[t]), read at position t-1
        return F.pad(self.head(self.trunk.hidden(idx, real)).squeeze(-1)[:, :-1], (1, 0)).float()


class ActorCritic(nn.Module):
    """The policy (a GPT) and a Critic (critic=False, for RLOO and the reference: none)."""

    def __init__(self, policy, critic=True, temperature=1.0):
        super().__init__()
        self.policy, self.critic, self.temperature = policy, Critic(policy) if critic else None, temperature

    def forward(self, idx, real, critic_only=False):
        """(log-probs, values, entropies), each (B, T), by action token; None where not computed."""
        if critic_only:
            return None, self.critic(idx, real), None
        logits = self.policy(idx, real=real)[0]  # (B, T, V)
        values = self.critic(idx, real) if self.critic is not None else None
        # as model.token_logprobs: the logit at position t-1 scores token t, so column 0 gets 0
        logp_all = F.log_softmax(logits[:, :-1].float() / self.temperature, dim=-1)  # (B, T-1, V)
        logp = F.pad(logp_all.gather(-1, idx[:, 1:, None]).squeeze(-1), (1, 0))  # (B, T)
        with torch.no_grad():  # a statistic: the entropy of the distribution each token was drawn from
            ent = F.pad(-(logp_all.exp() * logp_all).sum(-1), (1, 0))  # (B, T)
        return logp, values, ent


# -----------------------------------------------------------------------------
# The pieces: pure functions on (B, T) tensors

def masked_mean(x, mask):
    """Mean of x over the valid tokens."""
    return torch.where(mask.bool(), x, 0.0).sum() / mask.sum().clamp(min=1)  # where, not *: NaN * 0 is NaN


def whiten(x, mask, eps=1e-8):
    """Zero mean, unit variance over the valid tokens; 0 at masked positions."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return torch.where(mask.bool(), (x - mean) * torch.rsqrt(var + eps), 0.0)


def kl_penalty_rewards(logp, ref_logp, mask, beta):
    """-beta * (log pi - log pi_ref) per response token (the k1 estimator of the KL)."""
    return torch.where(mask.bool(), -beta * (logp - ref_logp), 0.0)


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
    al., 2024), per token as PRIME (Cui et al., 2025). Rows g*k .. g*k+k-1 are k samples of one
    prompt; with G_{i,t} = sum_{s>=t} r_{i,s} and R_i = G_{i,0},  A_{i,t} = G_{i,t} - mean_{j!=i} R_j.
    A final score alone gives RLOO exactly. The baseline is taken once per response (PRIME takes
    it per token, which pays for length). (B, T) -> (B, T), 0 at masked positions."""
    r = torch.where(mask.bool(), rewards, 0.0)  # where, not *: NaN * 0 is NaN
    G = r.flip(1).cumsum(1).flip(1)  # (B, T) return-to-go
    R = r.sum(1).view(-1, k)  # (B/k, k) whole returns, a row per prompt
    baseline = (R.sum(1, keepdim=True) - R) / (k - 1)  # (B/k, k) the mean return of the k-1 others
    return torch.where(mask.bool(), G - baseline.reshape(-1, 1), 0.0)


def policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2):
    """The clipped policy loss over valid tokens (PPO's and RLOO's), with CleanRL's stats."""
    logratio = logp - old_logp
    ratio = logratio.exp()
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    pg_loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)  # pessimistic bound
    with torch.no_grad():  # 0-d tensors, kept on the device: update reads them once per rollout
        stats = {"pg_loss": pg_loss.detach(),
                 "approx_kl": masked_mean((ratio - 1) - logratio, mask),  # k3, Schulman 2020
                 "clipfrac": masked_mean(((ratio - 1).abs() > clip_eps).float(), mask)}
    return pg_loss, stats


def value_loss(values, old_values, returns, mask, clip_vf=0.2):
    """The clipped value loss over valid tokens: V may move clip_vf from the rollout's values."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip_vf, clip_vf)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (v_clipped - returns) ** 2), mask)


def ppo_loss(logp, old_logp, advantages, values, old_values, returns, mask, clip_eps=0.2, clip_vf=0.2):
    """Clipped policy loss and clipped value loss over valid tokens, with CleanRL's stats."""
    (pg_loss, stats), v_loss = policy_loss(logp, old_logp, advantages, mask, clip_eps), value_loss(
        values, old_values, returns, mask, clip_vf)
    return pg_loss, v_loss, {**stats, "v_loss": v_loss.detach()}


def explained_variance(returns, values, mask):
    """1 - Var(returns - V) / Var(returns) over the valid tokens: does the critic predict the returns?"""
    y, v = returns[mask.bool()], values[mask.bool()]
    var_y = y.var()
    return float("nan") if var_y == 0 else (1 - (y - v).var() / var_y).item()


# -----------------------------------------------------------------------------
# Rollout, update, and the loop

@torch.no_grad()
def rollout(agent, net, ref, reward_fn, prompts, generator, cfg, eot, pad, max_new_tokens):
    """Sample a response per prompt and read every token of it: a dict of (B, T) tensors. ref(idx,
    real) -> (log pi_ref, ...); reward_fn(idx, real, resp_mask) -> (B, T) task rewards (reward.py)."""
    net.eval(), ref.eval()  # no dropout in any model during RL
    idx, resp_mask, _ = agent.policy.generate(prompts, max_new_tokens, eot, pad, temperature=cfg.temperature,
                                              generator=generator)
    real, idx, resp_mask = pad_first((idx != pad) | resp_mask, idx, resp_mask)  # (B, T) each row's padding in front
    logp, values, _ = net(idx, real)  # log pi(y_t), V(s_t): recomputed, not taken from sampling
    ref_logp = ref(idx, real)[0]      # log pi_ref(y_t)
    task_rewards = reward_fn(idx, real, resp_mask)
    resp_mask = resp_mask.float()
    truncated = ~((idx == eot) & resp_mask.bool()).any(1)  # (B,) no <|endoftext|> within the limit
    task_rewards = task_rewards + final_token_rewards(truncated.float() * cfg.trunc_penalty, resp_mask)
    return dict(idx=idx, real=real, resp_mask=resp_mask, logp=logp, values=values, ref_logp=ref_logp,
                task_rewards=task_rewards, truncated=truncated)


def minibatches(B, cfg, generator):
    """cfg.ppo_epochs shuffled passes over B rows, in minibatches of cfg.minibatch row indices."""
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(B, generator=generator)
        yield from (perm[i:i + cfg.minibatch] for i in range(0, B, cfg.minibatch))


def update(net, opt, b, cfg, generator):
    """Epochs of clipped minibatch steps on rollout b: PPO's policy and value losses, or without a
    critic RLOO's policy loss alone. Returns the last epoch's mean stats, floats read in one sync."""
    net.eval()  # dropout stays off: the ratio must be exactly 1 before the first step
    n_mb, stats = -(-b["idx"].size(0) // cfg.minibatch), []
    for mb in minibatches(b["idx"].size(0), cfg, generator):
        logp, values, ent = net(b["idx"][mb], b["real"][mb])
        mb_mask = b["resp_mask"][mb]
        if values is None:  # RLOO: the clipped policy loss alone
            loss, s = policy_loss(logp, b["logp"][mb], b["advantages"][mb], mb_mask, cfg.clip_eps)
        else:  # separate parameters: the two losses need no weights
            pg_loss, v_loss, s = ppo_loss(logp, b["logp"][mb], b["advantages"][mb], values, b["values"][mb],
                                          b["returns"][mb], mb_mask, cfg.clip_eps, cfg.clip_vf)
            loss = pg_loss + v_loss
        step(opt, loss, cfg.ppo_grad_clip)
        stats.append({**s, "entropy": masked_mean(ent, mb_mask)})
    means = torch.stack([torch.stack(list(s.values())) for s in stats[-n_mb:]]).mean(0)  # (n_stats,)
    return dict(zip(stats[0], means.tolist()))


def warm_up_critic(net, opt, b, cfg, generator):
    """update's epochs with the value loss alone: the critic learns V of the SFT policy's rollout b."""
    net.eval()
    for mb in minibatches(b["idx"].size(0), cfg, generator):
        _, values, _ = net(b["idx"][mb], b["real"][mb], critic_only=True)
        step(opt, value_loss(values, b["values"][mb], b["returns"][mb], b["resp_mask"][mb], cfg.clip_vf),
             cfg.ppo_grad_clip)


def step(opt, loss, max_norm):
    """One AdamW step; the policy's and the critic's gradients each clipped to max_norm."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite PPO loss ({loss.item()})")
    opt.zero_grad(set_to_none=True)  # a parameter without a gradient is not stepped
    loss.backward()
    for group in opt.param_groups:
        nn.utils.clip_grad_norm_(group["params"], max_norm)
    opt.step()


def make_optimizer(agent, cfg):
    """AdamW with two groups: 0 the policy (ppo_lr), 1 the critic (vf_lr); eps as CleanRL."""
    critic = agent.critic.parameters() if agent.critic is not None else []
    return torch.optim.AdamW([{"params": agent.policy.parameters(), "lr": cfg.ppo_lr},
                             {"params": critic, "lr": cfg.vf_lr}], eps=1e-5, weight_decay=0.0)


def train(agent, ref, reward_fn, next_prompts, cfg, eot, pad, max_new_tokens, seed, path, name,
          curve_point, eval_every, ckpt_every, stop_after=0, net=None, save=True):
    """cfg.ppo_iters iterations of PPO (RLOO: an agent without a critic) against the frozen reference,
    resumed from path's checkpoint if any. next_prompts(rng, gen) -> (one rollout's prompt ids, the
    generator to sample them with); net: what agent's forward passes go through (agent by default);
    save: write checkpoints. Stops after stop_after iterations (0: never). Returns the state."""
    net = agent if net is None else net
    opt = make_optimizer(agent, cfg)
    torch.manual_seed(seed)  # and all else random in a run is drawn from the three below, saved in each checkpoint
    gen = torch.Generator(device=agent.policy.lm_head.weight.device).manual_seed(seed)  # sampling
    cpu_gen = torch.Generator().manual_seed(seed)  # minibatch order
    rng = random.Random(seed)                      # prompts
    state = load_state(path, agent, opt, gen, cpu_gen, rng)
    if state is None:  # a new run: the learning curve's first point, then the critic's warm-up
        t0 = time.perf_counter()
        state = {"iter": 0, "log": [], "curve": [curve_point(0)], "warmup_explained_var": []}
        state["t_curve0"], t0 = time.perf_counter() - t0, time.perf_counter()
        for _ in range(cfg.vf_warmup if agent.critic is not None else 0):
            prompts, sampler = next_prompts(rng, gen)
            b = rollout(agent, net, ref, reward_fn, prompts, sampler, cfg, eot, pad, max_new_tokens)
            rewards = kl_penalty_rewards(b["logp"], b["ref_logp"], b["resp_mask"], cfg.beta) + b["task_rewards"]
            _, b["returns"] = compute_gae(rewards, b["values"], b["resp_mask"], cfg.gamma, cfg.lam)
            state["warmup_explained_var"].append(explained_variance(b["returns"], b["values"], b["resp_mask"]))
            warm_up_critic(net, opt, b, cfg, cpu_gen)
        state["t_warmup"] = time.perf_counter() - t0
    start = state["iter"]
    for it in tqdm(range(start, cfg.ppo_iters), desc=name, dynamic_ncols=True, initial=start, total=cfg.ppo_iters):
        t0 = time.perf_counter()
        # 1. rollout: sample a response per prompt, read log pi, V, log pi_ref and the task reward of every token
        prompts, sampler = next_prompts(rng, gen)
        b = rollout(agent, net, ref, reward_fn, prompts, sampler, cfg, eot, pad, max_new_tokens)
        # 2. rewards: the KL penalty to the reference on every response token, plus the task reward
        rewards = kl_penalty_rewards(b["logp"], b["ref_logp"], b["resp_mask"], cfg.beta) + b["task_rewards"]
        # 3. advantages: GAE over the critic's values, or without a critic RLOO over each prompt's rloo_k samples
        if b["values"] is None:
            advantages = rloo_advantages(rewards, b["resp_mask"], cfg.rloo_k)
        else:
            advantages, b["returns"] = compute_gae(rewards, b["values"], b["resp_mask"], cfg.gamma, cfg.lam)
        b["advantages"] = whiten(advantages, b["resp_mask"])  # the returns stay unwhitened: the critic's targets
        t1 = time.perf_counter()
        # 4. update: epochs of clipped minibatch steps on this rollout
        stats = update(net, opt, b, cfg, cpu_gen)
        # 5. the plumbing: log line, learning curve, checkpoint
        log(state, it + 1, b, stats, name, (it + 1) % eval_every == 0 or it + 1 == cfg.ppo_iters, curve_point, t0, t1)
        if save and ((it + 1) % ckpt_every == 0 or it + 1 == cfg.ppo_iters):
            save_state(path, agent, opt, gen, cpu_gen, rng, state)
        if stop_after and it + 1 == start + stop_after:
            break
    return state


# -----------------------------------------------------------------------------
# Plumbing beside the loop: the log, the checkpoint

def log(state, it, b, stats, name, curve_now, curve_point, t_start, t_update):
    """Iteration it's row of the log (per response the mean summed task reward, KL, length and
    truncation; update's stats; seconds per part), a learning-curve point if curve_now, a log line."""
    t0, mask = time.perf_counter(), b["resp_mask"]
    state["curve"] += [curve_point(it)] if curve_now else []
    row = {"iter": it, "reward": b["task_rewards"].sum(1).mean().item(),
           "kl": torch.where(mask.bool(), b["logp"] - b["ref_logp"], 0.0).sum(1).mean().item(),
           "length": mask.sum(1).mean().item(), "truncated": b["truncated"].float().mean().item(), **stats,
           **({"explained_var": explained_variance(b["returns"], b["values"], mask)} if "returns" in b else {}),
           "t_rollout": t_update - t_start, "t_update": t0 - t_update, "t_curve": time.perf_counter() - t0}
    state["log"].append(row)
    state["iter"] = it
    tqdm.write(f"{name} iter {it} | reward {row['reward']:.3f} | kl {row['kl']:.3f} | clipfrac {row['clipfrac']:.3f} | "
               f"entropy {row['entropy']:.3f} | len {row['length']:.1f} | s: rollout {row['t_rollout']:.2f} "
               f"update {row['t_update']:.2f} curve {row['t_curve']:.2f}")


def save_state(path, agent, opt, gen, cpu_gen, rng, state):
    """A resumable checkpoint: the policy's and the critic's weights, the optimiser, the random states, the state."""
    critic = agent.critic.state_dict() if agent.critic is not None else {}
    save_atomic({"policy": agent.policy.state_dict(), "critic": critic, "optimizer": opt.state_dict(),
                 "gen": gen.get_state(), "cpu_gen": cpu_gen.get_state(), "rng": rng.getstate(), **state}, path)


def load_state(path, agent, opt, gen, cpu_gen, rng):
    """Restore what save_state wrote into the given objects; the state, or None without a checkpoint."""
    if not os.path.exists(path):
        return None
    ck = torch.load(path, weights_only=True)
    agent.policy.load_state_dict(ck["policy"])
    if agent.critic is not None:
        agent.critic.load_state_dict(ck["critic"])
    opt.load_state_dict(ck["optimizer"])
    gen.set_state(ck["gen"].cpu()), cpu_gen.set_state(ck["cpu_gen"]), rng.setstate(ck["rng"])  # states on the CPU
    print(f"resuming at iteration {ck['iter']} from {path}")
    return {k: ck[k] for k in ("iter", "log", "curve", "t_curve0", "t_warmup", "warmup_explained_var")}
