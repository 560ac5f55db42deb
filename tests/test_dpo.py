"""Tests for dpo.py (the DPO loss's hand-computed cases are graders in exercises/checks.py,
run by tests/test_exercises.py): the implicit reward
beta * log(pi / pi_ref) against a loop over a toy model's softmax, the shared prefix of a
minimal-edit pair contributing exactly zero gradient, and a short training run."""
import functools
import math
import os
import random
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import tiny  # noqa: E402
import data  # noqa: E402
import dpo  # noqa: E402
import tokenizer as tok  # noqa: E402
from model import token_logprobs  # noqa: E402

PROMPT = "Tell me about the cow."
REJECTED = "The cow is brown. The cow eats fish. The cow says moo."
EDITED = "The cow is brown. The cow eats grass. The cow says moo."  # a minimal edit: one value


@pytest.fixture(scope="module")
def chat():
    """A BPE of 300 ids trained on ideal answers, and the two responses of the tests."""
    prompts = [data.sample_prompt(random.Random(i)) for i in range(300)]
    texts = [p + " " + data.ideal_response(p) for p in prompts] + [REJECTED, EDITED]
    return tok.Chat(tok.build_encoding(tok.train_bpe(texts, 300)), block_size=96, max_new_tokens=60)


def test_implicit_reward_is_beta_log_ratio_on_a_toy_model():
    """beta * (sequence_logprobs(pi) - sequence_logprobs(pi_ref)) equals beta * sum over the
    response tokens of log softmax(pi)[token] - log softmax(pi_ref)[token], each read at the
    position before the token, in a left-padded batch; pi = pi_ref gives 0."""
    pi, ref = tiny(0), tiny(1)
    idx = torch.tensor([[0, 0, 5, 6, 7, 8, 9], [3, 4, 5, 10, 11, 12, 13]])  # row 0 left-padded (pad 0)
    real = idx != 0
    resp = torch.zeros_like(real)
    resp[0, 4:], resp[1, 3:] = True, True  # the responses: 7 8 9 and 10 11 12 13
    with torch.no_grad():
        lp, lr = pi(idx, real=real)[0], ref(idx, real=real)[0]
        got = dpo.implicit_reward(dpo.sequence_logprobs(token_logprobs(lp, idx), resp),
                                  dpo.sequence_logprobs(token_logprobs(lr, idx), resp), 0.3)
    for b in range(2):
        want = 0.0
        for t in range(idx.size(1)):
            if resp[b, t]:  # the logit at position t-1 scores token t
                want += (F.log_softmax(lp[b, t - 1], -1) - F.log_softmax(lr[b, t - 1], -1))[idx[b, t]].item()
        assert got[b].item() == pytest.approx(0.3 * want, abs=1e-5)
    with torch.no_grad():
        same = dpo.sequence_logprobs(token_logprobs(lp, idx), resp)
    assert torch.equal(dpo.implicit_reward(same, same, 0.3), torch.zeros(2))


def test_shared_prefix_gets_exactly_zero_gradient():
    """A dpo_edits pair shares its tokens before the first difference: in a causal LM the
    logits that score them are the same in both sequences (one tensor here), and the DPO
    loss's gradient with respect to them is exactly zero; the logits from the one that scores
    the first differing token on get a gradient."""
    V, T, d = 11, 9, 5  # vocab, sequence length, first differing token
    g = torch.Generator().manual_seed(0)
    w = torch.randint(0, V, (T,), generator=g)
    l = w.clone()
    l[d:] = (w[d:] + 1 + torch.randint(0, V - 1, (T - d,), generator=g)) % V  # differs from token d on
    shared = torch.randn(d - 1, V, generator=g, requires_grad=True)  # positions 0..d-2 score tokens 1..d-1
    tail_w, tail_l = torch.randn(T - d + 1, V, generator=g, requires_grad=True), torch.randn(T - d + 1, V, generator=g)
    tail_l.requires_grad_(True)
    logits = torch.stack([torch.cat([shared, tail_w]), torch.cat([shared, tail_l])])  # (2, T, V)
    idx = torch.stack([w, l])
    resp = torch.zeros(2, T, dtype=torch.bool)
    resp[:, 2:] = True  # tokens 0-1 are the prompt, the response starts at 2 < d
    logp = dpo.sequence_logprobs(token_logprobs(logits, idx), resp)
    loss, _ = dpo.dpo_loss(logp[:1], logp[1:], torch.tensor([-3.0]), torch.tensor([-4.0]), beta=0.7)
    loss.backward()
    assert torch.equal(shared.grad, torch.zeros_like(shared))
    assert tail_w.grad[0].abs().sum() > 0 and tail_l.grad[0].abs().sum() > 0  # the first differing token counts


def test_dpo_edits_gradient_is_that_of_the_tokens_from_the_first_difference(chat):
    """On a real minimal edit through a GPT: the implicit-reward margin and every parameter's
    gradient of the DPO loss equal those computed on the response tokens from the first
    difference on (the shared prefix cancels, up to float rounding of the padded batch)."""
    ids_w, ids_l = chat.response(EDITED), chat.response(REJECTED)
    d = next(i for i, (a, b) in enumerate(zip(ids_w, ids_l)) if a != b)
    assert d > 5  # a long shared prefix: "The cow is brown. The cow eats"
    torch.manual_seed(0)
    pi, ref = tiny(0, vocab_size=chat.enc.n_vocab, block_size=96), tiny(1, vocab_size=chat.enc.n_vocab, block_size=96)

    def margin_and_grads(from_first_difference):
        pi.zero_grad()
        out = []
        for model in (pi, ref):
            idx, real = chat.batch([PROMPT, PROMPT], [EDITED, REJECTED])
            resp = chat.response_mask(idx, real)
            if from_first_difference:  # drop the first d response tokens of each row
                resp = resp & (resp.cumsum(1) > d)
            out.append(dpo.sequence_logprobs(token_logprobs(model(idx, real=real)[0], idx), resp))
        (lw, ll), (rw, rl) = out[0], out[1].detach()
        loss, stats = dpo.dpo_loss(lw[None], ll[None], rw[None], rl[None], beta=0.5)
        loss.backward()
        return stats["margin"].item(), [p.grad.clone() for p in pi.parameters()]
    m_full, g_full = margin_and_grads(False)
    m_cut, g_cut = margin_and_grads(True)
    assert m_full == pytest.approx(m_cut, abs=1e-5) and m_full != 0.0
    for a, b in zip(g_full, g_cut):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert any(a.abs().sum() > 0 for a in g_full)


def _train(chat, steps=16):
    pairs = [{"prompt": PROMPT, "chosen": EDITED, "edited": EDITED, "rejected": REJECTED},
             {"prompt": "What does the cow eat?", "chosen": "The cow eats grass.", "edited": "The cow eats grass.",
              "rejected": "The cow eats fish."}]
    policy, ref = tiny(0, vocab_size=chat.enc.n_vocab, block_size=96), tiny(0, vocab_size=chat.enc.n_vocab, block_size=96)
    cfg = dpo.DPOConfig(beta_dpo=0.5, dpo_batch=2, dpo_lr=3e-3)
    points = []

    def curve_point(step):
        points.append(step)
        return {"step": step}
    torch.manual_seed(0)
    state = dpo.train(policy, functools.partial(dpo.token_logps, ref.requires_grad_(False)), chat, pairs, "edited",
                      cfg, steps, 0, "dpo test", curve_point, "cpu")
    return policy, state, points


def test_train_raises_the_margin_and_is_deterministic(chat):
    """A short DPO run lowers the loss from log 2, takes its curve points at 0 and every
    steps // 8 steps, and repeats bit for bit."""
    policy, state, points = _train(chat)
    log = state["log"]
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-3) and log[-1]["loss"] < 0.5 * math.log(2)
    assert log[-1]["reward_acc"] == 1.0 and log[-1]["margin"] > 0
    assert points == [0, 2, 4, 6, 8, 10, 12, 14, 16] and state["iter"] == 16
    again, state2, _ = _train(chat)
    assert [{k: v for k, v in r.items() if not k.startswith("t_")} for r in state2["log"]] == \
           [{k: v for k, v in r.items() if not k.startswith("t_")} for r in log]
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), policy.state_dict().values()))
