"""Tests for tokenizer.py: BPE training, tiktoken agreement, save/load, specials."""
import json
import os
import random
import sys

import pytest
import regex
import tiktoken
import tiktoken.load

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tokenizer as T  # noqa: E402

VOCAB = 320  # 60 merges: small enough that the toy corpus below supports all of them


def make_corpus(n=400, seed=0):
    rng = random.Random(seed)
    animals = "cow dog cat horse sheep goat pig duck hen fox owl bear wolf deer frog mouse".split()
    colors = "brown black white red gray spotted golden small big happy sleepy hungry".split()
    verbs = ["eats grass", "runs fast", "sleeps in the barn", "jumps over the fence",
             "drinks water", "likes apples", "hides under the tree", "sings at night"]
    out = []
    for _ in range(n):
        a = rng.choice(animals)
        out.append(f"The {a} is {rng.choice(colors)}. The {a} {rng.choice(verbs)}. "
                   f"It is {rng.randint(1, 20)} years old, isn't it?")
    return out


@pytest.fixture(scope="module")
def corpus():
    return make_corpus()


@pytest.fixture(scope="module")
def ranks(corpus):
    return T.train_bpe(corpus, VOCAB)


@pytest.fixture(scope="module")
def enc(ranks):
    return T.build_encoding(ranks)


def random_strings(n=300, seed=0):
    rng = random.Random(seed)
    pieces = ["hello", " world", "é", "ñandú", "naïve", "日本語", "中文字符", "🐄", "🦊🐺", "👩‍👩‍👧",
              "  ", "\n", "\n\n", "\t", "   \n  ", "'s", "'ll", "123", "3.14", "<|endoftext|>", "<|pad|>"]
    out = ["", " ", "\n", "      ", "<|endoftext|>"]
    while len(out) < n:
        kind = rng.random()
        if kind < 0.4:  # mix of known tricky pieces
            out.append("".join(rng.choice(pieces) for _ in range(rng.randint(1, 8))))
        elif kind < 0.7:  # random bytes; invalid utf-8 becomes U+FFFD
            out.append(bytes(rng.randrange(256) for _ in range(rng.randint(0, 40))).decode("utf-8", errors="replace"))
        else:  # random code points, skipping surrogates (not encodable as utf-8)
            cps = [rng.randrange(0x110000) for _ in range(rng.randint(0, 20))]
            out.append("".join(chr(c) for c in cps if not 0xD800 <= c <= 0xDFFF))
    return out


def test_round_trip_unicode(enc):
    """decode(encode_ordinary(s)) == s for emoji, CJK, accents, random code points, whitespace, ''."""
    for s in random_strings():
        assert enc.decode(enc.encode_ordinary(s)) == s, repr(s)


def test_user_text_with_special_literal_is_ordinary(enc):
    """A literal "<|endoftext|>" in user text is encoded as plain bytes, not the special id."""
    ids = enc.encode_ordinary("hi <|endoftext|> there")
    assert T.special_ids(enc)["<|endoftext|>"] not in ids
    assert enc.decode(ids) == "hi <|endoftext|> there"


def test_specials(ranks, enc):
    """Each special is one id; ids are distinct and occupy the last 4 slots of vocab_size."""
    assert len(ranks) == VOCAB - len(T.SPECIALS)
    assert enc.n_vocab == VOCAB
    sp = T.special_ids(enc)
    for s in T.SPECIALS:
        assert enc.encode(s, allowed_special="all") == [sp[s]]
    assert [sp[s] for s in T.SPECIALS] == list(range(VOCAB - 4, VOCAB))
    assert sp["<|pad|>"] != sp["<|endoftext|>"]


def test_training_deterministic(corpus, ranks):
    """Two training runs on the same corpus give identical ranks."""
    assert T.train_bpe(corpus, VOCAB) == ranks
    assert T.train_bpe(list(corpus), VOCAB) == T.train_bpe(corpus, VOCAB)


def test_ranks_are_bpe_consistent(ranks):
    """Ranks are 0..n-1, single bytes come first, and every token is a merge of two lower-rank tokens."""
    assert sorted(ranks.values()) == list(range(len(ranks)))
    assert all(ranks[bytes([b])] == b for b in range(256))
    for tok, r in ranks.items():
        if len(tok) > 1:
            assert len(bpe_parts(tok, {t: q for t, q in ranks.items() if q < r})) == 2, tok


def bpe_parts(tok, ranks):
    """Greedy lowest-rank merging of tok's bytes (used to recover each token's merge pair)."""
    parts = [bytes([b]) for b in tok]
    while len(parts) > 1:
        cands = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks]
        if not cands:
            break
        _, i = min(cands)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def reference_encode(text, ranks):
    """minbpe-style: recover merges {(id_a, id_b): id}, apply them in rank order on each chunk."""
    merges = {}
    for tok, r in ranks.items():
        if len(tok) > 1:
            a, b = bpe_parts(tok, {t: q for t, q in ranks.items() if q < r})
            merges[(ranks[a], ranks[b])] = r
    out = []
    for chunk in regex.findall(T.GPT2_PAT, text):
        ids = list(chunk.encode("utf-8"))
        while len(ids) > 1:
            pair = min(zip(ids, ids[1:]), key=lambda p: merges.get(p, float("inf")))
            if pair not in merges:
                break
            new, i = [], 0
            while i < len(ids):  # replace every occurrence of pair, left to right
                if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
                    new.append(merges[pair])
                    i += 2
                else:
                    new.append(ids[i])
                    i += 1
            ids = new
        out.extend(ids)
    return out


def test_tiktoken_matches_reference_merges(corpus, ranks, enc):
    """tiktoken's encoding of the training sentences equals direct application of the learned merges."""
    for s in corpus[:200] + random_strings(50, seed=1):
        assert enc.encode_ordinary(s) == reference_encode(s, ranks), repr(s)


def test_save_load_round_trip(tmp_path, monkeypatch, corpus, ranks, enc):
    """save_ranks/load_ranks gives identical ranks and encodings; no .tmp file is left behind."""
    path = str(tmp_path / "bpe.tiktoken")
    T.save_ranks(ranks, path)
    assert not os.path.exists(path + ".tmp")
    loaded = T.load_ranks(path)
    assert loaded == ranks
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # "" disables tiktoken's on-disk cache
    assert tiktoken.load.load_tiktoken_bpe(path) == ranks  # it really is tiktoken's file format
    enc2 = T.build_encoding(loaded)
    for s in corpus[:50]:
        assert enc2.encode_ordinary(s) == enc.encode_ordinary(s)


def test_load_sees_overwritten_file(tmp_path):
    """Re-saving to the same path and loading returns the new ranks (no stale cache)."""
    path = str(tmp_path / "bpe.tiktoken")
    a, b = T.train_bpe(["aa aa aa"], 261), T.train_bpe(["bb bb bb"], 261)
    T.save_ranks(a, path)
    assert T.load_ranks(path) == a
    T.save_ranks(b, path)
    assert T.load_ranks(path) == b


def test_compression(corpus, enc):
    """The trained tokenizer uses well under one token per byte on its corpus."""
    text = "\n".join(corpus)
    assert len(enc.encode_ordinary(text)) / len(text.encode("utf-8")) < 0.5


def test_early_stop_when_no_pair_repeats():
    """Training stops once no adjacent pair occurs at least twice."""
    ranks = T.train_bpe(["abab"], 512)
    assert len(ranks) == 257 and ranks[b"ab"] == 256  # "ab" x2 merges; ("ab","ab") occurs once


def test_get_tokenizer(tmp_path, corpus, ranks):
    """get_tokenizer trains and saves a BPE, then reloads it from its file without texts."""
    path = str(tmp_path / "sub" / "bpe.tiktoken")
    enc = T.get_tokenizer(path, texts=corpus, vocab_size=VOCAB)
    assert os.path.exists(path) and T.load_ranks(path) == ranks
    enc2 = T.get_tokenizer(path)  # loads, no texts needed
    assert enc2.encode_ordinary(corpus[0]) == enc.encode_ordinary(corpus[0])


def test_gpt2_layout_checked(tmp_path):
    """vocab.json + merges.txt whose ids do not grow along the merges are refused in one line
    (tiktoken would merge in another order than Hugging Face); tests/test_gpt2.py checks
    real files against transformers."""
    spell = T.bytes_to_unicode()
    vocab = {spell[b]: b for b in range(256)} | {"ab": 257, "bc": 256, "<|endoftext|>": 258}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\nb c\n")
    with pytest.raises(ValueError, match="not laid out as GPT-2's"):
        T.gpt2_ranks(str(tmp_path))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nb c\na b\n")
    assert T.gpt2_ranks(str(tmp_path))[b"ab"] == 257


# -----------------------------------------------------------------------------
# Micro-batches by length


def _area(lengths, runs):
    return sum(len(r) * max(lengths[i] for i in r) for r in runs)


def test_split_by_length_is_a_partition_of_minimal_area():
    """Every index once, runs of ascending lengths, and the padded area equals the minimum
    over all ways to cut the sorted lengths into at most 4 runs (brute force)."""
    import itertools
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 30) for _ in range(rng.randint(1, 9))]
        runs = T.split_by_length(lengths)
        assert sorted(i for r in runs for i in r) == list(range(len(lengths)))
        assert 1 <= len(runs) <= 4 and all(r for r in runs)
        flat = [lengths[i] for r in runs for i in r]
        assert flat == sorted(lengths)
        L = sorted(lengths)
        best = min(sum((b - a) * L[b - 1] for a, b in zip((0,) + cuts, cuts + (len(L),)))
                   for k in range(4) for cuts in itertools.combinations(range(1, len(L)), k))
        assert _area(lengths, runs) == best
    assert T.split_by_length([7, 7, 7]) == [[0, 1, 2]]  # no cut that saves nothing
