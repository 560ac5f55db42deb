"""
Evaluation and report: how good a policy is, how good a reward model is, and the files a
reader looks at.

- Win rate against the SFT model: each policy sample is compared with K fixed SFT samples
  of the same prompt under the world's judge (win 1, tie 0.5, loss 0), on an evaluation
  set drawn with its own seed; 95% CIs by a bootstrap over seeds and then prompts, paired
  when two methods are compared on the same seeds and prompts.
- Reward-model diagnostics: held-out pairwise accuracy, and with a gold judge the
  fact-flip accuracy (a correct answer against the same answer with one value changed),
  Spearman against the judge, and the token RM's bad-class recall per error type.
- The report: results.json, results.md, ppo_diagnostics.png, learning_curves.png,
  token_rewards.html; for sweeps sweep.json and headline.png.
- The classroom labs' figures, from finished run folders: proxy reward against the gold
  judge over PPO iterations (reward hacking), and fine-grained PPO's gain over PPO against
  the annotator's miss rate (annotator noise).
Run as stage 5 of `python train.py`; the labs as

    python evaluation.py reward_hacking runs/frontier     # -> runs/frontier/reward_hacking.png
    python evaluation.py annotator_noise runs/noise       # -> runs/noise/annotator_noise.png

and the fair comparison's tables across run folders (README: A fair comparison) as

    python evaluation.py frontier runs/frontier runs/frontier_ppo   # win rate against KL, matched-KL pairs
    python evaluation.py compare runs/abl_centre:fg_ppo runs/fair:fg_ppo   # two runs, paired
"""

import argparse
import copy
import glob
import html
import itertools
import json
import os
import random
import sys
import time

import torch

import data
import diff_labels
import reward
from model import load_gpt, token_logprobs

# -----------------------------------------------------------------------------
# Statistics


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


def pooled(wins):
    """(mean, 95% CI) of per-seed lists of per-prompt values (S seeds, P prompts): a win rate."""
    return sum(map(sum, wins)) / sum(map(len, wins)), bootstrap_ci(wins)


def paired(wins_a, wins_b):
    """pooled() of a - b, prompt by prompt within each seed: the same seeds and prompts, in order."""
    return pooled([[x - y for x, y in zip(u, v)] for u, v in zip(wins_a, wins_b)])


def prf(pred, gold, k):
    """Precision, recall and F1 of class k."""
    tp = ((pred == k) & (gold == k)).sum().item()
    p = tp / max((pred == k).sum().item(), 1)
    r = tp / max((gold == k).sum().item(), 1)
    return {"precision": p, "recall": r, "f1": 2 * p * r / max(p + r, 1e-12)}


def spearman(x, y):
    """Spearman's rank correlation, ties given their average rank."""
    def ranks(v):
        v = torch.as_tensor(v, dtype=torch.float64)
        order = v.argsort()
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for u in v.unique():  # average the ranks of ties
            r[v == u] = r[v == u].mean()
        return r
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return (rx * ry).sum().item() / max((rx.norm() * ry.norm()).item(), 1e-12)


# -----------------------------------------------------------------------------
# Win rate against the SFT model

EVAL_BATCH = 256  # prompts sampled at once: small models are overhead-bound, so a big batch is faster

def eval_set(path, world, chat, sft_path, cfg, device):
    """Evaluation prompts (their own seed) with K judged SFT reference samples each; cached at path."""
    if os.path.exists(path):
        return json.load(open(path))
    rng = random.Random(cfg.seed + 1000)
    prompts = [world.eval_prompt(rng) for _ in range(cfg.n_eval)]
    sft = load_gpt(sft_path, device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1000)
    refs = [chat.sample(sft, prompts, gen, batch=EVAL_BATCH) for _ in range(cfg.k_ref)]
    out = {"prompts": prompts, "refs": refs, "ref_scores": [world.scores(prompts, rs) for rs in refs]}
    data.write_json(out, path)
    return out


def evaluate(model, ev, world, chat, seed, n=None):
    """Per-prompt win values against the K reference samples (win 1, tie 0.5, loss 0), the
    judge's error rates of the policy's samples (one per prompt, temperature 1), and the samples."""
    prompts = ev["prompts"][:n]
    gen = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    responses = chat.sample(model, prompts, gen, batch=EVAL_BATCH)
    wins = []
    for i, s in enumerate(world.scores(prompts, responses)):
        refs = [rs[i] for rs in ev["ref_scores"]]
        wins.append(sum(1.0 if s > q else 0.5 if s == q else 0.0 for q in refs) / len(refs))
    return wins, sample_stats(world, chat, prompts, responses), responses


def curve(model, ev, world, chat, cfg, unit):
    """point(x) -> the learning-curve point of model at x, a PPO or RLOO "iter" or a DPO "step"
    (unit): the win rate and judge score on the first n_curve evaluation prompts."""
    def point(x):
        wins, rates, _ = evaluate(model, ev, world, chat, cfg.seed + 2000, cfg.n_curve)
        return {unit: x, "win_rate": sum(wins) / len(wins), "judge_score": rates["judge_score"]}
    return point


def sample_stats(world, chat, prompts, responses):
    """The judge's error rates of responses, and their mean length in tokens (eot included)."""
    return {**world.rates(prompts, responses), "mean_length": sum(map(len, map(chat.response, responses))) / len(responses)}


@torch.no_grad()
def kl_to_ref(model, ref, chat, prompts, seed):
    """The KL to the reference per response on the model's own samples, sum_t log pi(y_t) -
    log pi_ref(y_t) over the response tokens (the k1 estimator of ppo.rollout), averaged over
    prompts. Sampled as evaluate samples (same seed, same batches): the evaluated responses."""
    gen, total = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed), 0.0
    for i in range(0, len(prompts), EVAL_BATCH):
        idx, resp, logp = model.generate([chat.prompt(p) for p in prompts[i:i + EVAL_BATCH]], chat.max_new_tokens,
                                         chat.eot, chat.pad, generator=gen)  # logp (B, T) of the sampled tokens
        ref_logp = token_logprobs(ref(idx, mask=(idx != chat.pad) | resp)[0], idx)  # (B, T)
        total += torch.where(resp, logp - ref_logp, 0.0).sum().item()
    return total / len(prompts)


def final_eval(path, ppo_path, sft, ev, world, chat, seed, device):
    """Win values, error rates and KL to SFT of a finished policy (PPO, RLOO or DPO: its GPT's
    weights, saved under "gpt.", on a copy of the SFT model sft) on the full evaluation set; cached at path."""
    if os.path.exists(path):
        return json.load(open(path))
    ck = torch.load(ppo_path, map_location=device, weights_only=True)
    policy = copy.deepcopy(sft).to(device)
    policy.load_state_dict({k.removeprefix("gpt."): v for k, v in ck["policy"].items() if k.startswith("gpt.")})
    t0 = time.perf_counter()
    wins, rates, responses = evaluate(policy, ev, world, chat, seed)
    out = {"wins": wins, "rates": rates, "kl_eval": kl_to_ref(policy, sft, chat, ev["prompts"], seed),
           "log": ck["log"], "curve": ck["curve"], "examples": responses[:8],
           "t_curve0": ck.get("t_curve0", 0.0), "t_warmup": ck.get("t_warmup", 0.0),
           "warmup_explained_var": ck.get("warmup_explained_var", []), "t_final_eval": time.perf_counter() - t0}
    data.write_json(out, path)
    return out


# -----------------------------------------------------------------------------
# Reward-model diagnostics

def fact_flips(n, seed):
    """(prompt, correct answer, the same answer with one fact's value changed, the third of
    the answer the changed fact sits in: 0, 1, 2, or None for a one-fact answer) tuples."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        p = data.sample_prompt(rng)
        e, attrs = data.parse_prompt(p)
        a = rng.choice(attrs)
        wrong = rng.choice([v for v in data.VALUES[a] if v != data.KB[e][a]])
        good = data.ideal_response(p)
        out.append((p, good, good.replace(data.FACT[a].format(e=e, v=data.KB[e][a]), data.FACT[a].format(e=e, v=wrong)),
                    3 * attrs.index(a) // len(attrs) if len(attrs) > 1 else None))
    return out


def error_types(enc, record, labels):
    """For each bad-labelled token of a rejected response: the judge's category of the
    sentence it sits in, or "missing" for an insertion point (a bad label on a kept token)."""
    deleted, _ = reward.label_pair(enc, record["rejected"], record["edited"], "paper")
    text, offsets = enc.decode_with_offsets(enc.encode_ordinary(record["rejected"]))
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


@torch.no_grad()
def token_metrics(trm, chat, val, scheme, gold, device, batch=32):
    """Held-out per-class precision/recall/F1 of the token RM; with a gold judge also the
    bad-class recall by error type (which errors the RM catches)."""
    vex = reward.rm_examples(chat, val, scheme)
    pred, true, by_type = [], [], {}
    for i in range(0, len(vex), batch):
        idx, real, cls = reward.token_batch(chat, [x for pair in vex[i:i + batch] for x in pair], device)
        p = trm(idx, real).argmax(-1)  # (B, T), rows 2k (rejected) and 2k+1 (edited) of pair i+k
        pred.append(p[cls != -1])
        true.append(cls[cls != -1])
        for k, r in enumerate(val[i:i + batch] if gold else []):  # the rejected responses
            labels, _ = reward.label_pair(chat.enc, r["rejected"], r["edited"], scheme)
            for t, h in zip(error_types(chat.enc, r, labels), p[2 * k][cls[2 * k] != -1].tolist()):
                if t is not None:
                    by_type.setdefault(t, []).append(h == 0)
    pred, true = torch.cat(pred), torch.cat(true)
    names = ["bad", "neutral", "good"] if scheme == "paper" else ["bad", "rest"]
    out = {"scheme": scheme, **{f"{n}_{k}": v for c, n in enumerate(names) for k, v in prf(pred, true, c).items()}}
    if gold:
        out["bad_recall_by_type"] = {t: sum(h) / len(h) for t, h in sorted(by_type.items())}
    return out


def rm_metrics(rms, norms, samples, val, world, chat, scheme, seed, device):
    """Metrics of every RM: held-out pairwise accuracy of the scores PPO sees; with a gold
    judge also fact-flip accuracy and Spearman against the judge on the SFT samples."""
    vp = [r["prompt"] for r in val]
    flips = fact_flips(300, seed + 7) if world.gold else []
    gold_sft = world.scores(samples["prompts"], samples["responses"]) if world.gold else None
    metrics = {}
    for name, rm in rms.items():
        def score(prompts, texts):  # what PPO sees, one number per response
            return reward.centred_scores(rm, norms[name], chat, prompts, texts, device)
        hi = score(vp, [r["chosen"] for r in val])
        lo = score(vp, [r["rejected"] for r in val])
        m = metrics[name] = {"pairwise_acc": sum(h > l for h, l in zip(hi, lo)) / len(val)}
        if world.gold:
            ok = [g > b for g, b in zip(score([f[0] for f in flips], [f[1] for f in flips]),
                                        score([f[0] for f in flips], [f[2] for f in flips]))]
            m["fact_flip_acc"] = sum(ok) / len(flips)
            for k, part in enumerate(("first", "middle", "last")):  # of a long answer: is an early fact weaker?
                hits = [h for h, f in zip(ok, flips) if f[3] == k]
                m[f"fact_flip_acc_{part}"] = sum(hits) / max(len(hits), 1)
            m["spearman_vs_judge"] = spearman(score(samples["prompts"], samples["responses"]), gold_sft)
    if "seq_edits" in rms:
        e = reward.response_scores(rms["seq_edits"], chat, vp, [r["edited"] for r in val], device)
        r = reward.response_scores(rms["seq_edits"], chat, vp, [r["rejected"] for r in val], device)
        metrics["seq_edits"]["pairwise_acc_edited_vs_rejected"] = sum(a > b for a, b in zip(e, r)) / len(val)
    if "token" in rms:
        metrics["token"].update(token_metrics(rms["token"], chat, val, scheme, world.gold, device))
    return metrics


# -----------------------------------------------------------------------------
# The report

PAIRED = [("fg_ppo", "ppo"), ("rloo_fg", "rloo"), ("dpo_edits", "dpo")]  # the paired differences reported


def mean(xs):
    return sum(xs) / len(xs)


def log_mean(res, key, rows):
    """The mean over seeds of the mean of key over rows (a slice) of each run's log; None where
    the log has no key (RLOO has no critic to explain anything, DPO has no rollouts)."""
    if not all(key in r["log"][-1] for r in res):
        return None
    return mean([mean([x[key] for x in r["log"][rows]]) for r in res])


def results(config, seeds, methods, evals, world, chat, ev, rm_metrics_by_seed, timing):
    """The results.json dict; evals[method] is the list of final_eval outputs, one per seed;
    timing the wall-clock seconds of each stage in this invocation."""
    sft_rates = sample_stats(world, chat, ev["prompts"], ev["refs"][0])
    out = {"config": config, "seeds": seeds, "methods": {"sft": sft_rates}}
    for m in methods:
        res = evals[m]
        wins = [r["wins"] for r in res]
        rates = {k: sum(r["rates"][k] for r in res) / len(seeds) for k in sft_rates}
        kl_eval = mean([r["kl_eval"] for r in res]) if all("kl_eval" in r for r in res) else None  # older caches: none
        kl = log_mean(res, "kl", slice(-5, None))
        win_rate, ci = pooled(wins)
        out["methods"][m] = {"win_rate": win_rate, "win_rate_ci95": ci, **rates,
                             # KL to SFT per response on the policy's own samples: the last 5 rollouts of
                             # training, or for DPO (no rollouts) its evaluation samples (kl_eval)
                             "kl": kl if kl is not None else kl_eval,
                             "kl_eval": kl_eval,  # every method: on the evaluation samples of the final policy
                             # does the critic learn? 1 - Var(returns - V) / Var(returns), early and late
                             "explained_var_early": log_mean(res, "explained_var", slice(None, 10)),
                             "explained_var": log_mean(res, "explained_var", slice(-10, None)),
                             "per_seed": [{"seed": s, "win_rate": sum(w) / len(w), **r["rates"]}
                                          for s, w, r in zip(seeds, wins, res)]}
    for a, b in PAIRED:  # paired: same seeds, same prompts
        if a in methods and b in methods:
            d, ci = paired([r["wins"] for r in evals[a]], [r["wins"] for r in evals[b]])
            out[f"{a}_minus_{b}"] = {"win_rate": d, "ci95": ci}
    out["reward_models"] = rm_metrics_by_seed
    out["timing_s"] = {"stages": timing, "ppo_parts": time_split(evals)}
    return out


PARTS = ["t_sample", "t_policy", "t_ref", "t_reward", "t_update", "t_curve"]  # the log's seconds per part


def time_split(evals):
    """Where each method's PPO runs spent their time, in seconds summed over iterations and
    seeds: sampling, the policy / reference / reward forwards, the update, the learning-curve
    points, the critic's warm-up and the final evaluation."""
    out = {}
    for m, res in evals.items():
        split = {p[2:]: sum(row.get(p, 0.0) for r in res for row in r["log"]) for p in PARTS}  # DPO: update, curve
        split["curve"] += sum(r["t_curve0"] for r in res)  # the first point, before iteration 1
        split["critic_warmup"] = sum(r["t_warmup"] for r in res)
        split["final_eval"] = sum(r["t_final_eval"] for r in res)
        out[m] = split
    return out


def number(x, digits=2):
    """x to digits decimals, or "-" for None (a figure a method does not have)."""
    return "-" if x is None else f"{x:.{digits}f}"


def results_md(out, methods, world, n_eval, k_ref):
    cols = [c for c in ("wrong", "missing", "rude", "off_topic", "unparseable", "repeated", "unrequested")
            if c in out["methods"]["sft"]]  # error rates exist only with a gold judge

    def row(cells):
        return "| " + " | ".join(cells) + " |"
    lines = [f"# Results ({len(out['seeds'])} seed(s), {n_eval} evaluation prompts, "
             f"K={k_ref} SFT reference samples each)", "",
             row(["method", "win rate vs SFT [95% CI]", "judge score", "KL", "KL eval", "length", "expl. var"] + cols),
             row(["---"] * (7 + len(cols)))]
    sft = out["methods"]["sft"]
    lines.append(row(["sft", "0.5 (by definition)", f"{sft['judge_score']:.2f}", "0", "0", f"{sft['mean_length']:.1f}", ""]
                     + [f"{sft[c]:.3f}" for c in cols]))
    for m in methods:
        r = out["methods"][m]
        lo, hi = r["win_rate_ci95"]
        lines.append(row([m, f"{r['win_rate']:.3f} [{lo:.3f}, {hi:.3f}]", f"{r['judge_score']:.2f}", number(r["kl"]),
                          number(r["kl_eval"]), f"{r['mean_length']:.1f}", number(r["explained_var"])]
                         + [f"{r[c]:.3f}" for c in cols]))
    for a, b in PAIRED:
        if (d := out.get(f"{a}_minus_{b}")) is not None:
            lines += ["", f"{a} - {b} win rate: {d['win_rate']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] (paired)"]
    if "wrong_first" in sft:
        lines += ["", "Wrong facts by position in the all-facts answers (first / middle / last third of the sentences):"]
        lines += [f"- {m}: " + " / ".join(f"{out['methods'][m][f'wrong_{k}']:.3f}" for k in ("first", "middle", "last"))
                  for m in ["sft"] + methods]
    flips = {n: m for n, m in next(iter(out["reward_models"].values()), {}).items() if "fact_flip_acc_first" in m}
    if flips:
        lines += ["", "Fact-flip accuracy of each reward model by the flipped fact's third (first seed):"]
        lines += [f"- {n}: " + " / ".join(f"{m[f'fact_flip_acc_{k}']:.2f}" for k in ("first", "middle", "last"))
                  for n, m in flips.items()]
    lines += ["", "KL = summed per-token KL to the SFT reference per response, last 5 PPO / RLOO iterations (DPO, which",
              "has no rollouts: KL eval); KL eval = the same on the final policy's evaluation samples; length = response",
              "tokens of the evaluation samples (eot included); expl. var = the critic's explained variance of the",
              "returns, last 10 iterations (- : no critic)."]
    return "\n".join(lines + world.notes()) + "\n"


def report(cfg, world, chat, config, seeds, methods, timing, processes, device):
    """Stage 5 of the pipeline: each finished policy evaluated (final_eval), then results.json
    (with the processes it ran with), results.md, the plots and the token-reward HTML, in cfg.out."""
    sft_path = os.path.join(cfg.out, "sft", "model.pt")
    ev = eval_set(os.path.join(cfg.out, "eval", "refs.json"), world, chat, sft_path, cfg, device)
    sft = load_gpt(sft_path, device)
    evals = {m: [final_eval(os.path.join(cfg.out, "ppo", f"{m}_seed{s}.eval.json"),
                            os.path.join(cfg.out, "ppo", f"{m}_seed{s}.pt"), sft, ev, world, chat, cfg.seed + 2000,
                            device) for s in seeds] for m in methods}
    rm_metrics = {f"seed{s}": json.load(open(p)) for s in seeds  # none when only oracle methods ran
                  if os.path.exists(p := os.path.join(cfg.out, "rm", f"seed{s}", "metrics.json"))}
    out = results(config, seeds, methods, evals, world, chat, ev, rm_metrics, timing)
    out["processes"] = processes
    data.write_json(out, os.path.join(cfg.out, "results.json"))
    md = results_md(out, methods, world, cfg.n_eval, cfg.k_ref)
    with open(os.path.join(cfg.out, "results.md"), "w") as f:
        f.write(md)
    plot_curves(cfg.out, evals, methods, cfg.n_curve)
    token_rm = os.path.join(cfg.out, "rm", f"seed{seeds[0]}", "token.pt")
    if os.path.exists(token_rm):
        samples = json.load(open(os.path.join(cfg.out, "sft", "samples.json")))
        token_rewards_html(os.path.join(cfg.out, "token_rewards.html"), reward.load_rm(token_rm, device)[0],
                           samples, world, chat, device)
    print(md)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(out_dir, evals, methods, n_curve):
    """ppo_diagnostics.png (the first seed's PPO statistics per iteration) and
    learning_curves.png (win rate and judge score during training, mean over seeds)."""
    plt = _pyplot()
    keys = ["reward", "kl", "clipfrac", "entropy", "explained_var", "length"]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, k in zip(axes.flat, keys):
        for i, m in enumerate(methods):
            log = [r for r in evals[m][0]["log"] if k in r and "iter" in r]  # RLOO has no critic, DPO no rollouts
            ax.plot([r["iter"] for r in log], [r[k] for r in log], color=f"C{i}", label=m)
        ax.set_title(k)
        ax.set_xlabel("iteration")
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "ppo_diagnostics.png"), dpi=80)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    dpo_axes = [ax.twiny() for ax in axes] if any("step" in evals[m][0]["curve"][0] for m in methods) else []
    for ax, top, k in zip(axes, dpo_axes or [None, None], ["win_rate", "judge_score"]):
        for i, m in enumerate(methods):
            curves = [r["curve"] for r in evals[m]]
            ys = [sum(c[j][k] for c in curves) / len(curves) for j in range(len(curves[0]))]
            unit = "iter" if "iter" in curves[0][0] else "step"  # DPO: against its steps, on the top axis, dashed
            (ax if unit == "iter" else top).plot([p[unit] for p in curves[0]], ys, marker="o", color=f"C{i}",
                                                 linestyle="-" if unit == "iter" else "--", label=m)
        ax.set_title(f"{k} ({n_curve} prompts, mean over seeds)")
        ax.set_xlabel("PPO / RLOO iteration")
        if top is not None:
            top.set_xlabel("DPO step (dashed)")
    axes[0].legend(handles=axes[0].get_lines() + (dpo_axes[0].get_lines() if dpo_axes else []))
    axes[0].axhline(0.5, color="grey", lw=0.5)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "learning_curves.png"), dpi=80)
    plt.close("all")


@torch.no_grad()
def token_rewards_html(path, rm, samples, world, chat, device, n=8):
    """SFT samples with each token coloured by the token RM's reward, beside the gold labels."""
    rows = []
    for p, r in list(zip(samples["prompts"], samples["responses"]))[:n]:
        idx, real = chat.batch([p], [r], device)
        resp = chat.response_mask(idx, real)
        ids = idx[0][resp[0]].tolist()
        rewards = rm.token_rewards(idx, real, resp)[0][resp[0]].tolist()
        toks = [chat.enc.decode([t]) for t in ids]
        rows.append(f"<h4>{html.escape(p)} (judge {world.scores([p], [r])[0]:+.1f})</h4>"
                    f"<p>token RM: {diff_labels.render(toks, rewards, html=True)}</p>")
        if world.gold:  # the gold labels need the annotator
            gold, _ = reward.label_pair(chat.enc, ids, data.annotate(p, r), "bad_vs_rest")
            rows.append(f"<p>gold labels: {diff_labels.render(toks, gold, html=True)}</p>")
    with open(path, "w") as f:
        f.write("<html><body><h3>Token RM rewards on SFT samples (red = bad)</h3>" + "".join(rows) + "</body></html>")


def sweep_report(out_dir, sweep, runs):
    """sweep.json and sweep.md of a grid: per point and method the win rate with its CI, KL,
    length and explained variance, and each method's best point by win rate (the tuning
    protocol's choice); for a one-key grid also headline.png (plot_sweep). runs[point] is
    that point's results.json."""
    methods = [m for m in next(iter(runs.values()))["methods"] if m != "sft"]
    keys = ("win_rate", "win_rate_ci95", "kl", "mean_length", "explained_var", "wrong")
    table = {m: {n: {k: r["methods"][m].get(k) for k in keys} for n, r in runs.items()} for m in methods}
    best = {m: max(pts, key=lambda n: pts[n]["win_rate"]) for m, pts in table.items()}
    data.write_json({"sweep": sweep, "points": list(runs), "methods": table, "best": best},
                    os.path.join(out_dir, "sweep.json"))
    lines = [f"# Sweep {sweep}", "", "| point | method | win rate vs SFT [95% CI] | KL | length | expl. var |",
             "| --- | --- | --- | --- | --- | --- |"]
    for n in runs:
        for m in methods:
            r = table[m][n]
            lines.append(f"| {n} | {m} | {r['win_rate']:.3f} [{r['win_rate_ci95'][0]:.3f}, {r['win_rate_ci95'][1]:.3f}]"
                         f"{' (best)' if best[m] == n else ''} | {number(r['kl'])} | {r['mean_length']:.1f} | "
                         f"{number(r['explained_var'])} |")
    with open(os.path.join(out_dir, "sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if len(sweep.split()) == 1:
        key = sweep.split(":")[0]
        plot_sweep(os.path.join(out_dir, "headline.png"), key, [n.split("=", 1)[1] for n in runs],
                   {n.split("=", 1)[1]: r for n, r in runs.items()})
    print("sweep: best point per method: " + " | ".join(f"{m} {n} ({table[m][n]['win_rate']:.3f})"
                                                      for m, n in best.items()))


def plot_sweep(path, key, values, runs):
    """headline.png: win rate against SFT and wrong-fact rate per method against the swept
    value, and the win-rate / KL frontier. runs[value] is that run's results.json."""
    plt = _pyplot()
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
        axes[2].errorbar([rs[i]["kl"] for i in kl_order], [wr[i] for i in kl_order], marker="o", capsize=3, label=m,
                         yerr=[[err[0][i] for i in kl_order], [err[1][i] for i in kl_order]])
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
    fig.savefig(path, dpi=80)
    plt.close("all")


# -----------------------------------------------------------------------------
# The classroom labs, from finished run folders (README: Classroom kit)

def run_points(folder):
    """{point name: its run folder} of a --sweep folder (its sweep.json), or {name: folder}
    of a single run's folder."""
    if os.path.exists(p := os.path.join(folder, "sweep.json")):
        return {n: os.path.join(folder, n) for n in json.load(open(p))["points"]}
    return {os.path.basename(os.path.normpath(folder)): folder}


def proxy_and_gold(run_dir):
    """{method: {"iter", "proxy", "curve_iter", "gold"}} of one run folder, from the PPO
    runs' log and curve, a row per seed, cut to the shortest seed.
    Read from each run's final evaluation (ppo/*.eval.json), or its checkpoint (*.pt) if unfinished.
    - proxy: the reward PPO maximises (besides the KL penalty), per iteration: the rollout's
      mean summed task reward (log "reward"), already standardised on SFT samples by
      reward.fit_norm (0: an average SFT answer, 1: one SFT standard deviation better);
    - gold: the judge's mean score of the learning curve's samples (curve "judge_score", on
      the first n_curve evaluation prompts), standardised the same way: minus the mean and
      over the std of the judge scores of the K SFT reference samples of those same prompts
      (eval/refs.json). The same prompts, so the prompt mix cancels and the SFT model sits
      at 0 on both scales (sft/metrics.json holds only a mean, of other prompts)."""
    n_curve = json.load(open(os.path.join(run_dir, "config.json")))["n_curve"]
    ref = json.load(open(os.path.join(run_dir, "eval", "refs.json")))
    sft = torch.tensor([s[:n_curve] for s in ref["ref_scores"]], dtype=torch.float64)  # (K, n_curve)
    mu, sd = sft.mean().item(), sft.std().item()
    out = {}
    ppo_dir = os.path.join(run_dir, "ppo")
    for run in sorted({os.path.join(ppo_dir, os.path.basename(p).split(".")[0]) for p in glob.glob(ppo_dir + "/*_seed*")}):
        # a finished run's final evaluation holds the same log and curve as its checkpoint, lighter
        ck = (json.load(open(run + ".eval.json")) if os.path.exists(run + ".eval.json")
              else torch.load(run + ".pt", map_location="cpu", weights_only=True))
        if "reward" not in ck["log"][-1]:  # DPO has no rollouts, so no proxy reward per iteration
            continue
        m = out.setdefault(os.path.basename(run).rsplit("_seed", 1)[0], {"log": [], "curve": []})
        m["log"].append(ck["log"])
        m["curve"].append(ck["curve"])
    for m, c in out.items():
        n, k = min(map(len, c["log"])), min(map(len, c["curve"]))
        out[m] = {"iter": [r["iter"] for r in c["log"][0][:n]], "proxy": [[r["reward"] for r in lg[:n]] for lg in c["log"]],
                  "curve_iter": [p["iter"] for p in c["curve"][0][:k]],
                  "gold": [[(p["judge_score"] - mu) / sd for p in cv[:k]] for cv in c["curve"]]}
    return out


def over_seeds(rows):
    """The mean over seeds of per-seed series [[x per step], ...] (all of one length)."""
    return [sum(xs) / len(xs) for xs in zip(*rows)]


def plot_reward_hacking(path, folder, only=""):
    """The reward-hacking figure: a panel per run of folder (each point of a --sweep, e.g.
    each beta; only: the points whose names hold each of these space-separated strings), with each method's proxy reward (solid) and gold judge score (dashed,
    markers) over PPO iterations, both in SFT standard deviations (proxy_and_gold), mean
    over seeds. Reward hacking is where the solid line rises and the dashed one does not."""
    plt = _pyplot()
    points = {n: d for n, d in run_points(folder).items() if all(w in n for w in only.split())}
    fig, axes = plt.subplots(1, len(points), figsize=(4.6 * len(points), 3.8), sharey=True, squeeze=False)
    colours = {}
    for ax, (name, run_dir) in zip(axes[0], points.items()):
        for m, c in proxy_and_gold(run_dir).items():
            col = colours.setdefault(m, f"C{len(colours)}")
            ax.plot(c["iter"], over_seeds(c["proxy"]), color=col, lw=1, label=f"{m}: proxy (its RM)")
            ax.plot(c["curve_iter"], over_seeds(c["gold"]), color=col, ls="--", marker="o", ms=3,
                    label=f"{m}: gold (judge)")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(f"{name} ({len(c['proxy'])} seed(s))")
        ax.set_xlabel("PPO iteration")
    axes[0][0].set_ylabel("reward, in SFT standard deviations")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close("all")


def plot_annotator_noise(path, folder, only=""):
    """The annotator-noise figure of a --sweep=p_annotator_miss:... folder: left, fine-grained
    PPO's gain over PPO in win rate against SFT (fg_ppo - ppo, paired over seeds and prompts,
    95% bootstrap CI: results.json's fg_ppo_minus_ppo) against the probability that the
    annotator misses an error; right, what the noise does to the reward models: the
    fact-flip accuracy of the token and sequence RMs, mean over RM seeds."""
    plt = _pyplot()
    runs = {n: json.load(open(os.path.join(d, "results.json"))) for n, d in run_points(folder).items()
            if all(w in n for w in only.split())}
    p = {n: float(n.split("p_annotator_miss=")[1].split(",")[0]) for n in runs}
    names = sorted(runs, key=p.get)
    gain = [runs[n]["fg_ppo_minus_ppo"] for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].errorbar([p[n] for n in names], [g["win_rate"] for g in gain], marker="o", capsize=3,
                     yerr=[[g["win_rate"] - g["ci95"][0] for g in gain], [g["ci95"][1] - g["win_rate"] for g in gain]])
    axes[0].axhline(0, color="grey", lw=0.5)
    axes[0].set_title(f"fg_ppo - ppo win rate (paired 95% CI, {len(runs[names[0]]['seeds'])} seeds)")
    for rm in ("token", "seq"):
        accs = [[s[rm]["fact_flip_acc"] for s in runs[n]["reward_models"].values() if rm in s] for n in names]
        axes[1].plot([p[n] for n in names], [sum(a) / max(len(a), 1) for a in accs], marker="o", label=f"{rm} RM")
    axes[1].axhline(0.5, color="grey", lw=0.5)
    axes[1].set_title("fact-flip accuracy of the reward models")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("p_annotator_miss (each error overlooked with this probability)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close("all")


def frontier(path, folders, kl_tol=0.1):
    """The KL frontier across run folders (each a run or a --sweep folder, all sharing one
    SFT model and evaluation set): every (point, method) as win rate against SFT [95% CI] at
    its KL, plotted win rate against KL at path, and for each two points of different methods
    whose KLs differ by at most kl_tol (matched KL) the paired difference of their win rates
    over the seeds they share, prompt by prompt. Returns the printed table's lines."""
    runs = {}  # (point, method) -> (KL, {seed: wins per prompt})
    refs = set()
    for folder in folders:
        for name, d in run_points(folder).items():
            r = json.load(open(os.path.join(d, "results.json")))
            refs.add(open(os.path.join(d, "eval", "refs.json")).read())
            for m in (m for m in r["methods"] if m != "sft"):
                wins = {s: json.load(open(os.path.join(d, "ppo", f"{m}_seed{s}.eval.json")))["wins"] for s in r["seeds"]}
                runs[(f"{os.path.basename(os.path.normpath(folder))}/{name}", m)] = (r["methods"][m], wins)
    # one KL for every point: on the final policies' evaluation samples (kl_eval) where every point
    # has it, else the last rollouts' (kl; DPO, which has no rollouts, then cannot be placed)
    key = "kl_eval" if all(r.get("kl_eval") is not None for r, _ in runs.values()) else "kl"
    runs = {p: (r[key], wins) for p, (r, wins) in runs.items() if r.get(key) is not None}
    if len(refs) > 1:
        sys.exit("error: the folders do not share one evaluation set; their win rates cannot be paired")
    lines = [f"| point | method | seeds | win rate vs SFT [95% CI] | KL ({key}) |", "| --- | --- | --- | --- | --- |"]
    for (p, m), (kl, wins) in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[1][0])):
        w, ci = pooled(list(wins.values()))
        lines.append(f"| {p} | {m} | {len(wins)} | {w:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {kl:.2f} |")
    lines += ["", f"Paired differences at matched KL (|KL difference| <= {kl_tol}), over the seeds both ran:", ""]
    order = list(reward.METHODS)  # a pair reads later method - earlier one, as fg_ppo - ppo in results.json
    for (b, (kl_b, wb)), (a, (kl_a, wa)) in itertools.combinations(sorted(runs.items(), key=lambda kv: order.index(kv[0][1])), 2):
        if a[1] != b[1] and abs(kl_a - kl_b) <= kl_tol and (seeds := sorted(wa.keys() & wb.keys())):
            d, ci = paired([wa[s] for s in seeds], [wb[s] for s in seeds])
            lines.append(f"- {a[1]} {a[0]} (KL {kl_a:.2f}) - {b[1]} {b[0]} (KL {kl_b:.2f}): "
                         f"{d:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}], {len(seeds)} seeds")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, m in enumerate(dict.fromkeys(m for _, m in runs)):
        pts = sorted((kl, *pooled(list(wins.values())), p) for (p, mm), (kl, wins) in runs.items() if mm == m)
        ax.errorbar([q[0] for q in pts], [q[1] for q in pts], yerr=[[q[1] - q[2][0] for q in pts], [q[2][1] - q[1] for q in pts]],
                    marker="o", capsize=3, color=f"C{i}", label=m)
        for kl, w, _, p in pts:
            ax.annotate(p.split("/", 1)[1], (kl, w), fontsize=6, xytext=(3, -9), textcoords="offset points")
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.set_xlabel("KL to SFT per response")
    ax.set_ylabel("win rate vs SFT (95% CI)")
    ax.set_title("win rate / KL frontier")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close("all")
    print("\n".join(lines))
    return lines


def compare(a, b):
    """Two runs of one evaluation set, each "folder:method" (e.g. an ablation against the run
    it reverts a fix of), over the seeds both ran: each one's win rate against SFT [95% CI],
    KL, length, wrong and missing facts, and the paired difference a - b of their win rates,
    prompt by prompt. Returns the printed lines."""
    (da, ma), (db, mb) = (x.rsplit(":", 1) for x in (a, b))
    if open(os.path.join(da, "eval", "refs.json")).read() != open(os.path.join(db, "eval", "refs.json")).read():
        sys.exit("error: the two folders do not share one evaluation set; their win rates cannot be paired")
    seeds = sorted(set(json.load(open(os.path.join(da, "results.json")))["seeds"])
                   & set(json.load(open(os.path.join(db, "results.json")))["seeds"]))
    lines = ["| run | win rate vs SFT [95% CI] | KL | length | wrong | missing |", "| --- | --- | --- | --- | --- | --- |"]
    wins = {}
    for run, d, m in ((a, da, ma), (b, db, mb)):
        res = [json.load(open(os.path.join(d, "ppo", f"{m}_seed{s}.eval.json"))) for s in seeds]
        wins[run] = [r["wins"] for r in res]
        (w, ci), kl = pooled(wins[run]), log_mean(res, "kl", slice(-5, None))  # as results.json's kl
        kl = kl if kl is not None else mean([r["kl_eval"] for r in res]) if all("kl_eval" in r for r in res) else None
        lines.append(f"| {run} | {w:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | "
                     f"{kl if kl is not None else float('nan'):.2f} | " + " | ".join(
                         f"{mean([r['rates'][k] for r in res]):{f}}" for k, f in
                         (("mean_length", ".1f"), ("wrong", ".3f"), ("missing", ".3f"))) + " |")
    d, ci = paired(wins[a], wins[b])
    lines += ["", f"{a} - {b}: {d:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}] "
                  f"(paired, seeds {', '.join(map(str, seeds))})"]
    print("\n".join(lines))
    return lines


LABS = {"reward_hacking": plot_reward_hacking, "annotator_noise": plot_annotator_noise}

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="A classroom lab's figure from finished run folders (README: Classroom kit).")
    ap.add_argument("lab", choices=[*LABS, "frontier", "compare"])
    ap.add_argument("folder", nargs="+", help="a --sweep folder (reward_hacking also takes one run's folder; "
                                             "frontier takes several; compare two FOLDER:METHOD)")
    ap.add_argument("--out", help="where to write the figure (default: <first folder>/<lab>.png)")
    ap.add_argument("--only", default="", help='only the points whose names hold these strings, e.g. "ppo_lr=3e-5 lam=1"')
    args = ap.parse_args()
    out = args.out or os.path.join(args.folder[0], f"{args.lab}.png")
    if args.lab == "compare":
        if len(args.folder) != 2:
            ap.error("compare takes two runs, FOLDER:METHOD FOLDER:METHOD")
        compare(*args.folder)
        sys.exit()
    if args.lab == "frontier":
        frontier(out, args.folder)
    else:
        LABS[args.lab](out, args.folder[0], args.only)
    print(out)
