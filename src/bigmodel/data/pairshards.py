"""Sentence pairs as token ids on disk: `bigmodel data prepare` for a translation recipe, read back a batch at a time.

A prepared folder holds (format `bigmodel-pairids/1`), for each split (train / val / test, carved with the recipe's
seed and fractions at prepare time):
- `<split>-src.bin`, `<split>-tgt.bin`: each pair's token ids as the model sees them (`tokenize_pairs`): the source
  truncated to `max_length - 1` ids and ended with [EOS], the target [BOS] ... [EOS] within `max_length`; training
  pairs over the limit dropped. Raw little-endian uint16 (uint32 above 65,536 tokens), one pair after the other;
- `<split>-src-offsets.npy`, `<split>-tgt-offsets.npy`: int64 (N + 1,): pair i is `ids[offsets[i]:offsets[i + 1]]`;
- `<split>-text.bin` with `<split>-text-offsets.npy` (2N + 1,): each pair's raw source, then its raw target (UTF-8):
  BLEU's references and the report's examples;
and `tokenizer.json` (plus `target_tokenizer.json` with one vocabulary per side), and `index.json`: the format,
dtype, the model's input description, the tokenizer settings and SHA-256s, the PII types masked, `reverse`,
`shared_vocab`, the training pairs dropped, and each split's count and token totals.

Preparing reads the source a pair at a time (`StreamedPairs`): both sides go to scratch files, the splits are carved
by index as `load_pairs` carves them, PII is masked in the kept pairs once, and the tokenizers train on, and the writer
encodes, the texts read back from the scratch. `data.source: shards` with `data.path: FOLDER` trains a translation
model on it: in memory when the padded id matrices (int64) fit `data.in_memory_limit_mb`, exactly what tokenizing the
source recipe gives, else read a batch of rows at a time from disk (`DiskRows`); the batches are the sampling plan's
either way, so a run on the folder trains as a run on its source recipe does and resumes exactly.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigmodel.data.textshards import DTYPES, DiskRows, check_tokenizer_settings, text_tokenizer_digest
from bigmodel.data.textstream import TextStore
from bigmodel.errors import UserError

FORMAT = "bigmodel-pairids/1"
SPLITS = ("train", "val", "test")


class StreamedPairs:
    """A translation source (`TranslationDataConfig`) split, limited, reversed and masked as `load_pairs` does it, its
    sentences kept in scratch files under `scratch` (an existing folder); `close()` when done."""

    def __init__(self, cfg: Any, seed: int, scratch: Path) -> None:
        from bigmodel.data.parallel import carve_indices, pair_files

        scratch = Path(scratch)
        src, tgt = TextStore(scratch / "src.bin"), TextStore(scratch / "tgt.bin")
        self._stores = [src, tgt]
        carved, sources = pair_files(cfg)
        ranges: dict[str, tuple[int, int]] = {}
        for name, rows in sources:
            start = len(src)
            for s, t in rows():
                src.append(s)
                tgt.append(t)
            ranges[name] = (start, len(src))
        if carved:
            a, b = ranges["train"]
            picked = carve_indices(b - a, cfg.val_fraction, cfg.test_fraction, seed)
            splits = {k: torch.tensor(v, dtype=torch.int64) + a for k, v in picked.items()}
        else:
            splits = {k: torch.arange(a, b, dtype=torch.int64) for k, (a, b) in ranges.items()}
        if cfg.limit_train is not None:
            splits["train"] = splits["train"][: cfg.limit_train]
        self.rows = {k: splits[k] for k in SPLITS if k in splits and len(splits[k])}
        if "train" not in self.rows:
            raise UserError("the training split holds no sentence pairs")
        self.sides = (tgt, src) if cfg.reverse else (src, tgt)
        self.pii_masked: dict[str, int] | None = None
        self._mask(cfg, scratch)

    def _mask(self, cfg: Any, scratch: Path) -> None:
        """`mask_splits` over both sides: each kept sentence masked once, into stores the splits then read from."""
        from bigmodel.privacy.pii import masker_for

        m = masker_for(cfg)
        if m is None:
            return
        masked = (TextStore(scratch / "src-masked.bin"), TextStore(scratch / "tgt-masked.bin"))
        self._stores += list(masked)
        counts: Counter[str] = Counter()
        for name, rows in self.rows.items():
            start = len(masked[0])
            for side, out in zip(self.sides, masked, strict=True):
                for text in side.texts(rows):
                    done, c = m.mask(text)
                    out.append(done)
                    counts.update(c)
            self.rows[name] = torch.arange(start, len(masked[0]), dtype=torch.int64)
        self.sides = masked
        self.pii_masked = {t: counts.get(t, 0) for t in m.types}

    def texts(self, name: str, side: int) -> Iterator[str]:
        """The split's sources (`side` 0) or targets (1), in its order."""
        return self.sides[side].texts(self.rows[name])

    def train_side(self, side: int) -> _Side:
        return _Side(self, side)

    def close(self) -> None:
        for s in self._stores:
            s.close()


class _Side:
    """The training split's sources or targets, iterable as often as a tokenizer trainer needs."""

    def __init__(self, pairs: StreamedPairs, side: int) -> None:
        self.pairs, self.side = pairs, side

    def __len__(self) -> int:
        return len(self.pairs.rows["train"])

    def __iter__(self) -> Iterator[str]:
        return self.pairs.texts("train", self.side)


class StoredTexts(Sequence):
    """The raw sources (`side` 0) or targets (1) of a prepared split, read from `<split>-text.bin` when indexed."""

    def __init__(self, path: Path, offsets: np.ndarray, side: int) -> None:
        self.path, self.offsets, self.side = Path(path), offsets, side

    def __len__(self) -> int:
        return (len(self.offsets) - 1) // 2

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(i)
        k = 2 * (i % n) + self.side
        a, b = int(self.offsets[k]), int(self.offsets[k + 1])
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return os.pread(fd, b - a, a).decode("utf-8", "surrogatepass")
        finally:
            os.close(fd)

    def materialize(self) -> list[str]:
        """Every text of this side, from one read of the file."""
        data = self.path.read_bytes()
        o = self.offsets
        return [data[o[k] : o[k + 1]].decode("utf-8", "surrogatepass") for k in range(self.side, len(o) - 1, 2)]


# --------------------------------------------------------------------------------------------------------- writing
def write_pair_shards(recipe: Any, out: Path, make_preprocess: Any, chunk: int = 4096) -> dict[str, Any]:
    """Tokenise a translation recipe's pairs into `out` (a temporary folder renamed when complete), a pair at a time:
    `make_preprocess(sources, targets)` trains the tokenizers on the training sides; each split is encoded `chunk`
    pairs at a time. Memory is the pairs' offsets, one chunk and the tokenizers' training state. Returns the index."""
    from bigmodel.data.shards import prepared_folder
    from bigmodel.tokens import BOS_ID, EOS_ID

    cfg = recipe.data
    L = cfg.tokenizer.max_length
    with prepared_folder(Path(out)) as tmp:
        scratch = tmp / "scratch"
        scratch.mkdir()
        pairs = StreamedPairs(cfg, recipe.seed, scratch)
        try:
            pre = make_preprocess(pairs.train_side(0), pairs.train_side(1))
            src_tok, tgt_tok = pre.tokenizer, pre.target_tokenizer or pre.tokenizer
            vocab = max(src_tok.get_vocab_size(), tgt_tok.get_vocab_size())
            dtype_name = "uint16" if vocab <= 1 << 16 else "uint32"
            dtype = DTYPES[dtype_name]
            splits: dict[str, Any] = {}
            dropped = 0
            for name in SPLITS:
                if name not in pairs.rows:
                    continue
                offsets = {k: array("q", [0]) for k in ("src", "tgt", "text")}
                files = {k: open(tmp / f"{name}-{k}.bin", "wb") for k in offsets}  # noqa: SIM115 (closed below)
                try:
                    stream = zip(pairs.texts(name, 0), pairs.texts(name, 1), strict=True)
                    while group := list(itertools.islice(stream, chunk)):
                        s_ids = src_tok.encode_batch([s for s, _ in group], add_special_tokens=False)
                        t_ids = tgt_tok.encode_batch([t for _, t in group], add_special_tokens=False)
                        for (s_text, t_text), s_enc, t_enc in zip(group, s_ids, t_ids, strict=True):
                            s, t = s_enc.ids, t_enc.ids
                            if name == "train" and (len(s) + 1 > L or len(t) + 2 > L):
                                dropped += 1
                                continue
                            rows = {
                                "src": (s[: L - 1] or [1]) + [EOS_ID],
                                "tgt": [BOS_ID, *t[: L - 2], EOS_ID],
                            }
                            for k, ids in rows.items():
                                np.asarray(ids, dtype=dtype).tofile(files[k])
                                offsets[k].append(offsets[k][-1] + len(ids))
                            for text in (s_text, t_text):
                                data = text.encode("utf-8", "surrogatepass")
                                files["text"].write(data)
                                offsets["text"].append(offsets["text"][-1] + len(data))
                finally:
                    for f in files.values():
                        f.close()
                count = len(offsets["src"]) - 1
                if name == "train" and count == 0:
                    raise UserError(
                        f"every training pair is longer than data.tokenizer.max_length {L} tokens; raise it"
                    )
                for k, o in offsets.items():
                    np.save(tmp / f"{name}-{k}-offsets.npy", np.frombuffer(o, dtype=np.int64), allow_pickle=False)
                splits[name] = {
                    "count": count,
                    "src_tokens": offsets["src"][-1],
                    "tgt_tokens": offsets["tgt"][-1],
                    **{k: f"{name}-{k}.bin" for k in offsets},
                }
        finally:
            pairs.close()
            shutil.rmtree(scratch)
        (tmp / "tokenizer.json").write_text(src_tok.to_str(), encoding="utf-8")
        if pre.target_tokenizer is not None:
            (tmp / "target_tokenizer.json").write_text(tgt_tok.to_str(), encoding="utf-8")
        index = {
            "format": FORMAT,
            "dtype": dtype_name,
            "input_shape": dict(pre.input_shape),
            "tokenizer_config": cfg.tokenizer.model_dump(mode="json"),
            "tokenizer_sha256": text_tokenizer_digest(src_tok),
            "target_tokenizer_sha256": text_tokenizer_digest(tgt_tok) if pre.target_tokenizer is not None else None,
            "shared_vocab": pre.target_tokenizer is None,
            "reverse": cfg.reverse,
            "mask_pii": list(cfg.mask_pii),
            "pii_masked": pairs.pii_masked,
            "dropped": dropped,
            "splits": splits,
        }
        (tmp / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return index


# --------------------------------------------------------------------------------------------------------- reading
def load_pair_shards(recipe: Any, pre: Any | None) -> tuple[Any, Any]:
    """`data.source: shards` for a translation model → (TokenPairDataset, Preprocess): the folder's tokenizers and
    input description (or `pre`'s, which must be the tokenizers the ids were made with)."""
    from bigmodel.data.parallel import TokenPairDataset, TokenPairs
    from bigmodel.data.shards import read_prepared_index
    from bigmodel.data.text import load_tokenizer
    from bigmodel.runs import Preprocess

    cfg = recipe.data
    root = Path(cfg.path)
    meta = read_prepared_index(root, FORMAT, DTYPES)
    for key, default in (("reverse", False), ("shared_vocab", True)):
        asked = getattr(cfg, key)
        if asked != default and asked != meta.get(key):
            raise UserError(f"data.{key} {asked}: {root} was prepared with {key} {meta.get(key)} (prepare it again)")
    if pre is None:
        check_tokenizer_settings(cfg, meta.get("tokenizer_config"), root)
        tok = load_tokenizer(root / "tokenizer.json")
        target = None if meta["shared_vocab"] else load_tokenizer(root / "target_tokenizer.json")
        pre = Preprocess(
            [], None, None, dict(meta["input_shape"]), kind="translation", tokenizer=tok, target_tokenizer=target
        )
    want = (meta["tokenizer_sha256"], meta.get("target_tokenizer_sha256"))
    have = (
        text_tokenizer_digest(pre.tokenizer),
        text_tokenizer_digest(pre.target_tokenizer) if pre.target_tokenizer is not None else None,
    )
    if have != want:
        raise UserError(
            f"{root}: its token ids were made with other tokenizers than this model's (index.json tokenizer_sha256); "
            "prepare the folder again with this recipe"
        )
    if sorted(cfg.mask_pii) != sorted(meta.get("mask_pii", [])):
        raise UserError(
            f"data.mask_pii {cfg.mask_pii}: {root} was prepared with {meta.get('mask_pii', [])} masked (PII is masked "
            "before tokenising: prepare the folder again)"
        )
    dtype = DTYPES[meta["dtype"]]
    parts: dict[str, tuple[DiskRows, DiskRows, StoredTexts, StoredTexts]] = {}
    for name in SPLITS:
        if name not in meta["splits"]:
            continue
        entry = meta["splits"][name]
        try:
            offs = {
                k: np.load(root / f"{name}-{k}-offsets.npy", allow_pickle=False).astype(np.int64)
                for k in ("src", "tgt", "text")
            }
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"{root}: split {name!r}: cannot read its offsets ({e})") from None
        for k, itemsize in (("src", dtype.itemsize), ("tgt", dtype.itemsize), ("text", 1)):
            path = root / entry[k]
            size = path.stat().st_size if path.exists() else -1
            n = len(offs[k]) - 1
            if size != int(offs[k][-1]) * itemsize or n != (2 if k == "text" else 1) * entry["count"]:
                raise UserError(f"{path}: {size} bytes for {entry['count']} pairs; offsets disagree (prepare again)")
        text = root / entry["text"]
        parts[name] = (
            DiskRows(root / entry["src"], dtype, offs["src"]),
            DiskRows(root / entry["tgt"], dtype, offs["tgt"]),
            StoredTexts(text, offs["text"], 0),
            StoredTexts(text, offs["text"], 1),
        )
    in_memory = sum(s.nbytes + t.nbytes for s, t, _, _ in parts.values()) <= cfg.in_memory_limit_mb * 2**20

    def split(name: str) -> TokenPairs | None:
        if name not in parts:
            return None
        src, tgt, sources, targets = parts[name]
        return TokenPairs(
            src.materialize() if in_memory else src,
            torch.from_numpy(src._lengths.copy()),
            tgt.materialize() if in_memory else tgt,
            torch.from_numpy(tgt._lengths.copy()),
            targets.materialize() if in_memory else targets,
            sources.materialize() if in_memory else sources,
        )

    train = split("train")
    assert train is not None
    data = TokenPairDataset(train, split("val"), split("test"), [], int(meta.get("dropped", 0)))
    data.pii_masked = meta.get("pii_masked")
    data.on_disk = not in_memory
    return data, pre
