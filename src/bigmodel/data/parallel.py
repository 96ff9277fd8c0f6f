"""Parallel text for translation: sentence pairs → tokenized, length-filtered splits → padded teacher-forcing batches.

Sources (`task: translation`):
- `tsv`: `source<TAB>target` per line (`data.path` carved into splits, or `data.train_path` / `val_path` /
  `test_path`);
- `aligned_files`: `data.source_file` and `data.target_file`, one sentence per line, line i ↔ line i;
- `bible`: the King James Version (English) and the Reina-Valera 1909 (Spanish) from the Debian packages
  `sword-text-kjv` and `sword-text-sparv`, read straight from their SWORD zText files (`read_ztext`). Both use KJV
  versification, so entry i of one is entry i of the other: 31,084 verse pairs once markup, headings and notes are
  stripped.

Val and test pairs are carved at random with the recipe's seed (the same seed, the same split). Training pairs whose
source or target exceeds `data.tokenizer.max_length` tokens are dropped (counted in the log); val/test pairs are
kept (their sources truncated), so scores are over the whole held-out set.
"""

from __future__ import annotations

import functools
import html
import itertools
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bigmodel.config import TranslationDataConfig
from bigmodel.data.sampling import SamplingPlan
from bigmodel.data.sources import Splits
from bigmodel.data.split import mix_seed
from bigmodel.errors import UserError
from bigmodel.tokens import BOS_ID, EOS_ID, PAD_ID  # noqa: F401 (PAD_ID: re-exported)

SWORD_ROOT = Path("/usr/share/sword/modules/texts/ztext")
BIBLE_MODULES = {"en": "engKJV2006eb", "es": "spaRV1909eb"}


@dataclass
class PairSplit:
    source: list[str]
    target: list[str]

    def __len__(self) -> int:
        return len(self.source)


@dataclass
class PairCorpus(Splits):
    train: PairSplit
    val: PairSplit | None
    test: PairSplit | None


# ------------------------------------------------------------------------------------------------------ SWORD
def read_ztext(folder: Path) -> list[str]:
    """Every entry (module/testament/book/chapter headings and verses, in versification order) of a SWORD zText
    module, as raw markup. `.bzs`: 12-byte records (offset, size, uncompressed size) of zlib blocks in `.bzz`;
    `.bzv`: 10-byte records (block, offset, size) of each entry inside its decompressed block."""
    entries: list[str] = []
    for testament in ("ot", "nt"):
        try:
            bzs = (folder / f"{testament}.bzs").read_bytes()
            bzv = (folder / f"{testament}.bzv").read_bytes()
            bzz = (folder / f"{testament}.bzz").read_bytes()
        except OSError as e:
            raise UserError(f"{folder}: unreadable SWORD module ({e.strerror or e})") from None
        if len(bzs) % 12 or len(bzv) % 10:
            raise UserError(f"{folder}: {testament}.bzs / .bzv sizes are not whole records; not a zText module")
        blocks = [struct.unpack_from("<III", bzs, i) for i in range(0, len(bzs), 12)]
        cache: dict[int, bytes] = {}
        for i in range(0, len(bzv), 10):
            block, offset, size = struct.unpack_from("<IIH", bzv, i)
            if size == 0:
                entries.append("")
                continue
            if block not in cache:
                if block >= len(blocks):
                    raise UserError(f"{folder}: {testament}.bzv points at block {block} of {len(blocks)}")
                start, length, _ = blocks[block]
                try:
                    cache[block] = zlib.decompress(bzz[start : start + length])
                except zlib.error as e:
                    raise UserError(f"{folder}: {testament}.bzz block {block} does not decompress ({e})") from None
            entries.append(cache[block][offset : offset + size].decode("utf-8", errors="replace"))
    return entries


_DROP = re.compile(r"<(title|note|milestone)\b[^>]*?(/>|>.*?</\1>)", re.S)  # headings and notes, with their text
_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")


def strip_osis(markup: str) -> str:
    """Verse text from OSIS markup: headings and notes removed with their content, other tags unwrapped."""
    text = _TAG.sub(" ", _DROP.sub(" ", markup))
    text = html.unescape(text)
    text = _SPACE.sub(" ", text).strip()
    return re.sub(r" ([,.;:!?)\]])", r"\1", text)


def bible_pairs(root: Path | None = None) -> list[tuple[str, str]]:
    """(English, Spanish) verse pairs, in canonical order; entries empty on either side are skipped."""
    root = root or Path(os.environ.get("BIGMODEL_SWORD_ROOT", SWORD_ROOT))
    folders = {lang: root / mod for lang, mod in BIBLE_MODULES.items()}
    for lang, folder in folders.items():
        if not folder.is_dir():
            pkg = "sword-text-kjv" if lang == "en" else "sword-text-sparv"
            raise UserError(
                f"data.source 'bible': {folder} not found; install the Debian package `{pkg}` (apt-get install "
                "sword-text-kjv sword-text-sparv), or set BIGMODEL_SWORD_ROOT to a folder holding the modules"
            )
    en, es = read_ztext(folders["en"]), read_ztext(folders["es"])
    if len(en) != len(es):
        raise UserError(
            f"{root}: the two modules have {len(en)} and {len(es)} entries; expected the same versification"
        )
    pairs = []
    for a, b in zip(en, es, strict=True):
        a, b = strip_osis(a), strip_osis(b)
        if a and b:
            pairs.append((a, b))
    return pairs


# ---------------------------------------------------------------------------------------------------- readers
Pair = tuple[str, str]


def _iter_lines(path: Path, encoding: str) -> Iterator[str]:
    """The lines of a text file (universal newlines, no line ends), read a line at a time."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    n = 0
    try:
        with path.open(encoding=encoding) as f:
            for n, line in enumerate(f, 1):  # noqa: B007 (n: the last line read, for the error)
                yield line.rstrip("\n")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid {encoding} after line {n} ({e.reason}); set data.encoding") from None


def iter_tsv_pairs(path: Path, encoding: str = "utf-8") -> Iterator[Pair]:
    """`source<TAB>target` pairs of a file, a line at a time (blank lines skipped)."""
    empty = True
    for n, line in enumerate(_iter_lines(path, encoding), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or not parts[0].strip() or not parts[1].strip():
            raise UserError(f"{path}: line {n}: expected 'source<TAB>target' with both sides non-empty")
        empty = False
        yield parts[0].strip(), parts[1].strip()
    if empty:
        raise UserError(f"{path}: no sentence pairs")


def read_tsv_pairs(path: Path, encoding: str = "utf-8") -> list[Pair]:
    return list(iter_tsv_pairs(path, encoding))


def iter_aligned(source: Path, target: Path, encoding: str = "utf-8") -> Iterator[Pair]:
    """Line i of `source` with line i of `target`, a line at a time (pairs empty on both sides skipped)."""
    a, b = _iter_lines(source, encoding), _iter_lines(target, encoding)
    n, empty = 0, True
    for n, (s, t) in enumerate(itertools.zip_longest(a, b), 1):  # noqa: B007
        if s is None or t is None:
            na = n - 1 + (s is not None) + sum(1 for _ in a)
            nb = n - 1 + (t is not None) + sum(1 for _ in b)
            raise UserError(f"{source} has {na} lines but {target} has {nb}; aligned files need the same count")
        s, t = s.strip(), t.strip()
        if bool(s) != bool(t):
            raise UserError(f"{source if not s else target}: line {n} is empty but its counterpart is not")
        if s:
            empty = False
            yield s, t
    if empty:
        raise UserError(f"{source}: no sentence pairs")


def read_aligned(source: Path, target: Path, encoding: str = "utf-8") -> list[Pair]:
    return list(iter_aligned(source, target, encoding))


def carve_indices(n: int, val: float, test: float, seed: int) -> dict[str, list[int]]:
    """The pairs (by index, in corpus order) of each carved split: a seeded permutation, test first, then val."""
    g = torch.Generator().manual_seed(mix_seed(seed, 0x7A1))
    perm = torch.randperm(n, generator=g).tolist()
    n_test, n_val = round(n * test), round(n * val)
    return {
        "test": sorted(perm[:n_test]),
        "val": sorted(perm[n_test : n_test + n_val]),
        "train": sorted(perm[n_test + n_val :]),
    }


def _carve(pairs: list[Pair], val: float, test: float, seed: int) -> dict[str, list[Pair]]:
    return {k: [pairs[i] for i in idx] for k, idx in carve_indices(len(pairs), val, test, seed).items()}


def pair_files(cfg: TranslationDataConfig) -> tuple[bool, list[tuple[str, Callable[[], Iterator[Pair]]]]]:
    """(carved: one corpus to carve into splits, its pairs) or (False, each split file's pairs), read when iterated."""
    if cfg.source == "bible":
        return True, [("train", lambda: iter(bible_pairs(cfg.path)))]
    if cfg.source == "aligned_files":
        assert cfg.source_file is not None and cfg.target_file is not None
        src, tgt = cfg.source_file, cfg.target_file
        return True, [("train", lambda: iter_aligned(src, tgt, cfg.encoding))]
    if cfg.train_path is not None:
        files = (("train", cfg.train_path), ("val", cfg.val_path), ("test", cfg.test_path))
        return False, [(k, functools.partial(iter_tsv_pairs, p, cfg.encoding)) for k, p in files if p is not None]
    assert cfg.path is not None
    return True, [("train", functools.partial(iter_tsv_pairs, cfg.path, cfg.encoding))]


def load_pairs(cfg: TranslationDataConfig, seed: int) -> PairCorpus:
    carved, sources = pair_files(cfg)
    files = {k: list(rows()) for k, rows in sources}
    if carved:
        files = _carve(files["train"], cfg.val_fraction, cfg.test_fraction, seed)
    if cfg.limit_train is not None:
        files["train"] = files["train"][: cfg.limit_train]

    def split(name: str) -> PairSplit | None:
        rows = files.get(name)
        if not rows:
            return None
        if cfg.reverse:
            rows = [(t, s) for s, t in rows]
        return PairSplit([s for s, _ in rows], [t for _, t in rows])

    train = split("train")
    if train is None:
        raise UserError("the training split holds no sentence pairs")
    from bigmodel.privacy.pii import mask_splits

    return mask_splits(cfg, PairCorpus(train, split("val"), split("test")), ("source", "target"))


# ------------------------------------------------------------------------------------------------ tokenization
class _Both:
    """The sources, then the targets; iterable as often as a tokenizer trainer needs."""

    def __init__(self, source: Iterable[str], target: Iterable[str]) -> None:
        self.source, self.target = source, target

    def __iter__(self) -> Iterator[str]:
        return itertools.chain(self.source, self.target)


def train_pair_tokenizers(
    cfg: TranslationDataConfig, source: Iterable[str], target: Iterable[str]
) -> tuple[Any, Any | None]:
    """One tokenizer for both sides (`data.shared_vocab`), or (source, target) tokenizers; trained on the training
    split's sources and targets (lists, or iterables that can be read more than once)."""
    from bigmodel.data.corpus import plain
    from bigmodel.data.text import train_tokenizer

    tcfg = cfg.tokenizer.model_copy(update={"add_cls": False})
    if cfg.shared_vocab:
        both = source + target if isinstance(source, list) and isinstance(target, list) else _Both(source, target)
        return plain(train_tokenizer(tcfg, both)), None
    return plain(train_tokenizer(tcfg, source)), plain(train_tokenizer(tcfg, target))


@dataclass
class TokenPairs:
    """Source ids (N, S) padded with 0 and their lengths; targets [BOS] ... [EOS] (N, T) padded with 0, lengths;
    the raw target sentences (the references of BLEU) and the raw sources."""

    src: torch.Tensor
    src_lengths: torch.Tensor
    tgt: torch.Tensor
    tgt_lengths: torch.Tensor
    references: list[str]
    sources: list[str]

    def __len__(self) -> int:
        return int(self.src.shape[0])


@dataclass
class TokenPairDataset(Splits):
    train: TokenPairs
    val: TokenPairs | None
    test: TokenPairs | None
    labels: list[str]
    dropped: int  # training pairs over the length limit


def _pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max((len(r) for r in rows), default=1)
    out = torch.zeros((len(rows), max(T, 1)), dtype=torch.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
    return out, torch.tensor([len(r) for r in rows], dtype=torch.int64)


def encode_sources(tok: Any, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source ids ending in [EOS], truncated to `max_length`, padded."""
    rows = [(e.ids[: max_length - 1] or [1]) + [EOS_ID] for e in tok.encode_batch(texts, add_special_tokens=False)]
    return _pad(rows)


def tokenize_pairs(data: PairCorpus, src_tok: Any, tgt_tok: Any, max_length: int) -> TokenPairDataset:
    dropped = 0

    def enc(split: PairSplit | None, filter_long: bool) -> TokenPairs | None:
        nonlocal dropped
        if split is None:
            return None
        s_ids = [e.ids for e in src_tok.encode_batch(split.source, add_special_tokens=False)]
        t_ids = [e.ids for e in tgt_tok.encode_batch(split.target, add_special_tokens=False)]
        keep = list(range(len(s_ids)))
        if filter_long:
            keep = [i for i in keep if len(s_ids[i]) + 1 <= max_length and len(t_ids[i]) + 2 <= max_length]
            dropped += len(s_ids) - len(keep)
            if not keep:
                raise UserError(
                    f"every training pair is longer than data.tokenizer.max_length {max_length} tokens; raise it"
                )
        src, src_len = _pad([(s_ids[i][: max_length - 1] or [1]) + [EOS_ID] for i in keep])
        tgt, tgt_len = _pad([[BOS_ID] + t_ids[i][: max_length - 2] + [EOS_ID] for i in keep])
        return TokenPairs(src, src_len, tgt, tgt_len, [split.target[i] for i in keep], [split.source[i] for i in keep])

    train = enc(data.train, True)
    assert train is not None
    return TokenPairDataset(train, enc(data.val, False), enc(data.test, False), [], dropped)


# ---------------------------------------------------------------------------------------------------- batches
class PairLoader:
    """Batches ((src, src_lengths, tgt_in), tgt_out): tgt_in = [BOS] y..., tgt_out = y... [EOS] with padding -100.
    Training batches are drawn from length buckets (pairs of similar length together, less padding), in an order
    seeded by (seed, epoch); `epoch(e, start=k)` resumes exactly."""

    def __init__(
        self,
        pairs: TokenPairs,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.p = pairs
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.device = device
        self.plan = SamplingPlan(
            "length_buckets" if shuffle else "sequential",
            num_examples=len(pairs),
            batch_size=batch_size,
            seed=seed,
            drop_last=drop_last,
            lengths=pairs.tgt_lengths + pairs.src_lengths,
            rank=rank,
            world_size=world_size,
        )

    def __len__(self) -> int:
        return len(self.plan)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Any, torch.Tensor]]:
        for idx in self.plan.batches(epoch)[start:]:
            if isinstance(idx, slice):
                idx = torch.arange(len(self.p))[idx]
            S = int(self.p.src_lengths[idx].max())
            T = int(self.p.tgt_lengths[idx].max())
            src = self.p.src[idx][:, :S]  # rows first: ids on disk (`DiskRows`) are read by row
            tgt = self.p.tgt[idx][:, :T]
            tgt_in = tgt[:, :-1]
            tgt_out = tgt[:, 1:].clone()
            tgt_out[tgt_out == 0] = -100
            dev = self.device
            yield (src.to(dev), self.p.src_lengths[idx].to(dev), tgt_in.to(dev)), tgt_out.to(dev)
