"""
One GPU, end to end, in one command: the figures docs/engineering.md needs from a GPU, in
OUT/summary.json. About 8 minutes on one H100; each part has a time limit, and once the budget
is spent the parts left are skipped and named as such.

    python -m machinery.gpu_check --qa=PATH/dev_feedback.json [--out=runs/gpu_check] [--budget=480]

1. gpu     `python train.py --preset=gpu`, every default method, one seed: wall time, time per
           stage and per PPO part, peak GPU memory per stage (results.json), GPU utilisation per
           stage (nvidia-smi, once a second), SFT tokens/s and PPO rollout tokens/s.
2. gpt2    a GPT-2-small-shaped checkpoint written by transformers with random weights (12
           layers, 768 wide, block 1024, a 50,257-token vocabulary: a BPE trained on QA-Feedback
           and filled up with merges of its own tokens), QA-Feedback converted, and every stage of
           docs/real-data.md's 24 GB recipe with the critic, a few steps each: peak memory per stage.
3. export  part 2's fine-grained PPO policy written as a Hugging Face directory and read by
           GPT2LMHeadModel on the GPU: its logits against ours.
4. bench   `python -m machinery.bench --preset=gpu --steps=3` on the GPU and on this machine's CPU.
5. nccl    `torchrun --nproc_per_node=2 train.py --preset=tiny` on 2 GPUs; with one GPU it is not
           run (two processes on one GPU would not test nccl), and the summary says so.

--smoke runs parts 2 and 3 at test scale on the CPU (tests/test_gpu_check.py).
"""

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import torch

import tokenizer as tok

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT2_SMALL = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab=50257)
GPT2_SMOKE = dict(n_layer=2, n_head=2, n_embd=32, n_positions=256, vocab=1200)
RECIPE = ["--block_size=1024", "--max_new_tokens=200", "--sft_lr=5e-5", "--sft_batch=8", "--rm_batch=4",
          "--rollout_batch=16", "--minibatch=4"]  # docs/real-data.md: sized to fit a 24 GB card
FEW_STEPS = ["--sft_steps=20", "--rm_steps=10", "--ppo_iters=2", "--vf_warmup=1", "--dpo_steps=2", "--n_judge=32",
             "--n_eval=32", "--k_ref=1", "--n_curve=16", "--eval_every=2"]  # memory, not learning: every stage runs
SMOKE = ["--jobs=1", "--block_size=256", "--max_new_tokens=16", "--sft_steps=4", "--sft_batch=4", "--rm_steps=2", "--rm_batch=2",
         "--rollout_batch=4", "--minibatch=2", "--ppo_iters=1", "--n_judge=8", "--n_eval=8", "--n_curve=4"]


def run(cmd, timeout, log):
    """cmd in its own process group, killed with its children after timeout seconds; its output
    in log. Returns {"rc", "wall_s", "timed_out"}."""
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            rc = p.wait()
    t1 = time.time()
    return {"cmd": " ".join(cmd), "rc": rc, "wall_s": t1 - t0, "timed_out": t1 - t0 >= timeout, "t_end": t1}


class Utilisation(threading.Thread):
    """nvidia-smi's GPU utilisation (%) and memory used (MiB), sampled once a second: [(time, %, MiB)]."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples, self.stop = [], threading.Event()

    def run(self):
        while not self.stop.wait(1.0):
            try:
                line = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                       "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout
                util, mem = (float(x) for x in line.splitlines()[0].split(","))  # the first GPU
                self.samples.append((time.time(), util, mem))
            except (OSError, ValueError, IndexError):
                return

    def mean(self, t0, t1):
        window = [u for t, u, _ in self.samples if t0 <= t <= t1]
        return sum(window) / len(window) if window else None


def throughput(run_dir):
    """SFT real tokens per second of training, and PPO rollout tokens (sampled, then read by the
    policy, critic, reference and reward) per second of rollout, of a finished run folder."""
    sft = json.load(open(os.path.join(run_dir, "sft", "metrics.json")))
    batch = json.load(open(os.path.join(run_dir, "config.json")))["rollout_batch"]
    out = {"sft_tokens_per_s": sft["real_tokens"] / sft["train_s"]}
    for path in sorted(glob.glob(os.path.join(run_dir, "policies", "*.eval.json"))):
        log = [r for r in json.load(open(path))["log"] if "t_rollout" in r]
        if log:
            name = os.path.basename(path).split(".")[0]
            out[f"rollout_tokens_per_s_{name}"] = sum(r["length"] * batch for r in log) / sum(r["t_rollout"] for r in log)
    return out


def stage_windows(timing, t_end):
    """{stage: (start, end)} of results.json's stage times, laid back to back up to t_end (the
    report, the last stage, ends as the process does)."""
    out, t = {}, t_end
    for name, s in reversed(list(timing.items())):
        out[name], t = (t - s, t), t - s
    return out


def write_gpt2(path, texts, n_layer, n_head, n_embd, n_positions, vocab, seed=0):
    """A GPT-2 directory with random weights (transformers) of the given shape, and an encoding of
    exactly vocab tokens (<|endoftext|> last): a BPE trained on texts, filled up with merges of
    two of its tokens whose bytes its merges would split into exactly those two."""
    import transformers
    ranks = tok.train_bpe(texts, min(4096, vocab - 1 + len(tok.SPECIALS)))
    ranks = {t: r for t, r in ranks.items() if r < vocab - 1}  # train_bpe's count keeps room for our specials
    made = sorted(ranks, key=lambda t: (len(t) == 1, ranks[t]))  # the merged tokens first, then the bytes
    for a in made:
        for b in made:
            if len(ranks) == vocab - 1:
                break
            if a + b not in ranks and len(tok._merge_chunk([bytes([x]) for x in a + b], ranks)) == 2:
                ranks[a + b] = len(ranks)
        if len(ranks) == vocab - 1:
            break
    tok.save_gpt2_files(ranks, path)
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                                  n_head=n_head, bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def logits_check(ckpt, hf_dir, device):
    """Max |difference| of the logits of a policy checkpoint (ours) and of its export read by
    GPT2LMHeadModel, on random token ids, fp32."""
    import transformers
    from model import GPT, GPTConfig
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))
    sft = torch.load(os.path.join(run_dir, "sft", "model.pt"), map_location=device, weights_only=True)
    ours = GPT(GPTConfig(**sft["model_args"])).to(device).eval()
    ours.load_state_dict(torch.load(ckpt, map_location=device, weights_only=True)["policy"])
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).to(device).eval()
    idx = torch.randint(0, ours.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        return (ours(idx)[0].float() - hf(idx).logits.float()).abs().max().item()


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    ap.add_argument("--qa", default="shared/data/qa_feedback/dev_feedback.json", help="QA-Feedback's dev_feedback.json")
    ap.add_argument("--out", default="runs/gpu_check")
    ap.add_argument("--budget", type=float, default=480, help="seconds; parts that would start after it are skipped")
    ap.add_argument("--smoke", action="store_true", help="parts 2 and 3 at test scale on the CPU")
    args = ap.parse_args(argv)
    out, t_start = os.path.abspath(args.out), time.time()
    os.makedirs(out, exist_ok=True)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU here; machinery.gpu_check measures one (--smoke runs at test scale on the CPU)")
    summary = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
               "gpus": torch.cuda.device_count(), "parts": {}}
    util = Utilisation()
    if device == "cuda":
        util.start()
    py = [sys.executable]

    def part(name, limit, f):
        if time.time() - t_start + 10 > args.budget:
            summary["parts"][name] = {"skipped": f"budget of {args.budget:.0f} s spent"}
        else:
            t0 = time.time()
            try:
                summary["parts"][name] = f(limit)
            except Exception as e:  # a part that fails is reported, and the others still run
                summary["parts"][name] = {"error": f"{type(e).__name__}: {e}"}
            summary["parts"][name]["gpu_util_mean_pct"] = util.mean(t0, time.time())
        json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)

    def gpu(limit):
        d = os.path.join(out, "gpu")
        r = run(py + ["train.py", "--preset=gpu", "--device=cuda", f"--out={d}"], limit, d + ".log")
        r["files"] = sorted(os.path.relpath(p, d) for p in glob.glob(os.path.join(d, "**", "*.*"), recursive=True)
                            if p.endswith((".pt", ".json")))  # how far it got, if it ran out of time
        if r["rc"] == 0:
            res = json.load(open(os.path.join(d, "results.json")))
            windows = stage_windows(res["timing_s"]["stages"], r["t_end"])
            r.update(timing_s=res["timing_s"], peak_cuda_gib=res["processes"].get("peak_cuda_gib"),
                     gpu_util_pct_by_stage={s: util.mean(*w) for s, w in windows.items()},
                     win_rates={m: x.get("win_rate") for m, x in res["methods"].items()}, **throughput(d))
        return r

    def gpt2(limit):
        import data
        qa, d = os.path.abspath(args.qa), os.path.join(out, "gpt2")
        if not os.path.exists(qa):
            return {"skipped": f"no QA-Feedback file at {qa}"}
        conv = run(py + ["examples/qa_feedback.py", "convert", qa, os.path.join(out, "qa.jsonl")], 60, d + "_convert.log")
        texts = [r[k] for r in data.read_jsonl(os.path.join(out, "qa.jsonl")) for k in data.FIELDS if k in r]
        shape = GPT2_SMOKE if args.smoke else GPT2_SMALL
        write_gpt2(os.path.join(out, "gpt2_random"), texts, **shape)
        flags = [f"--init={os.path.join(out, 'gpt2_random')}", f"--data={os.path.join(out, 'qa.jsonl')}",
                 f"--device={device}", f"--out={d}", "--methods=ppo,fg_ppo,dpo_edits"] + RECIPE + FEW_STEPS
        r = run(py + ["train.py"] + flags + (SMOKE if args.smoke else []), limit - conv["wall_s"], d + ".log")
        r.update(shape=shape, convert=conv)
        if r["rc"] == 0:
            res = json.load(open(os.path.join(d, "results.json")))
            r.update(peak_cuda_gib=res["processes"].get("peak_cuda_gib"), timing_s=res["timing_s"]["stages"])
        return r

    def export(limit):
        ckpt, hf = os.path.join(out, "gpt2", "policies", "fg_ppo_seed1337.pt"), os.path.join(out, "hf_fg_ppo")
        r = run(py + ["-m", "machinery.export", ckpt, hf], limit, hf + ".log")
        if r["rc"] == 0:
            r["max_abs_logit_diff"] = logits_check(ckpt, hf, device)
        return r

    def bench(limit):
        r = {}
        for dev in ("cuda", "cpu"):
            log = os.path.join(out, f"bench_{dev}.log")
            r[dev] = run(py + ["-m", "machinery.bench", "--preset=gpu", f"--device={dev}", "--steps=3"], limit / 2, log)
            text = open(log).read()
            r[dev]["figures"] = json.loads(text[text.index("{"):]) if r[dev]["rc"] == 0 else None
        return r

    def nccl(limit):
        if torch.cuda.device_count() < 2:
            return {"skipped": "one GPU: a 2-process run on one GPU would not test nccl"}
        return run(["torchrun", "--standalone", "--nproc_per_node=2", "train.py", "--preset=tiny", "--device=cuda",
                    f"--out={os.path.join(out, 'nccl')}"], limit, os.path.join(out, "nccl.log"))

    parts = [("gpu", 330, gpu), ("gpt2", 150, gpt2), ("export", 40, export), ("bench", 120, bench), ("nccl", 90, nccl)]
    for name, limit, f in parts:
        if not args.smoke or name in ("gpt2", "export"):
            part(name, limit, f)
    util.stop.set()
    summary["wall_s"] = time.time() - t_start
    json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
