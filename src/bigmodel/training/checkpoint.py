"""Atomic checkpoints for exact resume, with no pickle.

A checkpoint is a folder `checkpoints/step-00000123/` holding
- `model.safetensors`: the weights and buffers (BatchNorm statistics too);
- `state.safetensors`: every other tensor — optimizer moments, RNG states, the best weights so far;
- `state.json`: everything else — step, epoch, position in the epoch, optimizer hyper-parameters, early stopping.
It is written under a temporary name, fsynced, and renamed into place; then `checkpoints/latest` is replaced
atomically to point at it. A kill at any moment leaves the previous checkpoint intact and `latest` valid.

A sharded checkpoint (FSDP2: every process holds part of the weights and optimizer moments) holds `sharded/` instead
of `model.safetensors` and the optimizer's tensors: each rank writes its own shards through
`torch.distributed.checkpoint` (DCP) as safetensors files whose headers say which slice of which tensor they hold, so
any number of processes — one without torch.distributed, too — reads back the slices it needs (resharding).
`state.safetensors` and `state.json` are as above (written by rank 0). No pickle: DCP's default `.metadata` file is
a pickle, so the safetensors-based storage is used instead.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from bigmodel.errors import UserError
from bigmodel.fileio import fsync_dir, write_text_atomic

FORMAT_VERSION = 1


def _fault(point: str, step: int) -> None:
    """Test hook: `BIGMODEL_FAULT=<point>:<step>[@<rank>]` kills this process (or only that rank's, under torchrun)
    with SIGKILL at that point — a real hard kill; `raise_after_step` raises instead. A fault fires on the job's
    first attempt only, so workers that torchrun restarts (`--max-restarts`) run through."""
    spec = os.environ.get("BIGMODEL_FAULT")
    if not spec or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return
    where, _, rank = spec.partition("@")
    if rank and rank != os.environ.get("RANK", "0"):
        return
    if where == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
    if where == f"raise_after_step:{step}" and point == "kill_after_step":
        raise RuntimeError(f"injected fault (BIGMODEL_FAULT={spec})")


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # safetensors wants contiguous, unshared storage; channels_last weights are made contiguous here (values unchanged).
    save_file({k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}, str(path))
    with path.open("rb+") as f:
        os.fsync(f.fileno())


def flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into tensors (for safetensors) and JSON-able metadata."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def split_optimizer(sd: dict[str, Any]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Split a name-keyed optimizer state (`get_optimizer_state_dict`) into its tensors, nested by parameter name (for
    DCP), and JSON-able metadata."""
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors.setdefault(name, {})[k] = v
            else:
                scalars.setdefault(name, {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def join_optimizer(tensors: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {name: dict(st) for name, st in tensors.items()}
    for name, st in meta["scalars"].items():
        state.setdefault(name, {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    for pid, st in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    extra_tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` atomically and prune all but the newest `keep`. Returns its folder."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _save_tensors(model_state, tmp / "model.safetensors")
    _complete(tmp, final, step, extra_tensors, state, keep)
    return final


def _complete(
    tmp: Path, final: Path, step: int, extra_tensors: dict[str, torch.Tensor], state: dict[str, Any], keep: int
) -> None:
    """Add the state files to the temporary folder `tmp`, rename it to `final`, move `latest`, prune old ones."""
    ckpt_root = final.parent
    _fault("kill_during_checkpoint", step)
    _save_tensors(extra_tensors, tmp / "state.safetensors")
    with (tmp / "state.json").open("w", encoding="utf-8") as f:
        json.dump({"format_version": FORMAT_VERSION, **state}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    if final.exists():  # the same step saved twice (e.g. resumed right after it): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(ckpt_root)
    write_text_atomic(ckpt_root / "latest", final.name + "\n")
    fsync_dir(ckpt_root)
    for old in sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The folder `latest` points to, or None when there is no complete checkpoint."""
    pointer = ckpt_root / "latest"
    if not pointer.is_file():
        return None
    folder = ckpt_root / pointer.read_text(encoding="utf-8").strip()
    if not (folder / "state.json").is_file():
        raise UserError(f"{pointer}: points to {folder.name}, which is not a complete checkpoint")
    return folder


def read_state(folder: Path) -> dict[str, Any]:
    """A checkpoint's `state.json` (step, epoch, plan, ...) without its tensors."""
    try:
        return json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}: unreadable checkpoint ({e})") from None


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, other tensors, state) of a checkpoint; the weights are empty for a sharded one (`load_sharded`)."""
    try:
        model_state = {} if is_sharded(folder) else load_file(str(folder / "model.safetensors"))
        extra = load_file(str(folder / "state.safetensors"))
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}: unreadable checkpoint ({e})") from None
    state = read_state(folder)
    if state.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{folder}: checkpoint format {state.get('format_version')} is not {FORMAT_VERSION}")
    return model_state, extra, state


def clean_partial(ckpt_root: Path) -> None:
    """Remove leftovers of checkpoints whose writing was interrupted."""
    for p in ckpt_root.glob(".tmp-step-*"):  # also the sharded ones' (no pid in their name)
        shutil.rmtree(p, ignore_errors=True)


def is_sharded(folder: Path) -> bool:
    return (folder / "sharded").is_dir()


def save_sharded_checkpoint(
    ckpt_root: Path,
    step: int,
    shards: dict[str, Any],
    extra_tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Every rank: write checkpoint `step` with `shards` (nested dicts of DTensors or tensors) through DCP; rank 0
    adds `extra_tensors` and `state`, renames it into place and moves `latest`. Collective; returns its folder."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    rank0 = dist.get_rank() == 0
    name = f"step-{step:08d}"
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}"  # one name for all ranks
    if rank0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    dcp.save(shards, storage_writer=HuggingFaceStorageWriter(str(tmp / "sharded"), save_distributed=True))
    dist.barrier()  # every rank's files are on disk (DCP fsyncs them)
    if rank0:
        fsync_dir(tmp / "sharded")
        _complete(tmp, final, step, extra_tensors, {"sharded": True, **state}, keep)
    dist.barrier()  # nobody reads or writes the next checkpoint before this one is in place
    return final


def load_sharded(folder: Path, template: dict[str, Any]) -> None:
    """Fill `template` (nested dicts of DTensors or tensors, shaped as saved) in place from `folder/sharded`, reading
    the slices each holds: written by N ranks, read by M (one without a process group, too)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    try:
        with warnings.catch_warnings():  # one process without a process group: "assuming ... a single process"
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(template, storage_reader=HuggingFaceStorageReader(str(folder / "sharded")))
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{folder}: unreadable sharded checkpoint ({str(e).splitlines()[0]})") from None
