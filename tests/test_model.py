"""Tests for model.py: causality, KV cache, batching with left padding, sampling log-probs."""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import tiny  # noqa: E402
from machinery.batching import by_length  # noqa: E402
from model import GPT, GPTConfig, KVCache, token_logprobs  # noqa: E402
from tokenizer import pad_first  # noqa: E402

PAD, EOT = 0, 1
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19], [20]]  # no PAD inside


def left_pad(prompts, pad=PAD):
    """(idx, mask) of prompts left-padded to the longest one."""
    P = max(map(len, prompts))
    idx = torch.full((len(prompts), P), pad, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, P - len(p):] = torch.tensor(p)
    return idx, idx != pad


def eot_prone(model, eot=EOT, k=1.75, scale=10.0):
    """Make `eot` likely (~20% at temperature 0.7) at every step, so sampled rows stop at varied times."""
    g = torch.Generator().manual_seed(123)
    u = torch.randn(model.config.n_embd, generator=g)
    u = scale * u / u.norm()
    with torch.no_grad():
        model.transformer.ln_f.bias.copy_(u)
        model.lm_head.weight[eot] = k * u / u.norm() ** 2
    return model


def test_causality():
    """Changing token t never changes logits before t, and does change logits at t."""
    model = tiny()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(2, 50, (2, 20), generator=g)
    base, _ = model(idx)
    for t in (0, 5, 13, 19):
        idx2 = idx.clone()
        idx2[:, t] = (idx2[:, t] + 7) % 48 + 2
        out, _ = model(idx2)
        assert torch.equal(out[:, :t], base[:, :t])
        assert not torch.allclose(out[:, t:], base[:, t:])
        assert (out[:, t] - base[:, t]).abs().max() > 1e-4


def test_cache_vs_no_cache_greedy_tokens():
    """Greedy generation with the KV cache gives exactly the tokens of full recomputation."""
    model = tiny()
    a = model.generate(PROMPTS, 20, eot=EOT, pad=PAD, temperature=0, use_cache=True)
    b = model.generate(PROMPTS, 20, eot=EOT, pad=PAD, temperature=0, use_cache=False)
    assert a[0].shape == (len(PROMPTS), 7 + 20)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.testing.assert_close(a[2], b[2], atol=1e-5, rtol=0)


def test_cache_logits_match_full_recompute():
    """Prefill + one-token-at-a-time cached logits equal a full recompute at the last position."""
    model = tiny()
    idx, resp_mask, _ = model.generate(PROMPTS, 15, eot=EOT, pad=PAD, temperature=0)
    real = (idx != PAD) | resp_mask
    B, T = idx.shape
    P = max(map(len, PROMPTS))
    cache = KVCache(model.config, B, T, "cpu")
    with torch.no_grad():
        logits, _ = model(idx[:, :P], real=real[:, :P], cache=cache)
        full, _ = model(idx[:, :P], real=real[:, :P])
        torch.testing.assert_close(logits, full, atol=1e-5, rtol=0)
        for j in range(P, T):
            step, _ = model(idx[:, j:j + 1], real=real[:, j:j + 1], cache=cache)
            full, _ = model(idx[:, :j + 1], real=real[:, :j + 1])
            torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-5, rtol=0)
    assert cache.t == T


def test_batched_greedy_equals_single():
    """Each row of a batched greedy generation equals generating its prompt alone."""
    model = tiny()
    # eot = a token that greedy decoding of the first prompt emits mid-way, so that row stops early
    probe, _, _ = model.generate(PROMPTS[:1], 12, eot=-1, pad=PAD, temperature=0)
    eot = next(t for t in probe[0, len(PROMPTS[0]) + 3:].tolist() if t != PAD)
    N = 20
    idx, resp_mask, _ = model.generate(PROMPTS, N, eot=eot, pad=PAD, temperature=0)
    P = max(map(len, PROMPTS))
    stopped = 0
    for i, p in enumerate(PROMPTS):
        assert idx[i, :P - len(p)].eq(PAD).all() and idx[i, P - len(p):P].tolist() == p
        one, one_mask, _ = model.generate([p], N, eot=eot, pad=PAD, temperature=0)
        single = one[0, len(p):].tolist()
        assert one_mask[0, len(p):].all()
        rm = resp_mask[i, P:]
        assert idx[i, P:][rm].tolist() == single
        n = len(single)
        assert rm[:n].all() and not rm[n:].any()
        assert idx[i, P + n:].eq(PAD).all()  # after a row stops it only holds pad
        if eot in single:
            assert single.index(eot) == n - 1
            stopped += 1
        else:
            assert n == N
    assert stopped >= 1


def test_padding_invariance():
    """Logits of a left-padded row at its real positions equal those of the sequence alone."""
    model = tiny()
    idx, mask = left_pad(PROMPTS)
    logits, _ = model(idx, real=mask)
    P = idx.size(1)
    for i, p in enumerate(PROMPTS):
        alone, _ = model(torch.tensor([p]))
        torch.testing.assert_close(logits[i, P - len(p):], alone[0], atol=1e-5, rtol=0)


def test_padding_token_values_irrelevant():
    """What the padding columns hold does not change the logits at real positions."""
    model = tiny()
    idx, mask = left_pad(PROMPTS)
    idx2 = torch.where(mask, idx, torch.randint(2, 50, idx.shape, generator=torch.Generator().manual_seed(1)))
    a, _ = model(idx, real=mask)
    b, _ = model(idx2, real=mask)
    torch.testing.assert_close(a[mask], b[mask], atol=1e-5, rtol=0)


def test_pad_first_moves_each_rows_padding_in_front():
    """generate's layout (prompt padded left, response right) becomes left_pad's of each whole
    row, every row ending at the last column, with no column of padding alone."""
    rows = [[5, 6, 7, 30, 31], [12, 32, 33, 34, 35, 36], [15, 16, 17, 18]]  # prompt + response
    P, T = 3, 3 + 5 + 2  # prompts end at column P; two columns of padding after every response
    idx = torch.full((3, T), PAD)
    for i, (p, r) in enumerate(((rows[0][:3], rows[0][3:]), (rows[1][:1], rows[1][1:]), (rows[2][:3], rows[2][3:]))):
        idx[i, P - len(p):P + len(r)] = torch.tensor(p + r)
    resp = torch.zeros_like(idx, dtype=torch.bool)
    resp[:, P:] = idx[:, P:] != PAD
    real, idx2, resp2 = pad_first(idx != PAD, idx, resp)
    want, want_real = left_pad(rows)
    assert torch.equal(idx2, want) and torch.equal(real, want_real)
    assert [resp2[i][real[i]].tolist() for i in range(3)] == [[False] * 3 + [True] * 2, [False] + [True] * 5,
                                                               [False] * 3 + [True]]


def test_by_length_equals_the_whole_batch_values_and_gradients():
    """Micro-batches by length give every row the whole batch's outputs at its real tokens,
    and the same gradient of a loss over them; rows of mixed lengths make several runs."""
    model = tiny()
    g = torch.Generator().manual_seed(4)
    rows = [torch.randint(2, 50, (n,), generator=g).tolist() for n in (3, 17, 4, 16, 9, 2, 18, 10)]
    idx, mask = left_pad(rows)
    calls = []

    def logits(i, r):
        calls.append(i.size(1))
        return model(i, real=r)[0]
    whole = model(idx, real=mask)[0]
    parts = by_length(logits, idx, mask)
    assert len(calls) > 1 and max(calls) == idx.size(1) and min(calls) < idx.size(1)
    torch.testing.assert_close(parts[mask], whole[mask], atol=1e-5, rtol=0)
    assert (parts[~mask] == 0).any()  # the columns a shorter run did not reach
    grads = []
    for out in (whole, parts):
        model.zero_grad()
        (out[mask] ** 2).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        whole = model(idx, real=mask)[0]  # a fresh graph for the second loss
        parts = by_length(logits, idx, mask)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    two = by_length(lambda i, r: (i, None), idx, mask)  # tuples pass, None stays None
    assert torch.equal(two[0][mask], idx[mask]) and two[1] is None


def test_overfit_small_batch():
    """A small batch can be memorised to near-zero loss."""
    model = tiny().train()
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 50, (4, 17), generator=g)
    x, y = data[:, :-1], data[:, 1:].contiguous()  # see test_loss_noncontiguous_targets
    opt = model.configure_optimizers(weight_decay=0.0, learning_rate=3e-3)
    _, loss0 = model(x, y)
    for _ in range(300):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _, loss = model(x, y)
    assert loss0.item() > 3.0  # ~ln(50) at init
    assert loss.item() < 0.05


def test_save_load_roundtrip(tmp_path):
    """state_dict saved with torch.save and loaded with weights_only=True gives identical logits."""
    model = tiny(seed=3)
    path = tmp_path / "ckpt.pt"
    torch.save(model.state_dict(), path)
    fresh = tiny(seed=99)
    idx, mask = left_pad(PROMPTS)
    assert not torch.equal(fresh(idx, real=mask)[0], model(idx, real=mask)[0])
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert fresh.lm_head.weight.data_ptr() == fresh.transformer.wte.weight.data_ptr()  # still tied
    assert torch.equal(fresh(idx, real=mask)[0], model(idx, real=mask)[0])


def test_sampling_logprobs_and_eot():
    """Sampled log-probs equal token_logprobs of a recompute; rows stop at eot; same seed, same samples."""
    model = eot_prone(tiny())
    temp, N = 0.7, 40
    prompts = PROMPTS * 2
    out = model.generate(prompts, N, eot=EOT, pad=PAD, temperature=temp,
                         generator=torch.Generator().manual_seed(7))
    idx, resp_mask, logprobs = out
    real = (idx != PAD) | resp_mask
    with torch.no_grad():
        ref = token_logprobs(model(idx, real=real)[0], idx, temp)
    torch.testing.assert_close(logprobs[resp_mask], ref[resp_mask], atol=1e-5, rtol=0)
    assert logprobs[~resp_mask].eq(0).all()
    assert (logprobs[resp_mask] < 0).all()
    P = max(map(len, prompts))
    lengths = []
    for i in range(len(prompts)):
        resp = idx[i, P:][resp_mask[i, P:]].tolist()
        n = len(resp)
        assert resp_mask[i, P:P + n].all() and not resp_mask[i, P + n:].any()
        assert EOT not in resp[:-1]
        if n < N:
            assert resp[-1] == EOT  # stopped because of eot
        assert idx[i, P + n:].eq(PAD).all()
        lengths.append(n)
    assert sum(n < N for n in lengths) >= 2 and len(set(lengths)) >= 3  # rows really stop, at different times
    if all(n < N for n in lengths):  # generation ends when every row is done
        assert idx.size(1) == P + max(lengths)
    again = model.generate(prompts, N, eot=EOT, pad=PAD, temperature=temp,
                           generator=torch.Generator().manual_seed(7))
    for x, y in zip(out, again):
        assert torch.equal(x, y)
    other = model.generate(prompts, N, eot=EOT, pad=PAD, temperature=temp,
                           generator=torch.Generator().manual_seed(8))
    assert not torch.equal(other[0][:, :P + 1], idx[:, :P + 1]) or other[0].shape != idx.shape


def test_top_k_logprobs():
    """With top_k the sampled tokens come from the top k and log-probs use the truncated softmax."""
    model = tiny()
    temp, k = 1.3, 3
    idx, resp_mask, logprobs = model.generate(PROMPTS, 10, eot=EOT, pad=PAD, temperature=temp, top_k=k,
                                              generator=torch.Generator().manual_seed(0))
    real = (idx != PAD) | resp_mask
    with torch.no_grad():
        logits = model(idx, real=real)[0][:, :-1].float() / temp
    topv, topi = logits.topk(k, dim=-1)
    masked = torch.full_like(logits, -float("inf")).scatter(-1, topi, topv)
    ref = F.pad(F.log_softmax(masked, -1).gather(-1, idx[:, 1:, None]).squeeze(-1), (1, 0))
    assert torch.isfinite(ref[resp_mask]).all()  # every sampled token is in the top k
    torch.testing.assert_close(logprobs[resp_mask], ref[resp_mask], atol=1e-5, rtol=0)


def test_gpt2_init_and_weight_decay_groups():
    """c_proj weights have std 0.02/sqrt(2*n_layer); only >=2-D tensors are weight-decayed."""
    n_layer = 4
    model = tiny(n_layer=n_layer, n_embd=64)
    cproj = torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith("c_proj.weight")])
    other = torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith("c_attn.weight")])
    assert cproj.numel() == n_layer * (64 * 64 + 4 * 64 * 64)
    assert cproj.std().item() == pytest.approx(0.02 / math.sqrt(2 * n_layer), rel=0.03)
    assert other.std().item() == pytest.approx(0.02, rel=0.03)
    assert all(p.abs().sum() == 0 for n, p in model.named_parameters() if n.endswith(".bias") and "ln" not in n)
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    assert any(p is model.lm_head.weight for p in decay["params"])  # tied wte/lm_head, listed once


def test_loss_ignores_minus_one():
    """The loss is the mean cross-entropy over targets != -1, computed by hand."""
    model = tiny()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50, (3, 10), generator=g)
    y = torch.randint(0, 50, (3, 10), generator=g)
    y[0, :4] = -1
    y[2, 7:] = -1
    logits, loss = model(x, y)
    logp = F.log_softmax(logits.double(), -1)
    terms = [-logp[b, t, y[b, t]] for b in range(3) for t in range(10) if y[b, t] != -1]
    assert len(terms) == 30 - 4 - 3
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), abs=1e-5)
    y2 = y.clone()
    logits2, _ = model(x)
    assert torch.equal(logits, logits2)
    # changing the logits at ignored positions (via their input tokens at the end of a row) leaves the loss
    x2 = x.clone()
    x2[2, 9] = (x2[2, 9] + 1) % 50
    _, loss2 = model(x2, y2)
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-6)
    assert model(x)[1] is None


def test_loss_noncontiguous_targets():
    """Targets sliced from a token tensor (data[:, 1:], non-contiguous) are accepted by forward."""
    model = tiny()
    data = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    _, loss = model(data[:, :-1], data[:, 1:])
    assert loss.item() == pytest.approx(model(data[:, :-1], data[:, 1:].contiguous())[1].item())


def test_a_sequence_longer_than_block_size_is_refused():
    """hidden refuses T (or the cache's past + T) beyond block_size, by the shapes alone."""
    model = tiny(block_size=16)
    with pytest.raises(AssertionError, match="block_size 16"):
        model(torch.randint(2, 50, (1, 17)))
    cache = KVCache(model.config, 1, 16, "cpu")
    model(torch.randint(2, 50, (1, 10)), cache=cache)
    with pytest.raises(AssertionError, match="block_size 16"):
        model(torch.randint(2, 50, (1, 7)), cache=cache)
