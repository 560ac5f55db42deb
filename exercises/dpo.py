"""
Exercise on dpo.py: the DPO loss. Replace `raise NotImplementedError`, then grade (from the
repository root):

    python -m exercises.grade dpo_loss

Shapes: every input is (B,), one number per preference pair: the summed log-probability of
the whole response (its tokens' log pi(y_t | x, y_<t) added up) under the policy and under the
frozen reference, for the preferred response (w) and the rejected one (l).
"""

import torch  # noqa: F401 (for your code)
from torch.nn import functional as F  # noqa: F401 (you may want F.logsigmoid)


def dpo_loss(logp_w, logp_l, ref_w, ref_l, beta):
    """DPO's loss (Rafailov et al., 2023), summed over the pairs, and its statistics.

    The implicit reward of a response is r = beta * (log pi(y | x) - log pi_ref(y | x)), so
    r_w = beta * (logp_w - ref_w) and r_l = beta * (logp_l - ref_l). The loss of a pair is the
    Bradley-Terry negative log-likelihood that w beats l:
        loss = -log sigma(r_w - r_l)
    Return (loss summed over the pairs, stats), with stats a dict of tensors summed over the
    pairs and computed without gradient: "loss", "reward_acc" (1 where r_w > r_l), "margin"
    (r_w - r_l), "reward_chosen" (r_w) and "reward_rejected" (r_l).
    Hint: -log sigma(z) is -F.logsigmoid(z), stable for large |z| where log(sigmoid(z)) is not.
    At pi = pi_ref every r is 0 and the loss is log 2 per pair: a good first check.
    """
    raise NotImplementedError
