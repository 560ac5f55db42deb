"""
Reward models on a GPT trunk initialised from the SFT weights:

- TokenRM: a per-token classifier trained on the Myers-diff labels of minimal edits
  (the fine-grained reward of Xu et al., ACL 2024). Two label schemes:
    paper        3 classes bad / neutral / good from token_labels; r_t = p(good) - p(bad).
    bad_vs_rest  2 classes; bad = deleted or replaced tokens of the original plus
                 insertion points (the original token before which the edit inserts
                 text, or <|endoftext|> when it appends), so that an omission has a token
                 to blame; r_t = -p(bad).
  Why two: an inserted correct token looks exactly like an unchanged correct token, so
  "good" is close to unlearnable, and omissions leave no token at all without insertion
  points (a prototype measured F1 ~ 0 for "good"; insertion points follow TLCR, arXiv 2407.16574).
- SeqRM: a scalar head read at the last response token (<|endoftext|>), trained with the
  Bradley-Terry loss -log σ(r_chosen - r_rejected) (Ouyang et al., 2022). Trained on
  (chosen, rejected) it is the standard RLHF baseline; on (edited, rejected) it is the
  ablation that sees the same edited data as the token RM but gives one number.

Labels use -1 for "ignore" (prompt, padding), as nanoGPT's targets do.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class RMConfig:
    rm_scheme: str = "bad_vs_rest"  # bad_vs_rest | paper (see the module docstring)
    rm_steps: int = 300         # optimisation steps of every RM, whatever the number of pairs
    rm_batch: int = 32          # preference pairs per step
    rm_lr: float = 3e-4
    rm_bad_weight: float = 1.0  # class weight of "bad" in the token loss; 1 keeps p(bad)
                                # calibrated, which is what PPO reads as a reward
    rm_center: bool = True      # shift token rewards so SFT samples average 0 per token


SCHEMES = {  # gold label (-1 / 0 / +1) -> class index; class 0 is always "bad"
    "paper": {-1: 0, 0: 1, 1: 2},
    "bad_vs_rest": {-1: 0, 0: 1, 1: 1},
}


def last_index(mask):
    """Index of the last real token of each row of mask (B, T) -> (B,)."""
    return mask.size(1) - 1 - mask.flip(1).int().argmax(1)


class TokenRM(nn.Module):

    def __init__(self, gpt, scheme="bad_vs_rest"):
        super().__init__()
        assert scheme in SCHEMES, f"rm_scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}"
        self.gpt, self.scheme = gpt, scheme
        self.head = nn.Linear(gpt.config.n_embd, len(set(SCHEMES[scheme].values())))

    def forward(self, idx, mask):
        return self.head(self.gpt.hidden(idx, mask))  # (B, T, n_classes)

    def token_rewards(self, idx, mask, resp_mask):
        """r_t (B, T) on response tokens, 0 elsewhere: -p(bad), or p(good) - p(bad) (paper)."""
        p = F.softmax(self(idx, mask).float(), dim=-1)  # (B, T, K)
        r = -p[..., 0] if self.scheme == "bad_vs_rest" else p[..., 2] - p[..., 0]
        return r * resp_mask


class SeqRM(nn.Module):

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt
        self.head = nn.Linear(gpt.config.n_embd, 1)

    def forward(self, idx, mask):
        h = self.gpt.hidden(idx, mask)  # (B, T, C)
        last = h[torch.arange(idx.size(0), device=idx.device), last_index(mask)]  # (B, C): the eot token
        return self.head(last).squeeze(-1).float()  # (B,)


def token_loss(logits, classes, bad_weight=1.0):
    """Cross-entropy per token; classes (B, T) are class indices, -1 where ignored."""
    w = torch.ones(logits.size(-1), device=logits.device)
    w[0] = bad_weight
    return F.cross_entropy(logits.float().flatten(0, 1), classes.flatten(), weight=w, ignore_index=-1)


def bt_loss(r_chosen, r_rejected):
    """Bradley-Terry: -log σ(r_chosen - r_rejected), averaged over pairs."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def prf(pred, gold, k):
    """Precision, recall and F1 of class k."""
    tp = ((pred == k) & (gold == k)).sum().item()
    p = tp / max((pred == k).sum().item(), 1)
    r = tp / max((gold == k).sum().item(), 1)
    return {"precision": p, "recall": r, "f1": 2 * p * r / max(p + r, 1e-12)}


def spearman(x, y):
    """Spearman's rank correlation, ties given their average rank."""
    def ranks(v):
        v = torch.as_tensor(v, dtype=torch.float64)
        order = v.argsort()
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for u in v.unique():  # average the ranks of ties
            r[v == u] = r[v == u].mean()
        return r
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return (rx * ry).sum().item() / max((rx.norm() * ry.norm()).item(), 1e-12)
