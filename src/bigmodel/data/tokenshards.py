"""Token streams on disk: `bigmodel data prepare` for a language-modelling recipe, read back without holding them.

A prepared folder holds (format `bigmodel-tokens/1`):
- `<split>.bin` for train / val / test (carved with the recipe's seed and fractions at prepare time): the split's
  token ids as one raw little-endian uint16 array (uint32 when the vocabulary has more than 65,536 tokens) — the
  layout nanoGPT's `train.bin` uses, readable with `np.memmap(path, dtype, mode="r")`;
- `tokenizer.json`: the tokenizer the ids were made with (trained on the training text at prepare time, or the
  pretrained model's for `model.name: hf`);
- `index.json`: the format, the dtype, the vocabulary size, each split's token count, the tokenizer settings and a
  SHA-256 of the tokenizer, and the PII types masked before tokenising.

`data.source: shards` with `data.path: FOLDER` trains a language model on it. Streams of at most
`data.in_memory_limit_mb` (as int64, all splits together) are read into memory; larger ones stay on disk as
`DiskTokens`, which reads each window of a batch with one `pread` (resident memory: one batch, whatever the corpus'
size). The windows are the sampling plan's either way, so a run on the folder trains exactly as a run on its source
recipe and resumes exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigmodel.data.shards import RawFile
from bigmodel.errors import UserError

FORMAT = "bigmodel-tokens/1"
SPLITS = ("train", "val", "test")
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def tokenizer_digest(tok: Any) -> str:
    """SHA-256 of the tokenizer's JSON form (the same for a tokenizer and its saved-and-loaded copy)."""
    from tokenizers import Tokenizer

    return hashlib.sha256(Tokenizer.from_str(tok.to_str()).to_str().encode()).hexdigest()


# --------------------------------------------------------------------------------------------------------- reading
class DiskTokens(RawFile):
    """A 1-D stream of token ids in a raw file, indexed like an int64 tensor: `ids[a:b]`, `ids[i]`, and `ids[index]`
    for an index tensor of any shape (rows of consecutive positions, i.e. windows, are read with one `pread` each)."""

    dtype = torch.int64
    device = torch.device("cpu")

    def __init__(self, path: Path, dtype: np.dtype, count: int) -> None:
        self.path, self._dtype, self._count = Path(path), dtype, count
        size = self.path.stat().st_size if self.path.exists() else -1
        if size != count * dtype.itemsize:
            raise UserError(
                f"{self.path}: {size} bytes, index.json says {count} tokens of {dtype.itemsize} bytes "
                "(prepare the folder again: bigmodel data prepare)"
            )

    def numel(self) -> int:
        return self._count

    def __len__(self) -> int:
        return self._count

    @property
    def shape(self) -> tuple[int]:
        return (self._count,)

    def to(self, device: Any) -> DiskTokens:
        """Stays on disk: windows are read on the CPU and the loader moves each batch to its device."""
        return self

    def _runs(self, starts: np.ndarray, length: int) -> np.ndarray:
        """(len(starts), length) ids: the `length` tokens from each start, one pread per row."""
        out = np.empty((len(starts), length), dtype=self._dtype)
        size = length * self._dtype.itemsize
        fd = self._file()
        for k, s in enumerate(starts.tolist()):
            if os.preadv(fd, [memoryview(out[k]).cast("B")], s * self._dtype.itemsize) != size:
                raise UserError(f"{self.path}: truncated token file (prepare the folder again)")
        return out

    def __getitem__(self, idx: Any) -> torch.Tensor:
        n = self._count
        if isinstance(idx, int):
            if not -n <= idx < n:
                raise IndexError(f"index {idx} out of range for {n} tokens")
            return torch.tensor(int(self._runs(np.array([idx % n]), 1)[0, 0]))
        if isinstance(idx, slice):
            a, b, step = idx.indices(n)
            if step != 1:
                return self[torch.arange(a, b, step)]
            return torch.from_numpy(self._runs(np.array([a]), max(0, b - a))[0].astype(np.int64))
        idx = torch.as_tensor(idx).cpu().long()
        if idx.numel() and (int(idx.max()) >= n or int(idx.min()) < -n):
            raise IndexError(f"index out of range for {n} tokens")
        idx = idx % max(n, 1)
        rows = idx.reshape(-1, idx.shape[-1]) if idx.dim() else idx.reshape(1, 1)
        L = rows.shape[1]
        if L and bool((rows - rows[:, :1] == torch.arange(L)).all()):  # windows: consecutive positions per row
            out = self._runs(rows[:, 0].numpy(), L)
        else:  # any other pattern: one read per element
            out = self._runs(rows.flatten().numpy(), 1).reshape(rows.shape)
        return torch.from_numpy(out.astype(np.int64)).reshape(idx.shape)

    def materialize(self) -> torch.Tensor:
        return torch.from_numpy(np.fromfile(self.path, dtype=self._dtype).astype(np.int64))


def read_index(root: Path) -> dict[str, Any]:
    from bigmodel.data.shards import read_prepared_index

    return read_prepared_index(root, FORMAT, DTYPES)


def load_token_shards(recipe: Any, pre: Any | None) -> tuple[Any, Any]:
    """`data.source: shards` for a language model → (LMDataset, Preprocess): the folder's tokenizer (or `pre`'s, which
    must be the one the ids were made with), each split in memory or on disk by `data.in_memory_limit_mb`."""
    from tokenizers import Tokenizer

    from bigmodel.data.corpus import LMDataset, TokenStream, plain
    from bigmodel.runs import Preprocess

    cfg = recipe.data
    root = Path(cfg.path)
    meta = read_index(root)
    if pre is None and recipe.model.name == "hf":
        from bigmodel.api import hf_lm_preprocess

        pre = hf_lm_preprocess(recipe)
    if pre is None:
        from bigmodel.data.textshards import check_tokenizer_settings

        check_tokenizer_settings(cfg, meta["tokenizer_config"], root)
        try:
            tok = plain(Tokenizer.from_file(str(root / "tokenizer.json")))
        except Exception as e:  # tokenizers raises its own Exception type for a bad file
            raise UserError(f"{root / 'tokenizer.json'}: cannot read the tokenizer ({e})") from None
        spec = {
            "kind": "lm",
            "vocab_size": tok.get_vocab_size(),
            "context_length": cfg.context_length,
            "tokenizer": meta["tokenizer_kind"],
        }
        pre = Preprocess(labels=[], mean=None, std=None, input_shape=spec, kind="lm", tokenizer=tok)
    if tokenizer_digest(pre.tokenizer) != meta["tokenizer_sha256"]:
        raise UserError(
            f"{root}: its token ids were made with another tokenizer than this model's (index.json tokenizer_sha256); "
            "prepare the folder again with this recipe"
        )
    if cfg.mask_pii and sorted(cfg.mask_pii) != sorted(meta.get("mask_pii", [])):
        raise UserError(
            f"data.mask_pii {cfg.mask_pii}: {root} was prepared with {meta.get('mask_pii', [])} masked (PII is masked "
            "before tokenising: prepare the folder again)"
        )
    dtype = DTYPES[meta["dtype"]]
    streams = {
        name: DiskTokens(root / meta["splits"][name]["shards"][0]["file"], dtype, meta["splits"][name]["count"])
        for name in SPLITS
        if name in meta["splits"]
    }
    in_memory = sum(len(s) for s in streams.values()) * 8 <= cfg.in_memory_limit_mb * 2**20
    ids = {name: s.materialize() if in_memory else s for name, s in streams.items()}
    if len(ids["train"]) < 2:
        raise UserError(f"{root}: the training split holds fewer than two tokens")
    data = LMDataset(
        TokenStream(ids["train"]),
        TokenStream(ids["val"]) if "val" in ids else None,
        TokenStream(ids["test"]) if "test" in ids else None,
        [],
    )
    data.pii_masked = meta.get("pii_masked")
    data.on_disk = not in_memory
    return data, pre


# --------------------------------------------------------------------------------------------------------- writing
def write_token_shards(recipe: Any, out: Path) -> dict[str, Any]:
    """Tokenise a language-modelling recipe's corpus (its splits, its tokenizer trained on the training text) into
    `out` (written into a temporary folder, renamed when complete), without holding a split (`corpus_pieces`):
    documents are read a block at a time (masked into scratch files first when `data.mask_pii` asks), a classification
    source a row at a time; the pieces are encoded ~1 M characters at a time. Memory is a block of a document (or the
    rows' labels and offsets) and the tokenizer. Returns the index."""
    import shutil

    from bigmodel.data.corpus import corpus_pieces, encode_pieces, train_lm_tokenizer
    from bigmodel.data.shards import prepared_folder

    cfg = recipe.data
    with prepared_folder(Path(out)) as tmp:
        scratch = tmp / "scratch"
        scratch.mkdir()
        corpus = corpus_pieces(cfg, recipe.seed, scratch)
        try:
            if recipe.model.name == "hf":
                from bigmodel.api import hf_lm_preprocess

                tok, kind, tok_cfg = hf_lm_preprocess(recipe).tokenizer, "hf", None
            else:
                tok = train_lm_tokenizer(cfg.tokenizer, corpus.pieces("train"))
                kind, tok_cfg = cfg.tokenizer.kind, cfg.tokenizer
            vocab = tok.get_vocab_size()
            dtype_name = "uint16" if vocab <= 1 << 16 else "uint32"
            dtype = DTYPES[dtype_name]
            splits: dict[str, Any] = {}
            for name in SPLITS:
                if not corpus.has(name):
                    continue
                count = 0
                with open(tmp / f"{name}.bin", "wb") as f:
                    for ids in encode_pieces(tok, corpus.pieces(name), dtype):
                        ids.tofile(f)
                        count += len(ids)
                if count == 0:  # an empty split (e.g. a document too short to carve): as the in-memory path, none
                    (tmp / f"{name}.bin").unlink()
                    continue
                splits[name] = {"count": count, "shards": [{"file": f"{name}.bin", "count": count}]}
        finally:
            corpus.close()
            shutil.rmtree(scratch)
        tok.save(str(tmp / "tokenizer.json"))
        index = {
            "format": FORMAT,
            "dtype": dtype_name,
            "vocab_size": vocab,
            "tokenizer_kind": kind,
            "tokenizer_config": tok_cfg.model_dump(mode="json") if tok_cfg is not None else None,
            "tokenizer_sha256": tokenizer_digest(tok),
            "mask_pii": list(cfg.mask_pii),
            "pii_masked": corpus.pii_masked,
            "splits": splits,
        }
        (tmp / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return index
