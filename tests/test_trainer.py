"""The Trainer: optimizers, schedules, L1, clipping, accumulation, early stopping, divergence, best-model selection."""

from __future__ import annotations

import json
import os

import pytest
import torch

from bigmodel.api import build_experiment
from bigmodel.config import ScheduleConfig, validate_recipe
from bigmodel.errors import TrainingDiverged, UserError
from bigmodel.training.optim import lr_factor
from bigmodel.training.trainer import Trainer
from conftest import run_cli, tiny_recipe


def make_trainer(run_dir=None, **over) -> Trainer:
    recipe = validate_recipe(tiny_recipe(**{"train.precision": "fp32", **over}))
    return build_experiment(recipe).trainer(run_dir=run_dir)


@pytest.mark.parametrize(
    ("opt", "cls"),
    [
        ({"name": "sgd", "lr": 0.05, "momentum": 0.9}, torch.optim.SGD),
        ({"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True}, torch.optim.SGD),
        ({"name": "adam", "lr": 0.01, "weight_decay": 1e-4}, torch.optim.Adam),
        ({"name": "adamw", "lr": 0.01, "weight_decay": 0.05}, torch.optim.AdamW),
    ],
)
def test_each_optimizer_trains(opt, cls):
    t = make_trainer(**{"train.optimizer": opt, "train.epochs": 3})
    assert type(t.optimizer) is cls
    g0 = t.optimizer.param_groups[0]
    if opt["name"] == "sgd":
        assert g0["momentum"] == 0.9 and g0["nesterov"] == opt.get("nesterov", False)
    assert g0["weight_decay"] == opt.get("weight_decay", 0.0)
    assert t.optimizer.param_groups[1]["weight_decay"] == 0.0  # biases and norms are not decayed
    before = t.evaluate(t.val_loader)["loss"]
    t.fit()
    after = t.evaluate(t.val_loader)
    assert after["loss"] < before * 0.7 and after["accuracy"] > 0.5


def test_schedules():
    total, spe = 100, 10
    const = ScheduleConfig(name="constant")
    assert [lr_factor(const, s, total, spe) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    warm = ScheduleConfig(name="constant", warmup_steps=4)
    assert [lr_factor(warm, s, total, spe) for s in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    step = ScheduleConfig(name="step", step_size=3, gamma=0.5)
    assert [lr_factor(step, s, total, spe) for s in (0, 29, 30, 59, 60)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    cos = ScheduleConfig(name="cosine", min_lr_ratio=0.1)
    assert lr_factor(cos, 0, total, spe) == pytest.approx(1.0)
    assert lr_factor(cos, 50, total, spe) == pytest.approx(0.55)
    assert lr_factor(cos, 100, total, spe) == pytest.approx(0.1)
    one = ScheduleConfig(name="onecycle", pct_start=0.3, div_factor=10)
    f = [lr_factor(one, s, total, spe) for s in range(total + 1)]
    assert f[0] == pytest.approx(0.1) and max(f) == pytest.approx(1.0) and f.index(max(f)) == 30
    assert f[-1] == pytest.approx(0.0, abs=1e-9)
    assert all(a <= b for a, b in zip(f[:30], f[1:31], strict=True)) and all(
        a >= b for a, b in zip(f[30:-1], f[31:], strict=True)
    )


def test_trainer_applies_the_schedule_each_step():
    t = make_trainer(**{"train.schedule": {"name": "cosine"}, "train.optimizer.lr": 0.02})
    batches = t.train_loader.epoch(0)
    for step in range(3):
        t.train_step([next(batches)])
        t.state.step += 1
        expected = 0.02 * lr_factor(t.cfg.schedule, step, t.total_steps, t.steps_per_epoch)
        assert all(g["lr"] == pytest.approx(expected) for g in t.optimizer.param_groups)


def test_l1_penalty_shrinks_weights_and_enters_the_loss():
    plain = make_trainer(**{"train.epochs": 3, "model.dropout": 0.0})
    l1 = make_trainer(**{"train.epochs": 3, "train.l1": 1e-3, "model.dropout": 0.0})
    batch = next(iter(l1.train_loader.epoch(0)))
    # With identical weights, the step's loss is the task loss plus l1 * sum|w| over weight tensors.
    with torch.no_grad():
        task_loss = l1.task.loss(l1.model, batch).item()
        penalty = sum(p.abs().sum().item() for p in l1.model.parameters() if p.ndim >= 2)
    got = l1.train_step([batch]).item()
    assert got == pytest.approx(task_loss + 1e-3 * penalty, rel=1e-4)
    plain.fit()
    l1 = make_trainer(**{"train.epochs": 3, "train.l1": 1e-3, "model.dropout": 0.0})
    l1.fit()

    def norm1(m):
        return sum(p.abs().sum().item() for p in m.parameters() if p.ndim >= 2)

    assert norm1(l1.model) < 0.8 * norm1(plain.model)


def test_gradient_clipping_bounds_the_global_norm():
    t = make_trainer(**{"train.grad_clip": 0.01})
    norms = []

    def pre_hook(opt, args, kwargs):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    t.optimizer.register_step_pre_hook(pre_hook)
    batches = t.train_loader.epoch(0)
    for _ in range(3):
        t.train_step([next(batches)])
    assert norms and all(n <= 0.01 * (1 + 1e-5) for n in norms)
    unclipped = make_trainer()
    raw = []
    unclipped.optimizer.register_step_pre_hook(
        lambda o, a, k: raw.append(
            torch.linalg.vector_norm(torch.stack([p.grad.norm() for g in o.param_groups for p in g["params"]])).item()
        )
    )
    unclipped.train_step([next(iter(unclipped.train_loader.epoch(0)))])
    assert raw[0] > 0.1  # so the bound above really was enforced by clipping


def test_accumulating_4_micro_batches_equals_one_big_batch():
    over = {"model": {"name": "seed-cnn", "hidden": 32}, "train.optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}}
    big = make_trainer(**over, **{"train.batch_size": 64})
    acc = make_trainer(**over, **{"train.batch_size": 16, "train.grad_accum_steps": 4})
    acc.model.load_state_dict(big.model.state_dict())
    x, y = next(iter(big.train_loader.epoch(0)))
    big.train_step([(x, y)])
    acc.train_step([(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)])
    for (name, a), b in zip(big.model.named_parameters(), acc.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # And the data path agrees: 4 micro-batches of B/4 are the same examples as one batch of B.
    micro = list(acc.train_loader.epoch(0))[:4]
    assert torch.equal(torch.cat([m[1] for m in micro]), y)
    assert acc.steps_per_epoch == big.steps_per_epoch


def test_early_stopping_and_best_model_selection(tmp_path):
    # No change can beat min_delta 10 on val_loss: patience 2 stops after 3 evaluations.
    t = make_trainer(
        run_dir=tmp_path,
        **{
            "train.epochs": 10,
            "train.early_stopping": {"patience": 2, "min_delta": 10.0},
            "train.monitor": "val_loss",
        },
    )
    state = t.fit()
    assert state.stopped_early and state.epoch == 3 and state.best_epoch == 1
    good = make_trainer(**{"train.epochs": 4, "train.early_stopping": {"patience": 5}})
    st = good.fit()
    assert not st.stopped_early and st.epoch == 4
    # select_best: the returned model's validation metric is the best one seen.
    assert good.evaluate(good.val_loader)["accuracy"] == pytest.approx(st.best_value)


def test_epochs_auto_plans_whole_epochs_that_reach_min_steps():
    from bigmodel.config import TrainConfig
    from bigmodel.training.trainer import planned_epochs

    auto = TrainConfig(epochs="auto", min_steps=1000, max_epochs=100)
    assert planned_epochs(auto, 16) == 63  # 1,000 examples in batches of 64: more passes
    assert planned_epochs(auto, 427) == 3  # 27k examples: 1,281 steps
    assert planned_epochs(auto, 4688) == 1  # 300k examples: one pass, not a fixed epoch count
    assert planned_epochs(auto, 1) == 100  # capped by max_epochs
    assert planned_epochs(TrainConfig(epochs=7), 16) == 7
    t = make_trainer(**{"train.epochs": "auto", "train.min_steps": 5})
    s = t.steps_per_epoch
    t2 = make_trainer(**{"train.epochs": "auto", "train.min_steps": 2 * s + 1})
    assert t2.epochs == 3 and t2.total_steps == 3 * s
    assert t2.fit().epoch == 3 and t.epochs == -(-5 // s)


def test_a_step_budget_per_precision_follows_the_precision_the_run_trains_in(tmp_path, write_recipe):
    """`min_steps: {fp32: N, bf16: M}`: a run in bf16 autocast plans M steps, in fp32 N (a missing bf16 budget takes
    fp32's); the summary names the precision; a mapping without fp32 is a one-line error."""
    import pydantic

    from bigmodel.config import TrainConfig
    from bigmodel.training.trainer import planned_epochs

    both = TrainConfig(epochs="auto", min_steps={"fp32": 100, "bf16": 250})
    assert planned_epochs(both, 50) == 2 and planned_epochs(both, 50, torch.bfloat16) == 5
    assert planned_epochs(TrainConfig(epochs="auto", min_steps={"fp32": 100}), 50, torch.bfloat16) == 2
    with pytest.raises(pydantic.ValidationError, match="needs 'fp32'"):
        TrainConfig(epochs="auto", min_steps={"bf16": 100})
    runs = {}
    for precision in ("fp32", "bf16"):
        over = {"train.epochs": "auto", "train.min_steps": {"fp32": 3, "bf16": 6}, "train.precision": precision}
        t = make_trainer(**over)
        runs[precision] = t.epochs
        assert t.epochs == -(-{"fp32": 3, "bf16": 6}[precision] // t.steps_per_epoch)
    assert runs["bf16"] >= runs["fp32"]
    r = run_cli(
        "train",
        str(write_recipe(tiny_recipe(**{"train.epochs": "auto", "train.min_steps": {"fp32": 2, "bf16": 4}}))),
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
        "train.precision=fp32",
        check=True,
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["precision"] == "fp32" and summary["epochs_planned"] >= 1, r.stdout
    bad = run_cli("train", str(write_recipe(tiny_recipe(**{"train.min_steps": {"bf16": 4}}))), "--no-progress")
    assert bad.returncode == 2 and "train.min_steps" in bad.stderr and "Traceback" not in bad.stderr


def test_a_resumed_run_keeps_the_precision_it_was_planned_in(tmp_path, write_recipe):
    """`precision: auto` picks by machine, and a per-precision budget makes the plan a function of it: a run started
    where bf16 is native and resumed where it is not (here: the same CPU capped at AVX2) continues in bf16 for the
    epochs it planned, rather than switching to fp32 and another schedule. A Trainer built in another precision is
    still refused in one line naming both plans."""
    import os
    import signal
    import subprocess
    import sys

    from bigmodel.training.trainer import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        pytest.skip("needs a CPU with native bf16 (the first run must train in bf16)")
    r = tiny_recipe(**{"train.epochs": "auto", "train.min_steps": {"fp32": 2, "bf16": 40}, "train.checkpoint_every": 2})
    recipe = write_recipe(r)
    ref = tmp_path / "ref"
    run_cli("train", str(recipe), "--out", str(ref), "--no-progress", check=True)
    run = tmp_path / "run"
    killed = run_cli(
        "train", str(recipe), "--out", str(run), "--no-progress", env={"BIGMODEL_FAULT": "kill_after_step:3"}
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    avx2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    probe = "from bigmodel.training.trainer import cpu_has_native_bf16 as f; print(f())"
    env = {**os.environ, **avx2}
    fp32_here = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    run_cli("train", "--resume", str(run), "--no-progress", env=avx2, check=True)
    planned, resumed = (json.loads((d / "summary.json").read_text()) for d in (ref, run))
    assert resumed["precision"] == planned["precision"] == "bf16"
    assert resumed["epochs_planned"] == planned["epochs_planned"] and resumed["steps"] == planned["steps"]
    assert fp32_here.stdout.strip() == "False", fp32_here  # there, auto alone would have picked fp32

    from bigmodel.training.checkpoint import latest_checkpoint

    budget = {"train.epochs": "auto", "train.min_steps": {"fp32": 2, "bf16": 40}, "train.checkpoint_every": 2}
    t = make_trainer(run_dir=tmp_path / "t", **budget)  # fp32
    with pytest.raises(UserError, match=r"planned for \d+ epochs training in bf16; here it would train in fp32"):
        t.resume(latest_checkpoint(run / "checkpoints"))


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    t = make_trainer(
        run_dir=tmp_path,
        **{
            "train.optimizer": {"name": "sgd", "lr": 10.0, "momentum": 0.0},
            "train.checkpoint_every": 1,
            "train.epochs": 5,
        },
    )
    # Poison the data: a non-finite input makes a non-finite loss, the way a real data bug does.
    orig = t.train_loader.normalizer
    t.train_loader.normalizer = lambda xb: orig(xb) * (float("inf") if t.state.step >= 3 else 1.0)
    with pytest.raises(
        TrainingDiverged, match=r"loss became (nan|inf) at step 4 .*last good checkpoint: .*step-00000003"
    ):
        t.fit()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000003"
    weights = tmp_path / "checkpoints" / "step-00000003" / "model.safetensors"
    from safetensors.torch import load_file

    assert all(torch.isfinite(v).all() for v in load_file(str(weights)).values())


def test_early_stopping_counts_only_evaluations_without_improvement():
    t = make_trainer(**{"train.early_stopping": {"patience": 2, "min_delta": 0.01}})
    seq = [0.50, 0.60, 0.605, 0.70, 0.69, 0.705, 0.71]  # improvements: 1st, 2nd, 4th; 0.605 and 0.705 are < min_delta
    stopped_at = None
    for i, acc in enumerate(seq):
        t._after_eval({"accuracy": acc, "loss": 1.0})
        if t.state.stopped_early and stopped_at is None:
            stopped_at = i
    assert stopped_at == 5  # two evaluations in a row (0.69, 0.705) failed to beat 0.70 by 0.01
    assert t.state.best_value == pytest.approx(0.70)


@pytest.mark.parametrize("limit", ["train.max_steps=3", "train.time_limit_s=0.001"])
def test_step_and_time_limits_stop_evaluate_and_checkpoint(limit, tmp_path):
    import json

    from bigmodel import api

    key, value = limit.split("=")
    res = api.train(
        validate_recipe(tiny_recipe(**{key: float(value) if "time" in key else int(value)})),
        out=tmp_path / "run",
        progress=False,
    )
    expected = 3 if "max_steps" in key else 1  # a time limit this short stops after the first step
    assert res.steps == expected
    records = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"]
    assert val and val[-1]["step"] == expected  # evaluated on the way out
    assert (res.run_dir / "checkpoints" / f"step-{expected:08d}").is_dir()


def test_bf16_is_not_native_when_kernels_are_capped_below_avx512():
    """An AVX-512-BF16 machine running with AVX2 kernels (as an AVX2-only CPU does) emulates bf16 at ~1/10 of fp32's
    speed: `precision: auto` must then pick fp32, and the run's environment must say the caps were set."""
    import subprocess
    import sys

    code = (
        "import json, torch; from bigmodel.training.trainer import cpu_has_native_bf16, isa_caps, resolve_precision;"
        "print(json.dumps([cpu_has_native_bf16(), str(resolve_precision('auto', torch.device('cpu'))), isa_caps()]))"
    )
    for env in ({"ATEN_CPU_CAPABILITY": "avx2"}, {"ONEDNN_MAX_CPU_ISA": "AVX2"}):
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, check=True
        )
        native, dtype, caps = json.loads(out.stdout)
        assert native is False and dtype == "None" and caps == env


@pytest.mark.slow
def test_compile_trains_the_plain_module(tmp_path):
    """`train.compile`: the loss goes through torch.compile; checkpoints and best weights hold the plain module."""
    t = make_trainer(run_dir=tmp_path, **{"train.compile": True, "train.epochs": 2})
    assert t.train_model is not t.model and type(t.model).__name__ == "ImageClassifier"
    before = t.evaluate(t.val_loader)["loss"]
    t.fit()
    assert t.evaluate(t.val_loader)["loss"] < before * 0.7
    assert not any("_orig_mod" in k for k in t.best_weights)
    from safetensors.torch import load_file

    assert t.last_checkpoint is not None
    saved = load_file(t.last_checkpoint / "model.safetensors")
    assert saved.keys() == t.model.state_dict().keys()
