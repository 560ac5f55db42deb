"""
Exercises on ppo.py: generalised advantage estimation and the clipped PPO loss. Replace
each `raise NotImplementedError`, then grade (from the repository root):

    python -m exercises.grade gae ppo_loss

All per-token tensors are (B, T) over prompt + response; `mask` (B, T, bool or 0/1 float)
is True on the tokens that count (the response tokens), and the others must change nothing.
"""

import torch  # noqa: F401 (for your code)

from ppo import masked_mean  # noqa: F401 (given: mean of x over mask, divided by mask.sum().clamp(min=1))


def compute_gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (Schulman et al., 2016), on (B, T) tensors:

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns_t = A_t + V_t

    where t+1 is the next *valid* (mask) token of the row; after the last one V = A = 0.
    Return (advantages, returns), both 0 at masked positions. Rewards and values at masked
    positions must never reach a valid token, even when they are NaN (so multiplying by the
    mask is not enough: NaN * 0 is NaN; use torch.where).
    Hint: CleanRL's loop: for t in reversed(range(T)), carry `lastgaelam` (A_{t+1}) and
    `nextvalue` (V_{t+1}), both (B,), and update them only where mask[:, t] is True.
    """
    raise NotImplementedError


def ppo_loss(logp, old_logp, advantages, values, old_values, returns, mask, clip_eps=0.2, clip_vf=0.2):
    """The clipped PPO objective (Schulman et al., 2017), as losses to minimise, with
    masked means over the valid tokens:

        ratio     = exp(logp - old_logp)
        pg_loss   = mean( max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps)) )
        V_clipped = old_values + clip(values - old_values, -clip_vf, clip_vf)
        v_loss    = 0.5 * mean( max((values - returns)^2, (V_clipped - returns)^2) )

    The max is the pessimistic bound: a token whose ratio has already moved past the clip
    range in the direction its advantage pushes gets no gradient.
    Return (pg_loss, v_loss, stats) with stats a dict of floats (no gradient), CleanRL's names:
        "pg_loss", "v_loss": the two losses' values;
        "approx_kl": mean((ratio - 1) - log ratio)  (the k3 estimator of KL(old || new));
        "clipfrac": mean(|ratio - 1| > clip_eps)    (the fraction of tokens clipped).
    """
    raise NotImplementedError
