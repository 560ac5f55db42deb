"""Tests for the glue between the method's files, where an off-by-one would pass every other
test: the chat format's batches and response mask, the SFT shift, the reward model's
unshifted labels, the reward normalisation, and the reward tensor PPO reads (a bad token's
reward lands on exactly that token)."""
import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import tiny  # noqa: E402
import data  # noqa: E402
import reward  # noqa: E402
import tokenizer as tok  # noqa: E402
import sft  # noqa: E402

PROMPT = "What does the cow eat?"
WRONG, RIGHT = "The cow eats fish.", "The cow eats grass."  # the KB says grass: " fish" is the error


@pytest.fixture(scope="module")
def chat():
    rng = random.Random(0)
    texts = []
    for _ in range(1000):
        p = data.sample_prompt(rng)
        texts.append(p + " " + data.noisy_response(p, rng))
    return tok.Chat(tok.build_encoding(tok.train_bpe(texts, 512)), block_size=160, max_new_tokens=110)


def positions_of(chat, ids, text):
    """Columns t of a token list where ids[t] decodes to text."""
    return [t for t, i in enumerate(ids) if chat.enc.decode([i]) == text]


def test_fish_is_one_token(chat):
    """The hand-made pair below relies on " fish" and " grass" being single tokens of the test BPE."""
    assert [chat.enc.decode([t]) for t in chat.enc.encode_ordinary(" fish")] == [" fish"]
    assert len(chat.enc.encode_ordinary(" grass")) == 1


# -----------------------------------------------------------------------------
# Chat format


def test_batch_and_response_mask(chat):
    """Left-padded batch: real marks every token of prompt + response + eot; the response mask
    marks exactly the response tokens and the eot, whatever the padding."""
    prompts, responses = [PROMPT, "Tell me about the duck."], [WRONG, "The duck is yellow. The duck says quack."]
    idx, real = chat.batch(prompts, responses)
    resp = chat.response_mask(idx, real)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids = chat.prompt(p) + chat.response(r)
        assert idx[i][real[i]].tolist() == ids
        assert idx[i][resp[i]].tolist() == chat.response(r)  # eot included
        assert idx[i][resp[i]][-1].item() == chat.eot
        assert not (resp[i] & ~real[i]).any()
    assert (idx[~real] == chat.pad).all()
    assert chat.split(idx, resp) == (prompts, [chat.response(r) for r in responses])


def test_sft_targets_are_the_next_token(chat):
    """SFT: targets[t] = ids[t+1] on the response (the logit at t scores token t+1), -1 elsewhere."""
    ids, tgt = sft.sft_example(chat, PROMPT, WRONG)
    p, r = chat.prompt(PROMPT), chat.response(WRONG)
    assert ids == p + r and len(tgt) == len(ids)
    scored = [t for t, y in enumerate(tgt) if y != -1]
    assert scored == list(range(len(p) - 1, len(ids) - 1))  # from the last prompt token to the one before eot
    assert all(tgt[t] == ids[t + 1] for t in scored)
    assert [tgt[t] for t in scored] == r  # every response token, the eot included, is predicted once


# -----------------------------------------------------------------------------
# Reward-model labels: class t labels token t itself (no shift)


@pytest.mark.parametrize("scheme", ["bad_vs_rest", "bad_neutral_good"])
def test_rm_examples_label_the_wrong_token_itself(chat, scheme):
    """(rejected, edited) examples: -1 on the prompt; on the rejected response class 0 (bad)
    exactly at " fish"; with the bad_neutral_good scheme class 2 (good) exactly at " grass" of the edit."""
    rec = {"prompt": PROMPT, "chosen": RIGHT, "rejected": WRONG, "edited": RIGHT}
    (ids_o, cls_o), (ids_e, cls_e) = reward.rm_examples(chat, [rec], scheme)[0]
    n_p = len(chat.prompt(PROMPT))
    assert ids_o == chat.prompt(PROMPT) + chat.response(WRONG) and ids_e == chat.prompt(PROMPT) + chat.response(RIGHT)
    assert cls_o[:n_p] == [-1] * n_p and cls_e[:n_p] == [-1] * n_p
    assert [t for t, c in enumerate(cls_o) if c == 0] == positions_of(chat, ids_o, " fish")
    assert all(c == 1 for t, c in enumerate(cls_o) if t >= n_p and c != 0)
    good = [t for t, c in enumerate(cls_e) if c == 2]
    assert good == (positions_of(chat, ids_e, " grass") if scheme == "bad_neutral_good" else [])


def test_trained_token_rm_blames_the_wrong_token_in_a_rollout_batch(chat):
    """End to end: a token RM fitted on one labelled pair, read through reward_fn's path on a
    left-padded batch laid out as a rollout, gives its lowest reward at the " fish" column."""
    torch.manual_seed(0)
    rm = reward.TokenRM(tiny(vocab_size=chat.enc.n_vocab, block_size=160), "bad_vs_rest")
    rec = {"prompt": PROMPT, "chosen": RIGHT, "rejected": WRONG, "edited": RIGHT}
    idx, real, cls = reward.token_batch(chat, reward.rm_examples(chat, [rec], "bad_vs_rest")[0], "cpu")
    opt = torch.optim.Adam(rm.parameters(), lr=3e-3)
    rm.train()
    for _ in range(60):
        loss = reward.token_loss(rm(idx, real), cls)
        opt.zero_grad()
        loss.backward()
        opt.step()
    rm.eval()
    idx, real = chat.batch(["Tell me about the cow.", PROMPT], ["The cow is brown. The cow says moo.", WRONG])
    resp = chat.response_mask(idx, real)
    with torch.no_grad():
        r = rm.token_rewards(idx, real, resp)  # (B, T), what fg_ppo reads before normalisation
    row = r[1]
    fish = positions_of(chat, idx[1].tolist(), " fish")
    assert len(fish) == 1 and row.argmin().item() == fish[0]
    assert (r[~resp] == 0).all()


# -----------------------------------------------------------------------------
# Normalisation and the reward tensor of each method


# normalise by hand and its "no pay for length": the exercises' graders (exercises/checks.py)


def test_fit_norm_hand_computed():
    """The summed rewards [1, 2, 3] of three samples: centre 2, scale 1 (their mean and std)."""
    assert reward.fit_norm([1, 2, 3]) == pytest.approx({"center": 2.0, "scale": 1.0})


def samples_for_norm(n=24, seed=0):
    rng = random.Random(seed)
    prompts = [data.sample_prompt(rng) for _ in range(n)]
    return {"prompts": prompts, "responses": [data.noisy_response(p, rng) for p in prompts]}


def test_oracle_fg_reward_lands_on_the_deciding_tokens(chat):
    """oracle_fg, raw: the judge's verdict of each sentence on its last token (-1 on the "."
    after the wrong " fish"), each missing fact's -1 where the answer departs from it (here
    the eot, which stopped before the six facts still due), 0 elsewhere and off the response."""
    idx, real = chat.batch([PROMPT, "Tell me about the duck."], [WRONG, "The duck is yellow. The duck is small in size."])
    resp = chat.response_mask(idx, real)
    gold = reward.gold_rewards(chat, idx, real, resp, dense=True)
    row = idx[1].tolist()
    dots = positions_of(chat, row, ".")
    assert [t for t in range(idx.size(1)) if gold[0, t] != 0] == [positions_of(chat, idx[0].tolist(), ".")[-1]]
    assert gold[0].sum() == -1 == data.score(PROMPT, WRONG)
    assert (gold[~resp] == 0).all()
    # the duck: 2 correct facts paid on their "."; 6 missing facts after them, all decided by the eot
    assert gold[1, dots[-2]] == 1 and gold[1, dots[-1]] == 1 and gold[1, -1] == -6


def test_dense_oracle_sums_to_the_judge_score(chat):
    """For random noisy answers, cut short or followed by random tokens, each response's dense
    gold rewards sum exactly to the judge's score of its text."""
    rng, g = random.Random(3), torch.Generator().manual_seed(3)
    prompts, responses = [], []
    for i in range(40):
        p = data.sample_prompt(rng)
        ids = chat.response(data.noisy_response(p, rng))
        if i % 3 == 1:
            ids = ids[:rng.randint(1, len(ids))]  # truncated: no eot, maybe mid-sentence
        if i % 3 == 2:
            ids = ids[:-1] + torch.randint(0, 300, (rng.randint(1, 8),), generator=g).tolist() + [chat.eot]
        prompts.append(p), responses.append(ids)
    for p, ids in zip(prompts, responses):
        r = data.judge_token_rewards(chat.enc, p, ids)
        assert len(r) == len(ids)
        assert sum(r) == data.score(p, tok.decode_response(chat.enc, ids))


def test_oracle_fg_normalised_on_samples(chat):
    """reward_fn("oracle_fg") on the very samples it was fitted on: per-response sums have mean 0
    and std 1, the same normalisation as oracle_ppo (the same sums), and the centre is paid
    once, on the eot: every other response token keeps its raw reward / scale."""
    samples = samples_for_norm()
    fn = reward.reward_fn("oracle_fg", "unused", chat, samples, "cpu")
    idx, real = chat.batch(samples["prompts"], samples["responses"])
    resp = chat.response_mask(idx, real)
    r = fn(idx, real, resp)
    sums = r.sum(1)
    assert sums.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert sums.std().item() == pytest.approx(1.0, abs=1e-5)
    raw = reward.gold_rewards(chat, idx, real, resp, dense=True)
    s = raw.sum(1).std()
    torch.testing.assert_close(r[:, :-1], raw[:, :-1] / s, atol=1e-6, rtol=0)  # left padding: the eot is last
    assert (r[~resp] == 0).all()
    final = reward.reward_fn("oracle_ppo", "unused", chat, samples, "cpu")
    torch.testing.assert_close(final(idx, real, resp).sum(1), sums, atol=1e-5, rtol=0)


def test_oracle_ppo_reward_sits_on_the_eot_standardised(chat):
    """reward_fn("oracle_ppo"): one number per response, on its eot column, equal to the gold
    judge's score standardised over the samples."""
    samples = samples_for_norm()
    fn = reward.reward_fn("oracle_ppo", "unused", chat, samples, "cpu")
    idx, real = chat.batch(samples["prompts"], samples["responses"])
    resp = chat.response_mask(idx, real)
    r = fn(idx, real, resp)
    eot_col = idx.size(1) - 1  # left padding: every row ends at the last column, on its eot
    assert (idx[:, eot_col] == chat.eot).all()
    assert (r[:, :eot_col] == 0).all()
    scores = torch.tensor([data.score(p, x) for p, x in zip(samples["prompts"], samples["responses"])])
    torch.testing.assert_close(r[:, eot_col], (scores - scores.mean()) / scores.std(), atol=1e-5, rtol=0)


def test_fg_ppo_seq_adds_ppos_score_at_the_eot_and_pays_nothing_for_length(chat, tmp_path):
    """fg_ppo_seq = (fg_ppo's task reward + w * ppo's) / s, s refitted so that its sums over the
    SFT samples have mean 0 and std 1 again: on every token but the eot it is fg_ppo's blame
    (<= 0) over s, so no token is paid for being there (padding an answer earns nothing), and
    the eot carries ppo's score, weighted. w = 0 gives fg_ppo's reward."""
    torch.manual_seed(0)
    samples = samples_for_norm(40)
    for name, rm in (("token", reward.TokenRM(tiny(vocab_size=chat.enc.n_vocab, block_size=160))),
                     ("seq", reward.SeqRM(tiny(vocab_size=chat.enc.n_vocab, block_size=160)))):
        rm.eval()
        with torch.no_grad():
            rm.head.bias.add_(0.3)  # a SeqRM's score off 0, a TokenRM's p(bad) off 1/2
        scores = reward.response_scores(rm, chat, samples["prompts"], samples["responses"], "cpu")
        reward.save_rm(rm, reward.fit_norm(scores), str(tmp_path / f"{name}.pt"))
    fg, ppo = (reward.reward_fn(m, str(tmp_path), chat, samples, "cpu") for m in ("fg_ppo", "ppo"))
    idx, real = chat.batch(samples["prompts"], samples["responses"])
    resp = chat.response_mask(idx, real)
    for w in (0.0, 0.5, 2.0):
        both = reward.reward_fn("fg_ppo_seq", str(tmp_path), chat, samples, "cpu", seq_weight=w)(idx, real, resp)
        sums = both.sum(1)
        assert sums.mean().item() == pytest.approx(0.0, abs=1e-5) and sums.std().item() == pytest.approx(1.0, abs=1e-5)
        unscaled = fg(idx, real, resp) + w * ppo(idx, real, resp)
        s = unscaled.sum(1).std()
        torch.testing.assert_close(both, unscaled / s, atol=1e-5, rtol=0)  # the centre: 0, as each part's
        assert (both[:, :-1] <= 0).all() and (both[~resp] == 0).all()  # left padding: the eot is the last column
        if w == 0:
            torch.testing.assert_close(both, fg(idx, real, resp), atol=1e-5, rtol=0)


# -----------------------------------------------------------------------------
# Micro-batches cut by length give the whole batch's gradient


def _grads(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_sft_micro_batches_give_the_padded_batch_gradient(chat):
    """sft.sft_loss: summed losses of length-cut micro-batches over the batch's target
    count have the value and gradient of the mean loss of the whole batch padded at once,
    with fewer padded positions."""
    rng = random.Random(0)
    prompts = [data.sample_prompt(rng) for _ in range(12)]
    batch = [sft.sft_example(chat, p, data.noisy_response(p, rng)) for p in prompts]
    model = tiny(vocab_size=chat.enc.n_vocab, block_size=160)
    idx, real = tok.pad_left([x for x, _ in batch], chat.pad)
    tgt, _ = tok.pad_left([y for _, y in batch], -1)
    model.zero_grad()
    whole = model(idx, tgt, real=real)[1]
    whole.backward()
    expected = _grads(model)
    assert len(tok.split_by_length([len(x) for x, _ in batch])) > 1  # long and short answers: the cut happens
    model.zero_grad()
    loss, real_tokens, padded = sft.sft_loss(model, batch, chat.pad, "cpu")
    loss.backward()
    assert real_tokens == sum(len(x) for x, _ in batch) and padded < (~real).sum().item()
    torch.testing.assert_close(loss, whole, atol=1e-6, rtol=1e-6)
    for a, b in zip(_grads(model), expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bad_weight", [1.0, 3.0])
def test_token_rm_micro_batches_give_the_whole_batch_loss(chat, bad_weight):
    """train_token_rm's loss_of: summed weighted cross-entropy over micro-batches, divided by
    the summed class weights, equals token_loss's weighted mean over the whole batch."""
    rng = random.Random(1)
    recs = []
    for _ in range(6):
        p = data.sample_prompt(rng)
        r = data.noisy_response(p, rng)
        recs.append({"prompt": p, "chosen": r, "rejected": r, "edited": data.annotate(p, r)})
    ex = reward.rm_examples(chat, recs, "bad_vs_rest")
    torch.manual_seed(0)
    rm = reward.TokenRM(tiny(vocab_size=chat.enc.n_vocab, block_size=160), "bad_vs_rest")
    idx, real, cls = reward.token_batch(chat, [x for pair in ex for x in pair], "cpu")
    whole = reward.token_loss(rm(idx, real), cls, bad_weight)
    w = torch.tensor([bad_weight, 1.0])
    sums, counts = [], []
    for run in tok.split_by_length([max(len(x) for x, _ in pair) for pair in ex]):
        i, r, c = reward.token_batch(chat, [x for k in run for x in ex[k]], "cpu")
        sums.append(reward.token_loss(rm(i, r), c, bad_weight, reduction="sum"))
        counts.append(w[c[c != -1]].sum())
    torch.testing.assert_close(sum(sums) / sum(counts), whole, atol=1e-6, rtol=1e-6)
