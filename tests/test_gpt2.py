"""Tests for GPT-2 weights (model.GPT.from_pretrained, tokenizer.gpt2_ranks) against
transformers as the oracle, and the --init pipeline end to end on a tiny random GPT-2.

The checkpoint is a tiny random GPT2LMHeadModel saved with save_pretrained, its vocabulary
a BPE of ours exported as vocab.json + merges.txt, so the whole directory is consistent."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import tokenizer as T  # noqa: E402
from model import GPT, KVCache, gpt2_files  # noqa: E402
from test_train import ENV, ROOT, SMALL, ok  # noqa: E402

transformers = pytest.importorskip("transformers", reason="the oracle is transformers' GPT-2 (pip install transformers)")

RECORDS = os.path.join(ROOT, "examples", "prefs.jsonl")
STRINGS = ["The cow is brown.", "Hello,  world!\n\nIt's 2024; isn't it? ", "naïve café — 東京 🐄",
           "   leading spaces and trailing   ", "x" * 50 + " 12345 67", "<|endoftext|> is plain text here"]


def write_gpt2_dir(path, ranks, n_positions=256, safetensors=True, seed=0):
    """A Hugging Face GPT-2 checkpoint directory: our BPE ranks as vocab.json + merges.txt and
    a random 2-layer GPT2LMHeadModel. Returns the model (eval mode)."""
    spell = lambda b: "".join(T.bytes_to_unicode()[x] for x in b)
    vocab = {spell(t): r for t, r in ranks.items()} | {"<|endoftext|>": len(ranks)}
    merges = []
    for t, r in sorted(ranks.items(), key=lambda kv: kv[1])[256:]:
        # the merge that made t: t's bytes encoded with the tokens made before it end as two parts
        a, b = T._merge_chunk([bytes([x]) for x in t], {k: v for k, v in ranks.items() if v < r})
        merges.append(f"{spell(a)} {spell(b)}")
    os.makedirs(path, exist_ok=True)
    json.dump(vocab, open(os.path.join(path, "vocab.json"), "w"))
    open(os.path.join(path, "merges.txt"), "w").write("#version: 0.2\n" + "\n".join(merges) + "\n")
    cfg = transformers.GPT2Config(vocab_size=len(vocab), n_positions=n_positions, n_embd=32, n_layer=2, n_head=2,
                                  bos_token_id=len(ranks), eos_token_id=len(ranks))
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # weights far from init (biases and LayerNorms too), so every mismatch shows
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(path, safe_serialization=safetensors)
    return hf


@pytest.fixture(scope="module")
def ranks():
    texts = [r[k] for r in data.read_jsonl(RECORDS) for k in data.FIELDS if k in r]
    return T.train_bpe(texts + STRINGS, vocab_size=400)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, ranks):
    path = str(tmp_path_factory.mktemp("gpt2"))
    return path, write_gpt2_dir(path, ranks)


def test_encoding_matches_transformers_tokenizers(ckpt, ranks):
    """vocab.json + merges.txt served by tiktoken tokenise like GPT2Tokenizer and GPT2TokenizerFast;
    <|endoftext|> keeps its id and our other specials follow it."""
    path, _ = ckpt
    enc = T.build_encoding(T.gpt2_ranks(path))
    assert T.gpt2_ranks(path) == ranks
    assert T.special_ids(enc) == {s: len(ranks) + i for i, s in enumerate(T.SPECIALS)}
    slow = transformers.GPT2Tokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"))
    fast = transformers.GPT2TokenizerFast(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"))
    for s in STRINGS[:-1]:  # the tokenizers parse "<|endoftext|>" as the special; encode_ordinary does not
        ids = enc.encode_ordinary(s)
        assert ids == slow.encode(s) == fast.encode(s), s
        assert enc.decode(ids) == s
    assert T.bytes_to_unicode()[ord(" ")] == "Ġ" and len(set(T.bytes_to_unicode().values())) == 256


def _oracle_logits(hf, idx):
    with torch.no_grad():
        return hf(idx).logits  # (B, T, V_gpt2)


@pytest.mark.parametrize("safetensors", [True, False])
def test_logits_equal_transformers(tmp_path, ranks, safetensors):
    """Our loader's logits equal GPT2LMHeadModel's on random tokens (atol 1e-5), from
    model.safetensors and from pytorch_model.bin; the new rows are the mean of the old ones."""
    hf = write_gpt2_dir(str(tmp_path), ranks, safetensors=safetensors, seed=1)
    V = hf.config.vocab_size
    model = GPT.from_pretrained(str(tmp_path), vocab_size=V + 3, block_size=64).eval()
    assert model.config.gelu == "tanh" and model.config.n_embd == 32 and model.transformer.wpe.weight.shape == (64, 32)
    wte = model.transformer.wte.weight
    assert model.lm_head.weight is wte and torch.allclose(wte[V:], wte[:V].mean(0).expand(3, -1))
    idx = torch.randint(0, V, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(idx)[0]
    torch.testing.assert_close(ours[..., :V], _oracle_logits(hf, idx), atol=1e-5, rtol=0)


def test_kv_cache_and_padding_equal_transformers(ckpt):
    """Token by token through the KV cache, and a left-padded row, give GPT2LMHeadModel's logits."""
    path, hf = ckpt
    V = hf.config.vocab_size
    model = GPT.from_pretrained(path, vocab_size=V + 3, block_size=64).eval()
    idx = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(1))
    ref = _oracle_logits(hf, idx)
    cache = KVCache(model.config, 2, 30, "cpu")
    with torch.no_grad():
        steps = [model(idx[:, t:t + 1], cache=cache)[0] for t in range(30)]  # (2, 1, V + 3) each
        padded = torch.cat([torch.full((2, 5), V + 2), idx], 1)  # 5 pad tokens in front
        mask = torch.cat([torch.zeros(2, 5, dtype=torch.bool), torch.ones(2, 30, dtype=torch.bool)], 1)
        left = model(padded, real=mask)[0][:, 5:]
    torch.testing.assert_close(torch.cat(steps, 1)[..., :V], ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(left[..., :V], ref, atol=1e-5, rtol=0)


def test_missing_checkpoint_is_one_line(tmp_path):
    """No checkpoint: one line that says what to download and where; train.py exits with it
    before writing anything."""
    with pytest.raises(ValueError, match=r"huggingface-cli download gpt2 .*--local-dir .*nowhere") as info:
        gpt2_files(str(tmp_path / "nowhere"))
    assert "\n" not in str(info.value)
    import subprocess
    p = subprocess.run([sys.executable, "train.py", f"--init={tmp_path / 'nowhere'}", f"--out={tmp_path / 'out'}"],
                       cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr and "huggingface-cli download gpt2" in p.stderr
    assert not (tmp_path / "out").exists()


def test_init_pipeline_end_to_end(tmp_path, ckpt, ranks):
    """--init=DIR --data=FILE runs SFT, both RMs, PPO and fine-grained PPO from the tiny GPT-2:
    the model's sizes and encoding come from the checkpoint, not from the preset."""
    import subprocess
    path, hf = ckpt
    recs = data.read_jsonl(RECORDS)[:24]
    mine = tmp_path / "mine.jsonl"
    data.write_jsonl(str(mine), recs)
    out = tmp_path / "run"
    ok(subprocess.run([sys.executable, "train.py", *SMALL, f"--out={out}", f"--init={path}", f"--data={mine}",
                       "--methods=ppo,fg_ppo"], cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600))
    ck = torch.load(out / "sft" / "model.pt", weights_only=True)
    assert ck["model_args"] | {"block_size": 0} == dict(block_size=0, vocab_size=hf.config.vocab_size + 3, n_layer=2,
                                                        n_head=2, n_embd=32, dropout=0.0, bias=True, gelu="tanh")
    assert T.load_ranks(str(out / "tokenizer.tiktoken")) == ranks
    res = json.load(open(out / "results.json"))
    assert {"sft", "ppo", "fg_ppo"} <= set(res["methods"])
