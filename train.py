"""
The whole pipeline of fine-grained RLHF from minimal edits, one straight line:

    1. SFT      train a tokenizer and a GPT on the noisy toy corpus         -> sft/
    2. prefs    two SFT samples per prompt, judge picks, annotator edits    -> prefs.jsonl, prefs/
    3. rm       token-level RM (diff labels) and sequence-level BT RMs      -> rm/
    4. ppo      PPO (sequence reward) and fine-grained PPO (token rewards)  -> ppo/
    5. report   win rate against SFT, error rates, plots                    -> results.json, results.md

Each stage reads the files of the stages before it and writes its own; a stage whose
outputs exist is skipped (`--force` redoes everything). Run:

    python train.py                       # default preset, CPU or GPU autodetected
    python train.py --preset=tiny         # the whole pipeline in about 30 seconds
    python train.py --sft_steps=300 --beta=0.05 --out=runs/x
"""

import dataclasses
import html
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import data
import diff_labels
import ppo
import reward
import tokenizer as tok
from model import GPT, GPTConfig, autocast, pick_device

# -----------------------------------------------------------------------------
# Config: one dataclass for the pipeline; the world, reward models and PPO have their own.


@dataclass
class Config:
    out: str = "out"             # output directory of every stage
    seed: int = 1337
    device: str = "auto"         # auto = cuda -> mps -> cpu
    # corpus and tokenizer
    n_sft: int = 20000           # (prompt, noisy response) examples in the SFT corpus
    tokenizer: str = "bpe"       # bpe (trained here) | gpt2 (needs tiktoken's files)
    vocab_size: int = 512        # of the trained BPE, specials included
    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 160        # prompt + response; the longest toy answers are ~110 tokens
    # SFT
    sft_steps: int = 600
    sft_batch: int = 64
    sft_lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    max_new_tokens: int = 110    # response length limit when sampling
    n_judge: int = 500           # SFT samples judged (sft/metrics.json) and used to fit reward scales
    # preference data: the annotation budget, the same for every method
    n_pairs: int = 1000
    data: str = ""               # your own preference JSONL instead of the toy world (see README)
    # RL and evaluation
    methods: str = "ppo,fg_ppo,ppo_edits"  # comma-separated; also oracle_ppo, oracle_fg
    seeds: int = 1               # reward-model and PPO seeds (SFT and preference data are shared)
    n_eval: int = 500            # evaluation prompts, drawn with their own seed
    k_ref: int = 4               # SFT reference samples per evaluation prompt
    n_curve: int = 100           # prompts for the learning curves during PPO
    eval_every: int = 10         # PPO iterations between learning-curve points
    ckpt_every: int = 5          # PPO iterations between checkpoints
    stop_after: int = 0          # stop each PPO run after this many iterations (0: never); to test resuming
    sweep: str = ""              # key:v1,v2,... runs the pipeline once per value (see sweep())


PRESETS = {
    "default": {},
    "tiny": dict(n_sft=3000, n_layer=2, n_head=2, n_embd=64, sft_steps=400, sft_batch=32,
                 sft_lr=1e-2, warmup=20, n_judge=100, n_pairs=150, rm_steps=40, ppo_iters=6,
                 rollout_batch=32, minibatch=16, n_eval=100, k_ref=2, n_curve=32, eval_every=3),
    "gpu": dict(n_sft=50000, n_layer=6, n_head=6, n_embd=384, sft_steps=3000, sft_batch=128,
                sft_lr=1e-3, warmup=200),
}
SECTIONS = [Config, data.WorldConfig, reward.RMConfig, ppo.PPOConfig]
CHOICES = {"tokenizer": ["bpe", "gpt2"], "rm_scheme": list(reward.SCHEMES)}
POSITIVE = {"seeds", "n_pairs", "n_judge", "n_sft", "sft_steps", "sft_batch", "rm_steps", "rm_batch", "ppo_iters",
            "rollout_batch", "ppo_epochs", "minibatch", "n_eval", "k_ref", "n_curve", "eval_every", "ckpt_every",
            "max_new_tokens", "block_size", "n_layer", "n_head", "n_embd", "vocab_size"}


def parse_args(argv):
    """--key=value flags onto the fields of SECTIONS, on top of --preset (default: default)."""
    fields = {f.name: (cls, f) for cls in SECTIONS for f in dataclasses.fields(cls)}
    flags = {}
    for a in argv:
        if a == "--force":
            flags["force"] = True
            continue
        if not a.startswith("--") or "=" not in a:
            sys.exit(f"error: bad argument {a!r}; use --key=value (or --force)")
        k, v = a[2:].split("=", 1)
        flags[k] = v
    force = flags.pop("force", False)
    preset = flags.pop("preset", "default")
    if preset not in PRESETS:
        sys.exit(f"error: unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
    values = dict(PRESETS[preset])
    for k, v in flags.items():
        if k not in fields:
            sys.exit(f"error: unknown key --{k}; valid keys: --preset, --force, "
                     + ", ".join("--" + n for n in fields))
        typ = type(fields[k][1].default)
        try:
            values[k] = {bool: lambda s: {"true": True, "false": False, "1": True, "0": False}[s.lower()]}.get(typ, typ)(v)
        except (ValueError, KeyError):
            sys.exit(f"error: --{k}={v!r} is not a valid {typ.__name__}")
        if k in CHOICES and values[k] not in CHOICES[k]:
            sys.exit(f"error: --{k}={v!r} is not allowed; allowed values: {', '.join(CHOICES[k])}")
        if typ is int and k in POSITIVE and values[k] < (2 if k == "n_judge" else 1):
            sys.exit(f"error: --{k}={v} must be at least {2 if k == 'n_judge' else 1}")
    cfgs = {cls: cls(**{k: v for k, v in values.items() if fields[k][0] is cls}) for cls in SECTIONS}
    if cfgs[Config].max_new_tokens >= cfgs[Config].block_size:
        sys.exit("error: --max_new_tokens must be smaller than --block_size (the prompt needs room)")
    return cfgs, force, preset


# -----------------------------------------------------------------------------
# Small helpers shared by the stages.

def save_atomic(obj, path):
    """torch.save to a temp file, then rename: a crash never leaves half a checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def write_json(obj, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def get_lr(it, cfg):
    # 1) linear warmup, 2) cosine decay to 10% of the peak
    if it < cfg.warmup:
        return cfg.sft_lr * (it + 1) / cfg.warmup
    ratio = (it - cfg.warmup) / max(1, cfg.sft_steps - cfg.warmup)
    return cfg.sft_lr * (0.1 + 0.45 * (1 + math.cos(math.pi * ratio)))


def pad_left(seqs, pad):
    """List of token lists -> (idx, mask), both (B, T): left-padded so all rows end together."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
    mask = torch.zeros_like(idx, dtype=torch.bool)
    for i, s in enumerate(seqs):
        mask[i, T - len(s):] = True
    return idx, mask


def load_gpt(path, device):
    ck = torch.load(path, map_location=device, weights_only=True)
    model = GPT(GPTConfig(**ck["model_args"])).to(device)
    model.load_state_dict(ck["model"])
    return model


def sample_responses(ctx, model, prompts, gen, temperature=1.0, batch=64):
    """Decoded responses for prompts (eot stripped), sampled in batches with the KV cache."""
    out = []
    model.eval()
    for i in range(0, len(prompts), batch):
        ids = [ctx.prompt_ids(p) for p in prompts[i:i + batch]]
        idx, resp_mask, _ = model.generate(ids, ctx.cfg.max_new_tokens, ctx.sp["<|endoftext|>"],
                                           ctx.sp["<|pad|>"], temperature=temperature, generator=gen)
        for row, m in zip(idx.tolist(), resp_mask.tolist()):
            out.append(tok.decode_response(ctx.enc, [t for t, k in zip(row, m) if k]))
    return out


# -----------------------------------------------------------------------------
# Stage 1: SFT

def stage_sft(ctx):
    cfg, world, device = ctx.cfg, ctx.world, ctx.device
    path = os.path.join(cfg.out, "sft", "model.pt")
    if ctx.skip(path):
        return
    t0 = time.time()
    rng = random.Random(cfg.seed)
    if ctx.records is None:  # the toy world's noisy corpus
        prompts = [data.sample_prompt(rng, world) for _ in range(cfg.n_sft)]
        corpus = [(p, data.noisy_response(p, rng, world)) for p in prompts]
        texts = [p + " " + r for p, r in corpus]
    else:  # your own data: SFT on the chosen (and edited) responses
        corpus = [(r["prompt"], r[k]) for r in ctx.train_records for k in ("chosen", "edited") if k in r]
        texts = [r[k] for r in ctx.records for k in data.FIELDS if k in r]
    try:
        enc = tok.get_tokenizer(cfg.tokenizer, texts=texts, path=os.path.join(cfg.out, "tokenizer.tiktoken"),
                                vocab_size=cfg.vocab_size)
    except RuntimeError as e:  # tokenizer=gpt2 without its files
        sys.exit(f"error: {e}")
    sp = tok.special_ids(enc)
    ctx.enc, ctx.sp = enc, sp
    # One example = prompt + response; the loss is on response tokens only (targets -1 elsewhere).
    examples = []
    for p, r in corpus:
        pi, ri = ctx.prompt_ids(p), tok.response_ids(enc, r)
        examples.append(((pi + ri)[:cfg.block_size], ([-1] * (len(pi) - 1) + ri + [-1])[:cfg.block_size]))
    n_val = max(len(examples) // 20, 1)
    val, train = examples[:n_val], examples[n_val:]

    torch.manual_seed(cfg.seed)
    margs = dict(vocab_size=enc.n_vocab, block_size=cfg.block_size, n_layer=cfg.n_layer,
                 n_head=cfg.n_head, n_embd=cfg.n_embd)
    model = GPT(GPTConfig(**margs)).to(device)
    opt = model.configure_optimizers(cfg.weight_decay, cfg.sft_lr)
    print(f"sft: {len(train)} examples, {model.num_params() / 1e6:.2f}M parameters, vocab {enc.n_vocab}")

    def batch_of(exs):
        idx, mask = pad_left([x for x, _ in exs], sp["<|pad|>"])
        tgt, _ = pad_left([y for _, y in exs], -1)  # tgt[:, t] = idx[:, t+1] on response tokens
        return idx.to(device), mask.to(device), tgt.to(device)

    @torch.no_grad()
    def val_loss():
        model.eval()
        losses = []
        for i in range(0, len(val), 256):
            idx, mask, tgt = batch_of(val[i:i + 256])
            losses.append(model(idx, tgt, mask=mask)[1].item())
        model.train()
        return sum(losses) / len(losses)

    g = random.Random(cfg.seed)
    model.train()
    pbar = tqdm(range(cfg.sft_steps), desc="sft", dynamic_ncols=True)
    for it in pbar:
        for group in opt.param_groups:
            group["lr"] = get_lr(it, cfg)
        idx, mask, tgt = batch_of(g.sample(train, min(cfg.sft_batch, len(train))))
        with autocast(device):
            _, loss = model(idx, tgt, mask=mask)
        if not torch.isfinite(loss):
            sys.exit(f"error: sft stopped at step {it}: loss is {loss.item()}; no checkpoint written")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        pbar.set_postfix(loss=f"{loss.item():.3f}")
        if (it + 1) % max(cfg.sft_steps // 4, 1) == 0 or it + 1 == cfg.sft_steps:
            tqdm.write(f"sft step {it + 1} | train loss {loss.item():.4f} | val loss {val_loss():.4f}")

    # Fresh samples at temperature 1 (they also fit the reward scales later), and in the toy
    # world the judge's view of them against the corpus the model learned from.
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    jp = [ctx.sample_prompt(rng) for _ in range(cfg.n_judge)]
    samples = sample_responses(ctx, model, jp, gen)
    write_json({"prompts": jp, "responses": samples}, os.path.join(cfg.out, "sft", "samples.json"))
    metrics = {"val_loss": val_loss(), "time_s": time.time() - t0}
    if ctx.records is None:
        metrics["samples"] = data.error_rates(jp, samples)
        metrics["corpus"] = data.error_rates([p for p, _ in corpus[:2000]], [r for _, r in corpus[:2000]])
        print("sft: " + " | ".join(f"{k} {v:.3f} (corpus {metrics['corpus'][k]:.3f})" for k, v in metrics["samples"].items()))
    write_json(metrics, os.path.join(cfg.out, "sft", "metrics.json"))
    save_atomic({"model": model.state_dict(), "model_args": margs, "config": dataclasses.asdict(cfg)}, path)  # last: marks the stage done


# -----------------------------------------------------------------------------
# Stage 2: preference pairs and minimal edits

def label_pair(enc, original, edited, scheme):
    """Token labels (-1/0/+1) of an original response and its edit, from the Myers diff of
    their token ids (eot included, so an insertion at the end has a token to mark). Either
    may be given as text or, for sampled responses, as the token ids actually generated."""
    ids = [x if isinstance(x, list) else tok.response_ids(enc, x) for x in (original, edited)]
    breaks = {enc.encode_ordinary(c)[0] for c in ".?!"}  # sentence ends: deletions snap to sentences
    return diff_labels.token_labels(*ids, mark_insertions=(scheme == "bad_vs_rest"), breaks=breaks)


def stage_prefs(ctx):
    cfg, path = ctx.cfg, os.path.join(ctx.cfg.out, "prefs.jsonl")
    if ctx.skip(path):
        return
    if ctx.records is not None:  # your own data: the pairs (less the judge's split) are the prefs
        data.write_jsonl(path, ctx.train_records)
        print(f"prefs: {len(ctx.train_records)} pairs from {cfg.data} ({len(ctx.judge_records)} more kept for the judge RM)")
        return
    sft = load_gpt(os.path.join(cfg.out, "sft", "model.pt"), ctx.device)
    rng = random.Random(cfg.seed + 1)
    gen = torch.Generator(device=ctx.device).manual_seed(cfg.seed + 1)
    records, ties = [], 0
    pbar = tqdm(total=cfg.n_pairs, desc="prefs", dynamic_ncols=True)
    while len(records) < cfg.n_pairs:
        prompts = [data.sample_prompt(rng, ctx.world) for _ in range(32)]
        samples = sample_responses(ctx, sft, prompts + prompts, gen)
        for p, a, b in zip(prompts, samples[:32], samples[32:]):
            sa, sb = data.score(p, a), data.score(p, b)
            if sa == sb or not a.strip() or not b.strip():  # ties (and rare empty samples) are dropped
                ties += 1
                continue
            chosen, rejected = (a, b) if sa > sb else (b, a)
            edited = data.annotate(p, rejected, ctx.world.p_annotator_miss, rng)
            records.append({"prompt": p, "chosen": chosen, "rejected": rejected, "edited": edited})
        pbar.update(min(len(records), cfg.n_pairs) - pbar.n)
    pbar.close()
    records = records[:cfg.n_pairs]
    # What the labels look like, on the tokens the reward model will read.
    counts, dist, length = {-1: 0, 0: 0, 1: 0}, 0, 0
    for r in records:
        lo, le = label_pair(ctx.enc, r["rejected"], r["edited"], "paper")
        for v in lo + le:
            counts[v] += 1
        dist += sum(v != 0 for v in lo + le)  # token edit distance = deleted + inserted tokens
        length += len(lo)
    n_tok = sum(counts.values())
    stats = {"pairs": len(records), "ties_dropped": ties,
             "label_fraction": {"-1": counts[-1] / n_tok, "0": counts[0] / n_tok, "+1": counts[1] / n_tok},
             "mean_edit_distance_tokens": dist / len(records), "mean_response_tokens": length / len(records)}
    write_json(stats, os.path.join(cfg.out, "prefs", "stats.json"))
    data.write_jsonl(path, records)
    print(f"prefs: {stats['pairs']} pairs | {ties} ties dropped | labels -1 {counts[-1] / n_tok:.3f} "
          f"0 {counts[0] / n_tok:.3f} +1 {counts[1] / n_tok:.3f} | edit distance "
          f"{stats['mean_edit_distance_tokens']:.1f} of {stats['mean_response_tokens']:.1f} tokens")

# -----------------------------------------------------------------------------
# Stage 3: reward models


def rm_examples(ctx, records, scheme):
    """Token-level examples (prompt+response ids, class per token or -1) for both sequences
    of each pair: the rejected original and its edit. Pairs whose text runs past the
    context are cut to fit."""
    out, m = [], reward.SCHEMES[scheme]
    for r in records:
        p = ctx.prompt_ids(r["prompt"])
        lo, le = label_pair(ctx.enc, r["rejected"], r["edited"], scheme)
        for text, labels in ((r["rejected"], lo), (r["edited"], le)):
            ids = p + tok.response_ids(ctx.enc, text)
            out.append((ids[:ctx.cfg.block_size], ([-1] * len(p) + [m[v] for v in labels])[:ctx.cfg.block_size]))
    return out


def seq_batch(ctx, prompts, responses):
    ids = [(ctx.prompt_ids(p) + tok.response_ids(ctx.enc, r))[:ctx.cfg.block_size]  # the prompt is cut first
           for p, r in zip(prompts, responses)]
    idx, mask = pad_left(ids, ctx.sp["<|pad|>"])
    return idx.to(ctx.device), mask.to(ctx.device)


def train_rm(ctx, model, loss_of, n, desc, seed):
    """rm_steps AdamW steps of loss_of(list of example indices) on random batches of n examples."""
    rmc, g = ctx.rmc, random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=rmc.rm_lr, weight_decay=0.0)
    model.train()
    pbar = tqdm(range(rmc.rm_steps), desc=desc, dynamic_ncols=True)
    for it in pbar:
        for group in opt.param_groups:  # short warmup, then constant
            group["lr"] = rmc.rm_lr * min(1.0, (it + 1) / 20)
        with autocast(ctx.device):
            loss = loss_of(g.sample(range(n), min(rmc.rm_batch, n)))
        if not torch.isfinite(loss):
            sys.exit(f"error: {desc} stopped at step {it}: loss is {loss.item()}; no checkpoint written")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        pbar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    return model


@torch.no_grad()
def seq_scores(ctx, rm, prompts, responses):
    """One number per response: the sequence RM's score, or the token RM's summed reward."""
    out = []
    for i in range(0, len(prompts), 128):
        idx, mask = seq_batch(ctx, prompts[i:i + 128], responses[i:i + 128])
        if isinstance(rm, reward.TokenRM):
            resp = response_mask(ctx, idx, mask)
            out += rm.token_rewards(idx, mask, resp).sum(1).tolist()
        else:
            out += rm(idx, mask).tolist()
    return out


def response_mask(ctx, idx, real):
    """(B, T) True at response tokens (the eot included): real tokens after <|assistant|>."""
    start = (idx == ctx.sp["<|assistant|>"]).int().argmax(1, keepdim=True) + 1  # (B, 1)
    return real & (torch.arange(idx.size(1), device=idx.device)[None] >= start)


def fact_flips(n, seed):
    """(prompt, correct answer, the same answer with one fact's value changed) triples."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        p = data.sample_prompt(rng)
        e, attrs = data.parse_prompt(p)
        a = rng.choice(attrs)
        wrong = rng.choice([v for v in data.VALUES[a] if v != data.KB[e][a]])
        good = data.ideal_response(p)
        out.append((p, good, good.replace(data.FACT[a].format(e=e, v=data.KB[e][a]),
                                          data.FACT[a].format(e=e, v=wrong))))
    return out


def error_types(ctx, record, labels):
    """For each bad-labelled token of a rejected response: the judge's category of the
    sentence it sits in, or "missing" for an insertion point (a bad label on a kept token)."""
    deleted, _ = label_pair(ctx.enc, record["rejected"], record["edited"], "paper")
    text, offsets = ctx.enc.decode_with_offsets(tok.response_ids(ctx.enc, record["rejected"])[:-1])
    ends = offsets[1:] + [len(text)]  # a token's last character is at ends[i] - 1
    verdicts, _ = data.classify(record["prompt"], record["rejected"])
    types = []
    for i, v in enumerate(labels):
        if v != -1:
            types.append(None)
        elif deleted[i] != -1:
            types.append("missing")
        else:
            c = ends[i] - 1
            types.append(next((k for (s, t), k, _, _ in verdicts if s <= c < t), "unparseable"))
    return types


def stage_rm(ctx, seed):
    cfg, rmc = ctx.cfg, ctx.rmc
    d = os.path.join(cfg.out, "rm", f"seed{seed}")
    if ctx.skip(os.path.join(d, "metrics.json")):
        return
    records = data.read_jsonl(os.path.join(cfg.out, "prefs.jsonl"))
    random.Random(seed).shuffle(records)
    n_val = max(len(records) // 10, 1)  # held-out pairs
    val, train = records[:n_val], records[n_val:]
    toy, edits = ctx.records is None, all("edited" in r for r in records)
    sft_path, pad = os.path.join(cfg.out, "sft", "model.pt"), ctx.sp["<|pad|>"]
    torch.manual_seed(seed)
    rms = {}

    # Token-level RM: per-token cross-entropy on the diff labels of (rejected, edited).
    ex = rm_examples(ctx, train, rmc.rm_scheme) if edits else []  # pair i -> examples 2i, 2i+1

    def token_batch(exs):
        idx, mask = pad_left([x for x, _ in exs], pad)
        cls, _ = pad_left([y for _, y in exs], -1)
        return idx.to(ctx.device), mask.to(ctx.device), cls.to(ctx.device)

    def token_loss(pairs):
        idx, mask, cls = token_batch([ex[2 * i + j] for i in pairs for j in (0, 1)])
        return reward.token_loss(rms["token"](idx, mask), cls, rmc.rm_bad_weight)

    # Sequence-level RMs: Bradley-Terry on (chosen, rejected), and on (edited, rejected).
    def bt(name, better):
        def loss(pairs):
            ps = [train[i]["prompt"] for i in pairs]
            hi = rms[name](*seq_batch(ctx, ps, [train[i][better] for i in pairs]))
            lo = rms[name](*seq_batch(ctx, ps, [train[i]["rejected"] for i in pairs]))
            return reward.bt_loss(hi, lo)
        return loss

    plan = [("token", token_loss), ("seq", bt("seq", "chosen")), ("seq_edits", bt("seq_edits", "edited"))]
    for name, loss in plan if edits else plan[1:2]:
        gpt = load_gpt(sft_path, ctx.device)
        rms[name] = (reward.TokenRM(gpt, rmc.rm_scheme) if name == "token" else reward.SeqRM(gpt)).to(ctx.device)
        train_rm(ctx, rms[name], loss, len(train), f"rm {name}", seed)

    # Metrics every RM gets: held-out pairwise accuracy; in the toy world also fact-flip
    # accuracy and Spearman against the gold judge on SFT samples.
    samples = json.load(open(os.path.join(cfg.out, "sft", "samples.json")))
    lens = [len(tok.response_ids(ctx.enc, r)) for r in samples["responses"]]
    vp = [r["prompt"] for r in val]
    flips = fact_flips(300, seed + 7) if toy else []
    gold_sft = ctx.scores(samples["prompts"], samples["responses"]) if toy else None
    metrics, norms = {}, {}
    for name, rm in rms.items():
        s_sft = seq_scores(ctx, rm, samples["prompts"], samples["responses"])
        norms[name] = fit_norm(s_sft, lens, dense=(name == "token"), center=rmc.rm_center)
        c = norms[name]["center"] if name == "token" else 0.0  # token sums are centred per token

        def score(prompts, texts):  # what PPO sees, one number per response
            return [x - c * len(tok.response_ids(ctx.enc, y)) for x, y in zip(seq_scores(ctx, rm, prompts, texts), texts)]
        hi = score(vp, [r["chosen"] for r in val])
        lo = score(vp, [r["rejected"] for r in val])
        m = metrics[name] = {"pairwise_acc": sum(h > l for h, l in zip(hi, lo)) / len(val)}
        if toy:
            good = score([p for p, _, _ in flips], [g for _, g, _ in flips])
            bad = score([p for p, _, _ in flips], [b for _, _, b in flips])
            m["fact_flip_acc"] = sum(g > b for g, b in zip(good, bad)) / len(flips)
            m["spearman_vs_judge"] = reward.spearman([x - c * n for x, n in zip(s_sft, lens)], gold_sft)
    if "seq_edits" in rms:
        e = seq_scores(ctx, rms["seq_edits"], vp, [r["edited"] for r in val])
        r = seq_scores(ctx, rms["seq_edits"], vp, [r["rejected"] for r in val])
        metrics["seq_edits"]["pairwise_acc_edited_vs_rejected"] = sum(a > b for a, b in zip(e, r)) / len(val)
    if "token" in rms:
        metrics["token"].update(token_metrics(ctx, rms["token"], val, token_batch, toy))
    for name, rm in rms.items():
        save_atomic({"model": rm.state_dict(), "model_args": dataclasses.asdict(rm.gpt.config),
                     "norm": norms[name], "scheme": rmc.rm_scheme}, os.path.join(d, f"{name}.pt"))
    metrics["norm"] = norms
    write_json(metrics, os.path.join(d, "metrics.json"))
    for name in rms:
        print(f"rm {name}: " + " | ".join(f"{k} {v:.3f}" for k, v in metrics[name].items() if isinstance(v, float)))
    if toy and "token" in rms:
        print("rm token bad recall by error type: " + " | ".join(
            f"{k} {v:.2f}" for k, v in metrics["token"]["bad_recall_by_type"].items()))


@torch.no_grad()
def token_metrics(ctx, trm, val, token_batch, toy):
    """Held-out per-class precision/recall/F1 of the token RM; in the toy world also the
    bad-class recall by error type (which errors the RM catches)."""
    scheme = ctx.rmc.rm_scheme
    vex = rm_examples(ctx, val, scheme)
    pred, gold, by_type = [], [], {}
    for i in range(0, len(vex), 64):
        idx, mask, cls = token_batch(vex[i:i + 64])
        p = trm(idx, mask).argmax(-1)
        pred.append(p[cls != -1])
        gold.append(cls[cls != -1])
        for j in range(0, idx.size(0), 2) if toy else []:  # the rejected responses
            r = val[(i + j) // 2]
            labels, _ = label_pair(ctx.enc, r["rejected"], r["edited"], scheme)
            for t, h in zip(error_types(ctx, r, labels), p[j][cls[j] != -1].tolist()):
                if t is not None:
                    by_type.setdefault(t, []).append(h == 0)
    pred, gold = torch.cat(pred), torch.cat(gold)
    names = ["bad", "neutral", "good"] if scheme == "paper" else ["bad", "rest"]
    out = {"scheme": scheme, **{f"{n}_{k}": v for c, n in enumerate(names) for k, v in reward.prf(pred, gold, c).items()}}
    if toy:
        out["bad_recall_by_type"] = {t: sum(h) / len(h) for t, h in sorted(by_type.items())}
    return out


def stage_judge(ctx):
    """Your own data has no gold judge: a sequence RM trained on a split of the pairs that
    no other model sees stands in for it. It is biased (it shares the SFT trunk and the
    annotators' taste), and the report says so."""
    path = os.path.join(ctx.cfg.out, "rm", "judge.pt")
    if ctx.records is None or ctx.skip(path):
        return
    recs = ctx.judge_records
    torch.manual_seed(ctx.cfg.seed)  # the same judge whether or not SFT ran in this process
    rm = reward.SeqRM(load_gpt(os.path.join(ctx.cfg.out, "sft", "model.pt"), ctx.device)).to(ctx.device)

    def loss(pairs):
        ps = [recs[i]["prompt"] for i in pairs]
        return reward.bt_loss(rm(*seq_batch(ctx, ps, [recs[i]["chosen"] for i in pairs])),
                              rm(*seq_batch(ctx, ps, [recs[i]["rejected"] for i in pairs])))
    train_rm(ctx, rm, loss, len(recs), "judge rm", ctx.cfg.seed)
    save_atomic({"model": rm.state_dict(), "model_args": dataclasses.asdict(rm.gpt.config),
                 "norm": {"center": 0.0, "scale": 1.0}, "scheme": ""}, path)


def fit_norm(sums, lens, dense, center=True):
    """Reward scale fitted on SFT samples, so that every method starts on equal footing: a
    dense (per-token) reward is centred per token (if center) and scaled so that a
    response's summed reward has std 1; a final (sequence) score is standardised."""
    sums, lens = torch.as_tensor(sums, dtype=torch.float), torch.as_tensor(lens, dtype=torch.float)
    if not dense:
        return {"center": sums.mean().item(), "scale": sums.std().item()}
    c = (sums.sum() / lens.sum()).item() if center else 0.0
    return {"center": c, "scale": (sums - c * lens).std().item()}


def load_rm(path, device):
    ck = torch.load(path, map_location=device, weights_only=True)
    gpt = GPT(GPTConfig(**ck["model_args"]))
    rm = reward.TokenRM(gpt, ck["scheme"]) if path.endswith("token.pt") else reward.SeqRM(gpt)
    rm.load_state_dict(ck["model"])
    return rm.to(device).eval(), ck["norm"]

# -----------------------------------------------------------------------------
# Stage 4: PPO and fine-grained PPO

METHODS = {  # method: (reward source, dense per-token or final)
    "ppo": ("seq", False),
    "fg_ppo": ("token", True),
    "ppo_edits": ("seq_edits", False),
    "oracle_ppo": ("judge", False),      # gold judge score at the end (control, beyond the paper)
    "oracle_fg": ("annotator", True),    # gold per-token labels: annotator + diff on each sample
}


def split_rollout(ctx, idx, resp):
    """Prompt texts and response token ids (eot included) of a rollout batch."""
    prompts, responses = [], []
    for row, m in zip(idx.tolist(), resp.tolist()):
        a = row.index(ctx.sp["<|assistant|>"])
        prompts.append(ctx.enc.decode([t for t in row[:a] if t not in ctx.sp.values()]))
        responses.append([t for t, k in zip(row, m) if k])
    return prompts, responses


def gold_rewards(ctx, idx, real, resp, dense):
    """Oracle rewards: -1 on each token the annotator's edit labels bad (dense), or the
    judge's score (final), unnormalised."""
    prompts, responses = split_rollout(ctx, idx, resp)
    if not dense:
        scores = [data.score(p, tok.decode_response(ctx.enc, r)) for p, r in zip(prompts, responses)]
        return ppo.final_token_rewards(torch.tensor(scores, dtype=torch.float, device=idx.device), resp.float())
    out = torch.zeros(idx.shape, device=idx.device)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        edited = data.annotate(p, tok.decode_response(ctx.enc, r))
        labels, _ = label_pair(ctx.enc, r, edited, "bad_vs_rest")
        cols = resp[i].nonzero().squeeze(1)
        out[i, cols] = torch.tensor(labels, dtype=torch.float, device=idx.device)
    return out


def reward_fn(ctx, method, seed):
    """(idx, real, resp) -> (B, T) rewards of a method, normalised on SFT samples."""
    source, dense = METHODS[method]
    if source in ("seq", "token", "seq_edits"):
        rm, norm = load_rm(os.path.join(ctx.cfg.out, "rm", f"seed{seed}", f"{source}.pt"), ctx.device)
        if dense:
            raw = lambda idx, real, resp: rm.token_rewards(idx, real, resp)  # noqa: E731
        else:
            raw = lambda idx, real, resp: ppo.final_token_rewards(rm(idx, real), resp.float())  # noqa: E731
    else:
        raw = lambda idx, real, resp: gold_rewards(ctx, idx, real, resp, dense)  # noqa: E731
        norm = gold_norm(ctx, raw, dense)

    def fn(idx, real, resp):
        with autocast(ctx.device):
            r = raw(idx, real, resp).float()
        if dense:  # centre per token, then scale so a response's summed reward has std ~1
            return (r - norm["center"] * resp) / norm["scale"]
        return (r - norm["center"] * ppo.final_token_rewards(torch.ones(len(r), device=r.device), resp.float())) / norm["scale"]
    return fn


def gold_norm(ctx, raw, dense):
    """The same normalisation as for the learned RMs, fitted on the same SFT samples."""
    s = json.load(open(os.path.join(ctx.cfg.out, "sft", "samples.json")))
    idx, real = seq_batch(ctx, s["prompts"], s["responses"])
    resp = response_mask(ctx, idx, real)
    return fit_norm(raw(idx, real, resp).sum(1), resp.sum(1), dense, ctx.rmc.rm_center)


def eval_set(ctx):
    """Evaluation prompts (their own seed) with K judged SFT reference samples each; cached."""
    path = os.path.join(ctx.cfg.out, "eval", "refs.json")
    if os.path.exists(path):
        return json.load(open(path))
    cfg = ctx.cfg
    rng = random.Random(cfg.seed + 1000)
    pool = [r["prompt"] for r in ctx.judge_records] if ctx.records else None  # prompts no RM trained on
    prompts = [rng.choice(pool) if pool else data.sample_prompt(rng, ctx.world) for _ in range(cfg.n_eval)]
    sft = load_gpt(os.path.join(cfg.out, "sft", "model.pt"), ctx.device)
    gen = torch.Generator(device=ctx.device).manual_seed(cfg.seed + 1000)
    refs = [sample_responses(ctx, sft, prompts, gen) for _ in range(cfg.k_ref)]
    out = {"prompts": prompts, "refs": refs, "ref_scores": [ctx.scores(prompts, rs) for rs in refs]}
    write_json(out, path)
    return out


def evaluate(ctx, model, ev, n=None, seed=0):
    """Per-prompt win values against the K reference samples (win 1, tie 0.5, loss 0), and the
    judge's error rates of the policy's samples (one per prompt, temperature 1)."""
    prompts = ev["prompts"][:n]
    gen = torch.Generator(device=ctx.device).manual_seed(ctx.cfg.seed + 2000 + seed)
    responses = sample_responses(ctx, model, prompts, gen)
    wins = []
    for i, s in enumerate(ctx.scores(prompts, responses)):
        refs = [rs[i] for rs in ev["ref_scores"]]
        wins.append(sum(1.0 if s > q else 0.5 if s == q else 0.0 for q in refs) / len(refs))
    return wins, ctx.rates(prompts, responses), responses


def stage_ppo(ctx, method, seed):
    cfg, pc = ctx.cfg, ctx.pc
    path = os.path.join(cfg.out, "ppo", f"{method}_seed{seed}.pt")
    ck = torch.load(path, weights_only=True) if os.path.exists(path) else None
    if ck is not None and ck["iter"] == pc.ppo_iters:
        print(f"ppo {method} seed {seed}: {path} complete, skipping (--force to redo)")
        return
    ev = eval_set(ctx)
    sft_path = os.path.join(cfg.out, "sft", "model.pt")
    ref = load_gpt(sft_path, ctx.device).eval()  # the frozen SFT reference
    ref.requires_grad_(False)
    policy = ppo.ActorCritic(load_gpt(sft_path, ctx.device)).to(ctx.device)
    opt = torch.optim.AdamW(policy.parameters(), lr=pc.ppo_lr, eps=1e-5, weight_decay=0.0)  # eps as CleanRL
    fn = reward_fn(ctx, method, seed)
    # Everything random in a run is drawn from these three, saved in each checkpoint.
    torch.manual_seed(seed)
    gen = torch.Generator(device=ctx.device).manual_seed(seed)  # sampling
    cpu_gen = torch.Generator().manual_seed(seed)               # minibatch order
    rng = random.Random(seed)                                   # prompts
    start, log, curve = 0, [], []

    def curve_point(it):  # win rate and judge score on the first n_curve evaluation prompts
        wins, rates, _ = evaluate(ctx, policy.gpt, ev, cfg.n_curve)
        curve.append({"iter": it, "win_rate": sum(wins) / len(wins), "judge_score": rates["judge_score"]})

    if ck is not None:
        policy.load_state_dict(ck["policy"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["gen"].to("cpu") if ctx.device == "cpu" else ck["gen"])
        cpu_gen.set_state(ck["cpu_gen"])
        rng.setstate(ck["rng"])
        start, log, curve = ck["iter"], ck["log"], ck["curve"]
        print(f"ppo {method} seed {seed}: resuming at iteration {start}")
    else:
        curve_point(0)
    sp = ctx.sp
    pbar = tqdm(range(start, pc.ppo_iters), desc=f"{method} s{seed}", dynamic_ncols=True)
    for it in pbar:
        prompts = [ctx.prompt_ids(ctx.sample_prompt(rng)) for _ in range(pc.rollout_batch)]
        batch = ppo.rollout(policy, ref, prompts, fn, pc, sp["<|endoftext|>"], sp["<|pad|>"],
                            cfg.max_new_tokens, gen)
        try:
            stats = ppo.update(policy, opt, batch, pc, cpu_gen)
        except FloatingPointError as e:
            sys.exit(f"error: ppo {method} seed {seed} stopped at iteration {it}: {e}; "
                     f"the last good checkpoint {path} is intact")
        row = {"iter": it + 1, **batch["stats"], **stats}
        log.append(row)
        tqdm.write(f"{method} s{seed} iter {it + 1} | reward {row['reward']:.3f} | kl {row['kl']:.3f} | "
                   f"clipfrac {row['clipfrac']:.3f} | entropy {row['entropy']:.3f} | len {row['length']:.1f}")
        last = it + 1 == pc.ppo_iters
        if (it + 1) % cfg.eval_every == 0 or last:
            curve_point(it + 1)
        if (it + 1) % cfg.ckpt_every == 0 or last:
            save_atomic({"policy": policy.state_dict(), "optimizer": opt.state_dict(), "iter": it + 1,
                         "gen": gen.get_state(), "cpu_gen": cpu_gen.get_state(), "rng": rng.getstate(),
                         "log": log, "curve": curve}, path)
        if ctx.stop_after and it + 1 == start + ctx.stop_after:
            sys.exit(f"stopped after {ctx.stop_after} iterations (--stop_after); rerun to resume")

# -----------------------------------------------------------------------------
# Stage 5: evaluation and report


def bootstrap_ci(x, n_boot=2000, seed=0):
    """95% CI of the mean of x (S seeds, P prompts), resampling seeds and then prompts, so
    that both sources of variance are in the interval (with one seed: prompts only)."""
    x = torch.as_tensor(x, dtype=torch.float64)  # (S, P)
    g = torch.Generator().manual_seed(seed)
    S, P = x.shape
    si = torch.randint(S, (n_boot, S, 1), generator=g)
    pi = torch.randint(P, (n_boot, 1, P), generator=g)
    means = x[si, pi].mean((1, 2))  # (n_boot,)
    return [means.quantile(0.025).item(), means.quantile(0.975).item()]


def final_eval(ctx, method, seed, ev):
    """Win values and error rates of a finished policy on the full evaluation set; cached."""
    path = os.path.join(ctx.cfg.out, "ppo", f"{method}_seed{seed}.eval.json")
    if os.path.exists(path):
        return json.load(open(path))
    ck = torch.load(os.path.join(ctx.cfg.out, "ppo", f"{method}_seed{seed}.pt"), map_location=ctx.device, weights_only=True)
    policy = ppo.ActorCritic(load_gpt(os.path.join(ctx.cfg.out, "sft", "model.pt"), ctx.device)).to(ctx.device)
    policy.load_state_dict(ck["policy"])
    wins, rates, responses = evaluate(ctx, policy.gpt, ev)
    out = {"wins": wins, "rates": rates, "log": ck["log"], "curve": ck["curve"], "examples": responses[:8]}
    write_json(out, path)
    return out


def stage_report(ctx, seeds, methods, timing):
    cfg = ctx.cfg
    ev = eval_set(ctx)
    sft_rates = ctx.rates(ev["prompts"], ev["refs"][0])
    res = {m: [final_eval(ctx, m, s, ev) for s in seeds] for m in methods}
    out = {"config": ctx.config_dict, "seeds": seeds, "methods": {"sft": sft_rates}}
    for m in methods:
        wins = [r["wins"] for r in res[m]]
        rates = {k: sum(r["rates"][k] for r in res[m]) / len(seeds) for k in sft_rates}
        out["methods"][m] = {"win_rate": sum(map(sum, wins)) / sum(map(len, wins)),
                             "win_rate_ci95": bootstrap_ci(wins), **rates,
                             # KL to the reference at the end of training (mean of the last 5 iterations)
                             "kl": sum(sum(x["kl"] for x in r["log"][-5:]) / len(r["log"][-5:]) for r in res[m]) / len(seeds),
                             "per_seed": [{"seed": s, "win_rate": sum(w) / len(w), **r["rates"]}
                                          for s, w, r in zip(seeds, wins, res[m])]}
    if "ppo" in methods and "fg_ppo" in methods:  # paired: same seeds, same prompts
        diff = [[a - b for a, b in zip(f["wins"], p["wins"])] for f, p in zip(res["fg_ppo"], res["ppo"])]
        out["fg_ppo_minus_ppo"] = {"win_rate": sum(map(sum, diff)) / sum(map(len, diff)), "ci95": bootstrap_ci(diff)}
    out["reward_models"] = {f"seed{s}": json.load(open(os.path.join(cfg.out, "rm", f"seed{s}", "metrics.json")))
                            for s in seeds}
    out["timing_s"] = timing
    write_json(out, os.path.join(cfg.out, "results.json"))
    write_results_md(ctx, out, methods)
    plot_curves(ctx, res, methods)
    token_rewards_html(ctx, seeds[0])
    print(open(os.path.join(cfg.out, "results.md")).read())


def write_results_md(ctx, out, methods):
    cols = [c for c in ("wrong", "missing", "rude", "off_topic", "unparseable", "repeated", "unrequested")
            if c in out["methods"]["sft"]]  # error rates exist only in the toy world
    row = lambda cells: "| " + " | ".join(cells) + " |"  # noqa: E731
    lines = [f"# Results ({len(out['seeds'])} seed(s), {ctx.cfg.n_eval} evaluation prompts, "
             f"K={ctx.cfg.k_ref} SFT reference samples each)", "",
             row(["method", "win rate vs SFT [95% CI]", "judge score", "KL"] + cols), row(["---"] * (4 + len(cols)))]
    sft = out["methods"]["sft"]
    lines.append(row(["sft", "0.5 (by definition)", f"{sft['judge_score']:.2f}", "0"] + [f"{sft[c]:.3f}" for c in cols]))
    for m in methods:
        r = out["methods"][m]
        lo, hi = r["win_rate_ci95"]
        lines.append(row([m, f"{r['win_rate']:.3f} [{lo:.3f}, {hi:.3f}]", f"{r['judge_score']:.2f}", f"{r['kl']:.2f}"]
                         + [f"{r[c]:.3f}" for c in cols]))
    if "fg_ppo_minus_ppo" in out:
        d = out["fg_ppo_minus_ppo"]
        lines += ["", f"fg_ppo - ppo win rate: {d['win_rate']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] (paired)"]
    lines += ["", "KL = summed per-token KL to the SFT reference per response, last 5 PPO iterations."]
    if ctx.records is None:
        lines += ["wrong = wrong facts per stated fact; missing = per requested fact; unparseable = per sentence;",
                  "the others per response. Evaluation prompts come from the same small prompt space as training",
                  "prompts (24 animals x 18 templates), so prompts recur across stages by design."]
    else:
        lines += ["", f"Judge: a sequence RM trained on {len(ctx.judge_records)} held-out pairs of {ctx.cfg.data}, not a "
                  "gold judge. It is biased (same SFT trunk, same annotators) and can be exploited by the policies it "
                  "judges; treat these win rates as a sanity check, not a result."]
    with open(os.path.join(ctx.cfg.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def plot_curves(ctx, res, methods):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = ["reward", "kl", "clipfrac", "entropy", "explained_var", "length"]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, k in zip(axes.flat, keys):
        for m in methods:
            log = res[m][0]["log"]  # the first seed
            ax.plot([r["iter"] for r in log], [r[k] for r in log], label=m)
        ax.set_title(k)
        ax.set_xlabel("iteration")
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(ctx.cfg.out, "ppo_diagnostics.png"), dpi=80)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, k in zip(axes, ["win_rate", "judge_score"]):
        for m in methods:
            curves = [r["curve"] for r in res[m]]
            ys = [sum(c[i][k] for c in curves) / len(curves) for i in range(len(curves[0]))]
            ax.plot([p["iter"] for p in curves[0]], ys, marker="o", label=m)
        ax.set_title(f"{k} ({ctx.cfg.n_curve} prompts, mean over seeds)")
        ax.set_xlabel("PPO iteration")
    axes[0].axhline(0.5, color="grey", lw=0.5)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(ctx.cfg.out, "learning_curves.png"), dpi=80)
    plt.close("all")


@torch.no_grad()
def token_rewards_html(ctx, seed, n=8):
    """SFT samples with each token coloured by the token RM's reward, beside the gold labels."""
    if not os.path.exists(os.path.join(ctx.cfg.out, "rm", f"seed{seed}", "token.pt")):
        return
    rm, _ = load_rm(os.path.join(ctx.cfg.out, "rm", f"seed{seed}", "token.pt"), ctx.device)
    s = json.load(open(os.path.join(ctx.cfg.out, "sft", "samples.json")))
    rows = []
    for p, r in list(zip(s["prompts"], s["responses"]))[:n]:
        idx, real = seq_batch(ctx, [p], [r])
        resp = response_mask(ctx, idx, real)
        ids = idx[0][resp[0]].tolist()
        rewards = rm.token_rewards(idx, real, resp)[0][resp[0]].tolist()
        toks = [ctx.enc.decode([t]) for t in ids]
        rows.append(f"<h4>{html.escape(p)} (judge {ctx.scores([p], [r])[0]:+.1f})</h4>"
                    f"<p>token RM: {diff_labels.render(toks, rewards, html=True)}</p>")
        if ctx.records is None:  # the gold labels exist only in the toy world
            gold, _ = label_pair(ctx.enc, ids, data.annotate(p, r), "bad_vs_rest")
            rows.append(f"<p>gold labels: {diff_labels.render(toks, gold, html=True)}</p>")
    with open(os.path.join(ctx.cfg.out, "token_rewards.html"), "w") as f:
        f.write("<html><body><h3>Token RM rewards on SFT samples (red = bad)</h3>" + "".join(rows) + "</body></html>")

# -----------------------------------------------------------------------------
# Main: the stages in order


OUTPUTS = ["sft", "prefs", "prefs.jsonl", "rm", "ppo", "eval", "tokenizer.tiktoken", "config.json",
           "results.json", "results.md", "ppo_diagnostics.png", "learning_curves.png", "token_rewards.html"]
UNCHECKED = {"out", "device", "seeds", "stop_after", "methods", "sweep"}  # may change between runs of the same folder


class Ctx:
    """What every stage needs: configs, device, tokenizer, and the world it evaluates in —
    the toy world with its gold judge, or your own records with a judge RM."""

    def __init__(self, cfgs, device, records=None):
        self.cfg, self.world, self.rmc, self.pc = (cfgs[c] for c in SECTIONS)
        self.device, self.stop_after = device, self.cfg.stop_after
        self.config_dict = {k: v for c in SECTIONS for k, v in dataclasses.asdict(cfgs[c]).items()}
        self.records = records
        if records is not None:  # a quarter of the pairs train only the judge RM
            shuffled = random.Random(self.cfg.seed).sample(records, len(records))
            n = max(len(records) // 4, 1)
            self.judge_records, self.train_records = shuffled[:n], shuffled[n:]

    def skip(self, path):
        if os.path.exists(path):
            print(f"{os.path.relpath(path, self.cfg.out)} exists, skipping (--force to redo)")
            return True
        return False

    def sample_prompt(self, rng):
        return rng.choice(self.train_records)["prompt"] if self.records else data.sample_prompt(rng, self.world)

    def prompt_ids(self, prompt):
        """Chat-formatted prompt ids, cut from the left to leave room for the response."""
        return tok.prompt_ids(self.enc, prompt)[-(self.cfg.block_size - self.cfg.max_new_tokens):]

    def scores(self, prompts, responses):
        """The judge: the toy world's gold judge, or the judge RM for your own data."""
        if self.records is None:
            return [data.score(p, r) for p, r in zip(prompts, responses)]
        if not hasattr(self, "judge_rm"):
            self.judge_rm, _ = load_rm(os.path.join(self.cfg.out, "rm", "judge.pt"), self.device)
        return seq_scores(self, self.judge_rm, prompts, responses)

    def rates(self, prompts, responses):
        if self.records is None:
            return data.error_rates(prompts, responses)
        s = self.scores(prompts, responses)
        return {"judge_score": sum(s) / len(s)}


def main(argv):
    cfgs, force, preset = parse_args(argv)
    cfg = cfgs[Config]
    if cfg.sweep:
        return sweep(argv, cfg)
    methods = cfg.methods.split(",")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        sys.exit(f"error: unknown method(s) {', '.join(bad)}; allowed: {', '.join(METHODS)}")
    records = None
    if cfg.data:  # read and check your data before anything is written
        try:
            records = data.read_jsonl(cfg.data)
        except data.DataError as e:
            sys.exit(f"error: {e}")
        if len(records) < 8:
            sys.exit(f"error: {cfg.data}: {len(records)} record(s); at least 8 are needed (a quarter trains the judge RM)")
        if any(m.startswith("oracle") for m in methods):
            sys.exit("error: the oracle methods need the toy world's gold judge; drop them with --data")
        if not all("edited" in r for r in records):
            methods = [m for m in methods if m == "ppo"]
            print("note: not every record has an 'edited' field, so only the sequence-level method (ppo) runs")
    device = pick_device(cfg.device)
    ctx = Ctx(cfgs, device, records)
    os.makedirs(cfg.out, exist_ok=True)
    cpath = os.path.join(cfg.out, "config.json")
    if force:
        for name in OUTPUTS:
            p = os.path.join(cfg.out, name)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p) if os.path.exists(p) else None
    elif os.path.exists(cpath):
        old = json.load(open(cpath))
        changed = [k for k in ctx.config_dict if k not in UNCHECKED and old.get(k) != ctx.config_dict[k]]
        if changed:
            sys.exit(f"error: {cfg.out} holds a run with a different config ("
                     + ", ".join(f"{k}: {old.get(k)!r} -> {ctx.config_dict[k]!r}" for k in changed)
                     + "); use another --out, or --force to start over")
    write_json(ctx.config_dict, cpath)
    torch.manual_seed(cfg.seed)
    print(f"preset {preset} | device {device} | out {cfg.out}")
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    timing = {}

    def timed(name, f, *args):
        t0 = time.time()
        f(*args)
        timing[name] = timing.get(name, 0.0) + time.time() - t0

    timed("sft", stage_sft, ctx)
    ctx.enc = tok.get_tokenizer(cfg.tokenizer, path=os.path.join(cfg.out, "tokenizer.tiktoken"))
    ctx.sp = tok.special_ids(ctx.enc)
    if records is not None:
        n_long = sum(len(tok.prompt_ids(ctx.enc, r["prompt"])) > cfg.block_size - cfg.max_new_tokens
                     or len(ctx.prompt_ids(r["prompt"])) + max(len(tok.response_ids(ctx.enc, r[k])) for k in data.FIELDS[1:] if k in r)
                     > cfg.block_size for r in records)
        if n_long:
            print(f"warning: {n_long} record(s) longer than block_size={cfg.block_size} tokens are truncated")
    timed("prefs", stage_prefs, ctx)
    timed("judge", stage_judge, ctx)
    for s in seeds:
        timed("rm", stage_rm, ctx, s)
    for s in seeds:
        for m in methods:
            timed(m, stage_ppo, ctx, m, s)
    timed("report", stage_report, ctx, seeds, methods, timing)


# -----------------------------------------------------------------------------
# Sweeps: the headline experiment

SFT_KEYS = ({f.name for f in dataclasses.fields(Config)} | {f.name for f in dataclasses.fields(data.WorldConfig)}) - {
    "n_pairs", "methods", "seeds", "n_curve", "eval_every", "ckpt_every", "stop_after", "sweep", "p_annotator_miss"}
# (n_eval and k_ref stay in: the evaluation set is shared across a sweep)


def sweep(argv, cfg):
    """--sweep=key:v1,v2,...: the pipeline once per value, in <out>/<key>=<value>/, all
    sharing the first value's SFT model and evaluation set (a swept key must not change
    SFT), and for a PPO key also its preference data and reward models; then
    <out>/sweep.json and <out>/headline.png: win rate against SFT and wrong-fact rate per
    method against the value, and the win-rate / KL frontier."""
    key, _, values = cfg.sweep.partition(":")
    values = [v for v in values.split(",") if v]
    if key in SFT_KEYS or not values:
        sys.exit(f"error: --sweep=key:v1,v2,... with a key that leaves SFT alone (not {', '.join(sorted(SFT_KEYS))})")
    base = [a for a in argv if not a.startswith(("--sweep=", "--out=", f"--{key}="))]
    shared = ["sft", "tokenizer.tiktoken", "eval"]
    if key in {f.name for f in dataclasses.fields(ppo.PPOConfig)}:
        shared += ["prefs", "prefs.jsonl", "rm"]
    runs = {}
    for v in values:
        sub = os.path.join(cfg.out, f"{key}={v}")
        first = os.path.join(cfg.out, f"{key}={values[0]}")
        for name in shared if v != values[0] and not os.path.exists(sub) else []:
            src, dst = os.path.join(first, name), os.path.join(sub, name)
            shutil.copytree(src, dst) if os.path.isdir(src) else shutil.copy(src, dst)
        print(f"=== sweep {key}={v} -> {sub}")
        main(base + [f"--{key}={v}", f"--out={sub}"])
        runs[v] = json.load(open(os.path.join(sub, "results.json")))
    write_json({"key": key, "values": values, "runs": {v: {"methods": r["methods"], "fg_ppo_minus_ppo": r.get("fg_ppo_minus_ppo")}
                                                        for v, r in runs.items()}}, os.path.join(cfg.out, "sweep.json"))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = [m for m in runs[values[0]]["methods"] if m != "sft"]
    numeric = all(v.replace(".", "", 1).replace("e-", "", 1).isdigit() for v in values)
    values = sorted(values, key=float) if numeric else values
    x = [float(v) for v in values] if numeric else list(range(len(values)))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for m in methods:
        rs = [runs[v]["methods"][m] for v in values]
        wr = [r["win_rate"] for r in rs]
        err = [[w - r["win_rate_ci95"][0] for w, r in zip(wr, rs)], [r["win_rate_ci95"][1] - w for w, r in zip(wr, rs)]]
        axes[0].errorbar(x, wr, yerr=err, marker="o", capsize=3, label=m)
        axes[1].plot(x, [r.get("wrong", float("nan")) for r in rs], marker="o", label=m)
        kl_order = sorted(range(len(rs)), key=lambda i: rs[i]["kl"])  # a frontier is read along KL
        axes[2].plot([rs[i]["kl"] for i in kl_order], [wr[i] for i in kl_order], marker="o", label=m)
    axes[1].plot(x, [runs[v]["methods"]["sft"].get("wrong", float("nan")) for v in values], "k--", label="sft")
    axes[0].axhline(0.5, color="grey", lw=0.5)
    for ax, t, xl in zip(axes, ["win rate vs SFT (95% CI)", "wrong facts per stated fact", "win rate / KL frontier"],
                         [key, key, "KL to SFT per response"]):
        ax.set_title(t)
        ax.set_xlabel(xl)
        if xl == key and not numeric:
            ax.set_xticks(x, values)
        elif xl == key and min(x) > 0 and max(x) / min(x) > 5:
            ax.set_xscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out, "headline.png"), dpi=80)
    print(f"sweep: {os.path.join(cfg.out, 'headline.png')} and sweep.json written")


if __name__ == "__main__":
    main(sys.argv[1:])
