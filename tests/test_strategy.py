"""The Trainer strategy seam: a strategy wraps model / optimizer / loader, steps, reduces metric sums and carries its
own state through checkpoints; `fit` can be re-entered; metric states are sums that can be added across shards."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from bigmodel.api import build_experiment
from bigmodel.config import validate_recipe
from bigmodel.training.strategy import SingleDevice, Strategy, get_strategy
from conftest import tiny_recipe


def experiment(**over):
    return build_experiment(validate_recipe(tiny_recipe(**{"train.precision": "fp32", **over})))


class Wrapper(nn.Module):
    """What DDP / Opacus do to a model: wrap it, so the Trainer must train through the wrapper and save the inner."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner

    def forward(self, *a):
        return self.module(*a)


class Recording(Strategy):
    """A strategy that wraps the model, counts its calls and keeps a state tensor that must survive a resume."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: dict[str, int] = {"setup": 0, "accumulate": 0, "last": 0, "step": 0, "reduce": 0}
        self.counter = torch.zeros((), dtype=torch.int64)

    def setup(self, model, optimizer_factory, train_loader):
        self.calls["setup"] += 1
        wrapped = Wrapper(model)
        return wrapped, optimizer_factory(wrapped), train_loader

    @contextlib.contextmanager
    def accumulate(self, train_model, last):
        self.calls["accumulate"] += 1
        self.calls["last"] += int(last)
        yield

    def step(self, train_model, optimizer, grad_clip, scaler):
        self.calls["step"] += 1
        self.counter += 1
        super().step(train_model, optimizer, grad_clip, scaler)

    def reduce_metrics(self, metrics):
        self.calls["reduce"] += 1

    def unwrap(self, train_model):
        return train_model.module

    def state_dict(self):
        return {"counter": self.counter.clone()}, {"name": self.name}

    def load_state_dict(self, tensors, meta):
        assert meta == {"name": self.name}
        self.counter = tensors["counter"].clone()


def test_a_strategy_wraps_steps_reduces_and_is_saved_in_checkpoints(tmp_path):
    exp = experiment(**{"train.grad_accum_steps": 2, "train.epochs": 2})
    s = Recording()
    t = exp.trainer(run_dir=tmp_path / "run")
    t2 = type(t)(
        exp.recipe.train,
        exp.model,
        exp.task,
        exp.loader("train", True),
        exp.loader("val"),
        strategy=s,
        run_dir=tmp_path / "run",
    )
    assert isinstance(t2.train_model, Wrapper) and t2.model is t2.train_model.module
    state = t2.fit()
    steps = state.step
    assert s.calls == {"setup": 1, "accumulate": 2 * steps, "last": steps, "step": steps, "reduce": 2}
    assert int(s.counter) == steps
    # The checkpoint holds the plain module's weights (no `module.` prefix) and the strategy's state.
    from bigmodel.training import checkpoint as ckpt

    model_state, extra, meta = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert set(model_state) == set(exp.model.state_dict())
    assert int(extra["strategy.counter"]) == steps and meta["strategy"] == {"name": "recording"}
    fresh = Recording()
    t3 = type(t)(exp.recipe.train, exp.model, exp.task, exp.loader("train", True), strategy=fresh)
    t3.resume(ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert int(fresh.counter) == steps


def test_single_device_is_the_default_and_strategies_are_registered():
    t = experiment().trainer()
    assert isinstance(t.strategy, SingleDevice) and t.model is t.train_model
    assert isinstance(get_strategy("single"), SingleDevice)
    try:
        get_strategy("nope")
    except KeyError as e:
        assert "single" in str(e)
    else:
        raise AssertionError("an unknown strategy must be an error")


def test_fit_reentered_equals_one_fit():
    """Two calls of fit(epochs=1) continue exactly where the first stopped: same weights as one 2-epoch fit."""
    over = {"train.epochs": 2, "train.select_best": False}
    once = experiment(**over).trainer()
    once.fit()
    twice = experiment(**over).trainer()
    s1 = twice.fit(epochs=1)
    assert s1.epoch == 1
    s2 = twice.fit(epochs=1)
    assert s2.epoch == 2 and s2.step == once.state.step
    for (k, a), b in zip(once.model.state_dict().items(), twice.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # Further rounds keep training (a federated client's next round), past cfg.epochs.
    s3 = twice.fit(epochs=1)
    assert s3.epoch == 3 and s3.step == once.state.step * 3 // 2
    assert twice.train_time_s > 0


def test_metric_sums_of_shards_add_up_to_the_whole():
    """What a strategy all-reduces is the whole metric state: summing two shards' `sums()` gives the metrics of the
    whole split (classification: confusion matrix, loss sum, count)."""
    exp = experiment()
    t = exp.trainer()
    t.fit()
    loader = exp.loader("test")
    batches = list(loader.epoch(0))
    assert len(batches) >= 1
    x, y = batches[0]
    halves = [((x[: len(y) // 2]), y[: len(y) // 2]), (x[len(y) // 2 :], y[len(y) // 2 :])]
    whole, parts = exp.task.new_metrics(), [exp.task.new_metrics() for _ in halves]
    t.model.eval()
    with torch.inference_mode():
        exp.task.eval_batch(t.model, (x, y), whole)
        for m, b in zip(parts, halves, strict=True):
            exp.task.eval_batch(t.model, b, m)
    for k, v in parts[0].sums().items():
        v += parts[1].sums()[k]
    a, b = whole.compute(), parts[0].compute()
    assert a["confusion_matrix"] == b["confusion_matrix"] and a["num_examples"] == b["num_examples"] == len(y)
    assert abs(a["loss"] - b["loss"]) < 1e-6  # per-batch fp32 loss sums, added in another grouping


def test_token_metric_sums_add_up():
    from bigmodel.tasks.generative import TokenMetrics

    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(4, 5, 7, generator=g), torch.randint(0, 7, (4, 5), generator=g)
    target[0, :2] = -100
    whole, a, b = TokenMetrics(), TokenMetrics(), TokenMetrics()
    whole.update(logits, target)
    a.update(logits[:2], target[:2])
    b.update(logits[2:], target[2:])
    for k, v in a.sums().items():
        v += b.sums()[k]
    wa, aa = whole.compute(), a.compute()
    assert wa["num_tokens"] == aa["num_tokens"] == 18 and abs(wa["loss"] - aa["loss"]) < 1e-9
