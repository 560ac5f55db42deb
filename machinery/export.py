"""
A trained policy back to Hugging Face, as a GPT-2 directory that transformers reads:

    python -m machinery.export runs/x/policies/fg_ppo_seed1337.pt runs/x/hf/fg_ppo_seed1337

writes config.json and model.safetensors (model.GPT.save_pretrained) and the run's encoding as
vocab.json and merges.txt, with the project's chat tokens (<|user|>, <|assistant|>, <|pad|>) as
added tokens after <|endoftext|>: GPT2LMHeadModel.from_pretrained and GPT2Tokenizer.from_pretrained
load it, and so does model.GPT.from_pretrained. Any policy checkpoint of a run (PPO, RLOO, DPO)
works, or the run's sft/model.pt.
"""

import os
import sys

import torch

import tokenizer as tok
from model import GPT, GPTConfig


def export(ckpt, out):
    """Write the policy of checkpoint ckpt (its run folder two levels up) to the directory out."""
    run = os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))
    sft = torch.load(os.path.join(run, "sft", "model.pt"), map_location="cpu", weights_only=True)
    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**sft["model_args"]))
    model.load_state_dict(ck["policy"] if "policy" in ck else ck["model"])  # a policy, or the SFT model
    ranks = tok.load_ranks(os.path.join(run, "tokenizer.tiktoken"))
    eot = len(ranks)  # <|endoftext|>, then <|user|>, <|assistant|>, <|pad|> (tokenizer.SPECIALS)
    model.save_pretrained(out, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot + 3)
    tok.save_gpt2_files(ranks, out)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m machinery.export RUN/policies/METHOD_seedS.pt OUT_DIR")
    print(export(*sys.argv[1:]))
