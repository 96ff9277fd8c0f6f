from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from bigmodel.data import standard
from bigmodel.data.idx import write_idx

ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow (CI=true does too)")


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` run in CI (`CI=true`, as `.ci/run` is invoked there), with `--run-slow`, or when `-m`
    selects markers itself; a developer's default run skips them, naming how to run them."""
    ci = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
    if ci or config.getoption("--run-slow") or config.getoption("markexpr"):
        return
    skip = pytest.mark.skip(reason="slow: runs in CI (CI=true) or with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def bigmodel_home(tmp_path_factory, monkeypatch):
    """Each test gets its own run index and download cache."""
    home = tmp_path_factory.mktemp("bmhome")
    monkeypatch.setenv("BIGMODEL_HOME", str(home))
    return home


def tiny_recipe(**over) -> dict:
    """A recipe that trains in about a second: sklearn digits (8x8), a small cnn-small, 2 epochs."""
    r = {
        "name": "tiny",
        "task": "image_classification",
        "data": {"source": "digits", "val_fraction": 0.15, "test_fraction": 0.2},
        "model": {"name": "cnn-small", "widths": [8, 16], "dropout": 0.1},
        "train": {
            "epochs": 2,
            "batch_size": 64,
            "optimizer": {"name": "adamw", "lr": 0.01},
            "log_every": 5,
        },
        "seed": 0,
    }
    for key, value in over.items():
        node = r
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return r


@pytest.fixture
def write_recipe(tmp_path):
    def write(data: dict, name: str = "recipe.yaml") -> Path:
        p = tmp_path / name
        p.write_text(yaml.safe_dump(data, sort_keys=False))
        return p

    return write


def run_cli(
    *args: str, env: dict | None = None, check: bool = False, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "bigmodel", *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"bigmodel {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_image_folder(
    root: Path, classes=("cat", "dog"), per_class=12, size=(10, 12), mode="L", splits=("train",), seed=0
):
    """Write ROOT/<split>/<class>/*.png with a class-dependent pattern (so a model can learn it)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in splits:
        for ci, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = np.zeros(size, dtype=np.float64)
                base[:, ci * size[1] // len(classes) : (ci + 1) * size[1] // len(classes)] = 200
                img = np.clip(base + rng.normal(0, 20, size), 0, 255).astype(np.uint8)
                if mode == "RGB":
                    img = np.stack([img, img // 2, 255 - img], axis=-1)
                Image.fromarray(img, mode=None).save(d / f"{i:03d}.png")
    return root


def write_fashion_fixture(folder: Path, n_train=60, n_test=20) -> dict[str, bytes]:
    """Tiny Fashion-MNIST in the true on-disk format: the four gzipped IDX files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    for p in folder.iterdir():
        out[p.name] = p.read_bytes()
    return out


def write_cifar_fixture(folder: Path, key: str, n_train=30, n_test=10) -> np.ndarray:
    """CIFAR in the binary distribution's exact layout: fixed-size records of label byte(s) + 3,072 pixel bytes."""
    spec = standard.CIFAR_SETS[key]
    d = folder / spec.folder
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    first = None
    for i, name in enumerate([*spec.train_files, *spec.test_files]):
        n = n_train // len(spec.train_files) if name in spec.train_files else n_test
        pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = ((np.arange(n) + i) % (100 if key == "cifar100" else 10)).astype(np.uint8)
        labels = [fine[:, None]] if spec.label_bytes == 1 else [(fine // 5)[:, None], fine[:, None]]
        np.concatenate([*labels, pixels], axis=1).tofile(d / name)
        if first is None:
            first = pixels[0]
    if key == "cifar10":
        (d / "batches.meta.txt").write_text("\n".join(standard.CIFAR10_LABELS) + "\n\n")
    else:
        (d / "fine_label_names.txt").write_text("\n".join(f"fine{i}" for i in range(100)) + "\n")
        (d / "coarse_label_names.txt").write_text("\n".join(f"coarse{i}" for i in range(20)) + "\n")
    return first


def write_aclimdb_fixture(root: Path, n_train: int = 6, n_test: int = 4) -> Path:
    """A tiny copy of the Stanford aclImdb layout: <split>/{pos,neg}/<id>_<stars>.txt with `<br />` markup,
    plus an `unsup/` folder that must be ignored."""
    words = {
        "pos": ["great fun and a wonderful story", "truly wonderful acting", "a great film", "loved it"],
        "neg": ["boring and awful", "a dull terrible plot", "awful dialogue, dull film", "hated it"],
    }
    for split, n in (("train", n_train), ("test", n_test)):
        for label, texts in words.items():
            (root / split / label).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                stars = 7 + i % 4 if label == "pos" else 1 + i % 4
                (root / split / label / f"{i}_{stars}.txt").write_text(
                    f"{texts[i % 4]}<br /><br />review {i}", encoding="utf-8"
                )
    (root / "train" / "unsup").mkdir(exist_ok=True)
    (root / "train" / "unsup" / "0_0.txt").write_text("ignored", encoding="utf-8")
    return root


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`bigmodel serve RUN` in a subprocess on a free loopback port; stopped with SIGTERM."""

    def __init__(self, run_dir: Path, *args: str) -> None:
        import time

        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bigmodel", "serve", str(run_dir), "--port", str(self.port), *args],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for _ in range(300):
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"bigmodel serve did not start: {self.proc.stderr.read().decode() if self.proc.stderr else ''}"
        )

    def stop(self) -> str:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=60)
        return err.decode()


def train_text_fixture_run(folder: Path) -> Path:
    """A tiny text model (embedding bag on a two-word-class CSV) for serving tests."""
    from bigmodel import api
    from bigmodel.config import validate_recipe

    rows = ["text,label"] + [
        f'"{t}",{lbl}' for i in range(60) for t, lbl in [(("great fun", "pos"), ("awful plot", "neg"))[i % 2]]
    ]
    (folder / "r.csv").write_text("\n".join(rows) + "\n")
    recipe = {
        "task": "text_classification",
        "data": {"source": "csv", "path": str(folder / "r.csv"), "tokenizer": {"min_frequency": 1}},
        "model": {"name": "embedding-bag", "embedding_dim": 8},
        "train": {"epochs": 3, "batch_size": 8, "optimizer": {"name": "adamw", "lr": 0.05}},
    }
    api.train(validate_recipe(recipe), out=folder / "run", progress=False)
    return folder / "run"


LM_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
) * 30


def train_lm_fixture_run(folder: Path) -> Path:
    """A tiny character-level GPT on a repeated dialogue (~3 s): for generation, serving and fine-tuning tests."""
    from bigmodel import api
    from bigmodel.config import validate_recipe

    (folder / "corpus.txt").write_text(LM_TEXT, encoding="utf-8")
    recipe = {
        "name": "tiny_lm",
        "task": "language_modeling",
        "data": {
            "source": "text",
            "path": str(folder / "corpus.txt"),
            "context_length": 32,
            "batches_per_epoch": 80,
            "tokenizer": {"kind": "char", "normalization": "none", "min_frequency": 1},
        },
        "model": {"name": "gpt", "dim": 32, "num_heads": 2, "num_layers": 2},
        "train": {"epochs": 3, "batch_size": 16, "optimizer": {"lr": 0.01}, "precision": "fp32"},
    }
    return api.train(validate_recipe(recipe), out=folder / "run", progress=False).run_dir


def assert_same_run_weights(ref: Path, run: Path) -> None:
    """Two runs' final weights are bit-identical. On a mismatch the message says how far apart they are, the first
    logged record where the two runs part, and each run's CPU facts, so a failure on another machine can be read."""
    import json

    import torch
    from safetensors.torch import load_file

    a, b = load_file(str(ref / "model" / "model.safetensors")), load_file(str(run / "model" / "model.safetensors"))
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    differ = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    if not differ:
        return

    def records(r: Path) -> list[dict]:  # without the wall-clock fields, which always differ
        rows = [json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in d.items() if k != "time" and not k.endswith("_per_s")} for d in rows]

    parted = next(((x, y) for x, y in zip(records(ref), records(run), strict=False) if x != y), None)
    facts = ("cpu_capability", "cpu_native_bf16", "torch_threads", "cpu_isa_caps")
    envs = [{k: json.loads((r / "env.json").read_text()).get(k) for k in facts} for r in (ref, run)]
    worst = max(differ, key=differ.get)
    raise AssertionError(
        f"{len(differ)} of {len(a)} tensors differ (largest: {worst} by {differ[worst]:.3g}); "
        f"first differing log records: {parted}; environments: {envs}"
    )
