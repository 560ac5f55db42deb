"""workers.parallel: each task starts once those it waits for are done, and no sooner; a
task need not wait for the others (a PPO run for the last reward model); a worker's exit
message or exception stops the pool and reaches the caller."""

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from machinery.workers import parallel  # noqa: E402


def note(log, name):
    with open(log, "a") as f:
        f.write(name + "\n")


def lines(log):
    with open(log) as f:
        return f.read().split()


def note_once_done(log, name, other, timeout=60.0):
    """Wait (in a worker) until `other` has noted itself, then note name."""
    deadline = time.time() + timeout
    while other not in lines(log):
        assert time.time() < deadline, f"{name}: {other} never ran while {name} was running"
        time.sleep(0.02)
    note(log, name)


def fail(message):
    raise ValueError(message)


def test_one_process_runs_the_tasks_in_the_order_given(tmp_path):
    log = str(tmp_path / "log")
    parallel({"rm": (note, (log, "rm"), []), "ppo": (note, (log, "ppo"), ["rm"]),
              "dpo": (note, (log, "dpo"), [])}, jobs=1, threads=1)
    assert lines(log) == ["rm", "ppo", "dpo"]


def test_a_task_starts_once_its_own_are_done_not_all(tmp_path):
    """Two workers: 'slow' (a long reward model) runs until 'ppo' is done, and 'ppo' waits only
    for 'rm', so it must run beside 'slow' (a scheduler that waited for every reward model
    would never start it, and 'slow' would time out), and after 'rm', though given first."""
    log = str(tmp_path / "log")
    open(log, "w").close()
    parallel({"ppo": (note, (log, "ppo"), ["rm"]), "rm": (note, (log, "rm"), []),
              "slow": (note_once_done, (log, "slow", "ppo"), [])}, jobs=2, threads=1)
    assert lines(log) == ["rm", "ppo", "slow"]


def test_an_exit_or_an_error_in_a_worker_stops_the_pool(tmp_path):
    with pytest.raises(SystemExit, match="stopped after 2 iterations"):
        parallel({"a": (sys.exit, ("stopped after 2 iterations",), []), "b": (time.sleep, (0.1,), [])}, 2, 1)
    with pytest.raises(ValueError, match="a bug"):
        parallel({"a": (fail, ("a bug",), []), "b": (time.sleep, (0.1,), [])}, 2, 1)
    with pytest.raises(AssertionError, match="unknown"):
        parallel({"a": (time.sleep, (0.1,), ["b"])}, 2, 1)


def test_peak_memory_is_recorded_per_stage_and_per_pooled_task(monkeypatch):
    """On a GPU each stage's peak memory is kept under its name, a pool's tasks under their
    paths in the run folder, and the pool's own peak is its largest task's; off a GPU nothing."""
    from machinery import devices
    peaks = {}
    monkeypatch.setattr(devices, "cuda_peak_gib", lambda: None)
    devices.record_peaks(peaks, "sft", {}, "/o")
    assert peaks == {} and parallel({"a": (note, ("/dev/null", "a"), [])}, 1, 1) == {}
    monkeypatch.setattr(devices, "cuda_peak_gib", lambda: 0.5)
    devices.record_peaks(peaks, "sft", {}, "/o")
    devices.record_peaks(peaks, "rm_policies", {"/o/rm/seed1/token.pt": 1.5, "/o/policies/ppo_seed1.pt": 2.0}, "/o")
    assert peaks == {"sft": 0.5, "rm_policies": 2.0, "rm/seed1/token.pt": 1.5, "policies/ppo_seed1.pt": 2.0}
