"""
One run over several processes: the plumbing for

    torchrun --standalone --nproc_per_node=N train.py ...

as nanoGPT's train.py does it. torchrun starts N copies of the script and tells each its
RANK, LOCAL_RANK and WORLD_SIZE in the environment; setup() joins them into one process
group (nccl on CUDA with one GPU per LOCAL_RANK, gloo on CPU). Without torchrun every
function here is the identity, so `python train.py` computes exactly what it did before.

- Data parallel training: DistributedDataParallel (wrap) averages the gradients over the
  ranks during backward. SFT (sft.py) draws the same global batch on every rank and takes
  its slice (shard), each rank's summed loss divided by the batch's count / world_size, so
  that this average is the one-process gradient of the whole batch. The method's own loops
  (reward models, PPO, DPO) are written for one process: each rank runs them on its share,
  a config whose batch is divided by world_size (share) and its own random stream
  (rank_seed, rank_generator), and rank 0 logs its own statistics.
- Rank 0 (master) writes every file and prints; the others wait at barrier(), then read.
- A failure on one rank stops all (stop_all_on_error): the rank prints `rank k: message`
  and exits non-zero, and torchrun then stops the other ranks.

workers.py (--jobs) is another axis: independent stages side by side, each in one
process. Here one run is sharded over processes, so the two do not mix.
"""

import dataclasses
import os
import sys
import traceback
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

ddp = False      # started by torchrun (set by setup)
rank = 0         # this process's place in the group, 0 .. world_size - 1
world_size = 1
master = True    # rank 0: writes the files, prints the logs
comm_device = "cpu"  # where all-reduces happen: nccl reduces CUDA tensors only


def setup(device):
    """Join torchrun's process group if torchrun started this process (RANK is set); the
    device of this rank: device itself, or cuda:LOCAL_RANK on CUDA. Once per process
    (--sweep runs the pipeline several times)."""
    global ddp, rank, world_size, master, comm_device
    ddp = int(os.environ.get("RANK", -1)) != -1
    if not ddp or dist.is_initialized():
        return f"cuda:{os.environ['LOCAL_RANK']}" if ddp and device.startswith("cuda") else device
    if device == "mps":
        raise ValueError("--device=mps: torchrun runs on CUDA (nccl) or on the CPU (gloo)")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    master = rank == 0
    if device.startswith("cuda"):  # whichever GPU was named: each rank takes its own
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
        comm_device = device
        dist.init_process_group("nccl", device_id=torch.device(device))
    else:
        dist.init_process_group("gloo")
    return device


def check(jobs, batches):
    """One line and an exit if this run cannot be sharded: --jobs>1 (worker processes; see
    workers.py), or a batch size of batches {flag: size} that world_size does not divide."""
    if ddp and jobs > 1:
        sys.exit("error: --jobs>1 and torchrun do not mix: torchrun already runs one process per rank; drop --jobs")
    if bad := [f"--{k}={v}" for k, v in batches.items() if v % world_size]:
        sys.exit(f"error: under torchrun the batch sizes must be multiples of the {world_size} processes: "
                 + ", ".join(bad))


@contextmanager
def stop_all_on_error():
    """Around a whole run under torchrun: one log, rank 0's, from the start; an error on any
    rank prints `rank k: message` and exits at once with status 1 (the other ranks may be
    blocked waiting for this one), and torchrun then stops them all. A clean end leaves the
    process group. Nothing changes in one process."""
    started_as = int(os.environ.get("RANK", -1))  # -1: not started by torchrun
    if started_as > 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")
    try:
        yield
    except BaseException as e:
        if started_as == -1 or (isinstance(e, SystemExit) and e.code in (None, 0)):
            raise
        msg = e.code if isinstance(e, SystemExit) and isinstance(e.code, str) else traceback.format_exc()
        print(f"rank {started_as}: {msg}", file=sys.__stderr__, flush=True)
        os._exit(1)
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    """Every rank waits here for the others (for rank 0's files); nothing in one process."""
    if ddp:
        dist.barrier()


def on_master(f, *args):
    """f(*args) on rank 0 only: a stage that writes files and trains nothing. The other ranks
    go on to the next barrier(), after which they may read what it wrote."""
    return f(*args) if master else None


def master_first(f, *args):
    """f(*args) on rank 0, then on the other ranks, which find rank 0's files in place: for
    a stage that makes a file once and then reads it (the tokenizer)."""
    out = f(*args) if master else None
    barrier()
    return out if master else f(*args)


# -----------------------------------------------------------------------------
# Data parallel training

def shard(items):
    """This rank's slice of a list that every rank holds whole: contiguous, sizes differing by at most 1."""
    n = len(items)
    return items[rank * n // world_size:(rank + 1) * n // world_size]


def wrap(model, find_unused=False):
    """The model whose backward averages the gradients over the ranks (DistributedDataParallel);
    model itself in one process. Train through it, and hold it until backward has run (its
    hooks do the all-reduce); sample and save with model. find_unused: a forward may leave
    some parameters out (PPO's critic warm-up trains the critic alone)."""
    return DistributedDataParallel(model, find_unused_parameters=find_unused) if ddp else model


def share(cfg, field):
    """cfg with its batch size `field` divided by world_size: what one rank runs of each batch
    (cfg itself in one process)."""
    return dataclasses.replace(cfg, **{field: getattr(cfg, field) // world_size}) if ddp else cfg


def rank_seed(seed):
    """This rank's seed for its own batches: seed in one process and on rank 0."""
    return seed + 7919 * rank


def rank_generator(gen):
    """The generator this rank samples with: gen itself in one process. Under torchrun gen
    draws a seed (so gen stays the same on every rank, as the checkpoint has it) and each
    rank gets a new generator of that seed plus its rank: the ranks draw different numbers."""
    if not ddp:
        return gen
    seed = torch.randint(2 ** 62, (1,), generator=gen, device=gen.device).item()
    return torch.Generator(device=gen.device).manual_seed(seed + rank)


# -----------------------------------------------------------------------------
# Sums over every rank's data (no gradient flows through them)

def all_reduce_sum(x):
    """A tensor summed over the ranks (on every rank); x itself in one process."""
    if not ddp:
        return x
    y = x.detach().to(comm_device, copy=True)
    dist.all_reduce(y)
    return y.to(x.device)
