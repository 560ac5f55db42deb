"""
Speed and memory figures, printed as JSON (never asserted in tests: machines are noisy).

    python -m machinery.bench                   # model figures at the default config
    python -m machinery.bench --pipeline=tiny   # also the whole pipeline of a preset: per stage, per PPO part
    python -m machinery.bench --preset=gpu --device=cpu   # a preset's model (default: default), on a device
    python -m machinery.bench --steps=3      # fewer SFT steps timed (default 10), no generation without the cache

- matmul_gflops_1_thread / _all_threads: this machine's fp32 matmul peak (2048 x 2048)
- sft_step_*: one SFT step (forward + backward + AdamW) of the default model on random
  toy-corpus batches of 64, padded as one batch or cut into micro-batches by length
  (tok.split_by_length, as train.py does): seconds, the fraction of padded positions, and
  real-token GFLOP/s (6 * params * tokens + attention, real tokens only) as a fraction of
  the matmul peak at the same thread count
- gen_tokens_per_s_cache / _nocache: batched sampling, batch 32, 128 new tokens, and their
  ratio (the KV cache turns each step from O(T) tokens of work into O(1)), at the thread
  count train.py gives each worker process
- host_syncs: how often the host reads a tensor as a Python value (.item(), .tolist(), bool(), ...),
  each a synchronisation on a GPU, per SFT step, PPO rollout, PPO update and generated token
- peak_rss_mb: this process's peak resident memory; with --pipeline also the peaks summed over
  the pipeline's processes (its workers included), resident (rss: a page that several
  processes share, such as torch's library code, counted in each) and proportional (pss:
  a shared page split among them, so the sum is what they hold together), and each
  process's part of each peak
"""

import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

import torch

import data
import tokenizer as tok
from config import PRESETS, Config
from model import GPT, GPTConfig
from sft import sft_example, sft_loss
from machinery.workers import processes

flags = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
cfg = Config(**{k: v for k, v in PRESETS[flags.get("preset", "default")].items() if k in Config.__dataclass_fields__})
device = flags.get("device", "cuda" if torch.cuda.is_available() else "cpu")
jobs, threads, job_threads = processes(cfg, device)
out = {"device": device, "preset": flags.get("preset", "default"), "threads": threads, "threads_per_job": job_threads,
       "jobs": jobs}


def timeit(f, reps):
    f()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        f()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


# The matmul peak: the most a step could do on this machine.
for n_threads, name in ((1, "1_thread"), (threads, "all_threads")):
    torch.set_num_threads(n_threads)
    a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
    out[f"matmul_gflops_{name}"] = 2 * 2048 ** 3 / timeit(lambda: a @ b, 5) / 1e9

# SFT steps on random toy-corpus batches, padded whole or cut into micro-batches by length.
rng = random.Random(0)
corpus = [(p, data.noisy_response(p, rng)) for p in (data.sample_prompt(rng) for _ in range(3000))]
chat = tok.Chat(tok.build_encoding(tok.train_bpe([p + " " + r for p, r in corpus], cfg.vocab_size)),
                cfg.block_size, cfg.max_new_tokens)
examples = [sft_example(chat, p, r) for p, r in corpus]
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=chat.enc.n_vocab, block_size=cfg.block_size, n_layer=cfg.n_layer,
                      n_head=cfg.n_head, n_embd=cfg.n_embd)).to(device)
opt = model.configure_optimizers(cfg.weight_decay, 1e-4)
out["params_M"] = model.num_params() / 1e6


def sft_batches(n=10, seed=0):
    g = random.Random(seed)
    return [[examples[i] for i in g.sample(range(len(examples)), 64)] for _ in range(n)]


def step(batch, split):
    """One SFT step as train.py takes it (split into micro-batches by length), or padded whole."""
    loss, real, padded = sft_loss(model, batch, chat.pad, device, max_parts=4 if split else 1)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return real + padded


for n_threads, name in ((1, "1_thread"), (threads, "all_threads")):
    torch.set_num_threads(n_threads)
    batches = sft_batches(max(2, int(flags.get("steps", 10))))  # the first is a warm-up
    real = sum(len(x) for b in batches for x, _ in b) / len(batches)  # real tokens per batch
    for split in (False, True):
        positions = sum(step(b, split) for b in batches) / len(batches)
        it = iter(batches * 2)
        dt = timeit(lambda: step(next(it), split), len(batches) - 1)
        T = positions / 64  # mean padded length, for the attention term
        flops = real * (6 * model.num_params() + 12 * cfg.n_layer * cfg.n_embd * T)  # attention: 6 * 2 * L * C * T
        out[f"sft_step_{'split' if split else 'padded'}_{name}"] = {
            "s": dt, "real_tokens_per_s": real / dt, "pad_fraction": 1 - real / positions, "real_gflops": flops / dt / 1e9,
            "of_matmul_peak": flops / dt / 1e9 / out[f"matmul_gflops_{name}"]}

# Generation with and without the KV cache (eot = -1 never matches: all 128 tokens are made),
# at the threads of a worker, where PPO and evaluation sample
torch.set_num_threads(job_threads)
model.eval()
prompts = [[1 + (i % 7)] * (4 + i % 9) for i in range(32)]  # different lengths: left padding
for use_cache in (True, False) if "steps" not in flags else (True,):  # --steps: the cache's speed-up is not measured
    dt = timeit(lambda: model.generate(prompts, 128, eot=-1, pad=chat.pad, temperature=1.0,
                                       use_cache=use_cache), 2)
    out[f"gen_tokens_per_s_{'cache' if use_cache else 'nocache'}"] = 32 * 128 / dt
if "gen_tokens_per_s_nocache" in out:
    out["cache_speedup"] = out["gen_tokens_per_s_cache"] / out["gen_tokens_per_s_nocache"]


def memory_mb(pid):
    """{process id: (resident, proportional) memory in MiB} of pid and all its descendants,
    from /proc (those gone before they are read left out). Resident memory counts the pages
    a process shares with others (torch's library code) in each of them; proportional memory
    (Pss) splits each shared page among the processes that map it, so its sum over the
    processes is what they hold together."""
    children, sizes = {}, {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            children.setdefault(int(stat[1]), []).append(int(p))
        except OSError:
            continue
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            kb = dict(line.split()[:2] for line in open(f"/proc/{p}/smaps_rollup") if line.startswith(("Rss", "Pss:")))
            sizes[p] = int(kb["Rss:"]) / 1024, int(kb["Pss:"]) / 1024
        except (OSError, KeyError):
            pass
    return sizes



class CountSyncs:
    """Counts the project's reads of a tensor as a Python value (.item(), .tolist(), bool(), ...):
    on a GPU each makes the host wait for the device; on the CPU they are free, but their number
    is the same. Reads inside torch itself (AdamW's step counts, which stay on the CPU) are not
    counted: they are not the project's to cut."""
    NAMES = ["item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy"]

    def __enter__(self):
        self.n, self.saved = 0, {k: getattr(torch.Tensor, k) for k in self.NAMES}

        def counted(f):
            def call(t, *a, **kw):
                self.n += not sys._getframe(1).f_globals.get("__name__", "").startswith("torch")
                return f(t, *a, **kw)
            return call
        for k, f in self.saved.items():
            setattr(torch.Tensor, k, counted(f))
        return self

    def __exit__(self, *exc):
        for k, f in self.saved.items():
            setattr(torch.Tensor, k, f)


# Host syncs per step of the loops a GPU run spends its time in (issue: the host out of the hot
# loops): an SFT step, a PPO rollout of 64 responses and its update (2 epochs of 4 minibatches),
# and generation per new token.
import ppo  # noqa: E402
from machinery.batching import ByLength, micro_batched  # noqa: E402

syncs = {}
with CountSyncs() as c:
    step(sft_batches(1)[0], True)
syncs["sft_step"] = c.n
agent = ppo.ActorCritic(model).eval()
ref = ByLength(ppo.ActorCritic(GPT(model.config), critic=False)).eval()
pc, rng = ppo.PPOConfig(), random.Random(0)
batch_prompts = [chat.prompt(data.sample_prompt(rng)) for _ in range(pc.rollout_batch)]
with CountSyncs() as c:
    b = ppo.rollout(agent, ByLength(agent), ref, micro_batched(lambda i, r, m: m.float()), batch_prompts,
                    torch.Generator().manual_seed(0), pc, chat.eot, chat.pad, cfg.max_new_tokens)
syncs["ppo_rollout"] = c.n
rewards = ppo.kl_penalty_rewards(b["logp"], b["ref_logp"], b["resp_mask"], pc.beta) + b["task_rewards"]
advantages, b["returns"] = ppo.compute_gae(rewards, b["values"], b["resp_mask"], pc.gamma, pc.lam)
b["advantages"] = ppo.whiten(advantages, b["resp_mask"])
with CountSyncs() as c:
    ppo.update(ByLength(agent), ppo.make_optimizer(agent, pc), b, pc, torch.Generator().manual_seed(0))
syncs["ppo_update"] = c.n
with CountSyncs() as c:
    idx, _, _ = model.generate(prompts, 64, eot=-1, pad=chat.pad)
syncs["generate_per_token"] = c.n / 64
out["host_syncs"] = syncs

out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

# Optionally: the whole pipeline of a preset, wall-clock per stage and per PPO part (from its results.json)
if "pipeline" in flags:
    preset = flags["pipeline"]
    with tempfile.TemporaryDirectory() as d:
        t0, peak = time.time(), [{}, {}]  # the moments of the largest resident and proportional sums
        proc = subprocess.Popen([sys.executable, "train.py", f"--preset={preset}", f"--out={d}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        while proc.poll() is None:
            now = memory_mb(proc.pid)
            peak = [max(peak[i], now, key=lambda sizes: sum(v[i] for v in sizes.values())) for i in (0, 1)]
            time.sleep(0.5)
        assert proc.returncode == 0, f"train.py --preset={preset} failed"
        res = json.load(open(os.path.join(d, "results.json")))
        run = {"wall_s": time.time() - t0}
        for i, kind in enumerate(("rss", "pss")):  # each peak's sum, and where it was: the main process,
            sizes = {p: v[i] for p, v in peak[i].items()}  # then the others (workers), largest first
            run[f"peak_{kind}_mb_all_processes"] = sum(sizes.values())
            run[f"peak_{kind}_mb_by_process"] = [sizes.pop(proc.pid, 0.0)] + sorted(sizes.values(), reverse=True)
        out[f"pipeline_{preset}"] = {**run,
                                     **res["processes"], **res["timing_s"],
                                     "sft": json.load(open(os.path.join(d, "sft", "metrics.json"))),
                                     "reward_models": res["reward_models"],
                                     "win_rates": {m: r.get("win_rate") for m, r in res["methods"].items()}}

print(json.dumps(out, indent=2))
