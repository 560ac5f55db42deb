"""Which device a run uses (--device=auto takes cuda, then mps, then cpu), and its peak memory on a GPU."""

import os

import torch


def pick_device(device="auto"):
    """cuda -> mps -> cpu, unless a device is named; a named device that is not there raises
    ValueError with one line that says so."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device={device}: CUDA is not available on this machine; use --device=cpu (or auto)")
    if device == "mps" and not has_mps:
        raise ValueError("--device=mps: MPS is not available on this machine; use --device=cpu (or auto)")
    return device


def cuda_peak_gib():
    """The CUDA allocator's peak since the last call (or the start), in GiB, and a fresh count
    from here; None where this process has not used CUDA."""
    if not torch.cuda.is_initialized():
        return None
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return peak


def record_peaks(peaks, name, by_task, out):
    """On a GPU, peaks[name] = the peak of the stage that just ran (cuda_peak_gib) or of its
    pool's tasks (by_task, {task's file: GiB} from workers.parallel), each task under its path
    in the run folder out. Nothing off a GPU."""
    if (gib := cuda_peak_gib()) is not None:
        by_task = {os.path.relpath(n, out): p for n, p in by_task.items()}
        peaks.update({name: max([gib, *by_task.values()]), **by_task})
