"""Tests for machinery/distributed.py and the torchrun path of train.py, on CPU with gloo and 2
processes: the DDP gradient of the SFT loss on each rank's slice equals the one-process
gradient of the whole batch; PPO's warm-up and update through DDP keep the ranks identical;
`torchrun --nproc_per_node=2 train.py` runs the small pipeline end to end, writes the same
files as one process, and its SFT weights match one process's."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from machinery import distributed as dist  # noqa: E402
from machinery.batching import ByLength  # noqa: E402
import ppo  # noqa: E402
import sft  # noqa: E402
from conftest import tiny  # noqa: E402
from test_train import ENV, ROOT, SMALL, ok  # noqa: E402

WORLD = 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(rank, port):
    """Join a gloo group of WORLD processes as torchrun's environment would set it up."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert dist.setup("cpu") == "cpu" and dist.ddp and dist.world_size == WORLD


def spawn(fn, *args):
    """fn(rank, port, *args) in WORLD processes; an assertion failing in any of them fails the test."""
    mp.spawn(fn, (free_port(), *args), nprocs=WORLD)


def sft_batch(n=7, seed=0):
    """n SFT examples of different lengths (so the ranks' slices hold different numbers of targets)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p, r = torch.randint(3, 50, (2 + i % 3,), generator=g).tolist(), torch.randint(3, 50, (3 + 2 * i,), generator=g).tolist()
        out.append((p + r, [-1] * (len(p) - 1) + r + [-1]))
    return out


def sft_grads(rank, port, path):
    join(rank, port)
    model, batch = tiny(), sft_batch()
    model.train()
    n_targets = sum(t != -1 for _, y in batch for t in y) / dist.world_size  # as sft.stage_sft
    ddp_model = dist.wrap(model)  # held until after backward: its hooks do the all-reduce
    loss, _, _ = sft.sft_loss(ddp_model, dist.shard(batch), 0, "cpu", n_targets=n_targets)
    loss.backward()
    if dist.master:
        torch.save({k: p.grad for k, p in model.named_parameters()}, path)


def test_ddp_sft_gradient_equals_one_process_gradient(tmp_path):
    """Each rank's slice, its summed loss over the global targets / world size: DDP's average
    of the ranks' gradients is the one-process gradient of the whole batch (uneven slices)."""
    path = str(tmp_path / "grads.pt")
    spawn(sft_grads, path)
    model = tiny()
    model.train()
    loss, _, _ = sft.sft_loss(model, sft_batch(), 0, "cpu")
    loss.backward()
    ddp = torch.load(path)
    for k, p in model.named_parameters():
        torch.testing.assert_close(ddp[k], p.grad, rtol=1e-5, atol=1e-7)


def ppo_steps(rank, port, path):
    """As train.stage_rl under torchrun: each rank its own prompts and sampling stream, the
    critic's warm-up and one update through DDP(ByLength(agent)); saves the weights."""
    join(rank, port)
    agent = ppo.ActorCritic(tiny(0)).train(False)  # the same initial weights on every rank
    ref = ppo.ActorCritic(tiny(0), critic=False).requires_grad_(False)
    net = dist.wrap(ByLength(agent), find_unused=True)
    cfg = dist.share(ppo.PPOConfig(rollout_batch=8, minibatch=4, ppo_lr=1e-3, vf_lr=1e-3), "minibatch")
    g = torch.Generator().manual_seed(dist.rank_seed(0))
    prompts = [torch.randint(2, 50, (3 + i % 4,), generator=g).tolist() for i in range(4)]  # this rank's share
    b = ppo.rollout(agent, net, ByLength(ref), lambda i, r, m: m.float(), prompts, dist.rank_generator(g), cfg,
                    1, 0, 6)
    rewards = ppo.kl_penalty_rewards(b["logp"], b["ref_logp"], b["resp_mask"], cfg.beta) + b["task_rewards"]
    advantages, b["returns"] = ppo.compute_gae(rewards, b["values"], b["resp_mask"], cfg.gamma, cfg.lam)
    b["advantages"] = ppo.whiten(advantages, b["resp_mask"])
    opt = ppo.make_optimizer(agent, cfg)
    policy_before = {k: v.clone() for k, v in agent.policy.state_dict().items()}
    ppo.warm_up_critic(net, opt, b, cfg, torch.Generator().manual_seed(0))
    warmed = {k: v.clone() for k, v in agent.state_dict().items()}
    ppo.update(net, opt, b, cfg, torch.Generator().manual_seed(0))
    torch.save({"policy_before": policy_before, "warmed": warmed, "updated": agent.state_dict(),
                "tokens": b["idx"]}, f"{path}.{rank}")


def test_ppo_under_ddp_keeps_the_ranks_identical(tmp_path):
    """Two ranks sample different responses, yet after the critic's warm-up (the policy left
    out of the graph: DDP's find_unused) and a PPO update through DDP their weights are equal,
    the warm-up has left the policy unchanged and moved the critic, and the update the policy."""
    path = str(tmp_path / "ppo")
    spawn(ppo_steps, path)
    r = [torch.load(f"{path}.{k}") for k in range(WORLD)]
    assert not torch.equal(r[0]["tokens"], r[1]["tokens"])  # each rank its own data
    for k in r[0]["updated"]:
        torch.testing.assert_close(r[0]["warmed"][k], r[1]["warmed"][k], rtol=0, atol=1e-6, msg=k)
        torch.testing.assert_close(r[0]["updated"][k], r[1]["updated"][k], rtol=0, atol=1e-6, msg=k)
    for k, v in r[0]["policy_before"].items():
        assert torch.equal(r[0]["warmed"][f"policy.{k}"], v), k
    assert any(not torch.equal(r[0]["warmed"][f"policy.{k}"], r[0]["updated"][f"policy.{k}"]) for k in r[0]["policy_before"])
    assert not torch.equal(r[0]["warmed"]["critic.head.weight"], torch.zeros_like(r[0]["warmed"]["critic.head.weight"]))


def files(out):
    return sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The small pipeline in one process and under torchrun with 2 processes, side by side: their folders."""
    one, two = (str(tmp_path_factory.mktemp(n) / "run") for n in ("one", "two"))
    args = ["train.py", *SMALL, "--methods=ppo,fg_ppo"]  # both reward models' kinds, both reward shapes
    procs = [subprocess.Popen([sys.executable, *args, f"--out={one}"], cwd=ROOT, env=ENV, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE),
             subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={WORLD}", *args, f"--out={two}"], cwd=ROOT, env=ENV, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        ok(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return one, two


def test_torchrun_pipeline_writes_the_same_files_as_one_process(runs):
    """torchrun with 2 processes completes the small pipeline, writes the same files as one
    process (rank 0 alone writes: no stray temp files), and results.json records world_size."""
    one, two = runs
    assert files(one) == files(two)
    res = [json.load(open(os.path.join(d, "results.json"))) for d in runs]
    assert [r["processes"]["world_size"] for r in res] == [1, WORLD]
    assert res[1]["processes"]["jobs"] == 1
    assert set(res[0]["methods"]) == set(res[1]["methods"])
    log = torch.load(os.path.join(two, "policies", "fg_ppo_seed1337.pt"), weights_only=True)["log"]
    assert len(log) == 4 and all(r["length"] > 0 for r in log)


def test_torchrun_sft_weights_match_one_process(runs):
    """Every SFT step under DDP takes the one-process step on the same global batch: after the
    small run's 40 AdamW steps the weights agree to float32 rounding, amplified by the steps."""
    a, b = (torch.load(os.path.join(d, "sft", "model.pt"), weights_only=True)["model"] for d in runs)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-3, msg=k)


def test_torchrun_refuses_jobs(tmp_path):
    """--jobs>1 (worker processes) under torchrun: one line, every rank stops."""
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
                        "train.py", *SMALL, "--jobs=2", f"--out={tmp_path / 'run'}"], cwd=ROOT, env=ENV, text=True,
                       capture_output=True, timeout=300)
    assert p.returncode != 0
    assert "rank 0: error: --jobs>1 and torchrun do not mix" in p.stderr
