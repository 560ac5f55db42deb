"""
The oracle checks of the exercises, in one place. Each check takes an implementation
module, a project file (diff_labels, reward, ppo) or its blank in exercises/, calls the
function by its name and asserts what the project's own function does: against an oracle
(an LCS dynamic program, a plain Python loop) or on cases worked out by hand.

exercises/grade.py runs them on a student's files; tests/test_exercises.py runs them on the
project's files (so the graders cannot rot) and on the untouched blanks (which must fail).
The project's own tests of these functions are these checks: they are not written twice.
"""

import math
import random

import torch
import torch.nn.functional as F

import diff_labels  # the project's diff and apply: token_labels is graded apart from Myers
import reward       # the project's fit_norm

EOT = "<|endoftext|>"

# -----------------------------------------------------------------------------
# Myers' diff: valid and minimal, against an LCS dynamic program


def lcs(a, b):
    """Plain O(NM) dynamic program: length of a longest common subsequence."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def valid_minimal(diff, a, b):
    """diff(a, b)'s script replays a into b, keeps all of a in order, and has the minimal
    number of edits, len(a) + len(b) - 2 * LCS(a, b); returns the script."""
    s = diff(a, b)
    assert all(op in "=-+" for op, _ in s), s
    assert diff_labels.apply(a, s) == list(b), f"the script does not turn {a} into {b}: {s}"
    assert [t for op, t in s if op != "+"] == list(a)
    assert sum(op != "=" for op, _ in s) == len(a) + len(b) - 2 * lcs(a, b), f"not minimal for {a} -> {b}: {s}"
    return s


def random_pair(rng):
    """A random (a, b) pair from one of several families."""
    n = rng.choice([rng.randint(0, 8), rng.randint(0, 30), rng.randint(0, 30), rng.randint(0, 200)])
    k = rng.randint(2, 50)
    a = [rng.randrange(k) for _ in range(n)]
    kind = rng.randrange(6)
    if kind == 0:                                   # independent
        return a, [rng.randrange(k) for _ in range(rng.randint(0, n + 5))]
    if kind == 1:                                   # identical
        return a, list(a)
    if kind == 2:                                   # disjoint alphabets
        return a, [k + rng.randrange(k) for _ in range(rng.randint(0, n + 5))]
    b, i = list(a), rng.randint(0, n)
    if kind == 3 and n:                             # one substitution
        b[min(i, n - 1)] = rng.randrange(k + 1)
    elif kind == 4:                                 # one insertion
        b.insert(i, rng.randrange(k))
    elif n:                                         # one deletion
        del b[min(i, n - 1)]
    for _ in range(rng.randint(0, 3)):              # plus a few random point edits
        j = rng.randint(0, len(b))
        b[j:j + rng.randint(0, 2)] = [rng.randrange(k) for _ in range(rng.randint(0, 2))]
    return a, b


def random_pairs_minimal(diff, n=3000, seed=0):
    """n random pairs: every script replays correctly and has LCS-minimal length."""
    rng = random.Random(seed)
    for _ in range(n):
        valid_minimal(diff, *random_pair(rng))


def myers(m):
    """The raw Myers script of module m: its backtrack over its forward search's trace."""
    return lambda a, b: m._backtrack(list(a), list(b), *m._trace(list(a), list(b)))


def myers_random_pairs_minimal(m):
    """3,000 random pairs: valid scripts of LCS-minimal length."""
    random_pairs_minimal(myers(m))


def myers_edge_cases(m):
    """Empty sides, identical inputs, and Myers' own example ABCABBA -> CBABAC (D = 5)."""
    diff = myers(m)
    assert valid_minimal(diff, [], []) == []
    assert valid_minimal(diff, [], [1, 2]) == [("+", 1), ("+", 2)]
    assert valid_minimal(diff, [1, 2], []) == [("-", 1), ("-", 2)]
    assert valid_minimal(diff, "abc", "abc") == [("=", "a"), ("=", "b"), ("=", "c")]
    assert sum(op != "=" for op, _ in valid_minimal(diff, "ABCABBA", "CBABAC")) == 5


MYERS = [myers_random_pairs_minimal, myers_edge_cases]

# -----------------------------------------------------------------------------
# Token labels of a minimal edit, on hand-made cases

SENTENCES = ["The", " cow", " is", " brown", ".", " The", " cow", " is", " rude", ".",
             " The", " cow", " eats", " grass", "."]


def labels_shapes_and_values(m):
    """One label per token, original in {-1, 0}, edited in {0, 1}, one +1 per inserted token."""
    rng = random.Random(1)
    for _ in range(300):
        a, b = random_pair(rng)
        for mark in (False, True):
            lo, le = m.token_labels(a, b, mark_omissions=mark)
            assert len(lo) == len(a) and len(le) == len(b)
            assert set(lo) <= {-1, 0} and set(le) <= {0, 1}
            assert le.count(1) == sum(op == "+" for op, _ in diff_labels.diff(a, b))


def labels_substitution(m):
    """A substitution marks exactly the old token -1 and the new token +1 (and no omission mark)."""
    a = ["The", " cow", " eats", " fish", ".", EOT]
    b = ["The", " cow", " eats", " grass", ".", EOT]
    for mark in (False, True):
        assert m.token_labels(a, b, mark_omissions=mark) == ([0, 0, 0, -1, 0, 0], [0, 0, 0, 1, 0, 0])


def labels_sentence_deletion(m):
    """With '.' as a break, deleting a sentence labels exactly that sentence's tokens."""
    edited = SENTENCES[:5] + SENTENCES[10:]
    lo, le = m.token_labels(SENTENCES, edited, breaks={"."})
    assert [t for t, v in zip(SENTENCES, lo) if v == -1] == [" The", " cow", " is", " rude", "."]
    assert lo == [0] * 5 + [-1] * 5 + [0] * 5 and le == [0] * 10
    lo, _ = m.token_labels(SENTENCES, edited)         # without breaks: the latest position
    assert lo == [0] * 7 + [-1] * 5 + [0] * 3
    a = ["A", ".", " A", ".", " A", ".", EOT]         # a repeated sentence
    assert m.token_labels(a, a[:2] + a[4:], breaks={"."})[0] == [0, 0, 0, 0, -1, -1, 0]


def labels_omission_marks(m):
    """A pure insertion: +1 on the inserted tokens; with mark_omissions also -1 on the
    original token that follows it, or on the eot when the edit appends."""
    a = ["The", " cow", " eats", ".", EOT]
    b = ["The", " cow", " eats", " grass", ".", EOT]
    assert m.token_labels(a, b) == ([0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0])
    assert m.token_labels(a, b, mark_omissions=True) == ([0, 0, 0, -1, 0], [0, 0, 0, 1, 0, 0])
    a = ["The", " cow", " is", " big", ".", EOT]
    b = a[:5] + [" It", " says", " moo", "."] + [EOT]
    lo, le = m.token_labels(a, b, mark_omissions=True, breaks={"."})
    assert lo == [0, 0, 0, 0, 0, -1] and le == [0] * 5 + [1] * 4 + [0]
    assert m.token_labels(a, b)[0] == [0] * 6


def labels_omission_mark_placement(m):
    """An omitted sentence is marked where the answer departs from the edit, not where the
    sentence-aligned insertion starts: in the middle, at the start and at the end."""
    fact = lambda *w: list(w) + ["."]  # noqa: E731
    food, legs = fact(" The", " cow", " eats", " grass"), fact(" The", " cow", " has", " four", " legs")
    home = fact(" The", " cow", " lives", " in", " the", " barn")
    a, b = food + legs + [EOT], food + home + legs + [EOT]         # the middle: " has" skipped the fact
    lo, le = m.token_labels(a, b, mark_omissions=True, breaks={"."})
    assert [a[k] for k, v in enumerate(lo) if v] == [" has"]
    assert [b[k] for k, v in enumerate(le) if v] == home            # the + labels stay sentence-aligned
    colour, size = fact("The", " cow", " is", " brown"), fact(" The", " cow", " is", " big", " in", " size")
    a, b = ["The"] + size[1:] + [EOT], colour + size + [EOT]        # the start: " big" where " brown" was due
    lo, _ = m.token_labels(a, b, mark_omissions=True, breaks={"."})
    assert [a[k] for k, v in enumerate(lo) if v] == [" big"]
    a, b = food + [EOT], food + legs + [EOT]                        # the end: stopping skipped it
    lo, _ = m.token_labels(a, b, mark_omissions=True, breaks={"."})
    assert lo == [0] * len(food) + [-1]


TOKEN_LABELS = [labels_shapes_and_values, labels_substitution, labels_sentence_deletion, labels_omission_marks,
                labels_omission_mark_placement]

# -----------------------------------------------------------------------------
# The token reward model's loss, by hand


def token_loss_hand_computed(m):
    """Mean of -log softmax over non-ignored tokens on a 1x3, 2-class case."""
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [0.5, -0.5]]])
    classes = torch.tensor([[0, 1, -1]])
    nll0 = math.log(1 + math.exp(-2.0))  # -log softmax([2, 0])[0]
    nll1 = math.log(1 + math.exp(-1.0))  # -log softmax([0, 1])[1]
    assert abs(m.token_loss(logits, classes).item() - (nll0 + nll1) / 2) < 1e-6


def token_loss_bad_weight(m):
    """With bad_weight=w the mean is sum(w_i * nll_i) / sum(w_i), w_i = w on class 0
    (PyTorch's convention), and reduction="sum" gives the numerator."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 3, generator=g)
    classes = torch.tensor([[0, 1, 2, -1, 0], [-1, 2, 0, 1, 1]])
    nll = -F.log_softmax(logits, -1)
    for w in (0.25, 1.0, 3.0):
        num = den = 0.0
        for b in range(2):
            for t in range(5):
                c = int(classes[b, t])
                if c != -1:
                    num, den = num + (w if c == 0 else 1.0) * float(nll[b, t, c]), den + (w if c == 0 else 1.0)
        assert abs(m.token_loss(logits, classes, bad_weight=w).item() - num / den) < 1e-6
        assert abs(m.token_loss(logits, classes, bad_weight=w, reduction="sum").item() - num) < 1e-5


def token_loss_ignores_ignored_positions(m):
    """Logits at positions labelled -1 change neither the loss nor receive gradient."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 2, generator=g).requires_grad_(True)
    classes = torch.tensor([[-1, -1, 0, 1, 1, -1], [-1, 0, 0, 1, -1, -1]])
    loss = m.token_loss(logits, classes, bad_weight=2.0)
    loss.backward()
    ign = classes == -1
    assert (logits.grad[ign] == 0).all()
    other = logits.detach().clone()
    other[ign] = 100 * torch.randn(int(ign.sum()), 2, generator=g)
    assert m.token_loss(other, classes, bad_weight=2.0).item() == loss.item()


TOKEN_LOSS = [token_loss_hand_computed, token_loss_bad_weight, token_loss_ignores_ignored_positions]

# -----------------------------------------------------------------------------
# The reward tensor PPO reads per token


def final_token_rewards_on_last_true_only(m):
    """The score goes to the last True of each mask row (the eot) and nowhere else."""
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0],
                         [0, 1, 1, 1, 1, 1, 1],
                         [0, 0, 0, 0, 0, 0, 0],
                         [1, 0, 0, 0, 0, 0, 0],
                         [0, 0, 0, 1, 0, 0, 0]], dtype=torch.float)
    scores = torch.tensor([2.0, -3.0, 5.0, 0.5, 7.0])
    expected = torch.zeros(5, 7)
    expected[0, 4], expected[1, 6], expected[3, 0], expected[4, 3] = 2.0, -3.0, 0.5, 7.0
    assert torch.equal(m.final_token_rewards(scores, mask), expected)  # the all-False row gets nothing
    assert torch.equal(m.final_token_rewards(scores, mask.bool()), expected)


def normalise_hand_computed(m):
    """(r - c at the last response token) / s on two rows worked by hand: a prompt token
    first, then the response; the second row right-padded."""
    r = torch.tensor([[0.0, -1.0, -0.5, 0.0], [0.0, -1.0, -0.5, 0.0]])
    resp = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)
    out = m.normalise(r, resp, {"center": -1.0, "scale": 2.0})
    torch.testing.assert_close(out, torch.tensor([[0.0, -0.5, -0.25, 0.5], [0.0, -0.5, 0.25, 0.0]]))


def normalise_pays_nothing_for_length(m):
    """A response padded with neutral tokens (raw reward ~0, as -p(bad) of harmless text)
    does not earn more: the centre is subtracted once per response, not per token. (With
    the per-token centre c = -0.5 of these samples, each padding token would earn +0.5/s.)"""
    raw = torch.tensor([[0.0, -1.0, -0.01, -1.0], [-0.01, -0.01, -1.0, 0.0]])  # 2 samples, 4 response tokens
    mask = torch.ones_like(raw, dtype=torch.bool)
    norm = reward.fit_norm(raw.sum(1))
    short = m.normalise(raw[:1], mask[:1], norm).sum()
    padded = torch.cat([raw[:1], torch.full((1, 20), -0.001)], 1)  # the same answer and 20 harmless tokens
    long = m.normalise(padded, torch.ones_like(padded, dtype=torch.bool), norm).sum()
    assert long <= short
    torch.testing.assert_close(short, (raw[0].sum() - norm["center"]) / norm["scale"])


REWARD_TENSOR = [final_token_rewards_on_last_true_only, normalise_hand_computed, normalise_pays_nothing_for_length]

# -----------------------------------------------------------------------------
# GAE against a plain loop


def response_masks(B, T, seed=0):
    """(B, T) bool masks: a prompt region (left padding + prompt), a contiguous response, then
    right padding; includes an empty response and one that runs to the last column."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        p = int(torch.randint(0, T - 1, (1,), generator=g))
        n = int(torch.randint(1, T - p + 1, (1,), generator=g))
        mask[b, p:p + n] = True
    mask[0] = False               # empty response
    mask[1, :] = False
    mask[1, T - 3:] = True        # response ending at the last column (no right padding)
    return mask


def reference_gae(rewards, values, mask, gamma, lam):
    """Plain Python GAE over each row's valid positions, in double precision."""
    B, T = rewards.shape
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        a_next, v_next = 0.0, 0.0
        for t in reversed([t for t in range(T) if bool(mask[b, t])]):
            r, v = float(rewards[b, t]), float(values[b, t])
            a = r + gamma * v_next - v + gamma * lam * a_next  # delta_t + gamma * lam * A_{t+1}
            adv[b][t], ret[b][t] = a, a + v
            a_next, v_next = a, v
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


def gae_matches_loop(m):
    """compute_gae equals a per-row Python loop over valid tokens, 0 elsewhere, for several
    (gamma, lam), in float64 and float32."""
    g = torch.Generator().manual_seed(1)
    B, T = 6, 14
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = response_masks(B, T, seed=2)
    for gamma, lam in [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.5, 0.0), (0.99, 1.0)]:
        ref_adv, ref_ret = reference_gae(rewards, values, mask, gamma, lam)
        for dtype, atol in ((torch.float64, 1e-6), (torch.float32, 1e-5)):
            adv, ret = m.compute_gae(rewards.to(dtype), values.to(dtype), mask.float(), gamma, lam)
            torch.testing.assert_close(adv.double(), ref_adv, atol=atol, rtol=0)
            torch.testing.assert_close(ret.double(), ref_ret, atol=atol, rtol=0)
            assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def gae_bool_and_float_masks_agree(m):
    """A bool mask and the same mask as floats give identical results."""
    g = torch.Generator().manual_seed(3)
    r, v = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    mask = response_masks(4, 9, seed=4)
    a1, r1 = m.compute_gae(r, v, mask, 0.9, 0.7)
    a2, r2 = m.compute_gae(r, v, mask.float(), 0.9, 0.7)
    assert torch.equal(a1, a2) and torch.equal(r1, r2)


def gae_reward_to_go(m):
    """With gamma = lam = 1 and V = 0, returns (and advantages) are the reversed cumsum of rewards."""
    g = torch.Generator().manual_seed(5)
    B, T = 5, 12
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = response_masks(B, T, seed=6)
    adv, ret = m.compute_gae(rewards, torch.zeros(B, T, dtype=torch.float64), mask, 1.0, 1.0)
    to_go = (rewards * mask).flip(1).cumsum(1).flip(1) * mask
    torch.testing.assert_close(ret, to_go, atol=1e-12, rtol=0)
    torch.testing.assert_close(adv, to_go, atol=1e-12, rtol=0)


def gae_ignores_masked_positions(m):
    """Rewards/values at masked positions (even NaN/inf) never reach the valid outputs."""
    g = torch.Generator().manual_seed(7)
    B, T = 6, 13
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    mask = response_masks(B, T, seed=8)
    adv, ret = m.compute_gae(rewards, values, mask, 0.95, 0.9)
    for junk in (float("nan"), float("inf"), -float("inf"), 1e6):
        r2, v2 = torch.where(mask, rewards, junk), torch.where(mask, values, junk)
        for rr, vv in [(r2, values), (rewards, v2), (r2, v2)]:
            adv2, ret2 = m.compute_gae(rr, vv, mask, 0.95, 0.9)
            assert torch.isfinite(adv2).all() and torch.isfinite(ret2).all()
            assert torch.equal(adv2[mask], adv[mask]) and torch.equal(ret2[mask], ret[mask])
            assert (adv2[~mask] == 0).all() and (ret2[~mask] == 0).all()


GAE = [gae_matches_loop, gae_bool_and_float_masks_agree, gae_reward_to_go, gae_ignores_masked_positions]

# -----------------------------------------------------------------------------
# The clipped PPO loss, by hand


def loss_inputs(seed=13, B=3, T=8, spread=0.1):
    """(logp, old_logp, advantages, values, old_values, returns, mask) with ratios within
    exp(+-spread) of 1; logp and values require grad."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    logp = (old + spread * (2 * torch.rand(B, T, generator=g) - 1)).requires_grad_(True)
    adv = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g).requires_grad_(True)
    old_values = torch.randn(B, T, generator=g)
    returns = torch.randn(B, T, generator=g)
    mask = response_masks(B, T, seed=seed).float()
    mask[0, 2:5] = 1  # at least one non-empty row
    return logp, old, adv, values, old_values, returns, mask


def ppo_loss_inside_clip(m):
    """With every ratio inside [1-eps, 1+eps], loss and gradient are those of -mean(A * ratio)."""
    logp, old, adv, values, old_values, returns, mask = loss_inputs(spread=0.1)  # ratio in [0.905, 1.106]
    pg, _, stats = m.ppo_loss(logp, old, adv, values, old_values, returns, mask, 0.2)
    by_hand = -(adv * (logp - old).exp() * mask).sum() / mask.sum()
    torch.testing.assert_close(pg, by_hand, atol=1e-6, rtol=0)
    (g1,) = torch.autograd.grad(pg, logp)
    (g2,) = torch.autograd.grad(by_hand, logp)
    torch.testing.assert_close(g1, g2, atol=1e-7, rtol=0)
    assert stats["clipfrac"] == 0.0


def ppo_loss_clipped_tokens(m):
    """Tokens whose ratio is outside the clip range in the advantage's direction get no gradient;
    those outside against the advantage keep the unclipped gradient; clipfrac counts both."""
    old = torch.zeros(1, 6)
    # A>0 & r>1+eps (clipped), A<0 & r<1-eps (clipped), A>0 & r<1-eps (not clipped: pessimistic),
    # A<0 & r>1+eps (not clipped), inside, masked
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.1, 3.0]])
    adv = torch.tensor([[1.0, -2.0, 1.5, -0.5, 0.7, 1.0]])
    mask = torch.tensor([[1.0, 1, 1, 1, 1, 0]])
    logp = ratio.log().requires_grad_(True)
    z = torch.zeros(1, 6)
    pg, _, stats = m.ppo_loss(logp, old, adv, z, z, z, mask, 0.2)
    (grad,) = torch.autograd.grad(pg, logp)
    n = mask.sum()
    expected = torch.tensor([[0.0, 0.0, -1.5 * 0.5 / n, 0.5 * 1.5 / n, -0.7 * 1.1 / n, 0.0]])
    torch.testing.assert_close(grad, expected, atol=1e-7, rtol=0)
    assert abs(stats["clipfrac"] - 4 / 5) < 1e-6
    # the loss value itself: the pessimistic (max) of the two surrogates
    assert abs(pg.item() + (1.0 * 1.2 + -2.0 * 0.8 + 1.5 * 0.5 + -0.5 * 1.5 + 0.7 * 1.1) / 5) < 1e-6


def ppo_loss_approx_kl(m):
    """approx_kl (k3 = (r - 1) - log r) is 0 at ratio 1 and its masked mean otherwise."""
    logp, old, adv, values, old_values, returns, mask = loss_inputs(spread=0.5)
    _, _, s0 = m.ppo_loss(old.clone(), old, adv, values, old_values, returns, mask)
    assert s0["approx_kl"] == 0.0 and s0["clipfrac"] == 0.0
    _, _, s1 = m.ppo_loss(logp, old, adv, values, old_values, returns, mask)
    lr = (logp - old).detach()
    k3 = (((lr.exp() - 1) - lr) * mask).sum() / mask.sum()
    assert s1["approx_kl"] > 0 and abs(s1["approx_kl"] - k3.item()) < 1e-7


def ppo_value_loss_hand_computed(m):
    """0.5 * masked mean of max((V - R)^2, (V_clipped - R)^2), on a 1x3 case worked by hand."""
    values = torch.tensor([[1.0, 0.5, -1.0]])
    old_values = torch.zeros(1, 3)
    returns = torch.tensor([[0.5, 1.0, 0.0]])
    z = torch.zeros(1, 3)
    # V_clipped = [0.2, 0.2, -0.2]; (V-R)^2 = [.25, .25, 1]; (Vc-R)^2 = [.09, .64, .04]; max = [.25, .64, 1]
    _, v_all, s = m.ppo_loss(z, z, z, values, old_values, returns, torch.ones(1, 3), clip_vf=0.2)
    assert abs(v_all.item() - 0.5 * (0.25 + 0.64 + 1.0) / 3) < 1e-7 and abs(s["v_loss"] - v_all.item()) < 1e-7
    _, v_two, _ = m.ppo_loss(z, z, z, values, old_values, returns, torch.tensor([[1.0, 1, 0]]), clip_vf=0.2)
    assert abs(v_two.item() - 0.5 * (0.25 + 0.64) / 2) < 1e-7


def ppo_loss_masked_gradient(m):
    """Backprop of pg_loss + v_loss leaves exactly zero gradient at masked positions."""
    logp, old, adv, values, old_values, returns, mask = loss_inputs(seed=17, B=4, T=10, spread=1.0)
    pg, vl, _ = m.ppo_loss(logp, old, adv, values, old_values, returns, mask)
    (pg + vl).backward()
    valid = mask.bool()
    assert (logp.grad[~valid] == 0).all() and (values.grad[~valid] == 0).all()
    assert logp.grad[valid].abs().sum() > 0 and values.grad[valid].abs().sum() > 0


PPO_LOSS = [ppo_loss_inside_clip, ppo_loss_clipped_tokens, ppo_loss_approx_kl, ppo_value_loss_hand_computed,
            ppo_loss_masked_gradient]

# -----------------------------------------------------------------------------
# The DPO loss


def dpo_loss_hand_computed(m):
    """-log sigma(beta * ((lw - rw) - (ll - rl))) per pair, summed; the stats by hand."""
    logp_w, logp_l = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    ref_w, ref_l = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0])
    loss, stats = m.dpo_loss(logp_w, logp_l, ref_w, ref_l, beta=0.5)
    # pair 1: r_w = 0.5 * 1 = 0.5, r_l = 0.5 * -1 = -0.5, margin 1; pair 2: r_w = 0.5, r_l = 1.0, margin -0.5
    expected = -math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(0.5)))
    assert abs(loss.item() - expected) < 1e-6
    assert stats["reward_acc"].item() == 1.0 and abs(stats["margin"].item() - 0.5) < 1e-6
    assert abs(stats["reward_chosen"].item() - 1.0) < 1e-6 and abs(stats["reward_rejected"].item() - 0.5) < 1e-6


def dpo_loss_log2_at_the_reference(m):
    """A policy equal to its reference gives every implicit reward 0: log 2 per pair."""
    ref_w, ref_l = torch.tensor([-11.0, -5.0, -2.0]), torch.tensor([-11.0, -7.0, -9.0])
    assert abs(m.dpo_loss(ref_w, ref_l, ref_w, ref_l, 0.1)[0].item() - 3 * math.log(2)) < 1e-6


def dpo_loss_gradient_pushes_chosen_up(m):
    """d loss / d log pi(y_w) = -beta * sigma(-(r_w - r_l)) < 0 and the opposite for y_l: the
    policy raises the preferred answer and lowers the rejected one, less so once the margin is large."""
    logp_w, logp_l = torch.tensor([-3.0, 0.0], requires_grad=True), torch.tensor([-3.0, -20.0], requires_grad=True)
    ref = torch.tensor([-3.0, -3.0])
    m.dpo_loss(logp_w, logp_l, ref, ref, 0.5)[0].backward()
    margins = torch.tensor([0.0, 0.5 * (3.0 + 17.0)])
    want = -0.5 * torch.sigmoid(-margins)
    assert torch.allclose(logp_w.grad, want, atol=1e-6) and torch.allclose(logp_l.grad, -want, atol=1e-6)


DPO_LOSS = [dpo_loss_hand_computed, dpo_loss_log2_at_the_reference, dpo_loss_gradient_pushes_chosen_up]
