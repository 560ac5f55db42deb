"""
Stages 3 and 4 in worker processes: the reward models (per seed and kind) need nothing from
each other, and a policy run (per method and seed) only the reward model it learns from;
small models on a few CPU cores are partly overhead-bound, so a core runs a second run
better than it helps a first one as a second thread. train.py's --jobs and --threads choose
how many processes and threads; results are the same for the same threads per process,
whatever the jobs. torchrun shards one run over processes instead (distributed.py); the
two do not mix.
"""

import ctypes
import multiprocessing as mp
import os
import queue
import threading

import torch
from tqdm import tqdm

from machinery import distributed as dist
from machinery.devices import cuda_peak_gib


def processes(cfg, device):
    """(jobs, threads of this process, threads of each worker). Small models are
    overhead-bound, so the cores go to parallel runs rather than to threads of one run."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cores = max(1, cores // dist.world_size)  # torchrun: the ranks share the machine's cores
    jobs = cfg.jobs or (cores if device == "cpu" and not dist.ddp else 1)  # torchrun: one process per rank
    threads = cfg.threads or int(os.environ.get("OMP_NUM_THREADS", 0))
    return jobs, threads or cores, threads or max(1, cores // jobs)


def give_back_memory():
    """Return the freed heap to the OS. glibc keeps the memory a process has freed for its own
    later use, so without this the parent would hold SFT's activations (about 0.5 GB at the
    default preset) for as long as the workers run, and a worker its last task's. Without glibc
    (no malloc_trim) it does nothing."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
    finally:
        give_back_memory()


def parallel(tasks, jobs, threads):
    """Stages in `jobs` worker processes of `threads` torch threads each, or one after the
    other in this process (jobs == 1). tasks: {name: (stage, args, after)}, `after` the names
    of the tasks that must finish first (a PPO run waits for its reward model): each task
    starts once they have, in the order given, so no core waits for a stage's last task
    while a later one could run. The first worker that exits (a non-finite loss,
    --stop_after) stops them all with its message. A worker runs task after task: a fresh one
    per task (maxtasksperchild=1) would not start on the heap its last task left fragmented
    (80 MiB less at the default run's peak) but costs 2-4 s per task to start, a third more
    time for the tiny preset's pool. Returns {name: peak GiB} of the tasks run in this process on
    a GPU (cuda_peak_gib), else {}."""
    assert all(set(after) <= set(tasks) for _, _, after in tasks.values()), "a task waits for an unknown one"
    give_back_memory()  # what the stages before freed, before the workers add theirs
    if jobs == 1 or len(tasks) <= 1:
        peaks, _ = {}, cuda_peak_gib()
        for name, (stage, args, _) in tasks.items():  # the order given puts each task after those it waits for
            stage(*args)
            dist.barrier()  # torchrun: rank 0 has saved what the next task may read
            peaks[name] = cuda_peak_gib()
            give_back_memory()
        return {name: gib for name, gib in peaks.items() if gib is not None}  # on a GPU: each task's peak memory
    done, waiting, finished = queue.SimpleQueue(), dict(tasks), set()
    with mp.get_context("spawn").Pool(min(jobs, len(tasks)), start_worker, (threads,)) as pool:
        while len(finished) < len(tasks):
            for name in [n for n, (_, _, after) in waiting.items() if finished.issuperset(after)]:
                stage, args, _ = waiting.pop(name)
                pool.apply_async(call, ((stage, args),), callback=lambda message, name=name: done.put((name, message)),
                                 error_callback=lambda e: done.put((None, e)))  # a bug in a stage: its exception
            name, message = done.get()
            if name is None or message is not None:
                pool.terminate()
                raise message if name is None else SystemExit(message)
            finished.add(name)
        pool.close()
        pool.join()
    return {}
