"""Tests for train.py: the pipeline end to end on a smaller-than-tiny config (outputs, schema,
determinism, resuming after --stop_after and after SIGKILL, skipping, config checks, flag
errors, atomic checkpoints, non-finite losses), and bring-your-own data."""
import glob
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import ppo  # noqa: E402
import reward  # noqa: E402
import model  # noqa: E402
import train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 1337  # Config.seed
METHODS = ["ppo", "fg_ppo", "ppo_edits"]  # Config.methods
SMALL = ["--preset=tiny", "--n_sft=600", "--sft_steps=40", "--n_judge=24", "--n_pairs=24", "--rm_steps=5",
         "--ppo_iters=4", "--rollout_batch=8", "--minibatch=4", "--n_eval=16", "--k_ref=1", "--n_curve=8",
         "--eval_every=2", "--ckpt_every=1", "--max_new_tokens=40", "--jobs=1"]
# One thread: the same numbers in every run, and on a busy 2-core machine a run takes ~15 s
# instead of ~2 min (torch's default threads fight other processes for the cores).
ENV = os.environ | {"TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def cmd(out, *extra):
    return [sys.executable, "train.py", *SMALL, f"--out={out}", *extra]


def run(out, *extra, timeout=600):
    """The pipeline on the small config into out; the CompletedProcess."""
    return subprocess.run(cmd(out, *extra), cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=timeout)


def ok(p):
    assert p.returncode == 0, f"rc {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    return p


def results(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def comparable(res):
    """results.json less what may differ between equal runs: timing, processes, the output folder."""
    res = json.loads(json.dumps(res))
    res.pop("timing_s")
    res.pop("processes")
    res["config"].pop("out")
    res["config"].pop("jobs")
    return res


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """One uninterrupted reference run, shared: (output folder, wall time in seconds)."""
    out = str(tmp_path_factory.mktemp("ref") / "run")
    t0 = time.time()
    ok(run(out))
    return out, time.time() - t0


# -----------------------------------------------------------------------------
# End to end


def test_end_to_end_outputs_and_schema(ref):
    """A run writes every stage's files, and results.json has the documented schema and sane values."""
    out, _ = ref
    for f in ["sft/model.pt", "sft/metrics.json", "prefs.jsonl", "prefs/stats.json", "results.json",
              "results.md", "ppo_diagnostics.png", "learning_curves.png", "token_rewards.html"]:
        assert os.path.isfile(os.path.join(out, f)), f
    records = data.read_jsonl(os.path.join(out, "prefs.jsonl"))
    assert len(records) == 24
    for r in records:
        for k in ("prompt", "chosen", "rejected", "edited"):
            assert isinstance(r[k], str), (k, r)
    rm_dirs = glob.glob(os.path.join(out, "rm", "seed*"))
    assert rm_dirs
    for d in rm_dirs:
        for f in ("metrics.json", "token.pt", "seq.pt", "seq_edits.pt"):
            assert os.path.isfile(os.path.join(d, f)), (d, f)

    res = results(out)
    for k in ("config", "seeds", "methods", "fg_ppo_minus_ppo", "reward_models", "timing_s"):
        assert k in res, k
    assert res["seeds"] == [SEED]
    assert res["config"]["ppo_iters"] == 4 and res["config"]["n_eval"] == 16
    assert set(res["methods"]) == {"sft", *METHODS}
    assert "judge_score" in res["methods"]["sft"]
    for m in METHODS:
        r = res["methods"][m]
        for k in ("win_rate", "win_rate_ci95", "judge_score", "per_seed", "kl", "explained_var", "explained_var_early",
                  "mean_length", "wrong_first", "wrong_middle", "wrong_last"):
            assert k in r, (m, k)
        assert 1 < r["mean_length"] <= 41 and r["explained_var"] <= 1  # max_new_tokens=40, plus the eot
        lo, hi = r["win_rate_ci95"]
        assert 0.0 <= lo <= r["win_rate"] <= hi <= 1.0, (m, r["win_rate"], lo, hi)
        assert [s["seed"] for s in r["per_seed"]] == [SEED]
        assert all(0.0 <= s["win_rate"] <= 1.0 for s in r["per_seed"])
    d = res["fg_ppo_minus_ppo"]
    lo, hi = d["ci95"]
    assert -1.0 <= lo <= d["win_rate"] <= hi <= 1.0
    assert math.isclose(d["win_rate"], res["methods"]["fg_ppo"]["win_rate"] - res["methods"]["ppo"]["win_rate"],
                        abs_tol=1e-9)
    assert set(res["reward_models"]) == {f"seed{SEED}"}
    assert {"token", "seq", "seq_edits"} <= set(res["reward_models"][f"seed{SEED}"])
    assert all(isinstance(v, float) for v in res["timing_s"]["stages"].values())
    md = open(os.path.join(out, "results.md")).read()  # each method's settings, its tuned ones included
    assert "| ppo | ppo | seq RM | 4 | 1e-05 | 1 | 0.02 |" in md and "| fg_ppo | ppo | token RM, dense | 4 | 3e-05 | 0.95 | 0.05 |" in md
    for m in METHODS:  # where each PPO run spent its time
        split = res["timing_s"]["ppo_parts"][m]
        assert set(split) == {"rollout", "update", "curve", "critic_warmup", "final_eval"}
        assert all(v > 0 for v in split.values()), split


def test_rloo_and_dpo_run_end_to_end(tmp_path):
    """rloo, rloo_fg, dpo and dpo_edits run through the pipeline into results.json and results.md:
    no critic figures, a KL for each (DPO's on its own samples), their paired differences, RLOO's
    iterations and DPO's steps as learning curves (DPO: PPO's 4 x 2 x 2 = 16 policy steps)."""
    out = tmp_path / "run"
    methods = ["rloo", "rloo_fg", "dpo", "dpo_edits"]
    p = ok(run(out, f"--methods={','.join(methods)}"))
    assert "| rloo | rloo | seq RM | 4 | 1e-05 | 0.02 | 4 | - | - | - |" in p.stdout  # the settings, printed at start-up
    assert "| dpo | dpo | chosen > rejected | - | - | - | - | 0 | 2e-05 | 0.1 |" in p.stdout  # no lam: no method uses it
    res = results(out)
    assert set(res["methods"]) == {"sft", *methods} and "rloo_fg_minus_rloo" in res and "dpo_edits_minus_dpo" in res
    for m in methods:
        r = res["methods"][m]
        assert r["explained_var"] is None and isinstance(r["kl_eval"], float) and 0 <= r["win_rate"] <= 1
    assert res["methods"]["dpo"]["kl"] == res["methods"]["dpo"]["kl_eval"]
    assert not os.path.exists(os.path.join(out, "rm", f"seed{SEED}", "seq_edits.pt"))  # no method needs it
    curve = json.load(open(os.path.join(out, "policies", f"dpo_seed{SEED}.eval.json")))["curve"]
    assert [p["step"] for p in curve] == [0, 2, 4, 6, 8, 10, 12, 14, 16]
    log = json.load(open(os.path.join(out, "policies", f"rloo_fg_seed{SEED}.eval.json")))["log"]
    assert [row["iter"] for row in log] == [1, 2, 3, 4] and "v_loss" not in log[0]
    md = open(os.path.join(out, "results.md")).read()
    assert all(f"| {m} |" in md for m in methods) and "dpo_edits - dpo win rate" in md


def test_sweep_runs_every_point_and_picks_each_methods_best(ref, tmp_path):
    """--sweep over two PPO keys: every point of the grid gets its own folder and results,
    sharing the first point's SFT model and reward models (copied, not retrained);
    sweep.json names each method's best point by win rate; a point equals a plain run of
    its settings (ppo_epochs=2, minibatch=4 are the reference run's)."""
    out = str(tmp_path / "sweep")
    p = ok(run(out, "--sweep=ppo_epochs:2,1 minibatch:4", "--jobs=2", timeout=900))
    names = ["ppo_epochs=2,minibatch=4", "ppo_epochs=1,minibatch=4"]
    s = json.load(open(os.path.join(out, "sweep.json")))
    assert s["points"] == names and set(s["best"]) == set(METHODS)
    for m in METHODS:
        assert s["best"][m] == max(names, key=lambda n: s["methods"][m][n]["win_rate"])
    assert p.stdout.count("sft step") == 4  # SFT trained once (4 log lines), then copied
    assert "sweep: best point per method" in p.stdout and os.path.isfile(os.path.join(out, "sweep.md"))
    assert results(os.path.join(out, names[1]))["config"]["ppo_epochs"] == 1
    assert comparable(results(os.path.join(out, names[0]))) == comparable(results(ref[0]))


def test_sweep_over_n_pairs_gives_each_point_its_own_preference_data(tmp_path):
    """--sweep=n_pairs:...: each point annotates its own n_pairs pairs and trains its own reward
    models (n_pairs shapes the preference data: they are not copied from the first point)."""
    out = str(tmp_path / "pairs")
    p = ok(run(out, "--sweep=n_pairs:12,20", "--methods=ppo", "--ppo_iters=1", timeout=900))
    for n in (12, 20):
        assert len(data.read_jsonl(os.path.join(out, f"n_pairs={n}", "prefs.jsonl"))) == n
        assert results(os.path.join(out, f"n_pairs={n}"))["config"]["n_pairs"] == n
    assert p.stdout.count("prefs: ") == 2  # annotated twice, not copied


def test_determinism_same_seed_same_results(ref, tmp_path):
    """Two runs with the same seed and config into different folders give the same results."""
    out, _ = ref
    other = str(tmp_path / "run")
    ok(run(other))
    a, b = results(out), results(other)
    assert a["config"]["out"] != b["config"]["out"]  # the folder is recorded: excluded from the comparison
    assert comparable(a) == comparable(b)
    with open(os.path.join(out, "prefs.jsonl")) as f, open(os.path.join(other, "prefs.jsonl")) as g:
        assert f.read() == g.read()


def test_two_jobs_give_the_sequential_results(ref, tmp_path):
    """--jobs=2 (RMs and PPO runs in two worker processes, one thread each) reproduces the
    sequential run's results.json exactly, and records how it ran."""
    out = str(tmp_path / "run")
    ok(run(out, "--jobs=2"))
    res = results(out)
    assert res["processes"] == {"jobs": 2, "threads": 1, "threads_per_job": 1, "world_size": 1}
    assert results(ref[0])["processes"]["jobs"] == 1
    assert comparable(res) == comparable(results(ref[0]))


# -----------------------------------------------------------------------------
# Resuming


def test_resume_after_stop_after_matches_uninterrupted(ref, tmp_path):
    """--stop_after=2 stops the first PPO run with an error; rerunning without it resumes to the same results."""
    out = str(tmp_path / "run")
    p = run(out, "--stop_after=2")
    assert p.returncode != 0
    assert "stopped after 2 iterations" in p.stderr and "Traceback" not in p.stderr
    ck = torch.load(os.path.join(out, "policies", f"ppo_seed{SEED}.pt"), weights_only=True)
    assert ck["iter"] == 2
    assert not os.path.exists(os.path.join(out, f"ppo/fg_ppo_seed{SEED}.pt"))
    assert not os.path.exists(os.path.join(out, "results.json"))
    p = ok(run(out))
    assert "resuming at iteration 2" in p.stdout
    assert comparable(results(out)) == comparable(results(ref[0]))


def test_resume_after_sigkill_matches_uninterrupted(ref, tmp_path):
    """SIGKILL once a PPO checkpoint exists, rerun the same command: the results equal the reference run's."""
    out = str(tmp_path / "run")
    proc = subprocess.Popen(cmd(out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        deadline = time.time() + 300
        while not glob.glob(os.path.join(out, "policies", "*.pt")):  # *.pt: not the *.pt.tmp being written
            assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before any PPO checkpoint"
            assert time.time() < deadline, "no PPO checkpoint within 300 s"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    for path in glob.glob(os.path.join(out, "policies", "*.pt")):  # whatever was left is a whole checkpoint
        assert "iter" in torch.load(path, weights_only=True)
    p = ok(run(out))
    assert "resuming at iteration" in p.stdout
    assert comparable(results(out)) == comparable(results(ref[0]))


def test_rerun_of_finished_run_skips_every_stage(ref, tmp_path):
    """Rerunning a finished run skips every stage, is fast, and reproduces the results."""
    src, ref_wall = ref
    out = str(tmp_path / "run")
    shutil.copytree(src, out)  # --out is not part of the config check
    t0 = time.time()
    p = ok(run(out))
    wall = time.time() - t0
    assert "sft/model.pt exists, skipping" in p.stdout
    assert "prefs.jsonl exists, skipping" in p.stdout
    assert f"rm/seed{SEED}/metrics.json exists, skipping" in p.stdout
    for m in METHODS:
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith(f"{m} seed {SEED}:")), "")
        assert "complete, skipping" in line, (m, p.stdout)
    assert "resuming" not in p.stdout and "sft step" not in p.stdout
    res = results(out)
    for stage in ("sft", "prefs", "rm_policies"):
        assert res["timing_s"]["stages"][stage] < 2.0, (stage, res["timing_s"])
    assert wall < ref_wall, (wall, ref_wall)
    assert comparable(res) == comparable(results(src))


# -----------------------------------------------------------------------------
# Config checks and flag errors


def test_changed_config_refused_then_force_reruns(ref, tmp_path):
    """A different config in a used folder exits naming the key and suggesting --force; --force reruns."""
    out = str(tmp_path / "run")
    shutil.copytree(ref[0], out)
    before = open(os.path.join(out, "config.json")).read()
    p = run(out, "--beta=0.5")
    assert p.returncode != 0
    assert "beta" in p.stderr and "--force" in p.stderr and "Traceback" not in p.stderr
    assert open(os.path.join(out, "config.json")).read() == before  # nothing touched
    p = ok(run(out, "--beta=0.5", "--force"))
    assert "skipping" not in p.stdout  # everything redone
    res = results(out)
    assert res["config"]["beta"] == 0.5
    assert json.load(open(os.path.join(out, "config.json")))["beta"] == 0.5


@pytest.mark.parametrize("flag, expected", [
    ("--nope=1", ["--nope", "valid keys", "--beta", "--n_sft", "--rm_scheme"]),
    ("--beta=abc", ["--beta", "float"]),
    ("--preset=huge", ["huge", "default", "tiny", "gpu"]),
    ("--methods=ppo,xyz", ["xyz", "fg_ppo", "ppo_edits", "oracle_ppo", "oracle_fg"]),
    ("--rm_scheme=xyz", ["rm_scheme", "xyz", "bad_vs_rest", "bad_neutral_good"]),
])
def test_bad_flags_give_one_line_errors(tmp_path, flag, expected):
    """A bad flag exits non-zero with a one-line error that says what is allowed, before writing anything."""
    out = str(tmp_path / "run")
    p = subprocess.run([sys.executable, "train.py", f"--out={out}", flag], cwd=ROOT, capture_output=True,
                       text=True, env=ENV, timeout=300)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    for e in expected:
        assert e in lines[0], (e, lines[0])
    assert not os.path.exists(out)


# -----------------------------------------------------------------------------
# Atomic writes and non-finite losses


def test_no_tmp_files_left_after_a_run(ref):
    """No temp files remain anywhere in the output tree of a finished run."""
    left = [os.path.join(d, f) for d, _, fs in os.walk(ref[0]) for f in fs if f.endswith(".tmp")]
    assert left == []


def test_save_atomic_keeps_old_file_when_save_fails(tmp_path, monkeypatch):
    """If torch.save dies half-way, save_atomic leaves the previous checkpoint intact."""
    path = str(tmp_path / "sub" / "ck.pt")
    data.save_atomic({"v": torch.tensor([1.0, 2.0])}, path)  # creates the folder too
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.tensor([1.0, 2.0]))

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        data.save_atomic({"v": torch.tensor([3.0])}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.tensor([1.0, 2.0]))
    data.save_atomic({"v": torch.tensor([3.0])}, path)  # a later save still works
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.tensor([3.0]))
    assert not os.path.exists(path + ".tmp")


def test_nonfinite_sft_loss_stops_without_checkpoint(tmp_path):
    """A huge SFT learning rate gives a NaN loss: exit non-zero naming stage and step, no sft/model.pt."""
    out = str(tmp_path / "run")
    p = run(out, "--sft_lr=1e30")
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr
    assert "sft stopped at step" in p.stderr and "nan" in p.stderr.lower(), p.stderr
    assert not os.path.exists(os.path.join(out, "sft", "model.pt"))
    assert not os.path.exists(os.path.join(out, "prefs.jsonl"))


# -----------------------------------------------------------------------------
# Your own data (--data)

def _jsonl(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("line, expected", [
    ('{"prompt": "p", "chosen": "a", "rejected": ', "invalid JSON"),
    ('{"prompt": "p", "rejected": "b"}', 'missing field "chosen"'),
    ('{"prompt": "p", "chosen": 3, "rejected": "b"}', 'field "chosen" must be a string'),
    ('{"prompt": "", "chosen": "a", "rejected": "b"}', 'field "prompt" is empty'),
])
def test_bad_data_named_by_file_and_line_nothing_written(tmp_path, line, expected):
    """A bad record stops the run before anything is written, naming file:line, no traceback."""
    good = '{"prompt": "p", "chosen": "a", "rejected": "b"}'
    path = _jsonl(tmp_path / "mine.jsonl", [good, line])
    out = tmp_path / "out"
    p = run(out, f"--data={path}")
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert f"mine.jsonl:2: {expected}" in p.stderr
    assert not out.exists()


def test_non_utf8_and_empty_data_files(tmp_path):
    """A non-UTF-8 file and an empty file get one-line errors naming the file."""
    bad = tmp_path / "bin.jsonl"
    bad.write_bytes(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n\xff\xfe\n')
    empty = _jsonl(tmp_path / "empty.jsonl", [])
    for path, expected in ((bad, "bin.jsonl:2: not valid UTF-8"), (empty, "empty.jsonl: no records")):
        p = run(tmp_path / "out", f"--data={path}")
        assert p.returncode != 0 and "Traceback" not in p.stderr and expected in p.stderr


def test_own_data_runs_end_to_end_with_judge_rm(tmp_path):
    """--data with edits runs all three methods; without edits only ppo; long records warn once."""
    recs = data.read_jsonl(os.path.join(ROOT, "examples", "prefs.jsonl"))[:60]
    recs[0] = dict(recs[0], chosen=recs[0]["chosen"] * 20)  # longer than block_size
    full = _jsonl(tmp_path / "full.jsonl", [json.dumps(r) for r in recs])
    out = tmp_path / "full"
    p = ok(run(out, f"--data={full}"))
    assert "warning: 1 record(s) longer than block_size" in p.stdout
    res = results(out)
    assert set(METHODS) <= set(res["methods"])
    assert "sequence RM trained on 15 held-out pairs" in open(out / "results.md").read()
    no_edits = _jsonl(tmp_path / "noedit.jsonl", [json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")})
                                                 for r in recs])
    out = tmp_path / "noedit"
    p = ok(run(out, f"--data={no_edits}"))
    assert "only the methods without edits run: ppo" in p.stdout
    assert set(results(out)["methods"]) == {"sft", "ppo"}


def test_too_few_records_and_non_positive_sizes_refused(tmp_path):
    """Fewer than 8 records, --seeds=0 and max_new_tokens >= block_size are one-line errors."""
    path = _jsonl(tmp_path / "few.jsonl", ['{"prompt": "p", "chosen": "a", "rejected": "b"}'] * 3)
    for extra, expected in (([f"--data={path}"], "at least 8 are needed"), (["--seeds=0"], "--seeds=0 must be at least 1"),
                            (["--max_new_tokens=200"], "must be smaller than --block_size")):
        p = run(tmp_path / "out", *extra)
        assert p.returncode != 0 and "Traceback" not in p.stderr and expected in p.stderr
