"""Tokenized texts on disk: `bigmodel data prepare` for a text-classification recipe, read back a batch at a time.

A prepared folder holds (format `bigmodel-textids/1`), for each split (train / val / test, carved with the recipe's
seed and fractions at prepare time):
- `<split>-ids.bin`: every text's token ids, one after the other, as raw little-endian uint16 (uint32 when the
  vocabulary has more than 65,536 tokens) — each text's real tokens only, no padding;
- `<split>-offsets.npy`: int64 (N + 1,): text i is `ids[offsets[i]:offsets[i + 1]]` (at least one token);
- `<split>-labels.npy`: int64 (N,) class indices;
and `tokenizer.json` (trained on the training texts at prepare time, a pretrained run's, or the `hf` model's) and
`index.json`: the format, dtype, label names, the model's input description, the tokenizer settings and a SHA-256 of
the tokenizer, the PII types masked before tokenising, and each split's count, token total and longest text.

`data.source: shards` with `data.path: FOLDER` trains a text classifier on it. Splits whose padded id matrices (int64)
fit `data.in_memory_limit_mb` together are read into memory, exactly what tokenizing the source recipe gives; larger
ones stay on disk as `DiskRows`, which reads each batch's texts with one `pread` each. The batches are the sampling
plan's either way, so a run on the folder trains as a run on its source recipe does and resumes exactly.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from array import array
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigmodel.data.shards import LazyImages, RawFile
from bigmodel.errors import UserError

FORMAT = "bigmodel-textids/1"
SPLITS = ("train", "val", "test")
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def text_tokenizer_digest(tok: Any) -> str:
    """SHA-256 of the tokenizer's JSON form, read back first (so a tokenizer and its saved copy agree); works for
    Hugging Face tokenizers and bigmodel's n-gram tokenizer alike."""
    from bigmodel.data.text import tokenizer_from_str

    return hashlib.sha256(tokenizer_from_str(tok.to_str()).to_str().encode()).hexdigest()


# --------------------------------------------------------------------------------------------------------- reading
class DiskRows(LazyImages, RawFile):
    """(N, width) int64 token ids, each row a text right-padded with 0 (as `data.text.encode` pads), read from the
    split's id stream only when indexed. Indexing, `subset` views and `materialize` come from `LazyImages`."""

    dtype = torch.int64

    def __init__(self, path: Path, dtype: np.dtype, offsets: np.ndarray, rows: torch.Tensor | None = None) -> None:
        lengths = np.diff(offsets)
        super().__init__(len(lengths), (max(1, int(lengths.max(initial=1))),), rows)
        self.path, self._dtype, self._offsets, self._lengths = Path(path), dtype, offsets, lengths

    @property
    def nbytes(self) -> int:
        return len(self) * self._item * 8

    def _view(self, rows: torch.Tensor) -> DiskRows:
        return DiskRows(self.path, self._dtype, self._offsets, rows)

    def _read(self, rows: torch.Tensor) -> torch.Tensor:
        n, width, size = len(rows), self._item, self._dtype.itemsize
        out = np.zeros((n, width), dtype=self._dtype)
        if n:
            r = rows.numpy()
            order = np.argsort(r, kind="stable")
            fd = self._file()
            for k in order.tolist():
                start, length = int(self._offsets[r[k]]), int(self._lengths[r[k]])
                if os.preadv(fd, [memoryview(out[k, :length]).cast("B")], start * size) != length * size:
                    raise UserError(f"{self.path}: truncated token file (prepare the folder again)")
        return torch.from_numpy(out.astype(np.int64))

    def materialize(self) -> torch.Tensor:
        """The padded (N, width) matrix in memory (one read of the stream)."""
        if self._rows is not None:
            return self[slice(None)]
        flat = np.fromfile(self.path, dtype=self._dtype)
        if len(flat) != int(self._offsets[-1]):
            raise UserError(f"{self.path}: {len(flat)} tokens, the offsets say {int(self._offsets[-1])}")
        out = np.zeros((len(self._lengths), self._item), dtype=np.int64)
        out[np.arange(self._item)[None, :] < self._lengths[:, None]] = flat  # row-major: the stream's order
        return torch.from_numpy(out)


def read_index(root: Path) -> dict[str, Any]:
    from bigmodel.data.shards import read_prepared_index

    return read_prepared_index(root, FORMAT, DTYPES)


def check_tokenizer_settings(cfg: Any, prepared: dict[str, Any] | None, root: Path) -> None:
    """A `data.tokenizer` setting the recipe gives (other than the default: a resumed run's saved recipe spells out
    every key) must be the one the folder was tokenized with."""
    asked = cfg.tokenizer.model_dump(mode="json")
    default = type(cfg.tokenizer)().model_dump(mode="json")
    for k in (k for k in asked if asked[k] != default[k]):
        if prepared is None or prepared.get(k) != asked[k]:
            was = "a pretrained model's" if prepared is None else repr(prepared.get(k))
            raise UserError(
                f"data.tokenizer.{k} {asked[k]!r}: {root} was tokenized with {was} (prepare it again with this "
                "setting, or drop it from the recipe)"
            )


def load_text_shards(recipe: Any, pre: Any | None) -> tuple[Any, Any]:
    """`data.source: shards` for a text classifier → (SeqDataset, Preprocess): the folder's tokenizer and input
    description (or `pre`'s, which must be the tokenizer the ids were made with)."""
    from bigmodel.data.sequences import SeqDataset, SeqSplit
    from bigmodel.data.shards import finish_prepared
    from bigmodel.data.text import load_tokenizer
    from bigmodel.runs import Preprocess

    cfg = recipe.data
    root = Path(cfg.path)
    meta = read_index(root)
    labels = list(meta["labels"])
    if pre is None:
        check_tokenizer_settings(cfg, meta.get("tokenizer_config"), root)
        tok = load_tokenizer(root / "tokenizer.json")
        pre = Preprocess(labels, None, None, dict(meta["input_shape"]), kind="text", tokenizer=tok)
    if text_tokenizer_digest(pre.tokenizer) != meta["tokenizer_sha256"]:
        raise UserError(
            f"{root}: its token ids were made with another tokenizer than this model's (index.json tokenizer_sha256); "
            "prepare the folder again with this recipe"
        )
    if list(pre.labels) != labels:
        raise UserError(f"{root}: labels {labels}, the model's are {list(pre.labels)}")
    if sorted(cfg.mask_pii) != sorted(meta.get("mask_pii", [])):
        raise UserError(
            f"data.mask_pii {cfg.mask_pii}: {root} was prepared with {meta.get('mask_pii', [])} masked (PII is masked "
            "before tokenising: prepare the folder again)"
        )
    dtype = DTYPES[meta["dtype"]]
    rows: dict[str, DiskRows] = {}
    ys: dict[str, torch.Tensor] = {}
    for name in SPLITS:
        if name not in meta["splits"]:
            continue
        entry = meta["splits"][name]
        try:
            offsets = np.load(root / entry["offsets"], allow_pickle=False).astype(np.int64)
            y = np.load(root / entry["labels"], allow_pickle=False).astype(np.int64)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"{root}: split {name!r}: cannot read its offsets or labels ({e})") from None
        path = root / entry["ids"]
        size = path.stat().st_size if path.exists() else -1
        if len(offsets) != len(y) + 1 or size != int(offsets[-1]) * dtype.itemsize:
            raise UserError(f"{path}: {size} bytes for {len(y)} texts, offsets and labels disagree (prepare again)")
        rows[name], ys[name] = DiskRows(path, dtype, offsets), torch.from_numpy(y)
    in_memory = sum(r.nbytes for r in rows.values()) <= cfg.in_memory_limit_mb * 2**20
    splits = {
        name: SeqSplit(r.materialize() if in_memory else r, torch.from_numpy(np.maximum(r._lengths, 1)), ys[name])
        for name, r in rows.items()
    }
    train, val, test = finish_prepared(splits, labels, cfg, recipe.seed, meta, root)
    data = SeqDataset(train, val, test, labels)
    data.pii_masked = meta.get("pii_masked")
    data.on_disk = not in_memory
    return data, pre


# --------------------------------------------------------------------------------------------------------- writing
def write_text_shards(recipe: Any, out: Path, make_preprocess: Any, chunk: int = 4096) -> dict[str, Any]:
    """Tokenise a text-classification recipe's source into `out` (a temporary folder renamed when complete), a row at
    a time (`data/textstream.py`): the source's texts go to a scratch file, the splits are carved from the labels,
    `make_preprocess(labels, training texts)` gives the tokenizer (trained on them, a pretrained run's, or the `hf`
    model's), and each split is encoded `chunk` texts at a time. Memory is the labels, the offsets, one chunk and the
    tokenizer's training state, not the texts. Returns the index."""
    import shutil

    from bigmodel.data.shards import applied_carving, prepared_folder
    from bigmodel.data.textstream import StreamedText

    cfg = recipe.data
    with prepared_folder(Path(out)) as tmp:
        scratch = tmp / "scratch"
        scratch.mkdir()
        text = StreamedText(cfg, recipe.seed, scratch)
        try:
            pre = make_preprocess(text.labels, text.train_texts())
            tok = pre.tokenizer
            dtype_name = "uint16" if tok.get_vocab_size() <= 1 << 16 else "uint32"
            dtype = DTYPES[dtype_name]
            splits: dict[str, Any] = {}
            for name in SPLITS:
                if not text.has(name):
                    continue
                offsets, total, longest = array("q", [0]), 0, 0  # 8 bytes a text, not a Python int
                stream = text.texts(name)
                with open(tmp / f"{name}-ids.bin", "wb") as f:
                    while group := list(itertools.islice(stream, chunk)):
                        for enc in tok.encode_batch(group):
                            n = max(1, sum(enc.attention_mask))  # as `encode` counts: every text keeps ≥ 1 token
                            ids = np.zeros(n, dtype=dtype)
                            got = enc.ids[:n]
                            ids[: len(got)] = got
                            ids.tofile(f)
                            total += n
                            longest = max(longest, n)
                            offsets.append(total)
                split = text.splits[name]
                np.save(tmp / f"{name}-offsets.npy", np.frombuffer(offsets, dtype=np.int64), allow_pickle=False)
                np.save(tmp / f"{name}-labels.npy", split.y.numpy().astype(np.int64), allow_pickle=False)
                splits[name] = {
                    "count": len(split),
                    "tokens": total,
                    "longest": longest,
                    "ids": f"{name}-ids.bin",
                    "offsets": f"{name}-offsets.npy",
                    "labels": f"{name}-labels.npy",
                }
        finally:
            text.close()
            shutil.rmtree(scratch)
        (tmp / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
        index = {
            "format": FORMAT,
            "dtype": dtype_name,
            "labels": list(text.labels),
            "input_shape": dict(pre.input_shape),
            "tokenizer_config": cfg.tokenizer.model_dump(mode="json"),  # the recipe's (hf / init_from: max_length)
            "tokenizer_sha256": text_tokenizer_digest(tok),
            "mask_pii": list(cfg.mask_pii),
            "pii_masked": text.pii_masked,
            "applied": applied_carving(cfg),
            "splits": splits,
        }
        (tmp / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return index
