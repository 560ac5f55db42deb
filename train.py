"""
The whole pipeline of fine-grained RLHF from minimal edits, one straight line:

    0. tokenizer  a BPE trained on the world's text (GPT-2's with --init)       -> tokenizer.tiktoken
    1. sft        a GPT (or GPT-2's weights) on the corpus or your responses    -> sft/
    2. prefs      two SFT samples per prompt, judge picks, annotator edits      -> prefs.jsonl, prefs/
    3. rm         token-level RM (diff labels) and sequence-level BT RMs        -> rm/
    4. ppo        per method and seed: PPO or RLOO (an RM's reward), DPO (pairs) -> ppo/
    5. report     win rate against SFT, error rates, plots                      -> results.json, results.md

Each stage reads the files of the stages before it and writes its own; a stage whose
outputs exist is skipped (`--force` redoes everything). Stages 3 and 4 share one pool of
worker processes (workers.py), where a policy run starts as soon as its reward model is
saved. The method lives in the files the stages call: reward.py (labels, reward models,
the reward each method gets), ppo.py (the PPO and RLOO loop), dpo.py (DPO), evaluation.py
(win rate, diagnostics, report); world.py says where data and judgements come from. Run:

    python train.py                       # default preset, CPU or GPU autodetected
    python train.py --preset=tiny         # the whole pipeline in about a minute
    python train.py --sft_steps=300 --beta=0.05 --out=runs/x
    python train.py --help                # every flag, by section, with its default
    torchrun --standalone --nproc_per_node=4 train.py --preset=gpu   # 4 GPUs (README: Several GPUs)
"""

import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from types import SimpleNamespace

import torch
from tqdm import tqdm

import data
import distributed as dist
import dpo
import evaluation
import ppo
import reward
import tokenizer as tok
from config import SECTIONS, Config, parse_args, prepare_out, sweep_grid
from model import GPT, GPTConfig, autocast, gpt2_files, load_gpt, pick_device, save_atomic
from workers import parallel, processes
from world import make_world

# -----------------------------------------------------------------------------
# The stages


def skip(cfg, path):
    if os.path.exists(path):
        print(f"{os.path.relpath(path, cfg.out)} exists, skipping (--force to redo)")
        return True
    return False


def stage_tokenizer(cfg, world):
    """The encoding of this run, GPT-2's with --init, else a BPE trained on the world's text;
    made once, then read from its file."""
    path = os.path.join(cfg.out, "tokenizer.tiktoken")
    texts = world.tokenizer_texts(cfg.n_sft, cfg.seed) if not cfg.init and not os.path.exists(path) else None
    return tok.get_tokenizer(path, texts, cfg.vocab_size, cfg.init)


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
        loss_sum = loss_sum + model(idx.to(device), tgt.to(device), mask=real.to(device), reduction="sum")[1]
        n_real = sum(lengths[i] for i in run)  # counted on the host: no GPU sync
        real_tokens, padded = real_tokens + n_real, padded + len(run) * max(lengths[i] for i in run) - n_real
    return loss_sum / (n_targets or sum(t != -1 for _, y in batch for t in y)), real_tokens, padded


def stage_sft(cfg, world, chat, device):
    path = os.path.join(cfg.out, "sft", "model.pt")
    if skip(cfg, path):
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

    g = random.Random(cfg.seed)
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
        if not torch.isfinite(loss_all):
            sys.exit(f"error: sft stopped at step {it}: loss is {loss_all.item()}; no checkpoint written")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        pbar.set_postfix(loss=f"{loss_all.item():.3f}")
        if (it + 1) % max(cfg.sft_steps // 4, 1) == 0 or it + 1 == cfg.sft_steps:
            tqdm.write(f"sft step {it + 1} | train loss {loss_all.item():.4f} | val loss {val_loss():.4f}")
    real_tokens, padded = dist.all_reduce_sum(torch.tensor([real_tokens, padded])).tolist()  # of all ranks
    if not dist.master:  # rank 0 samples, judges and saves; the others wait at the stage's barrier
        return

    # Fresh samples at temperature 1 (they also fit the reward scales later), and with a gold
    # judge its view of them against the corpus the model learned from.
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    prompts = [world.sample_prompt(rng) for _ in range(cfg.n_judge)]
    samples = chat.sample(model, prompts, gen)
    data.write_json({"prompts": prompts, "responses": samples}, os.path.join(cfg.out, "sft", "samples.json"))
    metrics = {"val_loss": val_loss(), "time_s": time.time() - t0, "pad_fraction": padded / (padded + real_tokens)}
    if world.gold:
        metrics["samples"] = data.error_rates(prompts, samples)
        metrics["corpus"] = data.error_rates([p for p, _ in corpus[:2000]], [r for _, r in corpus[:2000]])
        print("sft: " + " | ".join(f"{k} {v:.3f} (corpus {metrics['corpus'][k]:.3f})" for k, v in metrics["samples"].items()))
    data.write_json(metrics, os.path.join(cfg.out, "sft", "metrics.json"))
    save_atomic({"model": model.state_dict(), "model_args": dataclasses.asdict(model.config),
                 "config": dataclasses.asdict(cfg)}, path)  # last: marks the stage done


def stage_prefs(cfg, world, chat, device):
    path = os.path.join(cfg.out, "prefs.jsonl")
    if skip(cfg, path):
        return
    records, ties = world.preference_pairs(chat, os.path.join(cfg.out, "sft", "model.pt"), cfg.n_pairs,
                                           cfg.seed + 1, device)
    stats = {"pairs": len(records), "ties_dropped": ties, **reward.label_stats(chat.enc, records)}
    data.write_json(stats, os.path.join(cfg.out, "prefs", "stats.json"))
    data.write_jsonl(path, records)
    f = stats["label_fraction"]
    print(f"prefs: {len(records)} pairs | {ties} ties dropped | labels -1 {f['-1']:.3f} 0 {f['0']:.3f} "
          f"+1 {f['+1']:.3f} | edit distance {stats['mean_edit_distance_tokens']:.1f} of "
          f"{stats['mean_response_tokens']:.1f} tokens")


def stage_judge(cfg, world, chat, rmc, device):
    """Your own data has no gold judge: a sequence RM trained on the quarter of the pairs
    that no other model sees stands in for it (see world.py)."""
    path = os.path.join(cfg.out, "rm", "judge.pt")
    if skip(cfg, path):
        return
    torch.manual_seed(cfg.seed)  # the same judge whether or not SFT ran in this process
    rm = reward.train_seq_rm(chat, os.path.join(cfg.out, "sft", "model.pt"), world.judge_records, "chosen",
                             rmc, cfg.seed, device, "judge rm")
    if dist.master:
        reward.save_rm(rm, {"center": 0.0, "scale": 1.0}, path)


def rm_split(cfg, seed):
    """(train, val) preference pairs of a reward-model seed: a tenth held out for the diagnostics."""
    records = data.read_jsonl(os.path.join(cfg.out, "prefs.jsonl"))
    random.Random(seed).shuffle(records)
    n_val = max(len(records) // 10, 1)
    return records[n_val:], records[:n_val]


RM_NAMES = ["token", "seq", "seq_edits"]


def rm_dir(cfg, seed):
    """The reward models of one seed, <name>.pt, and their diagnostics, metrics.json."""
    return os.path.join(cfg.out, "rm", f"seed{seed}")


def policy_path(cfg, method, seed):
    """The checkpoint of one policy run."""
    return os.path.join(cfg.out, "ppo", f"{method}_seed{seed}.pt")


def stage_rm(cfg, chat, rmc, seed, name, device):
    """One reward model of one seed: token (diff labels of the edits), seq (chosen > rejected)
    or seq_edits (edited > rejected), with its reward scale fitted on the SFT samples."""
    path = os.path.join(rm_dir(cfg, seed), f"{name}.pt")
    if skip(cfg, path):
        return
    train, _ = rm_split(cfg, seed)  # the same pairs for every RM of a seed ...
    sft_path = os.path.join(cfg.out, "sft", "model.pt")
    own = 3 * seed + RM_NAMES.index(name)  # ... but each its own head init and batch order
    torch.manual_seed(own)
    if name == "token":
        rm = reward.train_token_rm(chat, sft_path, train, rmc, own, device)
    else:
        better = {"seq": "chosen", "seq_edits": "edited"}[name]
        rm = reward.train_seq_rm(chat, sft_path, train, better, rmc, own, device, f"rm {name}")
    if not dist.master:  # rank 0 fits the scale and saves
        return
    samples = json.load(open(os.path.join(cfg.out, "sft", "samples.json")))
    reward.save_rm(rm, reward.fit_norm(reward.response_scores(rm, chat, samples["prompts"], samples["responses"],
                                                              device)), path)


def stage_rm_metrics(cfg, world, chat, rmc, seed, names, device):
    """The held-out diagnostics of one seed's reward models (evaluation.rm_metrics)."""
    d = rm_dir(cfg, seed)
    if skip(cfg, os.path.join(d, "metrics.json")):
        return
    _, val = rm_split(cfg, seed)
    rms, norms = {}, {}
    for name in names:
        rms[name], norms[name] = reward.load_rm(os.path.join(d, f"{name}.pt"), device)
    samples = json.load(open(os.path.join(cfg.out, "sft", "samples.json")))
    metrics = evaluation.rm_metrics(rms, norms, samples, val, world, chat, rmc.rm_scheme, seed, device)
    metrics["norm"] = norms
    data.write_json(metrics, os.path.join(d, "metrics.json"))
    for name in rms:
        print(f"rm {name} seed {seed}: "
              + " | ".join(f"{k} {v:.3f}" for k, v in metrics[name].items() if isinstance(v, float)))
    if "bad_recall_by_type" in metrics.get("token", {}):
        print("rm token bad recall by error type: " + " | ".join(
            f"{k} {v:.2f}" for k, v in metrics["token"]["bad_recall_by_type"].items()))


def stage_ppo(cfg, world, chat, rmc, pc, method, seed, device):
    """PPO (with a critic) or RLOO (without: rloo_k samples per prompt) of one method and seed."""
    path, name = policy_path(cfg, method, seed), f"{method} seed {seed}"
    if os.path.exists(path) and torch.load(path, weights_only=True)["iter"] == pc.ppo_iters:
        print(f"ppo {name}: {path} complete, skipping (--force to redo)")
        return
    sft_path = os.path.join(cfg.out, "sft", "model.pt")
    ev = evaluation.eval_set(os.path.join(cfg.out, "eval", "refs.json"), world, chat, sft_path, cfg, device)
    ref = load_gpt(sft_path, device).eval().requires_grad_(False)  # the frozen SFT reference
    k = pc.rloo_k if reward.METHODS[method].algo == "rloo" else 1
    policy = ppo.ActorCritic(load_gpt(sft_path, device), critic=reward.METHODS[method].algo == "ppo").to(device)
    samples = json.load(open(os.path.join(cfg.out, "sft", "samples.json")))
    reward_fn = reward.reward_fn(method, rm_dir(cfg, seed), chat, samples, rmc, device)

    def next_prompts(rng):  # the same prompts on every rank (one rng), then this rank's share, each k times in a row
        prompts = [chat.prompt(world.sample_prompt(rng)) for _ in range(pc.rollout_batch // k)]
        return [p for p in dist.shard(prompts) for _ in range(k)]  # rollout_batch responses in all

    try:
        state = ppo.train(policy, ref, reward_fn, next_prompts, pc, chat.eot, chat.pad, cfg.max_new_tokens, seed,
                          path, name, evaluation.curve(policy.gpt, ev, world, chat, cfg, "iter"), cfg.eval_every,
                          cfg.ckpt_every, cfg.stop_after)
    except FloatingPointError as e:
        sys.exit(f"error: ppo {name} stopped: {e}; the last good checkpoint {path} is intact")
    if state["iter"] < pc.ppo_iters:
        sys.exit(f"stopped after {cfg.stop_after} iterations (--stop_after); rerun to resume")


def stage_dpo(cfg, world, chat, dc, ppo_pc, method, seed, device):
    """DPO of one method and seed (dpo.py) on the training pairs of the seed's reward models,
    dpo_steps steps or, with 0, as many as standard PPO's policy updates (ppo_pc)."""
    path, name = policy_path(cfg, method, seed), f"{method} seed {seed}"
    if skip(cfg, path):  # saved once, at the end (a killed run starts again)
        return
    sft_path = os.path.join(cfg.out, "sft", "model.pt")
    ev = evaluation.eval_set(os.path.join(cfg.out, "eval", "refs.json"), world, chat, sft_path, cfg, device)
    ref = load_gpt(sft_path, device).eval().requires_grad_(False)  # the frozen SFT reference
    policy = load_gpt(sft_path, device)
    steps = dc.dpo_steps or ppo_pc.ppo_iters * ppo_pc.ppo_epochs * -(-ppo_pc.rollout_batch // ppo_pc.minibatch)
    dpo.train(policy, ref, chat, rm_split(cfg, seed)[0], reward.METHODS[method].better, dc, steps, seed, path, name,
              evaluation.curve(policy, ev, world, chat, cfg, "step"), device)


# -----------------------------------------------------------------------------
# Main: the stages in order

def run(cfgs, pcs, force, preset):
    """The pipeline once, for one config; pcs: each method's PPO settings (config.by_method)."""
    ctx = prepare(cfgs, pcs, force, preset)
    ctx.timed("rm_ppo", parallel, tasks([ctx]), ctx.jobs, ctx.job_threads)
    report(ctx)


def prepare(cfgs, pcs, force, preset):
    """Stages 0-2 and the evaluation set; returns what the reward models, the policy runs
    (tasks) and the report need."""
    cfg, world_cfg, rmc = cfgs[Config], cfgs[data.WorldConfig], cfgs[reward.RMConfig]
    methods = cfg.methods.split(",")
    try:  # your data is read and checked before anything is written
        device = dist.setup(pick_device(cfg.device))  # under torchrun: joins the ranks, cuda:LOCAL_RANK
        world = make_world(cfg, world_cfg, device)
        if cfg.init:
            gpt2_files(cfg.init)
    except (ValueError, data.DataError) as e:
        sys.exit(f"error: {e}")
    pc, algos = cfgs[ppo.PPOConfig], {reward.METHODS[m].algo for m in methods}
    dist.check(cfg.jobs, dict(sft_batch=cfg.sft_batch, rm_batch=rmc.rm_batch, rollout_batch=pc.rollout_batch,
                              minibatch=pc.minibatch,  # RLOO shards whole groups of rloo_k samples: its prompts
                              **({"rollout_batch/rloo_k": pc.rollout_batch // pc.rloo_k} if "rloo" in algos else {}),
                              **({"dpo_batch": cfgs[dpo.DPOConfig].dpo_batch} if "dpo" in algos else {})))
    if not world.gold and any(m.startswith("oracle") for m in methods):
        sys.exit("error: the oracle methods need the toy world's gold judge; drop them with --data")
    if not world.has_edits:  # the token RM, the RM on edits and DPO on edits need an edit in every pair
        methods = [m for m in methods if not reward.METHODS[m].needs_edits]
        if not methods:
            sys.exit(f"error: --methods={cfg.methods} all need an 'edited' field in every record of {cfg.data}")
        print(f"note: not every record has an 'edited' field, so only the methods without edits run: {', '.join(methods)}")
    config = {k: v for c in SECTIONS for k, v in dataclasses.asdict(cfgs[c]).items()}
    config["ppo_by_method"] = {m: d for m, pc in pcs.items()  # where a method's settings differ from the flat ones
                               if (d := {k: v for k, v in dataclasses.asdict(pc).items() if v != config[k]})}
    dist.on_master(prepare_out, cfg.out, config, force)
    dist.barrier()  # the other ranks look at the folder once rank 0 has checked (or --force emptied) it
    jobs, threads, job_threads = processes(cfg, device)
    torch.set_num_threads(threads)  # for the stages that run alone; the workers set job_threads
    torch.manual_seed(cfg.seed)
    print(f"preset {preset} | device {device} | out {cfg.out} | {jobs} job(s) x {job_threads} thread(s)"
          + (f" | torchrun: {dist.world_size} processes" if dist.ddp else ""))
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    rm_names = [n for n in RM_NAMES if n in {reward.METHODS[m].reward for m in methods}]
    timing = {}

    def timed(name, f, *args):
        t0 = time.time()
        result = f(*args)
        dist.barrier()  # torchrun: the next stage starts on every rank when rank 0 has written this one's files
        timing[name] = timing.get(name, 0.0) + time.time() - t0
        return result

    # Every rank runs every stage, in the same order: the training ones data parallel, and
    # the ones on_master on rank 0 alone (sampling, judging, evaluation, report).
    chat = tok.Chat(timed("tokenizer", dist.master_first, stage_tokenizer, cfg, world), cfg.block_size,
                    cfg.max_new_tokens)
    if not world.gold and (n_long := world.count_too_long(chat)):
        print(f"warning: {n_long} record(s) longer than block_size={cfg.block_size} tokens are truncated")
    timed("sft", stage_sft, cfg, world, chat, device)
    timed("prefs", dist.on_master, stage_prefs, cfg, world, chat, device)
    if not world.gold:
        timed("judge", stage_judge, cfg, world, chat, rmc, device)
    timed("eval_set", dist.on_master, evaluation.eval_set, os.path.join(cfg.out, "eval", "refs.json"), world, chat,
          os.path.join(cfg.out, "sft", "model.pt"), cfg, device)  # before the policy runs, which all read it
    return SimpleNamespace(cfg=cfg, rmc=rmc, pcs=pcs, world=world, chat=chat, config=config, seeds=seeds,
                           methods=methods, rm_names=rm_names, device=device, jobs=jobs, threads=threads,
                           job_threads=job_threads, timing=timing, timed=timed)


def tasks(ctxs, policies=True):
    """Stages 3 and 4 of prepared pipelines, as workers.parallel takes them, each named by the
    file it writes: every reward model of every seed; every policy run (PPO, RLOO, DPO), one
    per (seed, method), each after its reward model, so a run starts while other reward
    models train (policies=False: none); last each seed's reward-model diagnostics, which
    nothing waits for."""
    rms, runs, diagnostics = {}, {}, {}
    for c in ctxs:
        for s in c.seeds:
            models = {n: os.path.join(rm_dir(c.cfg, s), f"{n}.pt") for n in c.rm_names}
            for n, path in models.items():
                rms[path] = stage_rm, (c.cfg, c.chat, c.rmc, s, n, c.device), []
            for m in c.methods:
                algo, rm = reward.METHODS[m].algo, reward.METHODS[m].reward
                runs[policy_path(c.cfg, m, s)] = (
                    (stage_dpo, (c.cfg, c.world, c.chat, c.pcs[m], c.pcs["ppo"], m, s, c.device), []) if algo == "dpo"
                    else (stage_ppo, (c.cfg, c.world, c.chat, c.rmc, c.pcs[m], m, s, c.device),
                          [models[rm]] if rm in models else []))  # the oracle methods' judge is no task
            if models:
                diagnostics[os.path.join(rm_dir(c.cfg, s), "metrics.json")] = (
                    dist.on_master, (stage_rm_metrics, c.cfg, c.world, c.chat, c.rmc, s, c.rm_names, c.device),
                    list(models.values()))
    return rms | (runs if policies else {}) | diagnostics


def report(c):
    processes = {"jobs": c.jobs, "threads": c.threads, "threads_per_job": c.job_threads, "world_size": dist.world_size}
    c.timed("report", dist.on_master, evaluation.report, c.cfg, c.world, c.chat, c.config, c.seeds, c.methods,
            c.timing, processes, c.device)


def sweep(cfgs, pcs, force, preset):
    """--sweep="key:v1,v2 key2:..." runs the pipeline once per point of the grid, in
    <out>/key=v1,key2=.../, all sharing the first point's tokenizer, SFT model and evaluation
    set (so a swept key must leave SFT alone), and when only PPO keys are swept also its
    preference data and reward models. The reward models and policy runs of all points share
    one pool of workers. Then <out>/sweep.json and <out>/sweep.md (evaluation.sweep_report)."""
    points = sweep_grid(cfgs, pcs)
    only_ppo = all(one[c] == cfgs[c] for _, one, _ in points for c in SECTIONS
                   if c not in (Config, ppo.PPOConfig, dpo.DPOConfig))
    shared = ["sft", "tokenizer.tiktoken", "eval"] + (["prefs", "prefs.jsonl", "rm"] if only_ppo else [])
    first, ctxs = points[0][1][Config].out, []
    for i, (name, one, one_pcs) in enumerate(points):
        for item in shared if i > 0 and not os.path.exists(one[Config].out) and dist.master else []:
            src, dst = os.path.join(first, item), os.path.join(one[Config].out, item)
            shutil.copytree(src, dst) if os.path.isdir(src) else shutil.copy(src, dst)
        print(f"=== sweep {name} -> {one[Config].out}")
        ctxs.append(prepare(one, one_pcs, force, preset))
        if i == 0 and only_ppo:  # the other points copy its reward models
            ctxs[0].timed("rm_ppo", parallel, tasks(ctxs, policies=False), ctxs[0].jobs, ctxs[0].job_threads)
    t0 = time.time()
    parallel(tasks(ctxs), ctxs[0].jobs, ctxs[0].job_threads)
    for c in ctxs:
        c.timing["rm_ppo"] = c.timing.get("rm_ppo", 0.0) + time.time() - t0  # the whole grid's pool
        report(c)
    dist.on_master(evaluation.sweep_report, cfgs[Config].out, cfgs[Config].sweep,
                   {name: json.load(open(os.path.join(one[Config].out, "results.json"))) for name, one, _ in points})


def main(argv):
    cfgs, pcs, force, preset = parse_args(argv)
    with dist.stop_all_on_error():  # torchrun: one rank's error stops every rank
        try:
            (sweep if cfgs[Config].sweep else run)(cfgs, pcs, force, preset)
        except FloatingPointError as e:  # a non-finite loss: the stage's last good files are intact
            sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
