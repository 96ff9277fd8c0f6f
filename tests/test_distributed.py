"""Distributed data parallel on torchrun (CPU, gloo): `bigmodel train --nproc-per-node 2` gives the weights one
process gives (the global batch is split, gradients averaged), with gradient accumulation too; evaluation over
processes counts every example once; a checkpoint from 2 processes resumes on 1 and back; a failing rank ends the
job quickly; a killed worker is restarted (`--max-restarts`) and the run ends as if never interrupted."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, run_cli

RECIPE = {  # no BatchNorm, no dropout: the only difference between 1 and N processes is float rounding
    "name": "ddp",
    "task": "tabular_classification",
    "data": {"source": "wine"},
    "model": {"name": "mlp", "hidden": [16], "batchnorm": False, "dropout": 0.0},
    "train": {
        "epochs": 4,  # 7 steps per epoch: 28 steps
        "batch_size": 16,
        "precision": "fp32",
        "baseline": False,
        "optimizer": {"name": "adamw", "lr": 3.0e-3},
        "checkpoint_every": 4,
        "log_every": 5,
    },
    "seed": 0,
}

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def weights(run):
    return load_file(str(run / "model" / "model.safetensors"))


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp") / "ddp.yaml"
    path.write_text(yaml.safe_dump(RECIPE), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def single(recipe_file):
    out = recipe_file.parent / "single"
    run_cli("train", str(recipe_file), "--out", str(out), "--no-progress", check=True)
    return out


def train(recipe_file, out, *args, env=None, check=True):
    return run_cli("train", str(recipe_file), *args, "--out", str(out), "--no-progress", env=env, check=check)


def test_two_processes_give_one_process_weights(recipe_file, single, tmp_path):
    two = tmp_path / "two"
    proc = train(recipe_file, two, "--nproc-per-node", "2")
    assert proc.stdout.strip().splitlines()[-1] == str(two)  # rank 0 reports; the other ranks print nothing
    assert max_diff(weights(single), weights(two)) < 1e-6
    # the same validation metrics (sums reduced over processes) and the same log, step for step
    log1 = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    log2 = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log1] == [r["step"] for r in log2]
    for a, b in zip(log1, log2, strict=True):
        if a["split"] in ("val", "test"):
            assert a["accuracy"] == b["accuracy"] and a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    # gradient accumulation (no all-reduce until the last micro-batch): 2 x 8 per step is the same global batch
    acc = tmp_path / "accum"
    train(recipe_file, acc, "train.batch_size=8", "train.grad_accum_steps=2", "--nproc-per-node", "2")
    assert max_diff(weights(single), weights(acc)) < 1e-6


@pytest.mark.slow
def test_a_time_limit_stops_every_process_after_the_same_step(recipe_file, tmp_path):
    """`train.time_limit_s` over 2 processes: they agree at a log point and stop together (no rank left waiting)."""
    out = tmp_path / "limited"
    train(recipe_file, out, "train.time_limit_s=0.001", "train.log_every=3", "--nproc-per-node", "2")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3  # the first log point after the limit passed


@pytest.mark.slow  # the module itself is checked against BatchNorm below, in the default run
def test_sync_batchnorm_on_cpu_gives_one_process_weights(recipe_file, tmp_path):
    """BatchNorm over the global batch on gloo (`train.distributed.sync_batchnorm`): 2 processes = 1 process. Without
    it each process normalises its half batch, and the weights differ by ~0.07."""
    bn = ["model.batchnorm=true", "train.distributed.sync_batchnorm=true"]
    one, two = tmp_path / "one", tmp_path / "two"
    train(recipe_file, one, *bn)
    train(recipe_file, two, *bn, "--nproc-per-node", "2")
    a, b = weights(one), weights(two)
    assert "body.1.running_var" in a  # the BatchNorm's statistics are compared too
    assert max_diff(a, b) < 1e-6


def test_process_group_batchnorm_matches_batchnorm_forward_and_backward(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_bn_worker, args=(2, str(tmp_path)), nprocs=2, join=True)


def _bn_worker(rank, world, folder):
    import torch.distributed as dist

    from bigmodel.training.syncbn import ProcessGroupBatchNorm, convert

    dist.init_process_group("gloo", init_method=f"file://{folder}/rdzv", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 4, 4, generator=g) * 3 + 1
    ref = torch.nn.BatchNorm2d(3, momentum=None)  # cumulative averaging, the harder case
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5, generator=g)
        ref.bias.uniform_(-1, 1, generator=g)
    sync = convert(torch.nn.Sequential(ref)).train()
    assert isinstance(sync[0], ProcessGroupBatchNorm)
    ref = torch.nn.BatchNorm2d(3, momentum=None)
    ref.load_state_dict(sync[0].state_dict())
    xr = x.clone().requires_grad_(True)
    xs = x[rank * 3 : rank * 3 + 3].clone().requires_grad_(True)  # this process's half of the batch
    w = torch.randn(6, 3, 4, 4, generator=g)
    (ref(xr) * w).sum().backward()
    (sync(xs) * w[rank * 3 : rank * 3 + 3]).sum().backward()
    torch.testing.assert_close(sync[0](xs).detach(), ref(xr).detach()[rank * 3 : rank * 3 + 3], atol=1e-6, rtol=0)
    torch.testing.assert_close(xs.grad, xr.grad[rank * 3 : rank * 3 + 3], atol=1e-6, rtol=0)
    grads = torch.cat([sync[0].weight.grad, sync[0].bias.grad])
    dist.all_reduce(grads)  # what DDP sums (then averages): the parameter gradients of the whole batch
    torch.testing.assert_close(grads, torch.cat([ref.weight.grad, ref.bias.grad]), atol=1e-5, rtol=0)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(sync[0], name), getattr(ref, name), atol=1e-6, rtol=0)
    sync.eval()  # eval mode: an ordinary BatchNorm with the running statistics
    torch.testing.assert_close(sync(xs), ref.eval()(xr)[rank * 3 : rank * 3 + 3], atol=1e-6, rtol=0)
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_failing_rank_ends_the_job_quickly(recipe_file, tmp_path):
    t0 = time.perf_counter()
    proc = train(
        recipe_file,
        tmp_path / "r",
        "--nproc-per-node",
        "2",
        env={"BIGMODEL_FAULT": "raise_after_step:10@1"},
        check=False,
    )
    assert proc.returncode != 0 and time.perf_counter() - t0 < 60
    assert "injected fault" in proc.stderr


def test_evaluation_counts_every_example_once_on_three_processes(tmp_path):
    """10 validation examples on 3 ranks (4 + 3 + 3 of each global batch): the reduced metrics equal one process's."""
    import torch.multiprocessing as mp

    mp.spawn(_eval_worker, args=(3, str(tmp_path / "store")), nprocs=3, join=True)
    results = [json.loads((tmp_path / "store" / f"{r}.json").read_text()) for r in range(3)]
    single = json.loads((tmp_path / "store" / "single.json").read_text())
    for r in results:  # counts exactly; the loss sum up to the order of float additions
        assert r["num_examples"] == single["num_examples"] == 10
        assert r["accuracy"] == single["accuracy"] and r["confusion_matrix"] == single["confusion_matrix"]
        assert r["loss"] == pytest.approx(single["loss"], abs=1e-6)


def _eval_worker(rank, world, folder):
    import torch.distributed as dist

    from bigmodel.data.loader import BatchLoader, Normalizer
    from bigmodel.data.sources import ImageSplit
    from bigmodel.tasks.classification import ClassificationTask
    from bigmodel.training.ddp import DDPStrategy

    os.makedirs(folder, exist_ok=True)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rdzv", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    split = ImageSplit(torch.randint(0, 256, (10, 1, 4, 4), generator=g, dtype=torch.uint8), torch.arange(10) % 3)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    torch.manual_seed(0)
    model[1].reset_parameters()
    task = ClassificationTask(3)

    def evaluate(r, w):
        loader = BatchLoader(split, 4, Normalizer([0.5], [0.25]), shuffle=False, rank=r, world_size=w)
        m = task.new_metrics()
        with torch.no_grad():
            for batch in loader.epoch(0):
                task.eval_batch(model, batch, m)
        return m

    m = evaluate(rank, world)
    DDPStrategy().reduce_metrics(m)
    out = {k: v for k, v in m.compute().items() if k in ("accuracy", "num_examples", "confusion_matrix", "loss")}
    with open(f"{folder}/{rank}.json", "w") as f:
        json.dump(out, f)
    if rank == 0:
        s = evaluate(0, 1).compute()
        with open(f"{folder}/single.json", "w") as f:
            json.dump({k: v for k, v in s.items() if k in out}, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_checkpoints_resume_across_world_sizes_and_a_killed_worker_restarts(recipe_file, single, tmp_path):
    # written by 2 processes (both killed after step 12), resumed by 1
    two = tmp_path / "two-to-one"
    train(recipe_file, two, "--nproc-per-node", "2", env={"BIGMODEL_FAULT": "kill_after_step:12"}, check=False)
    assert not (two / "model").exists()
    run_cli("train", "--resume", str(two), "--no-progress", check=True)
    assert max_diff(weights(single), weights(two)) < 1e-6
    # written by 1 process (killed after step 12), resumed by 2
    one = tmp_path / "one-to-two"
    train(recipe_file, one, env={"BIGMODEL_FAULT": "kill_after_step:12"}, check=False)
    run_cli("train", "--resume", str(one), "--nproc-per-node", "2", "--no-progress", check=True)
    assert max_diff(weights(single), weights(one)) < 1e-6
    # kill -9 of one worker; torchrun restarts both, they resume from the last checkpoint: bit for bit the
    # uninterrupted 2-process run
    full, restarted = tmp_path / "full", tmp_path / "restarted"
    train(recipe_file, full, "--nproc-per-node", "2")
    env = {"BIGMODEL_FAULT": "kill_after_step:12@1"}
    train(recipe_file, restarted, "--nproc-per-node", "2", "--max-restarts", "1", env=env)
    a, b = weights(full), weights(restarted)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_node_launch_on_loopback(recipe_file, single, tmp_path):
    """Two `bigmodel train --nnodes 2` commands (node ranks 0 and 1) meeting at 127.0.0.1: one process's weights."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    out = tmp_path / "nodes"
    node = ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port]
    cmd = [sys.executable, "-m", "bigmodel", "train", str(recipe_file), *node, "--out", str(out), "--no-progress"]
    other = subprocess.Popen([*cmd, "--node-rank", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run_cli("train", str(recipe_file), *node, "--node-rank", "0", "--out", str(out), "--no-progress", check=True)
    assert other.wait(timeout=120) == 0
    assert max_diff(weights(single), weights(out)) < 1e-6


# ------------------------------------------------------------------------------------------------------------ FSDP2
GPT = [  # the GPT recipe at debug size: 2 epochs x 6 steps, a checkpoint every 4 steps
    "train.epochs=2",
    "data.batches_per_epoch=6",
    "data.val_fraction=0.01",
    "data.test_fraction=0.01",
    "model.dim=32",
    "model.num_layers=2",
    "train.checkpoint_every=4",
    "train.log_every=2",
]
GPT_RECIPE = str(ROOT / "recipes" / "shakespeare_char_gpt.yaml")


def train_gpt(out, *args, env=None, check=True):
    return run_cli("train", GPT_RECIPE, *GPT, *args, "--out", str(out), "--no-progress", env=env, check=check)


@pytest.fixture(scope="module")
def gpt_single(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt") / "single"
    train_gpt(out)
    return out


def test_fsdp2_shards_the_gpt_and_gives_one_process_weights(gpt_single, tmp_path):
    out = tmp_path / "fsdp2"
    train_gpt(out, "train.distributed.strategy=fsdp2", "--nproc-per-node", "2")
    # the checkpoint is sharded: each rank wrote its own safetensors file, rank 0 the state
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    shards = sorted(p.name for p in (ckpt / "sharded").glob("*.safetensors"))
    assert len(shards) == 2 and not (ckpt / "model.safetensors").exists()
    state = json.loads((ckpt / "state.json").read_text())
    assert state["sharded"] and state["train_state"]["samples_seen"] == 12 * 12  # global samples, 12 steps of 12
    # each shard holds part of each block's weights (its slice of dim 0), not whole tensors
    from safetensors import safe_open

    with safe_open(str(ckpt / "sharded" / shards[0]), "pt") as f:
        fc = f.get_slice("model.blocks.0.mlp.0.weight").get_shape()
    assert fc == [64, 32]  # of (128, 32)
    # the artifact is one plain model, the same as one process's (float rounding of the reductions aside)
    assert max_diff(weights(gpt_single), weights(out)) < 1e-6
    assert json.loads((out / "env.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_fsdp2_checkpoints_reshard_and_a_killed_worker_resumes_exactly(gpt_single, tmp_path):
    fsdp = ["train.distributed.strategy=fsdp2"]
    full = tmp_path / "full"
    train_gpt(full, *fsdp, "--nproc-per-node", "2")
    # kill -9 of rank 1 after step 6; torchrun restarts both workers, which resume from the sharded checkpoint of
    # step 4: bit for bit the uninterrupted run
    restarted = tmp_path / "restarted"
    env = {"BIGMODEL_FAULT": "kill_after_step:6@1"}
    train_gpt(restarted, *fsdp, "--nproc-per-node", "2", "--max-restarts", "1", env=env)
    a, b = weights(full), weights(restarted)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # written by 2 FSDP2 ranks, resumed by 1 process (no torch.distributed); written by 1, resumed by 2 FSDP2 ranks
    two = tmp_path / "two-to-one"
    train_gpt(two, *fsdp, "--nproc-per-node", "2", env={"BIGMODEL_FAULT": "kill_after_step:6"}, check=False)
    assert not (two / "model").exists()
    run_cli("train", "--resume", str(two), "--no-progress", check=True)
    one = tmp_path / "one-to-two"
    train_gpt(one, *fsdp, env={"BIGMODEL_FAULT": "kill_after_step:6"}, check=False)
    run_cli("train", "--resume", str(one), "--nproc-per-node", "2", "--no-progress", check=True)
    for run in (two, one):
        assert max_diff(weights(gpt_single), weights(run)) < 1e-6
        logs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        ref = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in logs] == [r["step"] for r in ref]
        for a, b in zip(logs, ref, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL): none here"
)
def test_nccl_on_two_gpus(recipe_file, tmp_path):
    """The same recipes on 2 GPUs under NCCL (backend auto): DDP agrees with one GPU, FSDP2 trains the GPT and its
    sharded checkpoint resumes on one process."""
    one, two = tmp_path / "one", tmp_path / "two"
    train(recipe_file, one, "train.device=cuda")
    train(recipe_file, two, "train.device=cuda", "--nproc-per-node", "2")
    assert json.loads((two / "env.json").read_text())["world_size"] == 2
    assert max_diff(weights(one), weights(two)) < 1e-4  # GPU reductions are not bit-reproducible
    fsdp = tmp_path / "fsdp2"
    env = {"BIGMODEL_FAULT": "kill_after_step:6"}
    fsdp_args = ["train.device=cuda", "train.distributed.strategy=fsdp2", "--nproc-per-node", "2"]
    train_gpt(fsdp, *fsdp_args, env=env, check=False)
    run_cli("train", "--resume", str(fsdp), "--no-progress", check=True)
    assert json.loads((fsdp / "summary.json").read_text())["steps"] == 12
