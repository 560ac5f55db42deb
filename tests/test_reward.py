"""Tests for reward.py: token and Bradley-Terry losses, which token the RMs read, token rewards,
that a few steps of training lower the losses, and the evaluation metrics."""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import tiny  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from reward import SCHEMES, SeqRM, TokenRM, bt_loss, last_index, token_loss  # noqa: E402

torch.set_num_threads(1)

PAD, EOT = 0, 1


def _randomise_head(head, seed=1, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(scale * torch.randn(head.weight.shape, generator=g))
        head.bias.copy_(torch.randn(head.bias.shape, generator=g))


def _batch(seed=0):
    """A left-padded batch: idx, real-token mask, response mask, per-token classes (-1 off response)."""
    g = torch.Generator().manual_seed(seed)
    rows = [(2, 3, 5), (0, 4, 6), (4, 2, 4)]  # (left padding, prompt length, response length)
    T = 10  # every row's total
    idx = torch.full((len(rows), T), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    resp = torch.zeros_like(mask)
    for b, (p, n, k) in enumerate(rows):
        s = T - n - k  # rows end together: s == p
        assert s == p
        idx[b, s:] = torch.randint(2, 50, (n + k,), generator=g)
        mask[b, s:] = True
        resp[b, s + n:] = True
    classes = torch.where(resp, torch.randint(0, 2, idx.shape, generator=g), -1)
    return idx, mask, resp, classes


# -----------------------------------------------------------------------------
# Losses (the token loss by hand: the exercises' graders, exercises/checks.py, run on reward.py
# by tests/test_exercises.py)

@pytest.mark.parametrize("scheme", ["bad_vs_rest", "bad_neutral_good"])
def test_token_rm_loss_ignores_padding_token_ids(scheme):
    """On a left-padded batch, changing the token ids at padding positions leaves the token loss unchanged."""
    rm = TokenRM(tiny(), scheme).eval()
    _randomise_head(rm.head)
    idx, mask, resp, classes = _batch()
    with torch.no_grad():
        loss = token_loss(rm(idx, mask), classes)
        idx2 = torch.where(mask, idx, torch.randint(2, 50, idx.shape, generator=torch.Generator().manual_seed(5)))
        assert not torch.equal(idx2, idx)
        loss2 = token_loss(rm(idx2, mask), classes)
        # and the real positions' outputs themselves do not move
        torch.testing.assert_close(rm(idx2, mask)[mask], rm(idx, mask)[mask], atol=1e-6, rtol=0)
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-6)


def test_bt_loss_hand_computed():
    """-log sigmoid(margin): log(1 + e^-1) for margin 1, log 2 for a tie, averaged over pairs."""
    assert bt_loss(torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-7)
    assert bt_loss(torch.tensor([0.3]), torch.tensor([0.3])).item() == pytest.approx(math.log(2), abs=1e-7)
    pair = bt_loss(torch.tensor([2.0, -1.0]), torch.tensor([0.0, 0.5]))
    assert pair.item() == pytest.approx((math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1.5))) / 2, abs=1e-6)


def test_bt_loss_swap_symmetry():
    """Swapping chosen and rejected negates the margin: bt(a, b) - bt(b, a) = -(a - b) per pair."""
    g = torch.Generator().manual_seed(2)
    a, b = 3 * torch.randn(20, generator=g, dtype=torch.float64), 3 * torch.randn(20, generator=g, dtype=torch.float64)
    for ai, bi in zip(a, b):
        ai, bi = ai.view(1), bi.view(1)
        assert bt_loss(bi, ai).item() == pytest.approx(-F.logsigmoid(bi - ai).item(), abs=1e-12)
        assert (bt_loss(ai, bi) - bt_loss(bi, ai)).item() == pytest.approx(-(ai - bi).item(), abs=1e-9)


# -----------------------------------------------------------------------------
# Which token the RMs read

def test_last_index_hand_masks():
    """last_index finds the last True of each row, wherever the padding is."""
    mask = torch.tensor([[0, 1, 1, 0],
                         [1, 0, 0, 0],
                         [1, 1, 1, 1],
                         [0, 0, 1, 0],
                         [0, 0, 0, 1],
                         [1, 0, 1, 0]], dtype=torch.bool)  # a gap: still the last True
    assert last_index(mask).tolist() == [2, 0, 3, 2, 3, 2]
    assert last_index(mask.float()).tolist() == [2, 0, 3, 2, 3, 2]


def test_seq_rm_reads_last_real_token():
    """Left and right padding (mask False) leave SeqRM's score equal to that of the bare sequence."""
    rm = SeqRM(tiny()).eval()
    _randomise_head(rm.head)
    seq = torch.tensor([5, 9, 23, 41, 7, EOT])
    with torch.no_grad():
        alone = rm(seq[None], torch.ones(1, 6, dtype=torch.bool))
        for left, right in [(3, 0), (0, 2), (3, 2), (1, 5)]:
            T = left + 6 + right
            idx = torch.full((1, T), PAD, dtype=torch.long)
            idx[0, left:left + 6] = seq
            idx[0, left + 6:] = torch.arange(right) + 30  # right padding need not be PAD tokens
            mask = torch.zeros(1, T, dtype=torch.bool)
            mask[0, left:left + 6] = True
            torch.testing.assert_close(rm(idx, mask), alone, atol=1e-5, rtol=0)
        # and it does read the eot: changing the last real token changes the score
        other = seq.clone()
        other[-1] = 11
        assert (rm(other[None], torch.ones(1, 6, dtype=torch.bool)) - alone).abs().item() > 1e-4
        # a batch of rows with different paddings scores each row as if alone
        idx = torch.tensor([[PAD, PAD, 5, 9, 23, 41, 7, EOT],
                            [5, 9, 23, 41, 7, EOT, PAD, PAD]])
        mask = idx != PAD
        torch.testing.assert_close(rm(idx, mask), alone.expand(2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("scheme", ["bad_vs_rest", "bad_neutral_good"])
def test_token_rewards_values(scheme):
    """token_rewards is 0 off the response and -p(bad) resp. p(good) - p(bad) on it, within its range."""
    rm = TokenRM(tiny(), scheme).eval()
    _randomise_head(rm.head, scale=10.0)
    idx, mask, resp, _ = _batch()
    with torch.no_grad():
        r = rm.token_rewards(idx, mask, resp)
        p = F.softmax(rm(idx, mask), -1)
    assert rm.head.out_features == (2 if scheme == "bad_vs_rest" else 3)
    assert r.shape == idx.shape
    assert (r[~resp] == 0).all()
    if scheme == "bad_vs_rest":
        expected = -p[..., 0]
        assert (r >= -1).all() and (r <= 0).all()
    else:
        expected = p[..., 2] - p[..., 0]
        assert (r >= -1).all() and (r <= 1).all()
    torch.testing.assert_close(r[resp], expected[resp], atol=1e-6, rtol=0)
    assert r[resp].abs().max() > 0.05  # not trivially zero


def test_token_rm_unknown_scheme_raises():
    """An unknown scheme is refused with a message naming the allowed ones."""
    with pytest.raises((AssertionError, ValueError)) as e:
        TokenRM(tiny(), "good_vs_rest")
    for name in SCHEMES:
        assert name in str(e.value)


def test_schemes_map_bad_to_class_zero():
    """Gold label -1 (bad) is class 0 in every scheme; bad_vs_rest merges neutral and good."""
    for s in SCHEMES.values():
        assert s[-1] == 0
    assert SCHEMES["bad_vs_rest"][0] == SCHEMES["bad_vs_rest"][1] == 1
    assert sorted(SCHEMES["bad_neutral_good"].values()) == [0, 1, 2]


# -----------------------------------------------------------------------------
# Training lowers the losses

def _train(model, loss_fn, steps=30, lr=1e-2):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.eval()  # no dropout in these tiny models anyway
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(loss_fn().item())
    return losses


@pytest.mark.parametrize("scheme", ["bad_vs_rest", "bad_neutral_good"])
def test_token_rm_training_lowers_loss(scheme):
    """~30 AdamW steps on a tiny batch lower the token loss well below its start."""
    rm = TokenRM(tiny(), scheme)
    idx, mask, resp, classes = _batch()
    if scheme == "bad_neutral_good":
        classes = torch.where(resp, torch.randint(0, 3, idx.shape, generator=torch.Generator().manual_seed(4)), -1)
    losses = _train(rm, lambda: token_loss(rm(idx, mask), classes))
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0], losses


def test_seq_rm_training_lowers_bt_loss():
    """~30 AdamW steps on a tiny batch of pairs lower the Bradley-Terry loss to under half its start."""
    rm = SeqRM(tiny())
    g = torch.Generator().manual_seed(6)
    chosen = torch.randint(2, 50, (4, 7), generator=g)
    rejected = torch.randint(2, 50, (4, 7), generator=g)
    chosen[:, -1] = rejected[:, -1] = EOT
    chosen[1, :2] = PAD  # one left-padded row
    cm, rj = chosen != PAD, rejected != PAD
    losses = _train(rm, lambda: bt_loss(rm(chosen, cm), rm(rejected, rj)))
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0], losses


def test_load_rm_reads_the_class_from_the_checkpoint(tmp_path):
    """load_rm builds the class the checkpoint holds, whatever the file is called: a token RM
    saved as seq.pt comes back a TokenRM of its scheme, a sequence RM saved as token.pt a SeqRM."""
    from reward import load_rm, save_rm
    for rm, name in ((TokenRM(tiny(0), "bad_neutral_good"), "seq.pt"), (SeqRM(tiny(0)), "token.pt")):
        _randomise_head(rm.head)
        save_rm(rm, {"center": 0.5, "scale": 2.0}, str(tmp_path / name))
        back, norm = load_rm(str(tmp_path / name), "cpu")
        assert type(back) is type(rm) and norm == {"center": 0.5, "scale": 2.0}
        assert getattr(back, "scheme", None) == getattr(rm, "scheme", None)
        for k, v in rm.state_dict().items():
            assert torch.equal(back.state_dict()[k], v), k
