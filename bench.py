"""
Speed and memory figures, printed as JSON (never asserted in tests: machines are noisy).

    python bench.py                      # model figures at the default config
    python bench.py --pipeline=tiny      # also time the whole pipeline of a preset, per stage

- train_tokens_per_s: SFT-style forward + backward + AdamW step, batch 64 x 96 tokens
- gen_tokens_per_s_cache / _nocache: batched sampling, batch 32, 128 new tokens, and their
  ratio (the KV cache turns each step from O(T) tokens of work into O(1))
- peak_rss_mb: the process's peak resident memory
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

from model import GPT, GPTConfig
from config import Config

cfg = Config()
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=cfg.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                      n_head=cfg.n_head, n_embd=cfg.n_embd)).to(device)
out = {"device": device, "threads": torch.get_num_threads(), "params_M": model.num_params() / 1e6}


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


# Training throughput
B, T = 64, 96
x = torch.randint(0, cfg.vocab_size - 4, (B, T), device=device)
opt = model.configure_optimizers(0.1, 1e-3)


def train_step():
    _, loss = model(x, x)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


out["train_tokens_per_s"] = B * T / timeit(train_step, 10)

# Generation with and without the KV cache (eot = -1 never matches: all 128 tokens are made)
model.eval()
prompts = [[1 + (i % 7)] * (4 + i % 9) for i in range(32)]  # different lengths: left padding
for use_cache in (True, False):
    dt = timeit(lambda: model.generate(prompts, 128, eot=-1, pad=cfg.vocab_size - 1, temperature=1.0,
                                       use_cache=use_cache), 2)
    out[f"gen_tokens_per_s_{'cache' if use_cache else 'nocache'}"] = 32 * 128 / dt
out["cache_speedup"] = out["gen_tokens_per_s_cache"] / out["gen_tokens_per_s_nocache"]
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

# Optionally: the whole pipeline of a preset, wall-clock per stage (from its results.json)
for a in sys.argv[1:]:
    if a.startswith("--pipeline="):
        preset = a.split("=", 1)[1]
        with tempfile.TemporaryDirectory() as d:
            t0 = time.time()
            subprocess.run([sys.executable, "train.py", f"--preset={preset}", f"--out={d}"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           cwd=os.path.dirname(os.path.abspath(__file__)))
            out[f"pipeline_{preset}_s"] = time.time() - t0
            out[f"pipeline_{preset}_stages_s"] = json.load(open(os.path.join(d, "results.json")))["timing_s"]

print(json.dumps(out, indent=2))
