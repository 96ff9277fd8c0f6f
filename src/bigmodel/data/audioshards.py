"""Decoded audio on disk: `bigmodel data prepare` for an audio-classification recipe, read back a window at a time.

A prepared folder holds (format `bigmodel-audio/1`), for each split (train / val / test, carved with the recipe's seed
at prepare time):
- `<split>-samples.bin`: every clip, decoded and resampled to the recipe's rate, one after the other as raw
  little-endian float32 (`np.memmap(path, "<f4", mode="r")` reads it);
- `<split>-offsets.npy`: int64 (N + 1,): clip i is `samples[offsets[i]:offsets[i + 1]]`;
- `<split>-labels.npy`: int64 (N,); `<split>-power.npy`: float32 (N,), each clip's mean power (what training adds
  noise against, computed once here); `<split>-names.json`: where each clip came from;
and `index.json`: the format, labels, sample rate, the model's input description with the log-mel normalisation
statistics of the training windows (computed at prepare time, as training from the source computes them), and each
split's clip and sample counts.

`data.source: shards` with `data.path: FOLDER` trains on it. Streams that fit `data.in_memory_limit_mb` together are
read into memory; larger ones stay on disk as `DiskSamples`: each batch reads, for each clip, only the part of its
window inside the clip (one `pread`), so resident memory holds batches, not the audio. Windows, noise and SpecAugment
masks are the sampling plan's and the batch seed's either way: a run on the folder trains as the source recipe does,
bit for bit, and resumes exactly. Preparing decodes the clips the carved splits keep, `STATS_CHUNK` (512) at a time,
appending each chunk to its stream and the training chunks to the statistics: its memory is one chunk, not the data
set; training on the folder holds batches.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from bigmodel.data.shards import RawFile
from bigmodel.errors import UserError

FORMAT = "bigmodel-audio/1"
SPLITS = ("train", "val", "test")
F32 = np.dtype("<f4")


class DiskSamples(RawFile):
    """A split's clips as one flat float32 stream in a raw file. `spans` reads many windows at once; slices read a
    range (`clip(i)`); nothing else is held in memory."""

    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, path: Path, count: int) -> None:
        self.path, self._count = Path(path), count
        size = self.path.stat().st_size if self.path.exists() else -1
        if size != count * F32.itemsize:
            raise UserError(
                f"{self.path}: {size} bytes, index.json says {count} float32 samples (prepare the folder again)"
            )

    def __len__(self) -> int:
        return self._count

    @property
    def shape(self) -> tuple[int]:
        return (self._count,)

    def to(self, device: Any) -> DiskSamples:
        """Stays on disk: windows are read on the CPU and the loader moves each batch to its device."""
        return self

    def spans(self, starts: np.ndarray, counts: np.ndarray, cols: np.ndarray, width: int) -> torch.Tensor:
        """(B, width) float32, zero but for row b's `counts[b]` samples from stream position `starts[b]`, placed
        from column `cols[b]` (one `preadv` per row, in file order)."""
        out = np.zeros((len(starts), width), dtype=F32)
        fd = self._file()
        for b in np.argsort(starts, kind="stable").tolist():
            n, c = int(counts[b]), int(cols[b])
            if n <= 0:
                continue
            got = os.preadv(fd, [memoryview(out[b, c : c + n]).cast("B")], int(starts[b]) * F32.itemsize)
            if got != n * F32.itemsize:
                raise UserError(f"{self.path}: truncated audio stream (prepare the folder again)")
        return torch.from_numpy(out)

    def __getitem__(self, idx: Any) -> torch.Tensor:
        if not isinstance(idx, slice) or idx.indices(self._count)[2] != 1:
            raise TypeError("DiskSamples reads ranges (samples[a:b]) and windows (spans)")
        a, b, _ = idx.indices(self._count)
        n = max(0, b - a)
        return self.spans(np.array([a]), np.array([n]), np.array([0]), n)[0]

    def materialize(self) -> torch.Tensor:
        return torch.from_numpy(np.fromfile(self.path, dtype=F32).astype(np.float32, copy=False))


def check_front_end(cfg: Any, shape: dict[str, Any], rate: int, root: Path) -> None:
    """A recipe training on a prepared folder asks for the folder's sample rate and log-mel settings (the stored
    normalisation statistics are of those features); one-line errors naming what differs."""
    if cfg.sample_rate != rate:
        raise UserError(f"data.sample_rate {cfg.sample_rate}: {root} holds audio at {rate} Hz (prepare it again)")
    stored = {k: v for k, v in shape["features"].items() if k not in ("mean", "std")}
    asked = {k: v for k, v in cfg.features.spec().items() if k not in ("mean", "std")}
    if json.loads(json.dumps(asked)) != stored:
        diff = sorted(k for k in asked if stored.get(k) != json.loads(json.dumps(asked[k])))
        raise UserError(
            f"data.features ({', '.join(diff)}): {root} was prepared with { ({k: stored.get(k) for k in diff}) } "
            "(its normalisation statistics are of those features; prepare it again)"
        )


class StreamWriter:
    """Split `name`'s clips, appended a chunk (an AudioSplit or SpeechSplit) at a time, as `<name>-samples.bin`
    (float32, one after the other), `<name>-offsets.npy` (N + 1), `<name>-power.npy` (each clip's mean power:
    what a run on the source adds noise against) and `<name>-names.json`; `close()` returns the index entry."""

    def __init__(self, tmp: Path, name: str) -> None:
        self.tmp, self.name = tmp, name
        self.file = open(tmp / f"{name}-samples.bin", "wb")  # noqa: SIM115 (closed by close())
        self.offsets, self.powers, self.names = [0], [], []

    def add(self, split: Any) -> None:
        from bigmodel.data.audio import clip_power

        power = split.power if split.power is not None else clip_power(split.samples, split.offsets, split.lengths)
        self.powers.append(power.numpy().astype(np.float32))
        for i in range(len(split)):
            clip = np.ascontiguousarray(split.clip(i), dtype=F32)
            clip.tofile(self.file)
            self.offsets.append(self.offsets[-1] + len(clip))
        start = len(self.names)
        self.names += list(split.names) if split.names else [f"{self.name}:{start + i}" for i in range(len(split))]

    def close(self) -> dict[str, Any]:
        self.file.close()
        name, tmp = self.name, self.tmp
        np.save(tmp / f"{name}-offsets.npy", np.asarray(self.offsets, dtype=np.int64), allow_pickle=False)
        power = np.concatenate(self.powers) if self.powers else np.zeros(0, dtype=np.float32)
        np.save(tmp / f"{name}-power.npy", power, allow_pickle=False)
        (tmp / f"{name}-names.json").write_text(json.dumps(self.names), encoding="utf-8")
        return {
            "count": len(self.names),
            "samples_total": self.offsets[-1],
            "samples": f"{name}-samples.bin",
            "offsets": f"{name}-offsets.npy",
            "power": f"{name}-power.npy",
            "names": f"{name}-names.json",
        }


def clips_summary(index: dict[str, Any]) -> str:
    """`data prepare`'s line for a folder of clips (audio classification, speech recognition): clips and seconds."""
    rate, splits = index["sample_rate"], index["splits"].items()
    return ", ".join(f"{k} {v['count']:,} clips ({v['samples_total'] / rate:,.1f} s)" for k, v in splits)


def write_stream(tmp: Path, name: str, split: Any) -> dict[str, Any]:
    """A whole split through `StreamWriter`; returns its index entry."""
    writer = StreamWriter(tmp, name)
    writer.add(split)
    return writer.close()


def read_stream(root: Path, name: str, entry: dict[str, Any]) -> tuple[DiskSamples, torch.Tensor, torch.Tensor, list]:
    """A split written by `write_stream`: (its samples on disk, offsets (N + 1), powers (N), names)."""
    try:
        offsets = torch.from_numpy(np.load(root / entry["offsets"], allow_pickle=False).astype(np.int64))
        power = torch.from_numpy(np.load(root / entry["power"], allow_pickle=False).astype(np.float32))
        names = json.loads((root / entry["names"]).read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{root}: split {name!r}: cannot read its offsets, power or names ({e})") from None
    if not (len(offsets) == len(power) + 1 == len(names) + 1):
        raise UserError(f"{root}: split {name!r}: offsets, power and names disagree (prepare again)")
    return DiskSamples(root / entry["samples"], int(offsets[-1])), offsets, power, names


class StoredSplit(NamedTuple):
    """One split of a prepared clip folder, as `read_streams` returns it."""

    samples: torch.Tensor | DiskSamples  # the whole stream, in memory or on disk
    starts: torch.Tensor  # (N,) first sample of each clip
    lengths: torch.Tensor  # (N,)
    power: torch.Tensor  # (N,) each clip's mean power
    names: list
    extra: Any  # what the task stores beside the clips (labels, transcripts)


def read_streams(
    root: Path, meta: dict[str, Any], limit_mb: float, read_extra: Callable[[str, dict[str, Any], int], Any]
) -> tuple[dict[str, StoredSplit], bool]:
    """Every split of a folder written by `write_stream` (audio classification, speech recognition) → ({split:
    StoredSplit}, in memory?). The streams are read into memory when together they fit `limit_mb` (the recipe's
    `data.in_memory_limit_mb`), else left on disk. `read_extra(split, entry, clips)` reads and checks the task's own
    file of the split."""
    streams: dict[str, DiskSamples] = {}
    parts: dict[str, Any] = {}
    for name in SPLITS:
        if name not in meta["splits"]:
            continue
        entry = meta["splits"][name]
        streams[name], offsets, power, names = read_stream(root, name, entry)
        parts[name] = (offsets, power, names, read_extra(name, entry, len(names)))
    in_memory = sum(len(s) for s in streams.values()) * F32.itemsize <= limit_mb * 2**20
    out = {}
    for name, (offsets, power, names, extra) in parts.items():
        samples = streams[name].materialize() if in_memory else streams[name]
        out[name] = StoredSplit(samples, offsets[:-1].clone(), offsets[1:] - offsets[:-1], power, names, extra)
    return out, in_memory


def read_index(root: Path) -> dict[str, Any]:
    from bigmodel.data.shards import read_prepared_index

    return read_prepared_index(root, FORMAT)


def load_audio_shards(recipe: Any, pre: Any | None) -> tuple[Any, Any]:
    """`data.source: shards` for an audio classifier → (AudioDataset, Preprocess): the folder's clips, in memory or on
    disk by `data.in_memory_limit_mb`, and its input description (or `pre`'s, which must be at the folder's rate)."""
    from bigmodel.data.audio import AudioDataset, AudioSplit
    from bigmodel.data.shards import finish_prepared
    from bigmodel.runs import Preprocess

    cfg = recipe.data
    root = Path(cfg.path)
    meta = read_index(root)
    labels, rate = list(meta["labels"]), int(meta["sample_rate"])
    shape = meta["input_shape"]
    if pre is None:
        check_front_end(cfg, shape, rate, root)
        if cfg.samples != int(shape["samples"]):
            raise UserError(
                f"data.clip_seconds {cfg.clip_seconds:g}: {root} was prepared for {int(shape['samples'])} samples "
                "(its normalisation statistics are over those windows; prepare it again)"
            )
        pre = Preprocess(labels, None, None, dict(shape), kind="audio")
    elif int(pre.input_shape["sample_rate"]) != rate:
        raise UserError(f"{root}: audio at {rate} Hz, the model was trained at {pre.input_shape['sample_rate']} Hz")
    if list(pre.labels) != labels:
        raise UserError(f"{root}: labels {labels}, the model's are {list(pre.labels)}")

    def read_labels(name: str, entry: dict[str, Any], count: int) -> torch.Tensor:
        try:
            y = torch.from_numpy(np.load(root / entry["labels"], allow_pickle=False).astype(np.int64))
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{root}: split {name!r}: cannot read its labels ({e})") from None
        if len(y) != count:
            raise UserError(f"{root}: split {name!r}: {len(y)} labels for {count} clips (prepare again)")
        return y

    streams, in_memory = read_streams(root, meta, cfg.in_memory_limit_mb, read_labels)
    splits = {
        name: AudioSplit(s.samples, s.starts, s.lengths, s.extra, s.names, s.power)  # type: ignore[arg-type]
        for name, s in streams.items()
    }
    train, val, test = finish_prepared(splits, labels, cfg, recipe.seed, meta, root)
    data = AudioDataset(train, val, test, labels, rate)
    data.on_disk = not in_memory
    return data, pre


def write_audio_shards(recipe: Any, out: Path) -> dict[str, Any]:
    """Decode an audio-classification recipe's splits (carved, at its rate) into `out` (a temporary folder renamed
    when complete), `STATS_CHUNK` clips at a time, adding the training chunks to the normalisation statistics:
    memory is one chunk, not the data set. Returns the index."""
    from bigmodel.data.audio import audio_files
    from bigmodel.data.shards import applied_carving, prepared_folder
    from bigmodel.tasks.audio import STATS_CHUNK, FeatureStats, log_mels

    cfg = recipe.data
    files, labels = audio_files(cfg, recipe.seed)
    features = cfg.features.spec()
    features["mean"] = features["std"] = None
    shape = {"kind": "audio", "sample_rate": cfg.sample_rate, "samples": cfg.samples, "features": features}
    stats = FeatureStats() if cfg.features.normalize else None
    with prepared_folder(Path(out)) as tmp:
        splits: dict[str, Any] = {}
        for name in SPLITS:
            split = files[name]
            if split is None:
                continue
            writer = StreamWriter(tmp, name)
            for a in range(0, len(split), STATS_CHUNK):
                part = split.decode(cfg.sample_rate, a, a + STATS_CHUNK)
                writer.add(part)
                if name == "train" and stats is not None:
                    stats.add(log_mels(shape, part.windows(cfg.samples)))
            np.save(tmp / f"{name}-labels.npy", split.y.numpy().astype(np.int64), allow_pickle=False)
            splits[name] = {**writer.close(), "labels": f"{name}-labels.npy"}
        if stats is not None:
            features["mean"], features["std"] = stats.result()
        index = {
            "format": FORMAT,
            "labels": list(labels),
            "sample_rate": int(cfg.sample_rate),
            "input_shape": shape,
            "applied": applied_carving(cfg),
            "splits": splits,
        }
        (tmp / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return index
