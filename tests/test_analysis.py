"""Tests for machinery/analysis.py: the labs' figures, the frontier and the paired comparison,
from hand-made run folders."""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from machinery import analysis  # noqa: E402

# -----------------------------------------------------------------------------
# The labs' figures, from hand-made run folders (a sweep of two points)


def fake_run(d, p_miss, gain):
    """A finished run folder as train.py leaves it, with only what the labs read: config.json,
    eval/refs.json (K=2 SFT samples of 3 prompts), two seeds of PPO checkpoints, results.json."""
    os.makedirs(os.path.join(d, "eval"))
    os.makedirs(os.path.join(d, "policies"))
    json.dump({"n_curve": 2}, open(os.path.join(d, "config.json"), "w"))
    # the first n_curve=2 prompts' SFT scores: 1, 3, 1, 3 -> mean 2, std 2/sqrt(3); the third prompt is not read
    json.dump({"ref_scores": [[1, 3, 50], [1, 3, -50]]}, open(os.path.join(d, "eval", "refs.json"), "w"))
    for m in ("ppo", "fg_ppo"):
        for s in (1, 2):
            log = [{"iter": i, "reward": 0.1 * i * s} for i in range(1, 3 + s)]  # seed 1 stopped after 3 iterations
            curve = [{"iter": i, "judge_score": 2 + i} for i in range(0, 3 + s, 2)]
            torch.save({"log": log, "curve": curve}, os.path.join(d, "policies", f"{m}_seed{s}.pt"))
    rms = {f"seed{s}": {"token": {"fact_flip_acc": 0.9 - p_miss}, "seq": {"fact_flip_acc": 0.6}} for s in (1, 2)}
    json.dump({"seeds": [1, 2], "fg_ppo_minus_ppo": {"win_rate": gain, "ci95": [gain - 0.02, gain + 0.02]},
               "reward_models": rms}, open(os.path.join(d, "results.json"), "w"))


def test_proxy_and_gold_standardise_on_the_curves_sft_samples(tmp_path):
    """proxy is the log's reward per seed; gold is the curve's judge score minus the mean, over the std
    of the SFT samples of the first n_curve evaluation prompts; seeds are cut to the shortest."""
    fake_run(tmp_path / "run", 0.0, 0.05)
    c = analysis.proxy_and_gold(str(tmp_path / "run"))
    assert set(c) == {"ppo", "fg_ppo"}
    assert c["ppo"]["iter"] == [1, 2, 3] and c["ppo"]["curve_iter"] == [0, 2]
    np.testing.assert_allclose(c["ppo"]["proxy"], [[0.1, 0.2, 0.3], [0.2, 0.4, 0.6]])
    np.testing.assert_allclose(c["fg_ppo"]["gold"], [[0, 2 / (2 / math.sqrt(3))]] * 2)  # (2 + i - 2) / std


def test_lab_figures_from_a_sweep_folder(tmp_path):
    """Both labs' commands write their figure from a sweep folder (its sweep.json names the points)."""
    names = ["p_annotator_miss=0.3", "p_annotator_miss=0"]  # out of order: the plot sorts by p
    for n, p, g in zip(names, (0.3, 0.0), (0.01, 0.06)):
        fake_run(tmp_path / n, p, g)
    json.dump({"points": names}, open(tmp_path / "sweep.json", "w"))
    assert list(analysis.run_points(str(tmp_path))) == names
    for lab, plot in analysis.LABS.items():
        plot(str(tmp_path / f"{lab}.png"), str(tmp_path))
        assert (tmp_path / f"{lab}.png").stat().st_size > 1000


def fake_frontier_point(d, method, kl, wins, refs="same prompts"):
    """A finished run folder with what analysis.frontier reads: results.json (seeds, a
    method's KL), eval/refs.json and each seed's final evaluation (wins per prompt)."""
    os.makedirs(os.path.join(d, "eval"))
    os.makedirs(os.path.join(d, "policies"))
    open(os.path.join(d, "eval", "refs.json"), "w").write(refs)
    json.dump({"seeds": sorted(wins), "methods": {"sft": {}, method: {"kl": kl}}}, open(os.path.join(d, "results.json"), "w"))
    for s, w in wins.items():
        rates = {"mean_length": 30.0 + s, "wrong": 0.1 * s, "missing": 0.05}
        log = [{"kl": kl + 1.0}] * 3 + [{"kl": kl}] * 5  # the last 5 rows are the KL
        json.dump({"wins": w, "rates": rates, "log": log}, open(os.path.join(d, "policies", f"{method}_seed{s}.eval.json"), "w"))


def test_frontier_pairs_only_points_at_matched_kl(tmp_path):
    """Points of different methods within kl_tol are paired prompt by prompt over the seeds
    both ran (hand-computed mean); a far-apart or same-method pair is not; folders with
    different evaluation sets are refused."""
    fake_frontier_point(tmp_path / "a", "ppo", 0.80, {1: [1, 0, 1, 1], 2: [0, 0, 1, 1]})
    fake_frontier_point(tmp_path / "b", "fg_ppo", 0.75, {1: [1, 1, 1, 1], 2: [0, 1, 1, 1], 3: [0, 0, 0, 0]})
    fake_frontier_point(tmp_path / "c", "fg_ppo", 1.20, {1: [0, 0, 0, 0]})
    lines = analysis.frontier(str(tmp_path / "f.png"), [str(tmp_path / n) for n in "abc"], kl_tol=0.1)
    pairs = [x for x in lines if x.startswith("- ")]
    assert len(pairs) == 1 and "fg_ppo b/b (KL 0.75) - ppo a/a (KL 0.80)" in pairs[0]
    assert "+0.250" in pairs[0] and "2 seeds" in pairs[0]  # (1 + 1) / 8 over seeds 1 and 2
    assert (tmp_path / "f.png").stat().st_size > 1000
    fake_frontier_point(tmp_path / "d", "ppo", 0.7, {1: [1, 1, 1, 1]}, refs="other prompts")
    with pytest.raises(SystemExit, match="evaluation set"):
        analysis.frontier(str(tmp_path / "g.png"), [str(tmp_path / "a"), str(tmp_path / "d")])


def test_compare_two_runs_over_their_shared_seeds(tmp_path):
    """compare: both runs' numbers over the seeds both ran, and a - b paired by prompt."""
    fake_frontier_point(tmp_path / "a", "fg_ppo", 0.75, {1: [1, 1, 1, 1], 2: [0, 1, 1, 1], 3: [0, 0, 0, 0]})
    fake_frontier_point(tmp_path / "b", "fg_ppo", 0.5, {1: [1, 0, 1, 1], 2: [0, 0, 1, 1]})
    lines = analysis.compare(f"{tmp_path / 'a'}:fg_ppo", f"{tmp_path / 'b'}:fg_ppo")
    assert "| 0.875 [" in lines[2] and lines[2].endswith("| 0.75 | 31.5 | 0.150 | 0.050 |")  # seeds 1, 2 only
    assert "| 0.625 [" in lines[3] and "| 0.50 |" in lines[3]
    assert ": +0.250 [" in lines[-1] and lines[-1].endswith("(paired, seeds 1, 2)")


def fake_seed_run(d, seed, wins_a, wins_b):
    """One run of one seed with fg_ppo and ppo: results.json and both final evaluations."""
    os.makedirs(os.path.join(d, "policies"))
    methods = {m: {"win_rate": sum(w) / len(w), "wrong": 0.1, "missing": 0.05} for m, w in (("fg_ppo", wins_a), ("ppo", wins_b))}
    json.dump({"seeds": [seed], "methods": {"sft": {}, **methods}}, open(os.path.join(d, "results.json"), "w"))
    for m, w in (("fg_ppo", wins_a), ("ppo", wins_b)):
        json.dump({"wins": w}, open(os.path.join(d, "policies", f"{m}_seed{seed}.eval.json"), "w"))


def test_runs_pairs_each_run_and_pools_the_runs(tmp_path):
    """runs: each run's fg_ppo - ppo paired on its own prompts, the pooled difference the mean
    over all prompts of all runs, and the count of runs whose own CI excludes 0."""
    fake_seed_run(tmp_path / "s1", 1, [1] * 20, [0] * 20)          # +1 on every prompt: its CI excludes 0
    fake_seed_run(tmp_path / "s2", 2, [1, 0] * 10, [0, 1] * 10)    # +1 and -1 alternate: mean 0
    lines = analysis.runs([str(tmp_path / "s1"), str(tmp_path / "s2")])
    assert "| s1 | 1.000 | 0.000 | +1.000 [+1.000, +1.000] |" in lines[2]
    assert "| s2 | 0.500 | 0.500 | +0.000 [" in lines[3]
    assert lines[-1].startswith("fg_ppo - ppo over 2 runs: +0.500 [") and lines[-1].endswith("the CI of 1 of 2 runs alone excludes 0")


def fake_settings_run(d, points, seeds, refs="same prompts"):
    """A run folder (no results.json: a sweep point may be unfinished) with config.json and one
    final evaluation per (method, seed): points {method: (settings, kl, wins per prompt by seed)}."""
    os.makedirs(os.path.join(d, "eval"))
    os.makedirs(os.path.join(d, "policies"))
    open(os.path.join(d, "eval", "refs.json"), "w").write(refs)
    flat = {"ppo_lr": 2e-5, "lam": 0.95, "beta": 0.05, "rloo_k": 4, "seq_weight": 1.0, "ppo_iters": 80,
            "dpo_steps": 0, "dpo_lr": 1e-5, "beta_dpo": 0.1}
    json.dump({**flat, "settings_by_method": {m: st for m, (st, _, _) in points.items()}},
              open(os.path.join(d, "config.json"), "w"))
    for m, (_, kl, wins) in points.items():
        for s in seeds:
            rates = {"wrong": 0.1, "missing": 0.05, "wrong_first": 0.1, "wrong_middle": 0.1, "wrong_last": 0.1}
            curve = [{"iter": 0, "judge_score": 1.0}, {"iter": 2, "judge_score": 3.0}, {"iter": 4, "judge_score": 2.0}]
            log = [{"iter": i, "reward": float(i)} for i in range(1, 5)]
            json.dump({"wins": wins[s], "kl_eval": kl, "rates": rates, "curve": curve, "log": log},
                      open(os.path.join(d, "policies", f"{m}_seed{s}.eval.json"), "w"))


def test_budgets_choose_on_the_tuning_seed_and_pair_on_the_fresh_ones(tmp_path):
    """Per KL budget each method's point is the tuning seed's best within it, even where another
    point wins on the fresh seeds; the fresh seeds pair it with ppo's prompt by prompt (by hand);
    a point is found by its settings whatever its folder's name."""
    lo, hi = {"ppo_lr": 1e-5}, {"ppo_lr": 3e-5}
    fake_settings_run(tmp_path / "tune" / "a", {"ppo": (lo, 0.4, {7: [1, 0]}), "fg_ppo": (lo, 0.45, {7: [0, 0]})}, [7])
    fake_settings_run(tmp_path / "tune" / "b", {"ppo": (hi, 1.4, {7: [1, 1]}), "fg_ppo": (hi, 0.9, {7: [1, 1]})}, [7])
    # on the fresh seeds fg_ppo's low-KL point is the better one; the budget still takes the tuning seed's choice
    fake_settings_run(tmp_path / "x", {"ppo": (lo, 0.5, {1: [1, 0, 0, 0], 2: [0, 0, 1, 0]}),
                                       "fg_ppo": (lo, 0.5, {1: [1, 1, 1, 1], 2: [1, 1, 1, 1]})}, [1, 2])
    fake_settings_run(tmp_path / "y", {"ppo": (hi, 1.6, {1: [1, 1, 0, 0], 2: [1, 1, 1, 1]}),
                                       "fg_ppo": (hi, 1.0, {1: [1, 1, 1, 0], 2: [1, 0, 0, 0]})}, [1, 2])
    lines = analysis.budgets(str(tmp_path / "b.png"), [str(tmp_path / "x"), str(tmp_path / "y")],
                             [str(tmp_path / "tune" / "a"), str(tmp_path / "tune" / "b")], limits=(0.5, 1.0, 1.5))
    text = "\n".join(lines)
    k05 = text.split("- KL <= 0.5:")[1].split("- KL <= 1:")[0]  # each method's only point within 0.5
    assert "ppo (ppo_lr 1e-05, lam 0.95, beta 0.05, ppo_iters 80) 0.250 at KL 0.50" in k05 and "fg_ppo - ppo: +0.750" in k05
    # KL <= 1: fg_ppo at 3e-5 (it won on seed 7, though its 1e-5 point wins on the fresh seeds), ppo at
    # 1e-5 (its 3e-5 point is over the budget): 0.5 - 0.25
    k1 = text.split("- KL <= 1:")[1].split("- KL <= 1.5")[0]
    assert "fg_ppo (ppo_lr 3e-05, lam 0.95, beta 0.05, ppo_iters 80) 0.500 at KL 1.00" in k1 and "fg_ppo - ppo: +0.250" in k1
    k15 = text.split("- KL <= 1.5:")[1]
    assert "ppo (ppo_lr 3e-05, lam 0.95, beta 0.05, ppo_iters 80) 0.750 at KL 1.60" in k15 and "fg_ppo - ppo: -0.250" in k15
    # the judge's curve peaked at 3.0 (iteration 2) and ended at 2.0; the proxy's mean rose from 1.5 (up to it) to 2.5
    assert text.count("| +1.00 / +1.00 |") == 4 and (tmp_path / "b.png").stat().st_size > 1000
