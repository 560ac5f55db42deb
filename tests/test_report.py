"""Tests for machinery/report.py: the token-reward HTML draws the gold labels with the token
RM's own label scheme."""
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import tiny  # noqa: E402
import data  # noqa: E402
import reward  # noqa: E402
import tokenizer as tok  # noqa: E402
from machinery import report  # noqa: E402
from world import ToyWorld  # noqa: E402


@pytest.fixture(scope="module")
def chat():
    rng = random.Random(0)
    texts = [p + " " + data.noisy_response(p, rng) for p in (data.sample_prompt(rng) for _ in range(500))]
    return tok.Chat(tok.build_encoding(tok.train_bpe(texts, 512)), block_size=160, max_new_tokens=110)


@pytest.mark.parametrize("scheme", ["bad_neutral_good", "bad_vs_rest"])
def test_token_rewards_html_gold_labels_follow_the_rms_scheme(chat, scheme, tmp_path, monkeypatch):
    """An answer that leaves a fact out: its gold labels in the HTML are label_pair's under the
    RM's scheme (bad_vs_rest puts an omission mark on it, the three-class scheme does not)."""
    prompt = "Tell me about the cow."
    full = data.ideal_response(prompt)
    short = full[:full.rindex(".", 0, len(full) - 1) + 1]  # the last fact left out
    drawn = []
    render = report.diff_labels.render
    monkeypatch.setattr(report.diff_labels, "render", lambda toks, labels, html=False: drawn.append(labels)
                        or render(toks, labels, html))
    rm = reward.TokenRM(tiny(0, vocab_size=chat.enc.n_vocab, block_size=160), scheme)
    report.token_rewards_html(str(tmp_path / "t.html"), rm, {"prompts": [prompt], "responses": [short]},
                              ToyWorld(data.WorldConfig()), chat, "cpu", n=1)
    ids = chat.response(short)
    gold, _ = reward.label_pair(chat.enc, ids, data.annotate(prompt, short), scheme)
    assert drawn[1] == gold  # [0] is the RM's rewards, [1] the gold labels
    assert (-1 in gold) == (scheme == "bad_vs_rest")  # the omission mark, only under bad_vs_rest
