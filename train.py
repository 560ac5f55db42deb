"""
The whole pipeline of fine-grained RLHF from minimal edits, one straight line:

    0. tokenizer  a BPE trained on the world's text (GPT-2's with --init)       -> tokenizer.tiktoken
    1. sft        a GPT (or GPT-2's weights) on the corpus or your responses    -> sft/  (sft.py)
    2. prefs      two SFT samples per prompt, judge picks, annotator edits      -> prefs.jsonl, prefs/
    3. rm         token-level RM (diff labels) and sequence-level BT RMs        -> rm/
    4. policies   per method and seed: PPO or RLOO (an RM's reward), DPO (pairs) -> policies/
    5. report     win rate against SFT, error rates, plots                      -> results.json, results.md

Each stage reads the files of the stages before it and writes its own, and is skipped if they
exist (`--force` redoes everything). The method is in the files the stages call; here it meets
the machinery (machinery/): the stages hand it micro-batched, DDP-wrapped models, and stages 3
and 4 run in a pool of worker processes, a policy starting once its reward model is saved.

    python train.py                       # default preset, CPU or GPU autodetected
    python train.py --preset=tiny         # the whole pipeline in about a minute
    python train.py --help                # every flag, by section, with its default
    torchrun --standalone --nproc_per_node=4 train.py --preset=gpu   # 4 GPUs (docs/engineering.md)
"""

import dataclasses
import json
import os
import random
import shutil
import sys
import time
from types import SimpleNamespace

import torch

import data
import dpo
import evaluation
import ppo
import reward
import sft
import tokenizer as tok
from config import SECTIONS, Config, parse_args, prepare_out, settings_table, sweep_grid
from data import save_atomic
from machinery import distributed as dist
from machinery.batching import ByLength, micro_batched
from machinery.devices import pick_device, record_peaks
from machinery.report import report as write_report, sweep_report
from machinery.workers import parallel, processes
from model import GPT, gpt2_files
from world import make_world, runnable

# -----------------------------------------------------------------------------
# Stages 0 and 2: the tokenizer, the preference data (stage 1, SFT, is sft.py)


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


def stage_prefs(cfg, world, chat, device):
    path = os.path.join(cfg.out, "prefs.jsonl")
    if skip(cfg, path):
        return
    records, ties = world.preference_pairs(chat, os.path.join(cfg.out, "sft", "model.pt"), cfg.n_pairs,
                                           cfg.seed + 1, device)
    stats = {"pairs": len(records), "ties_dropped": ties, **evaluation.label_stats(chat.enc, records)}
    data.write_json(stats, os.path.join(cfg.out, "prefs", "stats.json"))
    data.write_jsonl(path, records)
    labels = " ".join(f"{k} {v:.3f}" for k, v in stats["label_fraction"].items())
    print(f"prefs: {len(records)} pairs | {ties} ties dropped | labels {labels} | edit distance "
          f"{stats['mean_edit_distance_tokens']:.1f} of {stats['mean_response_tokens']:.1f} tokens")


def stage_judge(cfg, world, chat, rmc, device):
    """Your own data has no gold judge: a sequence RM trained on the quarter of the pairs
    that no other model sees stands in for it (see world.py)."""
    path = os.path.join(cfg.out, "rm", "judge.pt")
    if skip(cfg, path):
        return
    torch.manual_seed(cfg.seed)  # the same judge whether or not SFT ran in this process
    rm = reward.train_seq_rm(chat, os.path.join(cfg.out, "sft", "model.pt"), world.judge_records, "chosen",
                             dist.share(rmc, "rm_batch"), dist.rank_seed(cfg.seed), device, "judge rm", dist.wrap)
    if dist.master:
        reward.save_rm(rm, {"center": 0.0, "scale": 1.0}, path)


# -----------------------------------------------------------------------------
# Stage 3: the reward models; stage 4: the policies

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
    """The checkpoint of one policy run (PPO, RLOO or DPO)."""
    return os.path.join(cfg.out, "policies", f"{method}_seed{seed}.pt")


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
    share, batches = dist.share(rmc, "rm_batch"), dist.rank_seed(own)  # torchrun: each rank its own share
    if name == "token":
        rm = reward.train_token_rm(chat, sft_path, train, share, batches, device, dist.wrap)
    else:
        better = {"seq": "chosen", "seq_edits": "edited"}[name]
        rm = reward.train_seq_rm(chat, sft_path, train, better, share, batches, device, f"rm {name}", dist.wrap)
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
    print("\n".join(evaluation.rm_lines(metrics, seed)))


def stage_rl(cfg, world, chat, pc, method, seed, device):
    """PPO (with a critic) or RLOO (without: rloo_k samples per prompt) of one method and seed."""
    path, name = policy_path(cfg, method, seed), f"{method} seed {seed}"
    if os.path.exists(path) and torch.load(path, weights_only=True)["iter"] == pc.ppo_iters:
        print(f"{name}: {path} complete, skipping (--force to redo)")
        return
    sft_path, algo = os.path.join(cfg.out, "sft", "model.pt"), reward.METHODS[method].algo
    ev = evaluation.eval_set(os.path.join(cfg.out, "eval", "refs.json"), world, chat, sft_path, cfg, device)
    ref = ppo.ActorCritic(GPT.from_checkpoint(sft_path, device), critic=False, temperature=pc.temperature)
    ref.eval().requires_grad_(False)  # the frozen SFT reference
    agent = ppo.ActorCritic(GPT.from_checkpoint(sft_path, device), critic=algo == "ppo",
                            temperature=pc.temperature).to(device)
    samples = json.load(open(os.path.join(cfg.out, "sft", "samples.json")))
    reward_fn = reward.reward_fn(method, rm_dir(cfg, seed), chat, samples, device, pc.seq_weight)
    k = pc.rloo_k if algo == "rloo" else 1

    def next_prompts(rng, gen):  # the same draw on every rank, then this rank's share, each k times in a row
        prompts = [chat.prompt(world.sample_prompt(rng)) for _ in range(pc.rollout_batch // k)]
        return [p for p in dist.shard(prompts) for _ in range(k)], dist.rank_generator(gen)

    try:  # the forward passes in micro-batches by length; under torchrun DDP averages the gradients
        state = ppo.train(agent, ByLength(ref), micro_batched(reward_fn), next_prompts, dist.share(pc, "minibatch"),
                          chat.eot, chat.pad, cfg.max_new_tokens, seed, path, name,
                          evaluation.curve(agent.policy, ev, world, chat, cfg, "iter"), cfg.eval_every,
                          cfg.ckpt_every, cfg.stop_after, net=dist.wrap(ByLength(agent), find_unused=True),
                          save=dist.master)
    except FloatingPointError as e:
        sys.exit(f"error: {name} stopped: {e}; the last good checkpoint {path} is intact")
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
    ref = GPT.from_checkpoint(sft_path, device).eval().requires_grad_(False)  # the frozen SFT reference
    policy = GPT.from_checkpoint(sft_path, device)
    steps = dc.dpo_steps or ppo_pc.ppo_iters * ppo_pc.ppo_epochs * -(-ppo_pc.rollout_batch // ppo_pc.minibatch)
    state = dpo.train(policy, ByLength(ref, dpo.token_logps), chat, rm_split(cfg, seed)[0],
                      reward.METHODS[method].better, dist.share(dc, "dpo_batch"), steps, dist.rank_seed(seed), name,
                      evaluation.curve(policy, ev, world, chat, cfg, "step"), device,
                      net=dist.wrap(ByLength(policy, dpo.token_logps)))
    if dist.master:
        save_atomic({"policy": policy.state_dict(), **state}, path)


# -----------------------------------------------------------------------------
# Main: the stages in order; stages 3 and 4 in a pool of worker processes

def run(cfgs, settings, force, preset):
    """The pipeline once, for one config; settings: each method's PPOConfig or DPOConfig (config.by_method)."""
    ctx = prepare(cfgs, settings, force, preset)
    ctx.timed("rm_policies", parallel, tasks([ctx]), ctx.jobs, ctx.job_threads)
    report(ctx)


def prepare(cfgs, settings, force, preset):
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
    methods = runnable(world, methods)
    config = {k: v for c in SECTIONS for k, v in dataclasses.asdict(cfgs[c]).items()}
    config["settings_by_method"] = {m: d for m, sc in settings.items()  # where a method's differ from the flat ones
                                    if (d := {k: v for k, v in dataclasses.asdict(sc).items() if v != config[k]})}
    dist.on_master(prepare_out, cfg.out, config, force)
    dist.barrier()  # the other ranks look at the folder once rank 0 has checked (or --force emptied) it
    jobs, threads, job_threads = processes(cfg, device)
    torch.set_num_threads(threads)  # for the stages that run alone; the workers set job_threads
    torch.manual_seed(cfg.seed)
    print(f"preset {preset} | device {device} | out {cfg.out} | {jobs} job(s) x {job_threads} thread(s)"
          + (f" | torchrun: {dist.world_size} processes" if dist.ddp else ""))
    print("\n".join(settings_table({m: dataclasses.asdict(settings[m]) for m in methods})))
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    rm_names = [n for n in RM_NAMES if any(n in reward.METHODS[m].rms for m in methods)]
    timing, peaks = {}, {}

    def timed(name, f, *args):
        t0 = time.time()
        result = f(*args)
        dist.barrier()  # torchrun: the next stage starts on every rank when rank 0 has written this one's files
        timing[name] = timing.get(name, 0.0) + time.time() - t0
        record_peaks(peaks, name, result if name == "rm_policies" else {}, cfg.out)  # on a GPU: peak memory
        return result

    # Every rank runs every stage, in the same order: the training ones data parallel, and
    # the ones on_master on rank 0 alone (sampling, judging, evaluation, report).
    chat = tok.Chat(timed("tokenizer", dist.master_first, stage_tokenizer, cfg, world), cfg.block_size,
                    cfg.max_new_tokens)
    if not world.gold and (n_long := world.count_too_long(chat)):
        print(f"warning: {n_long} record(s) longer than block_size={cfg.block_size} tokens are truncated")
    timed("sft", sft.stage_sft, cfg, world, chat, device)
    timed("prefs", dist.on_master, stage_prefs, cfg, world, chat, device)
    if not world.gold:
        timed("judge", stage_judge, cfg, world, chat, rmc, device)
    timed("eval_set", dist.on_master, evaluation.eval_set, os.path.join(cfg.out, "eval", "refs.json"), world, chat,
          os.path.join(cfg.out, "sft", "model.pt"), cfg, device)  # before the policy runs, which all read it
    return SimpleNamespace(cfg=cfg, rmc=rmc, settings=settings, world=world, chat=chat, config=config, seeds=seeds,
                           methods=methods, rm_names=rm_names, device=device, jobs=jobs, threads=threads,
                           job_threads=job_threads, timing=timing, peaks=peaks, timed=timed)


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
                algo, reads = reward.METHODS[m].algo, reward.METHODS[m].rms
                runs[policy_path(c.cfg, m, s)] = (
                    (stage_dpo, (c.cfg, c.world, c.chat, c.settings[m], c.settings["ppo"], m, s, c.device), [])
                    if algo == "dpo" else (stage_rl, (c.cfg, c.world, c.chat, c.settings[m], m, s, c.device),
                          [models[n] for n in reads]))  # after its RMs (the oracles' judge is no task)
            if models:
                diagnostics[os.path.join(rm_dir(c.cfg, s), "metrics.json")] = (
                    dist.on_master, (stage_rm_metrics, c.cfg, c.world, c.chat, c.rmc, s, c.rm_names, c.device),
                    list(models.values()))
    return rms | (runs if policies else {}) | diagnostics


def report(c):
    processes = {"jobs": c.jobs, "threads": c.threads, "threads_per_job": c.job_threads, "world_size": dist.world_size,
                 **({"peak_cuda_gib": c.peaks} if c.peaks else {})}
    c.timed("report", dist.on_master, write_report, c.cfg, c.world, c.chat, c.config, c.seeds, c.methods,
            c.timing, processes, c.device)


def sweep(cfgs, settings, force, preset):
    """--sweep="key:v1,v2 key2:..." runs the pipeline once per point of the grid, in
    <out>/key=v1,key2=.../, all sharing the first point's tokenizer, SFT model and evaluation
    set (so a swept key must leave SFT alone), and, when no swept key changes them (n_pairs,
    the world's, the reward models'), also its preference data and reward models. The reward
    models and policy runs of all points share one pool of workers. Then <out>/sweep.json and
    <out>/sweep.md (machinery/report.sweep_report)."""
    points = sweep_grid(cfgs, settings)
    first = points[0][1]
    same_rms = all(one[Config].n_pairs == first[Config].n_pairs and one[data.WorldConfig] == first[data.WorldConfig]
                   and one[reward.RMConfig] == first[reward.RMConfig] for _, one, _ in points)
    shared = ["sft", "tokenizer.tiktoken", "eval"] + (["prefs", "prefs.jsonl", "rm"] if same_rms else [])
    ctxs = []
    for i, (name, one, one_settings) in enumerate(points):
        for item in shared if i > 0 and not os.path.exists(one[Config].out) and dist.master else []:
            src, dst = os.path.join(first[Config].out, item), os.path.join(one[Config].out, item)
            shutil.copytree(src, dst) if os.path.isdir(src) else shutil.copy(src, dst)
        print(f"=== sweep {name} -> {one[Config].out}")
        ctxs.append(prepare(one, one_settings, force, preset))
        if i == 0 and same_rms:  # the other points copy its reward models
            ctxs[0].timed("rm_policies", parallel, tasks(ctxs, policies=False), ctxs[0].jobs, ctxs[0].job_threads)
    t0 = time.time()
    parallel(tasks(ctxs), ctxs[0].jobs, ctxs[0].job_threads)
    for c in ctxs:
        c.timing["rm_policies"] = c.timing.get("rm_policies", 0.0) + time.time() - t0  # the whole grid's pool
        report(c)
    dist.on_master(sweep_report, cfgs[Config].out, cfgs[Config].sweep,
                   {name: json.load(open(os.path.join(one[Config].out, "results.json"))) for name, one, _ in points})


def main(argv):
    cfgs, settings, force, preset = parse_args(argv)
    with dist.stop_all_on_error():  # torchrun: one rank's error stops every rank
        try:
            (sweep if cfgs[Config].sweep else run)(cfgs, settings, force, preset)
        except FloatingPointError as e:  # a non-finite loss: the stage's last good files are intact
            sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
