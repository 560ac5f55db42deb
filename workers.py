"""
Independent stages in worker processes: the reward models (per seed and kind) and the PPO
runs (per method and seed) need nothing from each other, and small models on a few CPU
cores are partly overhead-bound, so a core runs a second run better than it helps a first
one as a second thread. train.py's --jobs and --threads choose how many processes and
threads; results are the same for the same threads per process, whatever the jobs.
torchrun shards one run over processes instead (distributed.py); the two do not mix.
"""

import multiprocessing as mp
import os
import sys
import threading

import torch
from tqdm import tqdm

import distributed as dist


def processes(cfg, device):
    """(jobs, threads of this process, threads of each worker). Small models are
    overhead-bound, so the cores go to parallel runs rather than to threads of one run."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cores = max(1, cores // dist.world_size)  # torchrun: the ranks share the machine's cores
    jobs = cfg.jobs or (cores if device == "cpu" and not dist.ddp else 1)  # torchrun: one process per rank
    threads = cfg.threads or int(os.environ.get("OMP_NUM_THREADS", 0))
    return jobs, threads or cores, threads or max(1, cores // jobs)


def start_worker(threads):
    torch.set_num_threads(threads)
    tqdm.set_lock(threading.RLock())  # not tqdm's default process lock, which a terminated worker would leak


def call(task):
    """Run one (stage, args) in a worker; its exit message, or None."""
    stage, args = task
    try:
        stage(*args)
    except SystemExit as e:
        return str(e.code)
    except FloatingPointError as e:
        return f"error: {e}"


def parallel(tasks, jobs, threads):
    """Independent stages [(stage, args), ...] in `jobs` worker processes of `threads` torch
    threads each, or one after the other in this process (jobs == 1). The first worker that
    exits (a non-finite loss, --stop_after) stops them all with its message."""
    if jobs == 1 or len(tasks) <= 1:
        for stage, args in tasks:
            stage(*args)
        return
    with mp.get_context("spawn").Pool(min(jobs, len(tasks)), start_worker, (threads,)) as pool:
        for message in pool.imap_unordered(call, tasks):
            if message is not None:
                pool.terminate()
                sys.exit(message)
        pool.close()
        pool.join()
