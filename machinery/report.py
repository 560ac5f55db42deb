"""
The report of a run, stage 5 of `python train.py`: each finished policy evaluated
(evaluation.final_eval), then in the run's folder results.json (every number), results.md (the
table a reader looks at), ppo_diagnostics.png and learning_curves.png, and token_rewards.html
(SFT samples coloured by the token RM's reward beside the gold labels); for a --sweep also
sweep.json, sweep.md and headline.png.
"""

import html
import json
import os

import torch

import data
import diff_labels
import reward
from config import SHOWN_DPO, SHOWN_PPO, settings_table
from evaluation import eval_set, final_eval, paired, pooled, sample_stats
from model import GPT

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


PARTS = ["t_rollout", "t_update", "t_curve"]  # the log's seconds per part


def time_split(evals):
    """Where each method's policy runs spent their time, in seconds summed over iterations and
    seeds: the rollouts (sampling and scoring), the updates, the learning-curve points, the
    critic's warm-up and the final evaluation."""
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
    c = out["config"]  # each method's settings: the flat ones, and where it differs
    lines += ["", "Each method's settings (the tuned ones from config.TUNED unless given as flags):", ""]
    lines += settings_table({m: {k: c.get("settings_by_method", {}).get(m, {}).get(k, c.get(k))
                                 for k in SHOWN_PPO + SHOWN_DPO} for m in methods})
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
    sft = GPT.from_checkpoint(sft_path, device)
    evals = {m: [final_eval(os.path.join(cfg.out, "policies", f"{m}_seed{s}.eval.json"),
                            os.path.join(cfg.out, "policies", f"{m}_seed{s}.pt"), sft, ev, world, chat, cfg.seed + 2000,
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
        if world.gold:  # the gold labels need the annotator; the RM's own scheme
            gold, _ = reward.label_pair(chat.enc, ids, data.annotate(p, r), rm.scheme)
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
