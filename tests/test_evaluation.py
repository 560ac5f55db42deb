"""Tests for evaluation.py: the bootstrap CI, precision/recall/F1 and Spearman on hand-computed
cases and against oracles."""
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from evaluation import bootstrap_ci, prf, spearman  # noqa: E402

# -----------------------------------------------------------------------------
# Bootstrap


def test_bootstrap_ci_constant_data_zero_width():
    """Constant data: the CI is the constant itself, for one seed and for several."""
    assert bootstrap_ci([[0.5] * 50]) == pytest.approx([0.5, 0.5])
    assert bootstrap_ci([[1.0] * 20] * 3) == pytest.approx([1.0, 1.0])


def test_bootstrap_ci_binary_matches_normal_approximation():
    """1 seed x P Bernoulli values: the CI holds the mean and is about mean +- 1.96 sqrt(p(1-p)/P)."""
    g = torch.Generator().manual_seed(0)
    P = 400
    x = (torch.rand(P, generator=g) < 0.3).double()
    p = x.mean().item()
    lo, hi = bootstrap_ci([x.tolist()])
    half = 1.96 * math.sqrt(p * (1 - p) / P)
    assert lo < p < hi
    assert lo == pytest.approx(p - half, abs=0.2 * half)
    assert hi == pytest.approx(p + half, abs=0.2 * half)
    assert bootstrap_ci([x.tolist()]) == [lo, hi]  # seeded: the same interval every time


# -----------------------------------------------------------------------------
# Metrics

def test_prf_hand_case():
    """Precision, recall and F1 of one class, worked by hand; no predictions of it gives 0, not an error."""
    pred = torch.tensor([0, 0, 1, 1, 0, 0])
    gold = torch.tensor([0, 1, 1, 0, 0, 1])
    out = prf(pred, gold, 0)  # tp = 2, predicted 4, gold 3
    assert out["precision"] == pytest.approx(0.5)
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(4 / 7)
    out1 = prf(pred, gold, 1)  # tp = 1, predicted 2, gold 3
    assert (out1["precision"], out1["recall"], out1["f1"]) == pytest.approx((0.5, 1 / 3, 0.4))
    none = prf(torch.ones(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), 0)
    assert none == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_spearman_monotone_and_reversed():
    """Spearman is 1 for any increasing relation and -1 for a decreasing one."""
    x = [0.5, -2.0, 3.0, 1.0, 10.0, -7.0]
    assert spearman(x, [v ** 3 + 1 for v in x]) == pytest.approx(1.0, abs=1e-12)
    assert spearman(x, [math.exp(-v) for v in x]) == pytest.approx(-1.0, abs=1e-12)
    assert spearman(torch.tensor(x), torch.tensor(x)) == pytest.approx(1.0, abs=1e-12)


def _average_ranks(v):
    """1-based ranks, ties sharing the mean of the positions they span (computed by counting)."""
    v = list(v)
    return [sum(u < w for u in v) + (sum(u == w for u in v) + 1) / 2 for w in v]


def test_spearman_with_ties_hand_computed():
    """With ties, Spearman is the Pearson correlation of average ranks (x=[1,2,2,3], y=[1,3,2,4]: 4.5/sqrt(22.5))."""
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5), abs=1e-12)
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.integers(0, 4, 12).astype(float)  # many ties
        y = x + rng.integers(-2, 3, 12)
        expected = np.corrcoef(_average_ranks(x), _average_ranks(y))[0, 1]
        assert spearman(x.tolist(), y.tolist()) == pytest.approx(expected, abs=1e-12)


def test_spearman_matches_scipy():
    """Agrees with scipy.stats.spearmanr on tied data."""
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    x = rng.integers(0, 5, 30).astype(float)
    y = 0.5 * x + rng.normal(size=30).round(0)
    assert spearman(x.tolist(), y.tolist()) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
