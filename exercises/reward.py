"""
Exercises on reward.py: the token reward model's loss, and the reward tensor PPO reads per
token. Replace each `raise NotImplementedError`, then grade (from the repository root):

    python -m exercises.grade token_loss reward_tensor

Shapes: B rows (responses), T positions (prompt + response, padded), K classes; class 0 is
always "bad"; -1 in a class tensor means "ignore" (prompt, padding), as in nanoGPT.
"""

import torch  # noqa: F401 (for your code)
from torch.nn import functional as F  # noqa: F401 (you may want F.cross_entropy or F.log_softmax)

from reward import last_index  # noqa: F401 (given: the index of the last True of each mask row, (B, T) -> (B,))


def token_loss(logits, classes, bad_weight=1.0, reduction="mean"):
    """The token RM's loss: cross-entropy of every labelled token, class 0 ("bad") weighted.

    logits (B, T, K), classes (B, T) with class indices, or -1 where ignored. With
    nll_i = -log softmax(logits_i)[classes_i] and w_i = bad_weight if classes_i == 0 else 1,
    over the labelled tokens i:
        reduction="mean":  sum_i w_i * nll_i / sum_i w_i
        reduction="sum":   sum_i w_i * nll_i        (train_token_rm divides by the weights itself)
    Ignored positions must change nothing, not even through their gradient.
    Hint: F.cross_entropy does all of it (weight=, ignore_index=, reduction=) on
    (B*T, K) logits and (B*T,) classes; compute it by hand once to see why.
    """
    raise NotImplementedError


def final_token_rewards(scores, resp_mask):
    """A (B, T) float tensor with scores (B,) placed on the last response token of each row
    (the <|endoftext|> token, where a sequence RM reads its score) and 0 elsewhere, also on
    rows whose resp_mask (B, T, bool or 0/1 float) is all False.

    This is what standard PPO reads per token: 0, 0, ..., 0, R.
    Hint: last_index(resp_mask) gives the columns; index the rows with torch.arange(B).
    """
    raise NotImplementedError


def normalise(r, resp_mask, norm):
    """Standardise task rewards r (B, T) with a method's norm {"center": c, "scale": s}
    (fitted on SFT samples, reward.fit_norm: c and s are the mean and std of their summed
    rewards):
        r'_t = (r_t - c * [t is the last response token]) / s
    so that a response's summed reward is (its raw sum - c) / s: mean 0, std 1 on SFT
    samples, for the dense token rewards and for a final score alike. This is what
    fine-grained PPO reads per token.
    Why subtract c once per response and not per token? The token RM's r_t = -p(bad) is
    <= 0, so c < 0; subtracting c / T_b on every token would pay -c / T_b for each extra
    harmless token: a length bonus the sequence methods do not get.
    Hint: final_token_rewards (yours above) puts c on the right token.
    """
    raise NotImplementedError
