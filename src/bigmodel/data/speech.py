"""Speech with transcripts, for `task: speech_recognition` (CTC over characters):
- `spoken_sentences`: English lines of Fish Fillets NG's dialogues (Debian `fillets-ng-data`) read by synthetic
  espeak-ng voices, generated on first use and cached. Voices are split into train / val / test, and so are the
  sentences: a test clip is an unheard voice reading an unseen sentence;
- `fillets_transcripts`: the game's real Czech voice clips (`fillets-ng-data-cs`) with their Czech text
  (`script/<level>/dialogs_cs.lua`), split by level;
- `audio_csv`: a CSV of audio paths and transcripts (and optionally splits).

Transcripts are normalised (NFKC, lower case, punctuation dropped, spaces collapsed); the alphabet is the training
split's characters, with index 0 the CTC blank. Clips keep their whole length (a batch is padded to its longest,
with lengths); training clips longer than `max_seconds` are left out.
"""

from __future__ import annotations

import csv
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar

import numpy as np
import torch
from pydantic import Field, model_validator

from bigmodel.config import _Split
from bigmodel.data.audio import (
    FILLETS_SOUND,
    GROUP_SHUFFLE_SEED,
    FeaturesConfig,
    NoiseConfig,
    SpecAugmentConfig,
    _espeak,
    clip_power,
    espeak_cache,
    espeak_voices,
    group_splits,
    noise_batch,
    read_many,
    spec_augment_masks,
    voice_name,
)
from bigmodel.data.sampling import SamplingPlan
from bigmodel.data.sources import Splits
from bigmodel.data.split import mix_seed
from bigmodel.errors import UserError

SPEECH_SOURCES = ("spoken_sentences", "fillets_transcripts", "audio_csv")
FILLETS_SCRIPT = Path("/usr/share/games/fillets-ng/script")
BLANK = "<blank>"
_LUA_STRING = r'"((?:[^"\\]|\\.)*)"'
_DIALOG_ID = re.compile(r"dialogId\(\s*" + _LUA_STRING + r"\s*,\s*" + _LUA_STRING + r"\s*,\s*" + _LUA_STRING + r"\s*\)")
_DIALOG_STR = re.compile(r"dialogStr\(\s*" + _LUA_STRING + r"\s*\)")


class SpeechDataConfig(_Split):
    """`data` of `task: speech_recognition`."""

    TASK: ClassVar[str] = "speech_recognition"
    SOURCES: ClassVar[tuple[str, ...]] = (*SPEECH_SOURCES, "shards")

    source: str
    """`spoken_sentences` (espeak-ng reading English lines; generated and cached), `fillets_transcripts` (real Czech
    speech with its text), `audio_csv` (paths and transcripts) or `shards` (clips and transcripts written by
    `bigmodel data prepare`)."""
    path: Path | None = None
    """`audio_csv`: the CSV; `fillets_transcripts`: the game's folder holding `sound/` and `script/` (default:
    Debian's `/usr/share/games/fillets-ng`); `shards`: the prepared folder."""
    in_memory_limit_mb: Annotated[float, Field(gt=0)] = 2048
    """`shards`: read the prepared clips into memory when together (float32) they are at most this many MiB; larger
    ones stay on disk and each batch's clips are read when needed."""
    path_column: str = "path"
    text_column: str = "text"
    split_column: str = "split"
    sample_rate: Annotated[int, Field(ge=4000, le=96_000)] = 16_000
    max_seconds: Annotated[float, Field(gt=0.0, le=120.0)] = 12.0
    """Training clips longer than this are left out (memory); evaluation and `predict` take any length."""
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    spec_augment: SpecAugmentConfig = Field(default_factory=SpecAugmentConfig)
    noise: NoiseConfig = Field(default_factory=NoiseConfig)
    voices: Annotated[int, Field(ge=3, le=600)] = 60
    """`spoken_sentences`: how many synthetic voices (split like the sentences)."""
    sentences_per_voice: Annotated[int, Field(ge=1, le=1000)] = 30
    cache_dir: Path | None = None

    @model_validator(mode="after")
    def _cross(self) -> SpeechDataConfig:
        if self.source in ("audio_csv", "shards") and self.path is None:
            raise ValueError(f"data.path is required when data.source is {self.source!r}")
        if self.source == "spoken_sentences" and self.path is not None:
            raise ValueError("data.source 'spoken_sentences' is generated; data.path does not apply")
        self.features.check_band(self.sample_rate)
        return self


# --------------------------------------------------------------------------------------------------------- text
def normalize_text(text: str) -> str:
    """NFKC, lower case, letters / digits / apostrophes kept, everything else a space, spaces collapsed."""
    text = unicodedata.normalize("NFKC", text).lower().replace("’", "'")
    kept = "".join(c if (c.isalnum() or c == "'") else " " for c in text)
    return " ".join(kept.split())


def encode_text(text: str, alphabet: list[str]) -> list[int]:
    index = {c: i for i, c in enumerate(alphabet)}
    return [index[c] for c in text if c in index]  # characters unseen in training are dropped


def decode_ids(ids: list[int], alphabet: list[str]) -> str:
    """Character ids → text, blanks dropped and spaces collapsed (as the transcripts were normalised)."""
    return " ".join("".join(alphabet[i] for i in ids if 0 < i < len(alphabet)).split())


def _unescape(s: str) -> str:
    return re.sub(r"\\(.)", r"\1", s)


def fillets_dialogs(script: Path, language: str) -> dict[str, str]:
    """Dialog id → text of every level's `dialogs_<language>.lua` (`en`: dialogId's own English text; others: the
    `dialogStr` after each `dialogId`)."""
    out: dict[str, str] = {}
    for f in sorted(script.glob(f"*/dialogs_{language}.lua")):
        src = f.read_text(encoding="utf-8", errors="replace")
        if language == "en":
            for m in _DIALOG_ID.finditer(src):
                out[m.group(1)] = _unescape(m.group(3))
            continue
        ids = list(_DIALOG_ID.finditer(src))
        if not ids:
            continue
        for m, nxt in zip(ids, [*ids[1:], None], strict=True):
            s = _DIALOG_STR.search(src, m.end(), nxt.start() if nxt else len(src))
            if s:
                out[m.group(1)] = _unescape(s.group(1))
    return out


# ------------------------------------------------------------------------------------------------------- splits
@dataclass
class SpeechSplit:
    """Whole clips in one flat buffer (as `AudioSplit`) with their transcripts."""

    samples: torch.Tensor  # (total,) float32
    offsets: torch.Tensor  # (N,) int64
    lengths: torch.Tensor  # (N,) int64 samples
    texts: list[str]
    names: list[str] = field(default_factory=list)
    power: torch.Tensor | None = None  # (N,) each clip's mean power, when known (prepared folders store it)

    def __len__(self) -> int:
        return len(self.texts)

    def clip(self, i: int) -> np.ndarray:
        o, n = int(self.offsets[i]), int(self.lengths[i])
        return self.samples[o : o + n].numpy()

    def subset(self, idx: list[int]) -> SpeechSplit:
        t = torch.tensor(idx, dtype=torch.int64)
        return SpeechSplit(
            self.samples,
            self.offsets[t],
            self.lengths[t],
            [self.texts[i] for i in idx],
            [self.names[i] for i in idx],
            None if self.power is None else self.power[t],
        )

    @classmethod
    def from_clips(cls, clips: list[np.ndarray], texts: list[str], names: list[str]) -> SpeechSplit:
        lengths = torch.tensor([len(c) for c in clips], dtype=torch.int64)
        offsets = torch.cumsum(lengths, 0) - lengths
        flat = torch.from_numpy(np.concatenate(clips)) if clips else torch.zeros(0)
        return cls(flat, offsets, lengths, list(texts), list(names))


@dataclass
class SpeechDataset(Splits):
    train: SpeechSplit
    val: SpeechSplit | None
    test: SpeechSplit | None
    labels: list[str]  # the alphabet: BLANK, then the training transcripts' characters
    sample_rate: int


# ------------------------------------------------------------------------------------------------------ sources
def spoken_sentences(cfg: SpeechDataConfig) -> dict[str, list[tuple[Path, str, str]]]:
    """{split: [(wav, text, voice)]}: espeak-ng voices reading English dialogue lines, voices and sentences split
    alike (generated into the cache on first use; written to a temporary folder, then renamed into place)."""
    _espeak()  # a clear error first when espeak-ng is missing
    if not FILLETS_SCRIPT.is_dir():
        raise UserError(
            f"{FILLETS_SCRIPT}: the English sentences come from Fish Fillets NG's dialogues "
            "(Debian/Ubuntu: apt-get install fillets-ng-data)"
        )
    english = map(normalize_text, fillets_dialogs(FILLETS_SCRIPT, "en").values())
    lines = sorted({t for t in english if re.fullmatch(r"[a-z' ]{12,70}", t)})  # no digits: espeak reads them out
    voices = espeak_voices(cfg.voices)
    where = group_splits([voice_name(v) for v in voices], ["x"] * len(voices), cfg.val_fraction, cfg.test_fraction)
    rng = np.random.default_rng(GROUP_SHUFFLE_SEED)
    order = [lines[i] for i in rng.permutation(len(lines)).tolist()]
    n_test, n_val = round(cfg.test_fraction * len(order)), round(cfg.val_fraction * len(order))
    pools = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    jobs: list[tuple[dict[str, Any], str, str]] = []  # (voice, sentence, split)
    for v in voices:
        split = where[voice_name(v)]
        pool = pools[split]
        if not pool:
            continue
        pick = rng.choice(len(pool), size=min(cfg.sentences_per_voice, len(pool)), replace=False)
        jobs += [(v, pool[i], split) for i in sorted(pick.tolist())]
    rows = [[f"{k:05d}.wav", text, voice_name(v), split] for k, (v, text, split) in enumerate(jobs)]
    root = espeak_cache(
        "spoken_sentences",
        cfg.cache_dir,
        ([(voice_name(v), t) for v, t, _ in jobs],),
        [(v, text, f"{k:05d}.wav") for k, (v, text, _) in enumerate(jobs)],
        ["path", "text", "voice", "split"],
        rows,
    )
    out: dict[str, list[tuple[Path, str, str]]] = {"train": [], "val": [], "test": []}
    with (root / "clips.csv").open(newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            out[r["split"]].append((root / r["path"], r["text"], r["voice"]))
    return out


def fillets_transcripts(cfg: SpeechDataConfig) -> dict[str, list[tuple[Path, str, str]]]:
    """{split: [(ogg, Czech text, level)]}: every level clip whose dialog id has Czech text, split by level."""
    root = cfg.path or FILLETS_SOUND.parent
    sound, script = root / "sound", root / "script"
    if not sound.is_dir() or not script.is_dir():
        raise UserError(
            f"{root}: Fish Fillets NG's sound/ and script/ not found (Debian/Ubuntu: apt-get install "
            "fillets-ng-data fillets-ng-data-cs; or set data.path to the game's folder)"
        )
    texts = fillets_dialogs(script, "cs")
    clips = [
        (f, normalize_text(texts[f.stem]), f.parent.parent.name)
        for f in sorted(sound.glob("*/cs/*.ogg"))
        if f.stem in texts and normalize_text(texts[f.stem])
    ]
    if not clips:
        raise UserError(f"{root}: no Czech clips with a transcript")
    where = group_splits([g for _, _, g in clips], ["x"] * len(clips), cfg.val_fraction, cfg.test_fraction)
    out: dict[str, list[tuple[Path, str, str]]] = {"train": [], "val": [], "test": []}
    for c in clips:
        out[where[c[2]]].append(c)
    return out


def speech_csv(cfg: SpeechDataConfig, seed: int) -> dict[str, list[tuple[Path, str, str]]]:
    path = cfg.path
    assert path is not None
    if not path.is_file():
        raise UserError(f"data.path {path}: CSV file not found")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: not a readable CSV file ({e})") from None
    header = list(rows[0]) if rows else []
    for col in (cfg.path_column, cfg.text_column):
        if col not in header:
            raise UserError(
                f"{path}: no column {col!r} (columns: {', '.join(header) or 'none'}); "
                "set data.path_column / data.text_column"
            )
    has_split = cfg.split_column in header
    out: dict[str, list[tuple[Path, str, str]]] = {"train": [], "val": [], "test": []}
    for i, r in enumerate(rows, start=2):
        split = r[cfg.split_column].strip() if has_split else "train"
        if split not in out:
            raise UserError(f"{path}: line {i}: split {split!r}, expected train, val or test")
        p = Path(r[cfg.path_column])
        out[split].append((p if p.is_absolute() else path.parent / p, normalize_text(r[cfg.text_column]), ""))
    if not out["train"]:
        raise UserError(f"{path}: no training rows")
    # Splits the CSV does not name are carved from train at random (seeded).
    g = np.random.default_rng(mix_seed(seed, 1))
    train = [out["train"][i] for i in g.permutation(len(out["train"])).tolist()]
    for split, fraction in (("test", cfg.test_fraction), ("val", cfg.val_fraction)):
        if not out[split] and fraction > 0 and not (has_split and split == "test" and out["test"]):
            n = max(1, round(fraction * len(out["train"])))
            out[split], train = train[:n], train[n:]
    out["train"] = train
    return out


def speech_items(cfg: SpeechDataConfig, seed: int) -> dict[str, list[tuple[Path, str, str]]]:
    """The recipe's (file, normalised transcript, group) rows per split, before decoding."""
    if cfg.source == "spoken_sentences":
        return spoken_sentences(cfg)
    if cfg.source == "fillets_transcripts":
        return fillets_transcripts(cfg)
    return speech_csv(cfg, seed)


def limit_train_rows(cfg: SpeechDataConfig, seed: int, n: int) -> list[int]:
    """Which of the `n` training clips `data.limit_train` keeps (seeded, in their order)."""
    if cfg.limit_train is None or cfg.limit_train >= n:
        return list(range(n))
    g = np.random.default_rng(mix_seed(seed, 3))
    return sorted(g.permutation(n)[: cfg.limit_train].tolist())


def fit_alphabet(texts: list[str]) -> list[str]:
    """The CTC blank, then every character of the training transcripts, sorted."""
    return [BLANK, *sorted({c for t in texts for c in t})]


def load_speech(cfg: SpeechDataConfig, seed: int, alphabet: list[str] | None = None) -> SpeechDataset:
    """The recipe's clips at `cfg.sample_rate` with normalised transcripts; the alphabet fitted on train (or given)."""
    items = speech_items(cfg, seed)
    parts: dict[str, SpeechSplit | None] = {}
    for name in ("train", "val", "test"):
        rows = items.get(name) or []
        if not rows:
            parts[name] = None
            continue
        clips = read_many([p for p, _, _ in rows], cfg.sample_rate)
        keep = [i for i, c in enumerate(clips) if name != "train" or len(c) <= cfg.max_seconds * cfg.sample_rate]
        parts[name] = SpeechSplit.from_clips(
            [clips[i] for i in keep], [rows[i][1] for i in keep], [str(rows[i][0]) for i in keep]
        )
    train = parts["train"]
    if train is None or len(train) == 0:
        raise UserError(f"data.max_seconds {cfg.max_seconds:g}: no training clip is that short")
    keep = limit_train_rows(cfg, seed, len(train))
    if len(keep) < len(train):
        train = train.subset(keep)
    if alphabet is None:
        alphabet = fit_alphabet(train.texts)
    return SpeechDataset(train, parts["val"], parts["test"], alphabet, cfg.sample_rate)


# ------------------------------------------------------------------------------------------------------- loader
class SpeechLoader:
    """Batches of padded waveforms with lengths, and CTC targets: x = (waveform (B, S), lengths (B,)[, masks]),
    y = character ids (B, L) padded with 0 (the blank: no transcript holds it, so lengths are the non-zero counts).
    Training batches group clips of similar length (shuffled batches,
    seeded per epoch) and carry SpecAugment's masks."""

    def __init__(
        self,
        split: SpeechSplit,
        alphabet: list[str],
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        hop_length: int = 160,
        mel_channels: int = 0,
        spec_augment: SpecAugmentConfig | None = None,
        noise: NoiseConfig | None = None,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.split = split
        self.targets = [torch.tensor(encode_text(t, alphabet), dtype=torch.int64) for t in split.texts]
        self.seed, self.hop, self.mel_channels = seed, hop_length, mel_channels
        self.spec_augment = spec_augment if train and spec_augment is not None and spec_augment.on else None
        self.noise = noise if train and noise is not None and noise.prob > 0 else None
        self.power = None
        if self.noise is not None:  # what SNRs are measured against: stored in a prepared folder, else computed
            stored = split.power
            self.power = stored if stored is not None else clip_power(split.samples, split.offsets, split.lengths)
        self.device = torch.device(device)
        self.plan = SamplingPlan(
            "length_buckets" if train else "sequential",
            num_examples=len(split),
            batch_size=batch_size,
            seed=seed,
            drop_last=False,
            lengths=split.lengths,
            rank=rank,
            world_size=world_size,
        )

    def __len__(self) -> int:
        return len(self.plan)

    @property
    def num_examples(self) -> int:
        return len(self.split)

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[Any, Any]]:
        for i, idx in enumerate(self.plan.batches(epoch)[start:], start):
            yield self._batch(idx, epoch, i)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return self.epoch(0)

    def _batch(self, idx: slice | torch.Tensor, epoch: int, i: int) -> tuple[Any, Any]:
        ids = torch.arange(len(self.split))[idx] if isinstance(idx, slice) else torch.as_tensor(idx)
        lengths = self.split.lengths[ids]
        S = int(lengths.max()) if len(ids) else 1
        pos = torch.arange(S).unsqueeze(0)
        if isinstance(self.split.samples, torch.Tensor):
            flat = (self.split.offsets[ids].unsqueeze(1) + pos).clamp(max=max(len(self.split.samples) - 1, 0))
            wave = torch.where(pos < lengths.unsqueeze(1), self.split.samples[flat], torch.zeros(()))
        else:  # on disk (`data/speechshards.py`): each clip read into its zero-padded row
            starts = self.split.offsets[ids].numpy()
            wave = self.split.samples.spans(starts, lengths.numpy(), np.zeros(len(ids), dtype=np.int64), S)
        tg = [self.targets[j] for j in ids.tolist()]
        targets = torch.zeros((len(tg), max((len(t) for t in tg), default=0)), dtype=torch.int64)
        for k, t in enumerate(tg):  # padded with 0, the blank, which no transcript holds
            targets[k, : len(t)] = t
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, i))
        if self.noise is not None:
            assert self.power is not None
            wave = noise_batch(wave, self.power[ids], self.noise, g, valid=pos < lengths.unsqueeze(1))
        x: tuple[Any, ...] = (wave.to(self.device), lengths.to(self.device))
        if self.spec_augment is not None:
            frames = S // self.hop + 1
            x = (*x, spec_augment_masks(len(ids), self.spec_augment, self.mel_channels, frames, g).to(self.device))
        return x, targets.to(self.device)
