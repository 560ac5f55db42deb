"""
Length micro-batching. A batch of sequences padded to its longest row wastes the padded
positions: a toy answer is 10 to 110 tokens, so about half of a rollout is padding. Cut into
a few micro-batches of rows of similar length (tokenizer.split_by_length), each padded only
to its own longest row, a forward costs about its real tokens. A row attends only to its own
real tokens (model.GPT.hidden), so every row's outputs are those of the whole batch at once,
up to float rounding.

train.py wraps the method's models and scoring functions with these before handing them over:
ByLength for a module (what an optimiser trains through, what DDP wraps), by_length for a
function.
"""

import torch
from torch import nn
from torch.nn import functional as F

from tokenizer import split_by_length


def by_length(f, idx, real, *rows, max_parts=4):
    """f(idx, real, *rows) of a batch padded on the left (every row ending at the last column,
    tokenizer.pad_first), run as up to max_parts micro-batches of rows of similar length, each
    cut to its longest row. f returns a (b, t, ...) tensor or a tuple of them (None passes
    through); the result is (B, T, ...) in the batch's row order, 0 in the columns a
    micro-batch did not reach."""
    *lengths, left = torch.cat([real.sum(1), real[:, -1].all().long().view(1)]).tolist()  # the one host read
    assert left, "by_length reads rows padded on the left (tokenizer.pad_first)"
    T, runs = idx.size(1), split_by_length(lengths, max_parts)
    order = torch.tensor([i for run in runs for i in run], device=idx.device)  # one copy to the device
    outs, start = [], 0
    for run in runs:
        n, r = max(lengths[i] for i in run), order[start:start + len(run)]
        out = f(idx[r, -n:], real[r, -n:], *(x[r, -n:] for x in rows))
        outs.append(out if isinstance(out, tuple) else (out,))
        start += len(run)
    back = torch.argsort(order)  # sorted -> batch order

    def join(parts):  # (b, n, ...) per run -> (B, T, ...): padded back on the left, rows put back
        if parts[0] is None:
            return None
        return torch.cat([F.pad(p, (0, 0) * (p.dim() - 2) + (T - p.size(1), 0)) for p in parts])[back]
    joined = tuple(join(parts) for parts in zip(*outs))
    return joined if isinstance(out, tuple) else joined[0]


def micro_batched(f):
    """f(idx, real, *rows), run by_length: a scoring function (a reward function) micro-batched."""
    return lambda idx, real, *rows: by_length(f, idx, real, *rows)


class ByLength(nn.Module):
    """module with its forward run by_length: f(module, idx, real, **kw) per micro-batch (by
    default module(idx, real, **kw)). A module, so that an optimiser's parameters and
    DistributedDataParallel see the wrapped module's."""

    def __init__(self, module, f=None):
        super().__init__()
        self.module, self.f = module, f

    def forward(self, idx, real, **kw):
        f = self.f or (lambda m, i, r, **k: m(i, r, **k))
        return by_length(lambda i, r: f(self.module, i, r, **kw), idx, real)
