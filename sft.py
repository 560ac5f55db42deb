"""
Stage 1 of the pipeline: supervised fine-tuning (SFT) of a GPT on the world's corpus of
(prompt, response) pairs, the loss on the response tokens only, as nanoGPT's train.py with
a warm-up and cosine learning rate. It writes sft/model.pt, the model every later stage
starts from (and the frozen reference of RL), its samples and their error rates.

Under torchrun (machinery/distributed.py) every process draws the same batch and takes its
slice; its summed loss over the whole batch's targets / world_size makes DDP's average of
the processes' gradients the one-process gradient of the whole batch.
"""

import dataclasses
import math
import os
import random
import sys
import time

import torch
from tqdm import tqdm

import data
import tokenizer as tok
from data import save_atomic
from machinery import distributed as dist
from model import GPT, GPTConfig, autocast


def get_lr(it, cfg):
    # 1) linear warmup, 2) cosine decay to 10% of the peak
    if it < cfg.warmup:
        return cfg.sft_lr * (it + 1) / cfg.warmup
    ratio = (it - cfg.warmup) / max(1, cfg.sft_steps - cfg.warmup)
    return cfg.sft_lr * (0.1 + 0.45 * (1 + math.cos(math.pi * ratio)))


def sft_example(chat, prompt, response):
    """(ids, targets) of one SFT example: prompt + response + eot, cut to block_size. The
    logit at position t scores token t+1, so targets[t] = ids[t+1] on the response: -1
    (ignored) up to the last prompt token, whose target is the first response token, and -1
    at the eot, which has no next token."""
    p, r = chat.prompt(prompt), chat.response(response)
    return (p + r)[:chat.block_size], ([-1] * (len(p) - 1) + r + [-1])[:chat.block_size]


def sft_loss(model, batch, pad, device, max_parts=4, n_targets=None):
    """Mean cross-entropy over the targets of a batch of sft_example()s (the sum over
    n_targets, if given), and its (real, padded) positions. It runs as up to max_parts
    micro-batches cut by length, so a short answer is not padded to the longest one
    (tok.split_by_length): the same value and gradient as the whole batch padded at once."""
    lengths = [len(x) for x, _ in batch]
    loss_sum, real_tokens, padded = 0.0, 0, 0
    for run in tok.split_by_length(lengths, max_parts):
        idx, real = tok.pad_left([batch[i][0] for i in run], pad)
        tgt, _ = tok.pad_left([batch[i][1] for i in run], -1)
        loss_sum = loss_sum + model(idx.to(device), tgt.to(device), real=real.to(device), reduction="sum")[1]
        n_real = sum(lengths[i] for i in run)  # counted on the host: no GPU sync
        real_tokens, padded = real_tokens + n_real, padded + len(run) * max(lengths[i] for i in run) - n_real
    return loss_sum / (n_targets or sum(t != -1 for _, y in batch for t in y)), real_tokens, padded


def stage_sft(cfg, world, chat, device):
    """A GPT (or GPT-2's weights, --init) trained on the world's SFT corpus; then its samples
    (which later fit the reward scales) and, with a gold judge, their error rates."""
    path = os.path.join(cfg.out, "sft", "model.pt")
    if os.path.exists(path):
        print("sft/model.pt exists, skipping (--force to redo)")
        return
    t0 = time.time()
    rng = random.Random(cfg.seed)
    corpus = world.sft_corpus(cfg.n_sft, rng)
    examples = [sft_example(chat, p, r) for p, r in corpus]  # the loss is on response tokens only
    n_val = max(len(examples) // 20, 1)
    val, train = examples[:n_val], examples[n_val:]

    torch.manual_seed(cfg.seed)
    if cfg.init:  # GPT-2's weights, its rows grown by our special tokens
        model = GPT.from_pretrained(cfg.init, chat.enc.n_vocab, cfg.block_size).to(device)
    else:
        model = GPT(GPTConfig(vocab_size=chat.enc.n_vocab, block_size=cfg.block_size, n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_embd=cfg.n_embd)).to(device)
    opt = model.configure_optimizers(cfg.weight_decay, cfg.sft_lr)
    print(f"sft: {len(train)} examples, {model.num_params() / 1e6:.2f}M parameters, vocab {chat.enc.n_vocab}")
    ddp_model = dist.wrap(model)  # trained through (torchrun: averages the gradients over the ranks)

    @torch.no_grad()
    def val_loss():  # mean over chunks of 256 examples
        model.eval()
        losses = [sft_loss(model, val[i:i + 256], chat.pad, device)[0].item() for i in range(0, len(val), 256)]
        model.train()
        return sum(losses) / len(losses)

    g, t_train = random.Random(cfg.seed), time.time()
    real_tokens = padded = 0
    model.train()
    pbar = tqdm(range(cfg.sft_steps), desc="sft", dynamic_ncols=True)
    for it in pbar:
        for group in opt.param_groups:
            group["lr"] = get_lr(it, cfg)
        batch = g.sample(train, min(cfg.sft_batch, len(train)))  # the same on every rank
        # torchrun: a rank's slice, its summed loss over the batch's targets / world_size: DDP's
        # average of the ranks' gradients is then the one-process gradient of the whole batch
        n_targets = sum(t != -1 for _, y in batch for t in y) / dist.world_size
        with autocast(device):
            loss, n_real, n_pad = sft_loss(ddp_model, dist.shard(batch), chat.pad, device, n_targets=n_targets)
        real_tokens, padded = real_tokens + n_real, padded + n_pad
        loss_all = dist.all_reduce_sum(loss.detach()) / dist.world_size  # the batch's loss: same on every rank
        if it % 10 == 0 or it + 1 == cfg.sft_steps:  # the host reads the loss (a sync on a GPU) every 10 steps
            if not torch.isfinite(loss_all):
                sys.exit(f"error: sft stopped at step {it}: loss is {loss_all.item()}; no checkpoint written")
            pbar.set_postfix(loss=f"{loss_all.item():.3f}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if (it + 1) % max(cfg.sft_steps // 4, 1) == 0 or it + 1 == cfg.sft_steps:
            tqdm.write(f"sft step {it + 1} | train loss {loss_all.item():.4f} | val loss {val_loss():.4f}")
    real_tokens, padded = dist.all_reduce_sum(torch.tensor([real_tokens, padded])).tolist()  # of all ranks
    train_s = time.time() - t_train
    if not dist.master:  # rank 0 samples, judges and saves; the others wait at the stage's barrier
        return

    # Fresh samples at temperature 1 (they also fit the reward scales later), and with a gold
    # judge its view of them against the corpus the model learned from.
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    prompts = [world.sample_prompt(rng) for _ in range(cfg.n_judge)]
    samples = chat.sample(model, prompts, gen)
    data.write_json({"prompts": prompts, "responses": samples}, os.path.join(cfg.out, "sft", "samples.json"))
    metrics = {"val_loss": val_loss(), "time_s": time.time() - t0, "train_s": train_s, "real_tokens": real_tokens,
               "pad_fraction": padded / (padded + real_tokens)}
    if world.gold:
        metrics["samples"] = data.error_rates(prompts, samples)
        metrics["corpus"] = data.error_rates([p for p, _ in corpus[:2000]], [r for _, r in corpus[:2000]])
        print("sft: " + " | ".join(f"{k} {v:.3f} (corpus {metrics['corpus'][k]:.3f})" for k, v in metrics["samples"].items()))
    data.write_json(metrics, os.path.join(cfg.out, "sft", "metrics.json"))
    save_atomic({"model": model.state_dict(), "model_args": dataclasses.asdict(model.config),
                 "config": dataclasses.asdict(cfg)}, path)  # last: marks the stage done
