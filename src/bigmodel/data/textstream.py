"""Labelled texts read a row at a time, for `bigmodel data prepare` of a text-classification or language-model recipe
whose source is a CSV / TSV / JSONL file, an aclImdb folder or the tweets.

`StreamedText` reads every file once, appending each text to a scratch file (`TextStore`) and keeping only its label
and where it starts; carves the splits from the labels (`finish_splits`, as `load_text` does: `RowSplit` has the `.y`
and `.subset` it needs); masks PII (`data.mask_pii`) in the kept texts only, split by split, into a second scratch
file; and then gives each split's texts in the split's order, read back one by one. Memory is the labels and offsets
(16 bytes a row), not the texts; the texts and labels are `load_text`'s (a test compares).
"""

from __future__ import annotations

import os
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

SPLITS = ("train", "val", "test")


class TextStore:
    """Texts appended to one scratch file as UTF-8, then read back by index (one `pread` each)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._out: Any = self.path.open("wb")
        self._offsets = array("q", [0])
        self._fd: int | None = None

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def append(self, text: str) -> int:
        """Store `text`; returns its index."""
        data = text.encode("utf-8", "surrogatepass")  # a JSON `\\ud800` escape is a lone surrogate: kept as it is
        self._out.write(data)
        self._offsets.append(self._offsets[-1] + len(data))
        return len(self._offsets) - 2

    def seal(self) -> None:
        """Done appending: texts can be read."""
        if self._fd is None:
            self._out.close()
            self._fd = os.open(self.path, os.O_RDONLY)

    def texts(self, rows: torch.Tensor, block: int = 1 << 16) -> Iterator[str]:
        """The texts at `rows` (int64 indices), in that order."""
        self.seal()
        assert self._fd is not None
        for a in range(0, len(rows), block):
            for i in rows[a : a + block].tolist():
                start, end = self._offsets[i], self._offsets[i + 1]
                yield os.pread(self._fd, end - start, start).decode("utf-8", "surrogatepass")

    def close(self) -> None:
        self._out.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class RowSplit:
    """A split as rows of a `TextStore` with their class indices."""

    rows: torch.Tensor  # (N,) int64
    y: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: torch.Tensor) -> RowSplit:
        return RowSplit(self.rows[idx], self.y[idx])


class SplitTexts:
    """One split's texts, iterable as often as a tokenizer trainer needs (WordPiece reads them twice)."""

    def __init__(self, source: StreamedText, name: str) -> None:
        self.source, self.name = source, name

    def __len__(self) -> int:
        return len(self.source.splits[self.name])

    def __iter__(self) -> Iterator[str]:
        return self.source.texts(self.name)


class StreamedText:
    """A text-classification source (`TextDataConfig`) carved and masked as `load_text` carves and masks it, its texts
    kept in scratch files under `scratch` (an existing folder); `close()` when done."""

    def __init__(self, cfg: Any, seed: int, scratch: Path) -> None:
        from bigmodel.data.sources import finish_splits
        from bigmodel.data.text import source_files, too_few_labels, unknown_label

        self._stores = [TextStore(Path(scratch) / "texts.bin")]
        store = self._stores[0]
        ids: dict[str, int] = {}  # label -> provisional id, in order of first appearance
        read: dict[str, tuple[Path, array, int]] = {}  # split -> (path, provisional ids, first row)
        first: dict[tuple[str, int], tuple[int, str]] = {}  # (held-out split, label id) -> (its first row, where)
        for split, path, rows in source_files(cfg):
            ys, start = array("q"), len(store)
            for text, label, where in rows():
                k = ids.setdefault(label, len(ids))
                if split != "train" and (split, k) not in first:
                    first[split, k] = (len(store), where)
                ys.append(k)
                store.append(text)
            read[split] = (path, ys, start)
        names = list(ids)
        train_path, train_ys, _ = read["train"]
        seen = np.unique(np.frombuffer(train_ys, dtype=np.int64)) if len(train_ys) else np.zeros(0, np.int64)
        self.labels = sorted(names[k] for k in seen.tolist())
        if len(self.labels) < 2:
            raise too_few_labels(train_path, self.labels)
        to_class = np.full(max(1, len(names)), -1, dtype=np.int64)
        for c, label in enumerate(self.labels):
            to_class[ids[label]] = c
        splits: dict[str, RowSplit | None] = {"val": None, "test": None}
        for split, (path, ys, start) in read.items():
            bad = [(row, where, names[k]) for (s, k), (row, where) in first.items() if s == split and to_class[k] < 0]
            if bad:
                _, where, label = min(bad)
                raise unknown_label(path, where, label, self.labels)
            y = torch.from_numpy(to_class[np.frombuffer(ys, dtype=np.int64)]) if len(ys) else torch.zeros(0).long()
            splits[split] = RowSplit(torch.arange(start, start + len(ys), dtype=torch.int64), y)
        train, val, test = finish_splits(splits["train"], splits["val"], splits["test"], self.labels, cfg, seed)
        carved = zip(SPLITS, (train, val, test), strict=True)
        self.splits: dict[str, RowSplit] = {n: s for n, s in carved if s is not None}
        self.store = store
        self.pii_masked: dict[str, int] | None = None
        self._mask(cfg, Path(scratch))

    def _mask(self, cfg: Any, scratch: Path) -> None:
        """`mask_splits`: each kept text masked once, into a second store the splits then read from."""
        from bigmodel.privacy.pii import masker_for

        m = masker_for(cfg)
        if m is None:
            return
        masked = TextStore(scratch / "masked.bin")
        self._stores.append(masked)
        counts: Counter[str] = Counter()
        for name, split in self.splits.items():
            start = len(masked)
            for text in self.store.texts(split.rows):
                out, c = m.mask(text)
                masked.append(out)
                counts.update(c)
            self.splits[name] = RowSplit(torch.arange(start, len(masked), dtype=torch.int64), split.y)
        self.store = masked
        self.pii_masked = {t: counts.get(t, 0) for t in m.types}

    def has(self, name: str) -> bool:
        return name in self.splits

    def texts(self, name: str) -> Iterator[str]:
        """The split's texts in its order (`load_text`'s `<split>.texts`)."""
        return self.store.texts(self.splits[name].rows)

    def train_texts(self) -> Iterable[str]:
        return SplitTexts(self, "train")

    def close(self) -> None:
        for s in self._stores:
            s.close()
