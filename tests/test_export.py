"""Tests for the way back to Hugging Face (model.GPT.save_pretrained, tokenizer.save_gpt2_files,
machinery/export.py) with transformers as the oracle: its GPT2LMHeadModel gives our logits, its
GPT2Tokenizer our tokens and specials, and our from_pretrained reads the directory back."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tokenizer as T  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from test_gpt2 import STRINGS, ranks, write_gpt2_dir  # noqa: E402,F401  (ranks: a fixture)
from test_train import ENV, ROOT  # noqa: E402

transformers = pytest.importorskip("transformers", reason="the oracle is transformers' GPT-2 (pip install transformers)")


def perturbed(model, seed=1):
    """model with every weight moved (the rows of our added specials too), so every mismatch shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def check_directory(out, model, enc):
    """transformers' model and tokenizer of out agree with our model and encoding."""
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf.config.eos_token_id == T.special_ids(enc)["<|endoftext|>"] == hf.generation_config.eos_token_id
    idx = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-5, rtol=0)
    hf_tok = transformers.GPT2Tokenizer.from_pretrained(out)
    for s in STRINGS[:-1]:
        assert hf_tok.encode(s) == enc.encode_ordinary(s), s
    sp = T.special_ids(enc)
    assert hf_tok.convert_tokens_to_ids(list(sp)) == list(sp.values())
    assert hf_tok.encode("<|user|>Hi<|assistant|>") == [sp["<|user|>"], *enc.encode_ordinary("Hi"), sp["<|assistant|>"]]


def test_save_pretrained_gives_transformers_our_logits_and_reads_back(tmp_path, ranks):
    """A GPT-2 start (its vocabulary grown by our specials), trained: save_pretrained and
    save_gpt2_files write a directory whose logits, tokens and specials transformers reproduces,
    and from_pretrained of ours reads back the same weights exactly."""
    src = str(tmp_path / "gpt2")
    write_gpt2_dir(src, ranks, n_positions=64)
    enc = T.build_encoding(T.gpt2_ranks(src))
    model = perturbed(GPT.from_pretrained(src, enc.n_vocab, 64))
    out = str(tmp_path / "out")
    model.save_pretrained(out, eos_token_id=enc.n_vocab - 4)
    T.save_gpt2_files(T.gpt2_ranks(src), out)
    check_directory(out, model, enc)
    back = GPT.from_pretrained(out)
    assert dataclasses.asdict(back.config) == dataclasses.asdict(model.config)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    read = lambda d, f: open(os.path.join(d, f), encoding="utf-8").read()  # noqa: E731
    assert json.loads(read(out, "vocab.json")) == json.loads(read(src, "vocab.json"))  # GPT-2's files, written back
    assert read(out, "merges.txt").split("\n") == read(src, "merges.txt").split("\n")


def test_export_command_writes_a_runs_policy(tmp_path, ranks):
    """python -m machinery.export RUN/policies/X.pt DIR: a toy run's policy (exact GELU, its own
    BPE) as a directory transformers loads with our logits and tokens."""
    run = tmp_path / "run"
    torch.manual_seed(0)
    sft = GPT(GPTConfig(vocab_size=len(ranks) + 4, block_size=64, n_layer=2, n_head=2, n_embd=32))
    os.makedirs(run / "sft"), os.makedirs(run / "policies")
    torch.save({"model": sft.state_dict(), "model_args": dataclasses.asdict(sft.config), "config": {}}, run / "sft" / "model.pt")
    T.save_ranks(ranks, str(run / "tokenizer.tiktoken"))
    policy = perturbed(sft)
    torch.save({"policy": policy.state_dict(), "iter": 1}, run / "policies" / "fg_ppo_seed1.pt")
    out = str(tmp_path / "hf")
    p = subprocess.run([sys.executable, "-m", "machinery.export", str(run / "policies" / "fg_ppo_seed1.pt"), out],
                       cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    check_directory(out, policy, T.build_encoding(ranks))
