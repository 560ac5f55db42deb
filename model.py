"""
A GPT language model in one file, in the lineage of nanoGPT's model.py, with a KV cache
and batched sampling over prompts of different lengths.

References: GPT-2 (Radford et al., 2019); nanoGPT (Karpathy). What differs from nanoGPT:
- forward returns logits for *all* positions: reward models and PPO score every token;
- batches are left-padded and carry `real`, True at real tokens, from which each row gets its
  own positions (0 at its first real token), so a padded prompt behaves exactly like the
  same prompt alone;
- a KV cache for generation (`use_cache=False` recomputes everything, for tests/bench).

Notation used in the shape comments:
    B batch, T time (sequence length), C channels (n_embd), V vocabulary size,
    nh number of heads, hs head size (C // nh).
"""

import json
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x, allowed, kv=None):
        # x: (B, T, C); allowed: (B, 1, T, Tk) bool, True where a query may attend to a key;
        # kv: this layer's slice of the KV cache, or None. Tk = past + T.
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if kv is not None:
            k, v = kv.update(k, v)  # (B, nh, Tk, hs): past keys/values followed by these
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.c_proj(y)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate=config.gelu)  # GPT-2 was trained with the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, allowed, kv=None):
        x = x + self.resid_dropout(self.attn(self.ln_1(x), allowed, kv))  # pre-norm residual blocks (GPT-2)
        x = x + self.mlp(self.ln_2(x))
        return x


class KVCache:
    """Keys and values of all layers for the positions seen so far, and which of those
    positions hold real tokens (the count per row is the next position id of each row)."""

    def __init__(self, config, B, T_max, device, dtype=torch.float32):
        hs = config.n_embd // config.n_head
        self.k = torch.zeros(config.n_layer, B, config.n_head, T_max, hs, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.real = torch.zeros(B, T_max, dtype=torch.bool, device=device)
        self.t = 0          # positions filled so far (shared by all rows: the batch is left-padded)
        self.layer = 0      # which layer the next update() writes

    def update(self, k, v):
        # k, v: (B, nh, T, hs) of the new positions; returns all keys/values up to them
        T, i = k.size(2), self.layer
        self.k[i, :, :, self.t:self.t + T] = k
        self.v[i, :, :, self.t:self.t + T] = v
        self.layer += 1
        return self.k[i, :, :, :self.t + T], self.v[i, :, :, :self.t + T]

    def add_real(self, real):
        """Record which of the next T positions are real (real (B, T)); returns the real keys up
        to them (B, t + T) and the count of real tokens before them (B, 1)."""
        self.real[:, self.t:self.t + real.size(1)] = real
        return self.real[:, :self.t + real.size(1)], self.real[:, :self.t].sum(1, keepdim=True)

    def advance(self, T):
        """Every layer has written the T new positions: the next call continues after them."""
        self.t, self.layer = self.t + T, 0


@dataclass
class GPTConfig:
    block_size: int = 256     # longest sequence (prompt + response) in tokens
    vocab_size: int = 512     # our BPE; 50260 for GPT-2's encoding plus our specials
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0      # 0 for this data size; RL turns it off in any case
    bias: bool = True         # bias in Linears and LayerNorms, as GPT-2
    gelu: str = "none"        # exact GELU (nanoGPT); "tanh" for GPT-2's weights (its gelu_new)


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying (Press & Wolf, 2017)
        self.apply(self._init_weights)
        # GPT-2 init: residual projections scaled by 1/sqrt(2 * n_layer), one per residual add
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @classmethod
    def from_pretrained(cls, path, vocab_size=None, block_size=None):
        """A GPT with the weights of a local Hugging Face GPT-2 checkpoint directory (config.json
        and model.safetensors or pytorch_model.bin; `gpt2_files` says what to download). The
        vocabulary grows to vocab_size (our special tokens after GPT-2's), each new row the mean
        of the pretrained ones: a token the model has never seen starts as an average token, and
        as the output rows are tied, with the average logit. block_size crops the position table.
        No transformers at run time: the tensors are read directly and renamed."""
        gpt2_files(path)
        hf = json.load(open(os.path.join(path, "config.json")))
        assert hf.get("layer_norm_epsilon", 1e-5) == 1e-5, "our LayerNorms use eps 1e-5, as GPT-2"
        act = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}[hf.get("activation_function", "gelu_new")]
        config = GPTConfig(block_size=block_size or hf["n_positions"], vocab_size=vocab_size or hf["vocab_size"],
                           n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], gelu=act)
        assert config.block_size <= hf["n_positions"], f"block_size {config.block_size} > GPT-2's {hf['n_positions']} positions"
        assert config.vocab_size >= hf["vocab_size"], "the vocabulary may grow, not shrink"
        f = os.path.join(path, "model.safetensors")
        if os.path.exists(f):
            from safetensors.torch import load_file
            sd = load_file(f)
        else:
            sd = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
        ours = {}
        for k, v in sd.items():
            k = k.removeprefix("transformer.")  # the hub's gpt2 has no prefix, save_pretrained writes one
            if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
                continue  # the causal-mask buffers of old checkpoints; the head is tied to wte
            # HF's Conv1D stores a Linear's weight as (in, out): y = x @ W + b; nn.Linear wants (out, in)
            if k.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")):
                v = v.t()
            ours["transformer." + k] = v.float().contiguous()
        wte = ours["transformer.wte.weight"]  # (V_gpt2, C) -> (vocab_size, C)
        new_rows = wte.mean(0, keepdim=True).expand(config.vocab_size - wte.size(0), -1)
        ours["transformer.wte.weight"] = ours["lm_head.weight"] = torch.cat([wte, new_rows])
        ours["transformer.wpe.weight"] = ours["transformer.wpe.weight"][:config.block_size]
        model = cls(config)
        model.load_state_dict(ours)  # strict: every parameter of ours is in the checkpoint, and only those
        return model

    def save_pretrained(self, path, **hf_config):
        """The way back: a Hugging Face GPT-2 directory (config.json with hf_config's keys too,
        model.safetensors) that transformers' GPT2LMHeadModel and our from_pretrained both read."""
        assert self.config.bias, "GPT-2 has biases in its Linears and LayerNorms"
        c = self.config
        hf = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=c.vocab_size, n_positions=c.block_size,
                  n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head, layer_norm_epsilon=1e-5, tie_word_embeddings=True,
                  activation_function={"tanh": "gelu_new", "none": "gelu"}[c.gelu], resid_pdrop=0.0, embd_pdrop=0.0,
                  attn_pdrop=0.0, **hf_config)
        sd = {}
        for k, v in self.state_dict().items():
            if k == "lm_head.weight":
                continue  # tied to wte: transformers ties it again on load
            if k.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")):
                v = v.t()  # nn.Linear's (out, in) -> HF's Conv1D (in, out)
            sd[k] = v.detach().float().contiguous().cpu()
        os.makedirs(path, exist_ok=True)
        json.dump(hf, open(os.path.join(path, "config.json"), "w"), indent=2)
        from safetensors.torch import save_file
        save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_checkpoint(cls, path, device="cpu"):
        """The GPT of a checkpoint this project wrote, {"model": state_dict, "model_args": GPTConfig fields}."""
        ck = torch.load(path, map_location=device, weights_only=True)
        model = cls(GPTConfig(**ck["model_args"])).to(device)
        model.load_state_dict(ck["model"])
        return model

    def num_params(self):
        return sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()

    def hidden(self, idx, real=None, cache=None):
        """Final hidden states (B, T, C) of tokens idx (B, T). real (B, T) is True at real
        tokens (False at padding); with a cache, idx continues the cached positions."""
        B, T = idx.size()
        real = torch.ones_like(idx, dtype=torch.bool) if real is None else real.bool()
        t0 = cache.t if cache is not None else 0
        # positions never pass t0 + T - 1: checked on the shapes, with no wait for the device
        assert t0 + T <= self.config.block_size, f"sequence longer than block_size {self.config.block_size}"
        # (B, Tk) real keys, past and present; (B, 1) real tokens before idx
        real_k, past = cache.add_real(real) if cache is not None else (real, 0)
        pos = (past + real.cumsum(1) - 1).clamp(min=0)  # (B, T) each row counts from its first real token
        # A query attends to earlier real keys; it may always attend to itself, so that padding
        # queries (whose outputs nobody reads) do not produce NaNs from an empty softmax.
        q_idx = torch.arange(t0, t0 + T, device=idx.device)[:, None]  # (T, 1)
        k_idx = torch.arange(t0 + T, device=idx.device)[None, :]      # (1, Tk)
        allowed = (k_idx <= q_idx) & (real_k[:, None, :] | (k_idx == q_idx))  # (B, T, Tk)
        allowed = allowed[:, None]  # (B, 1, T, Tk), broadcast over heads
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, allowed, cache)
        if cache is not None:
            cache.advance(T)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, real=None, cache=None, reduction="mean"):
        """Logits (B, T, V) at every position, and the cross-entropy against targets (B, T)
        where targets != -1, their mean or sum (None without targets)."""
        logits = self.lm_head(self.hidden(idx, real, cache))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                                   reduction=reduction)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas=(0.9, 0.95)):
        # weight decay on 2-D tensors (matmul weights, embeddings), none on biases and LayerNorms
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, eot, pad, temperature=1.0, top_k=None,
                 generator=None, use_cache=True):
        """Sample a response for each prompt (a list of token-id lists of any lengths).

        Prompts are left-padded with `pad` so that all rows end at the same index P and
        every new token is appended at the same column. Each row stops after it emits
        `eot` (later columns are `pad`). Returns
            idx       (B, P + N) prompt and response tokens,
            resp_mask (B, P + N) True at response tokens (the eot included); the real
                      tokens are then (idx != pad) | resp_mask,
            logprobs  (B, P + N) log-prob of each response token under the sampling
                      distribution (temperature and top-k applied), 0 elsewhere.
        """
        device = self.lm_head.weight.device
        B, P = len(prompts), max(len(p) for p in prompts)
        assert P + max_new_tokens <= self.config.block_size, "prompt + max_new_tokens exceeds block_size"
        idx = torch.full((B, P), pad, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            idx[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        real = idx != pad  # (B, P)
        resp_mask = torch.zeros_like(real)
        logprobs = torch.zeros(B, P, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        cache = KVCache(self.config, B, P + max_new_tokens, device, self.lm_head.weight.dtype) if use_cache else None
        x, x_real = idx, real  # what the next forward pass reads
        for _ in range(max_new_tokens):
            if use_cache:
                logits, _ = self(x, real=x_real, cache=cache)
            else:
                logits, _ = self(idx, real=real)  # recompute the whole context every step
            logits = logits[:, -1, :].float()  # (B, V) next-token logits
            if temperature > 0:
                logits = logits / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            logp = F.log_softmax(logits, dim=-1)  # (B, V)
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                nxt = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)  # (B,)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            lp = torch.where(done, 0.0, logp.gather(1, nxt[:, None]).squeeze(1))
            idx = torch.cat([idx, nxt[:, None]], 1)
            real = torch.cat([real, ~done[:, None]], 1)
            resp_mask = torch.cat([resp_mask, ~done[:, None]], 1)
            logprobs = torch.cat([logprobs, lp[:, None]], 1)
            x, x_real = nxt[:, None], ~done[:, None]
            done = done | (nxt == eot)
            if done.all():
                break
        return idx, resp_mask, logprobs


def token_logprobs(logits, tokens, temperature=1.0):
    """log p(tokens[:, t] | tokens[:, :t]) from the logits of the same sequence: the logit
    at position t scores token t+1, so the result at column t uses logits[:, t-1].
    logits (B, T, V), tokens (B, T) -> (B, T), column 0 is 0 (nothing predicts it)."""
    logp = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)  # (B, T-1, V)
    lp = logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)  # (B, T-1)
    return F.pad(lp, (1, 0))


def autocast(device):
    """The precision the model's forward runs at on device: bf16 autocast on CUDA GPUs that
    support it (the weights, the optimiser and the losses stay fp32), full fp32 elsewhere."""
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()




def gpt2_files(path):
    """Raise ValueError with one line saying what to download unless path holds a GPT-2
    checkpoint directory (config.json, weights, and vocab.json + merges.txt for the encoding)."""
    have = set(os.listdir(path)) if os.path.isdir(path) else set()
    if not {"config.json", "vocab.json", "merges.txt"} <= have or not have & {"model.safetensors", "pytorch_model.bin"}:
        raise ValueError(f"--init={path}: no GPT-2 checkpoint there; download one with `huggingface-cli download gpt2 "
                         f"config.json model.safetensors vocab.json merges.txt --local-dir {path}`")
