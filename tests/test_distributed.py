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

from conftest import run_cli

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
