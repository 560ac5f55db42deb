"""
DPO: preference optimisation with no reward model and no RL (Rafailov et al., "Direct
Preference Optimization: Your Language Model is Secretly a Reward Model", NeurIPS 2023).

The policy pi starts from the SFT model, which also stays frozen as the reference pi_ref. A
response y to a prompt x has the implicit reward

    r(x, y) = beta_dpo * log pi(y | x) / pi_ref(y | x)
            = beta_dpo * sum_t [log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)]

and DPO fits the Bradley-Terry likelihood of the pairs (x, y_w preferred to y_l) with it:

    L = -log sigma(r(x, y_w) - r(x, y_l))

Two methods (reward.METHODS): `dpo` on (chosen, rejected), the pairs the sequence RM of `ppo`
learns from, and `dpo_edits` on (edited, rejected), the minimal edits of `fg_ppo`.

Why DPO on minimal edits is implicitly token-level. An edit keeps the rejected answer up to
its first change: y_w and y_l share every token before the first difference, and such a
token has the same context in both, hence the same log pi and log pi_ref. Its terms cancel
in r(x, y_w) - r(x, y_l), so the loss, and its gradient, depend only on the tokens from the
first difference on: the shared prefix neither counts nor pulls (tests/test_dpo.py checks that
the gradient there is exactly zero). The loss concentrates on the edit and what follows it;
tokens after the edit that the two answers share again do not cancel (their contexts differ).

Budget (train.stage_dpo): `dpo_steps` AdamW steps of `dpo_batch` pairs drawn at random from
the training pairs of the seed's reward models (train.rm_split: the same pairs for every
method); 0 means as many steps as standard PPO's policy updates, ppo_iters * ppo_epochs *
ceil(rollout_batch / minibatch). The reference's log-probs are computed once, before step 1.

Simplified, said plainly: no dropout (as in PPO), a constant learning rate after a 20-step
warm-up (as the reward models), log-probs summed over the response tokens (the eot included)
with no length normalisation, no label smoothing. A run is short (minutes at the default
preset) and saved once, at the end: a killed run starts again from step 0 and, with the same
seed and threads, reaches the same weights. --stop_after does not apply to it. Written for
one process: train.py hands it `net`, what the policy's forward passes go through (length
micro-batches; under torchrun DDP, each process drawing its own share of each batch), and
saves what it returns.
"""

import functools
import random
import time
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from tqdm import tqdm

from model import autocast, token_logprobs


@dataclass
class DPOConfig:
    beta_dpo: float = 0.1       # DPO's beta: the implicit reward is beta_dpo * log(pi / pi_ref) of a response
    dpo_steps: int = 0          # AdamW steps of DPO (0: standard PPO's policy steps,
                                # ppo_iters * ppo_epochs * ceil(rollout_batch / minibatch))
    dpo_batch: int = 16         # preference pairs per step
    dpo_lr: float = 2e-5
    dpo_grad_clip: float = 1.0  # max gradient norm


def sequence_logprobs(lp, resp_mask):
    """log pi(y | x) of each row, (B,): the log-probs of the response tokens (resp_mask (B, T),
    the eot included) summed; lp (B, T) from model.token_logprobs (column t is
    log p(idx[t] | idx[<t]), read at position t-1)."""
    return torch.where(resp_mask, lp, 0.0).sum(1)


def implicit_reward(logp, ref_logp, beta):
    """DPO's reward of a response: beta * log(pi(y | x) / pi_ref(y | x)), from summed log-probs."""
    return beta * (logp - ref_logp)


def dpo_loss(logp_w, logp_l, ref_w, ref_l, beta):
    """-log sigma(r_w - r_l) summed over the pairs, with r the implicit rewards of the preferred
    (w) and rejected (l) responses; all inputs (B,). Returns (summed loss, stats summed over the
    pairs: the loss, whether r_w > r_l, the margin r_w - r_l, r_w and r_l), as TRL logs them."""
    r_w, r_l = implicit_reward(logp_w, ref_w, beta), implicit_reward(logp_l, ref_l, beta)
    loss = -F.logsigmoid(r_w - r_l)  # (B,)
    with torch.no_grad():
        stats = {"loss": loss.sum(), "reward_acc": (r_w > r_l).float().sum(), "margin": (r_w - r_l).sum(),
                 "reward_chosen": r_w.sum(), "reward_rejected": r_l.sum()}
    return loss.sum(), stats


def token_logps(gpt, idx, real):
    """(B, T) log pi(idx[t] | idx[<t]) of a GPT, column 0 at 0 (model.token_logprobs)."""
    return token_logprobs(gpt(idx, real=real)[0], idx)


def logprobs(net, chat, prompts, responses, device):
    """log pi(y | x) of each (prompt, response) text pair, (B,); net(idx, real) -> (B, T) token
    log-probs (token_logps of a GPT, or train.py's micro-batched wrapper of it)."""
    idx, real = chat.batch(prompts, responses, device)
    with autocast(device):
        lp = net(idx, real)  # (B, T)
    return sequence_logprobs(lp, chat.response_mask(idx, real))


# -----------------------------------------------------------------------------
# The loop: steps AdamW steps on random batches of pairs

def train(policy, ref, chat, pairs, better, cfg, steps, seed, name, curve_point, device, net=None):
    """DPO of policy (trained in place) against the frozen reference on pairs, records whose
    field better (chosen or edited) is preferred to "rejected". ref(idx, real) -> the
    reference's token log-probs; net: the same of the policy, what it trains through
    (token_logps of policy by default). curve_point(step) -> a learning-curve point, taken at
    0 and every steps // 8 steps. Returns the state {"iter", "log", "curve"}."""
    net = functools.partial(token_logps, policy) if net is None else net
    x = [r["prompt"] for r in pairs]
    with torch.no_grad():  # pi_ref never changes: its log-probs once, 64 pairs at a time
        ref_lp = {k: torch.cat([logprobs(ref, chat, x[i:i + 64], [r[k] for r in pairs[i:i + 64]], device)
                                for i in range(0, len(pairs), 64)]) for k in (better, "rejected")}
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.dpo_lr, eps=1e-5, weight_decay=0.0)
    g, every = random.Random(seed), max(steps // 8, 1)
    policy.eval()  # no dropout: at step 0 pi = pi_ref exactly
    state = {"iter": 0, "log": [], "curve": [curve_point(0)]}
    for step in tqdm(range(1, steps + 1), desc=name, dynamic_ncols=True):
        t0 = time.perf_counter()
        for group in opt.param_groups:  # short warm-up, then constant
            group["lr"] = cfg.dpo_lr * min(1.0, step / 20)
        batch = g.sample(range(len(pairs)), min(cfg.dpo_batch, len(pairs)))
        prompts = [x[i] for i in batch]
        # the method: summed log-probs of both responses, their implicit rewards against pi_ref, the BT loss
        logp_w, logp_l = logprobs(net, chat, prompts * 2, [pairs[i][k] for k in (better, "rejected") for i in batch],
                                  device).chunk(2)  # both responses of every pair in one batch
        loss, stats = dpo_loss(logp_w, logp_l, ref_lp[better][batch], ref_lp["rejected"][batch], cfg.beta_dpo)
        loss = loss / len(batch)  # the mean over the pairs
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name} stopped at step {step}: loss is {loss.item()}; nothing saved")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.dpo_grad_clip)
        opt.step()
        # the plumbing: log, learning curve
        row = {"step": step, **{k: (v / len(batch)).item() for k, v in stats.items()},
               "t_update": time.perf_counter() - t0}
        state["log"].append(row)
        if step % every == 0 or step == steps:
            t0 = time.perf_counter()
            state["curve"].append(curve_point(step))
            row["t_curve"] = time.perf_counter() - t0
            tqdm.write(f"{name} step {step} | loss {row['loss']:.4f} | reward_acc {row['reward_acc']:.3f} | "
                       f"margin {row['margin']:.3f} | s: update {row['t_update']:.2f} curve {row['t_curve']:.2f}")
    state["iter"] = steps
    return state
