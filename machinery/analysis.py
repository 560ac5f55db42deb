"""
Figures and tables across finished run folders: the fair comparison's frontier and paired
comparisons, and the classroom labs' figures (proxy reward against the gold judge over PPO
iterations: reward hacking; fine-grained PPO's gain over PPO against the annotator's miss
rate: annotator noise). From the repository root:

    python -m machinery.analysis reward_hacking runs/frontier     # -> runs/frontier/reward_hacking.png
    python -m machinery.analysis annotator_noise runs/noise       # -> runs/noise/annotator_noise.png
    python -m machinery.analysis frontier runs/frontier runs/frontier_ppo   # win rate against KL, matched-KL pairs
    python -m machinery.analysis budgets runs/fresh_* --tune runs/tune_*     # at equal KL budget, chosen on the tuning seed
    python -m machinery.analysis compare runs/abl_centre:fg_ppo runs/fair:fg_ppo   # two runs, paired
    python -m machinery.analysis runs runs/quick_*     # one command at several --seed: fg_ppo - ppo per run and over all
"""

import argparse
import glob
import itertools
import json
import math
import os
import sys

import torch

import reward
from evaluation import paired, pooled
from machinery.report import _pyplot, log_mean, mean

def run_points(folder):
    """{point name: its run folder} of a --sweep folder (its sweep.json), or {name: folder}
    of a single run's folder."""
    if os.path.exists(p := os.path.join(folder, "sweep.json")):
        return {n: os.path.join(folder, n) for n in json.load(open(p))["points"]}
    return {os.path.basename(os.path.normpath(folder)): folder}


def proxy_and_gold(run_dir):
    """{method: {"iter", "proxy", "curve_iter", "gold"}} of one run folder, from the PPO
    runs' log and curve, a row per seed, cut to the shortest seed.
    Read from each run's final evaluation (policies/*.eval.json), or its checkpoint (*.pt) if unfinished.
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
    ppo_dir = os.path.join(run_dir, "policies")
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
                wins = {s: json.load(open(os.path.join(d, "policies", f"{m}_seed{s}.eval.json")))["wins"] for s in r["seeds"]}
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
    win_kl_figure(path, {m: [(kl, *pooled(list(wins.values())), p.split("/", 1)[1]) for (p, mm), (kl, wins) in runs.items()
                             if mm == m] for m in dict.fromkeys(m for _, m in runs)}, "win rate / KL frontier")
    print("\n".join(lines))
    return lines


def win_kl_figure(path, series, title, xlabel="KL to SFT per response", budgets=()):
    """Win rate against SFT (95% CI) against KL, a line per method: series {method: [(KL, win
    rate, CI, label or None)]}; dotted lines at the KL budgets, and the axis cut a little beyond them."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, (m, pts) in enumerate(series.items()):
        pts = sorted(pts, key=lambda q: q[0])
        ax.errorbar([q[0] for q in pts], [q[1] for q in pts], yerr=[[q[1] - q[2][0] for q in pts], [q[2][1] - q[1] for q in pts]],
                    marker="o", capsize=3, color=f"C{i}", label=m)
        for kl, w, _, label in pts:
            if label:
                ax.annotate(label, (kl, w), fontsize=6, xytext=(3, -9), textcoords="offset points")
    for limit in budgets:
        ax.axvline(limit, color="grey", lw=0.5, ls=":")
    if budgets:  # the budgets' range; a point far beyond it (a DPO run that ran away) would squash the rest
        far = [f"{m} at KL {q[0]:.1f}" for m, pts in series.items() for q in pts if q[0] > 1.3 * max(budgets)]
        ax.set_xlim(0, 1.3 * max(budgets))
        title += f"\n(not shown: {', '.join(far)})" if far else ""
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("win rate vs SFT (95% CI)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close("all")


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
        res = [json.load(open(os.path.join(d, "policies", f"{m}_seed{s}.eval.json"))) for s in seeds]
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


def runs(folders, a="fg_ppo", b="ppo"):
    """Independent runs of one command at different --seed (each its own SFT model, data, reward
    models and evaluation prompts): per run a - b in win rate against SFT, paired prompt by
    prompt [95% CI], and the wrong and missing facts of both; then the difference over all runs
    (a bootstrap over runs and then prompts) and how many runs' own CI excludes 0. Returns the
    printed lines."""
    lines = [f"| run | {a} | {b} | {a} - {b} [95% CI] | wrong {a} / {b} | missing {a} / {b} |",
             "| --- | --- | --- | --- | --- | --- |"]
    wins, excludes = {a: [], b: []}, 0
    for d in folders:
        r = json.load(open(os.path.join(d, "results.json")))
        res = {m: json.load(open(os.path.join(d, "policies", f"{m}_seed{r['seeds'][0]}.eval.json"))) for m in (a, b)}
        (diff, ci), ra, rb = paired([res[a]["wins"]], [res[b]["wins"]]), r["methods"][a], r["methods"][b]
        excludes += ci[0] > 0 or ci[1] < 0
        for m in (a, b):
            wins[m].append(res[m]["wins"])
        lines.append(f"| {os.path.basename(os.path.normpath(d))} | {ra['win_rate']:.3f} | {rb['win_rate']:.3f} | "
                     f"{diff:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}] | {ra['wrong']:.3f} / {rb['wrong']:.3f} | "
                     f"{ra['missing']:.3f} / {rb['missing']:.3f} |")
    diff, ci = paired(wins[a], wins[b])
    lines += ["", f"{a} - {b} over {len(folders)} runs: {diff:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}] (paired); "
                  f"the CI of {excludes} of {len(folders)} runs alone excludes 0"]
    print("\n".join(lines))
    return lines


def settings_points(folders):
    """{(method, settings): {seed: its final evaluation}} of every finished policy run in folders
    (runs or --sweep folders, finished or not): a point is named by the settings its method ran
    with (config.shown_settings, from config.json), so the same point can be found in
    the folders of the tuning seed and of the fresh seeds whatever their names."""
    from config import shown_settings
    out = {}
    for folder in folders:
        for d in run_points(folder).values():
            cfg = json.load(open(os.path.join(d, "config.json")))
            for path in sorted(glob.glob(os.path.join(d, "policies", "*.eval.json"))):
                m, seed = os.path.basename(path).split(".")[0].rsplit("_seed", 1)
                mine = {**cfg, **cfg["settings_by_method"].get(m, {})}
                keys = sorted((k for k in shown_settings(m) if k in mine), key=lambda k: k == "ppo_iters")  # it last
                out.setdefault((m, ", ".join(f"{k} {mine[k]:g}" for k in keys)), {})[int(seed)] = json.load(open(path))
    return out


def over_optimised(runs):
    """(gold drop, proxy rise) of a point, mean over seeds: the judge's score of the learning
    curve from its peak to the end, and the proxy reward (the log's, last 5 iterations) from
    the curve's peak iteration to the end. Both > 0: the policy kept climbing its reward model
    while the judge fell. (nan, nan) for DPO, which has no proxy."""
    drops, rises = [], []
    for r in runs:
        if "reward" not in r["log"][-1]:
            return float("nan"), float("nan")
        peak = max(r["curve"], key=lambda p: p["judge_score"])
        at = [x["reward"] for x in r["log"] if x["iter"] <= max(peak["iter"], 1)][-5:]
        drops.append(peak["judge_score"] - r["curve"][-1]["judge_score"])
        rises.append(mean([x["reward"] for x in r["log"][-5:]]) - mean(at))
    return mean(drops), mean(rises)


def budgets(path, fresh, tune, limits=(0.5, 1.0, 1.5), base="ppo"):
    """The comparison at equal KL budget, chosen where it is not reported. For each budget and
    method, the point with the best win rate on the tuning seed's folders (tune) among those
    whose KL to SFT (kl_eval) is within the budget; that point on the fresh seeds (fresh), its
    win rate [95% CI] and KL, and each method's point minus base's, paired over the fresh seeds
    and prompts. Before it, every point of fresh: win rate, KL, wrong and missing facts, wrong
    facts by third, over-optimisation; the figure (win rate against KL on the fresh seeds) at
    path. Returns the printed lines."""
    t, f = settings_points(tune), settings_points(fresh)
    if len({open(os.path.join(d, "eval", "refs.json")).read() for folder in fresh for d in run_points(folder).values()}) > 1:
        sys.exit("error: the fresh folders do not share one evaluation set; their win rates cannot be paired")
    win = lambda runs: pooled([r["wins"] for r in runs.values()])
    kl = lambda runs: mean([r["kl_eval"] for r in runs.values()])
    lines = ["| method | settings | tuning seed: win (KL) | fresh seeds | win rate vs SFT [95% CI] | KL | wrong | missing | "
             "wrong first / middle / last | gold drop / proxy rise |", "| --- " * 10 + "|"]
    for (m, st), runs in sorted(f.items(), key=lambda kv: (list(reward.METHODS).index(kv[0][0]), kl(kv[1]))):
        (w, ci), tr = win(runs), t.get((m, st))
        rate = lambda k: mean([r["rates"][k] for r in runs.values()])
        lines.append(f"| {m} | {st} | " + (f"{win(tr)[0]:.3f} ({kl(tr):.2f})" if tr else "-") + f" | {len(runs)} | "
                     f"{w:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {kl(runs):.2f} | {rate('wrong'):.3f} | {rate('missing'):.3f} | "
                     + " / ".join(f"{rate('wrong_' + k):.3f}" for k in ("first", "middle", "last"))
                     + " | " + " / ".join("-" if math.isnan(x) else f"{x:+.2f}" for x in over_optimised(runs.values())) + " |")
    lines += ["", f"At equal KL budget: each method's point chosen on the tuning seed (best win rate with KL <= "
                  f"the budget), reported on the fresh seeds; differences against {base}, paired:", ""]
    for limit in limits:
        chosen = {}
        for m in dict.fromkeys(m for m, _ in t):
            ok = [(win(r)[0], st) for (mm, st), r in t.items() if mm == m and kl(r) <= limit]
            if ok and (m, max(ok)[1]) in f:
                chosen[m] = max(ok)[1]
        lines.append(f"- KL <= {limit:g}: " + "; ".join(
            f"{m} ({st}) {win(f[(m, st)])[0]:.3f} at KL {kl(f[(m, st)]):.2f}" for m, st in chosen.items()))
        for m, st in chosen.items():
            if m != base and base in chosen:
                a, b = f[(m, st)], f[(base, chosen[base])]
                seeds = sorted(a.keys() & b.keys())
                d, ci = paired([a[s]["wins"] for s in seeds], [b[s]["wins"] for s in seeds])
                lines.append(f"  - {m} - {base}: {d:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}] over {len(seeds)} seeds")
    order = sorted(dict.fromkeys(m for m, _ in f), key=list(reward.METHODS).index)
    win_kl_figure(path, {m: [(kl(r), *win(r), None) for (mm, _), r in f.items() if mm == m] for m in order},
                  f"win rate / KL on the fresh seeds ({max(len(r) for r in f.values())} seeds)",
                  "KL to SFT per response (final policy, evaluation samples)", limits)
    print("\n".join(lines))
    return lines


LABS = {"reward_hacking": plot_reward_hacking, "annotator_noise": plot_annotator_noise}

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="A classroom lab's figure from finished run folders (docs/teaching.md).")
    ap.add_argument("lab", choices=[*LABS, "frontier", "budgets", "compare", "runs"])
    ap.add_argument("folder", nargs="+", help="a --sweep folder (reward_hacking also takes one run's folder; "
                                             "frontier takes several; compare two FOLDER:METHOD; runs the "
                                             "folders of one command at several --seed)")
    ap.add_argument("--out", help="where to write the figure (default: <first folder>/<lab>.png)")
    ap.add_argument("--only", default="", help='only the points whose names hold these strings, e.g. "ppo_lr=3e-5 lam=1"')
    ap.add_argument("--tune", nargs="+", default=[], help="budgets: the tuning seed's folders, which choose the points")
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.5, 1.0, 1.5], help="budgets: the KL budgets")
    args = ap.parse_args()
    out = args.out or os.path.join(args.folder[0], f"{args.lab}.png")
    if args.lab == "compare":
        if len(args.folder) != 2:
            ap.error("compare takes two runs, FOLDER:METHOD FOLDER:METHOD")
        compare(*args.folder)
        sys.exit()
    if args.lab == "runs":
        runs(args.folder)
        sys.exit()
    if args.lab == "frontier":
        frontier(out, args.folder)
    elif args.lab == "budgets":
        budgets(out, args.folder, args.tune, args.budgets)
    else:
        LABS[args.lab](out, args.folder[0], args.only)
    print(out)
