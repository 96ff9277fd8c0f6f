"""Audio: decoding with libsndfile (the `soundfile` wheel bundles it: WAV, FLAC, Ogg/Vorbis, MP3), mono mixing,
resampling to the model's rate (scipy's polyphase filter), and the sources of `task: audio_classification`:
- `audio_folder`: `ROOT/<split>/<class>/*.wav|flac|ogg|mp3` (train required; val / test optional);
- `audio_csv`: a CSV of paths (relative to the CSV's folder, or absolute), labels and optionally splits;
- `spoken_digits`: "zero" ... "nine" spoken by synthetic voices that Debian's `espeak-ng` generates on first use
  (cached), split by voice, so no test voice is heard in training;
- `fillets_speakers`: speaker identification on the Czech voice clips of Debian's `fillets-ng-data-cs`, every
  speaker with at least `min_clips` clips a class, split by game level.

The sets that come in groups (voices, levels) are split by group with a fixed shuffle (the recipe's seed does not
move them), so runs with different seeds are measured on the same test clips. Other sources carve missing splits
seeded and stratified, as every other task does.

Clips are kept whole, decoded once at the data's sample rate, in one flat float32 buffer; the loader cuts each batch
to `clip_seconds` (a random window in training, the centre at evaluation; shorter clips are zero-padded, placed at
random in training and centred at evaluation) and draws SpecAugment's masks, all seeded by (seed, epoch, batch).
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from bigmodel.config import Strict, _Labels, _Split
from bigmodel.data.sampling import SamplingPlan
from bigmodel.data.sources import Splits, finish_splits
from bigmodel.data.split import mix_seed
from bigmodel.errors import UserError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif")
AUDIO_SOURCES = ("audio_folder", "audio_csv", "spoken_digits", "fillets_speakers")
FILLETS_SOUND = Path("/usr/share/games/fillets-ng/sound")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# espeak-ng's English voices that need no MBROLA data; every voice variant (`espeak-ng --voices=variant`) is applied
# to them but the two whispers (no voicing at all).
ESPEAK_LANGS = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029")
GROUP_SHUFFLE_SEED = 20261202  # the fixed shuffle of voices / levels into splits


# ----------------------------------------------------------------------------------------------------- config
class FeaturesConfig(Strict):
    """The log-mel front-end inside the model (its settings are saved with the model)."""

    n_mels: Annotated[int, Field(ge=4, le=256)] = 40
    n_fft: Annotated[int, Field(ge=16, le=8192)] = 512
    """FFT size in samples (512 at 16 kHz = 32 ms)."""
    win_length: Annotated[int, Field(ge=16, le=8192)] | None = 400
    """Hann window length in samples (default: n_fft); 400 at 16 kHz = 25 ms."""
    hop_length: Annotated[int, Field(ge=1, le=8192)] = 160
    """Samples between frames (160 at 16 kHz = 10 ms)."""
    f_min: Annotated[float, Field(ge=0.0)] = 20.0
    f_max: Annotated[float, Field(gt=0.0)] | None = None
    """Highest filter edge in Hz (default: half the sample rate)."""
    mel_scale: Literal["slaney", "htk"] = "slaney"
    norm: Literal["slaney", "none"] = "slaney"
    """Slaney's area normalisation of each filter (librosa's default), or none."""
    normalize: bool = True
    """Standardise each mel channel with the training split's mean and std (saved with the model)."""

    def check_band(self, sample_rate: int) -> None:
        """The filterbank's band must fit below the Nyquist frequency of the data's sample rate."""
        f_max = self.f_max or sample_rate / 2
        if f_max > sample_rate / 2 or self.f_min >= f_max:
            raise ValueError(
                f"data.features: f_min {self.f_min:g} and f_max {f_max:g} Hz must satisfy "
                f"f_min < f_max <= sample_rate / 2 = {sample_rate / 2:g}"
            )

    def spec(self) -> dict[str, Any]:
        """The front-end's settings as the model's `input_shape["features"]` holds them (statistics added later)."""
        return {
            "n_fft": self.n_fft,
            "win_length": self.win_length or self.n_fft,
            "hop_length": self.hop_length,
            "n_mels": self.n_mels,
            "f_min": self.f_min,
            "f_max": self.f_max,
            "mel_scale": self.mel_scale,
            "norm": None if self.norm == "none" else self.norm,
        }

    @model_validator(mode="after")
    def _cross(self) -> FeaturesConfig:
        if self.win_length is not None and self.win_length > self.n_fft:
            raise ValueError(f"data.features.win_length {self.win_length} is longer than data.features.n_fft")
        return self


class SpecAugmentConfig(Strict):
    """SpecAugment on the training batches: mask random bands of mel channels and runs of frames (to the training
    mean), seeded by (seed, epoch, batch); evaluation sees no masks."""

    freq_masks: Annotated[int, Field(ge=0, le=8)] = 0
    freq_width: Annotated[int, Field(ge=1, le=128)] = 8
    """Each band's width is drawn from 0 .. freq_width mel channels."""
    time_masks: Annotated[int, Field(ge=0, le=16)] = 0
    time_width: Annotated[int, Field(ge=1, le=1000)] = 10
    """Each run's length is drawn from 0 .. time_width frames."""

    @property
    def on(self) -> bool:
        return self.freq_masks + self.time_masks > 0


class NoiseConfig(Strict):
    """White Gaussian noise added to training clips (robustness to noisy recordings), seeded by (seed, epoch,
    batch); evaluation sees the clips as they are."""

    prob: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    """The chance that a training clip gets noise."""
    snr_db: tuple[float, float] = (5.0, 30.0)
    """Signal-to-noise ratio in dB (against the clip's mean power), drawn uniformly from this range."""

    @model_validator(mode="after")
    def _range(self) -> NoiseConfig:
        if self.snr_db[0] > self.snr_db[1]:
            raise ValueError(f"data.noise.snr_db {list(self.snr_db)}: expected [low, high] with low <= high")
        return self


def clip_power(samples: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean power of each clip of a flat buffer: a float64 sum over the clip alone, so the value does not depend on
    where the clip lies in the buffer (a folder prepared a chunk of clips at a time stores what a run on the source
    computes)."""
    out = torch.empty(len(offsets), dtype=torch.float64)
    for i, (o, n) in enumerate(zip(offsets.tolist(), lengths.tolist(), strict=True)):
        out[i] = samples[o : o + n].double().square().sum() / max(n, 1)
    return out.to(torch.float32)


def noise_batch(
    wave: torch.Tensor, power: torch.Tensor, cfg: NoiseConfig, g: torch.Generator, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """`wave` (B, S) with white noise at a random SNR (against `power`, each clip's mean power) on a random share
    `cfg.prob` of the clips (only where `valid`, when given: a padded batch's real samples)."""
    B, S = wave.shape
    hit = torch.rand(B, generator=g) < cfg.prob
    lo, hi = cfg.snr_db
    snr = lo + (hi - lo) * torch.rand(B, generator=g)
    std = torch.sqrt(power / torch.pow(10.0, snr / 10)) * hit
    noise = torch.randn(B, S, generator=g) * std.unsqueeze(1)
    if valid is not None:
        noise = noise * valid
    return wave + noise.to(wave.device)


class AudioDataConfig(_Split, _Labels):
    """`data` of `task: audio_classification`."""

    TASK: ClassVar[str] = "audio_classification"
    SOURCES: ClassVar[tuple[str, ...]] = (*AUDIO_SOURCES, "shards")

    source: str
    """`audio_folder`, `audio_csv`, `spoken_digits` (espeak-ng, generated and cached on first use),
    `fillets_speakers` (Debian `fillets-ng-data-cs`), or `shards` (clips decoded by `bigmodel data prepare`)."""
    in_memory_limit_mb: Annotated[float, Field(gt=0)] = 2048
    """`shards`: read the prepared clips into memory when together (float32) they are at most this many MiB; larger
    ones stay on disk and each batch's windows are read when needed."""
    path: Path | None = None
    """`audio_folder`: ROOT of `ROOT/<split>/<class>/*.wav`; `audio_csv`: the CSV; `fillets_speakers`: the game's
    `sound/` folder (default: Debian's)."""
    path_column: str = "path"
    """`audio_csv`: the column of audio paths."""
    split_column: str = "split"
    """`audio_csv`: the column naming each row's split (train / val / test), used when present."""
    sample_rate: Annotated[int, Field(ge=4000, le=96_000)] = 16_000
    """Every clip is resampled to this rate (the model's; `predict` and `serve` resample to it too)."""
    clip_seconds: Annotated[float, Field(gt=0.0, le=60.0)] = 1.0
    """The model's input length: longer clips are cut (random window in training, centre otherwise), shorter ones
    zero-padded."""
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    spec_augment: SpecAugmentConfig = Field(default_factory=SpecAugmentConfig)
    noise: NoiseConfig = Field(default_factory=NoiseConfig)
    voices: Annotated[int, Field(ge=3, le=600)] = 80
    """`spoken_digits`: how many synthetic voices speak the ten digits (each voice is an espeak-ng English accent,
    a voice variant, a speed and a pitch)."""
    min_clips: Annotated[int, Field(ge=1)] = 30
    """`fillets_speakers`: speakers with at least this many clips are the classes."""
    cache_dir: Path | None = None
    """`spoken_digits`: where the generated clips are kept (default: `$BIGMODEL_HOME/cache`)."""

    @model_validator(mode="after")
    def _cross(self) -> AudioDataConfig:
        if self.source in ("audio_folder", "audio_csv", "shards") and self.path is None:
            raise ValueError(f"data.path is required when data.source is {self.source!r}")
        if self.source == "spoken_digits" and self.path is not None:
            raise ValueError("data.source 'spoken_digits' is generated; data.path does not apply")
        self.features.check_band(self.sample_rate)
        if self.samples < self.features.n_fft // 2 + 1:
            raise ValueError(f"data.clip_seconds {self.clip_seconds:g} is shorter than one FFT window")
        return self

    @property
    def samples(self) -> int:
        return round(self.clip_seconds * self.sample_rate)


# ---------------------------------------------------------------------------------------------------- decoding
def need(module: str) -> Any:
    """Import an audio extra's module, or a one-line error saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"audio needs the {module} package: pip install 'bigmodel[audio]'") from None


def _decode(source: Any, name: str) -> tuple[np.ndarray, int]:
    """Decode with libsndfile; a file shorter than its header says (a cut-off download) is an error, not a clip."""
    import re

    sf = need("soundfile")

    try:
        with sf.SoundFile(source) as f:
            declared, rate = f.frames, int(f.samplerate)
            data = f.read(dtype="float32", always_2d=True)
            info = f.extra_info
    except Exception as e:  # libsndfile's errors (LibsndfileError, RuntimeError, TypeError for garbage)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{name}: not a readable audio file ({msg})") from None
    # WAV / AIFF: libsndfile shrinks `frames` to the bytes present and notes "data : N (should be M)".
    short = re.search(r"^\s*(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", info, re.MULTILINE)
    if data.shape[0] < declared or (short and int(short.group(2)) < int(short.group(1))):
        raise UserError(f"{name}: truncated audio file (fewer samples than its header declares)")
    if data.shape[0] == 0:
        raise UserError(f"{name}: the audio file holds no samples")
    if not np.isfinite(data).all():
        raise UserError(f"{name}: the audio file holds non-finite samples")
    return data.mean(axis=1, dtype=np.float32), rate


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Polyphase resampling (scipy `resample_poly`, Kaiser-windowed FIR) from `rate` to `target` Hz."""
    if rate == target:
        return x.astype(np.float32, copy=False)
    from scipy.signal import resample_poly

    g = math.gcd(rate, target)
    return resample_poly(x, target // g, rate // g).astype(np.float32)


def read_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """An audio file (WAV, FLAC, Ogg/Vorbis, MP3; any channel count and rate) → mono float32 at `sample_rate`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: audio file not found")
    x, rate = _decode(str(path), str(path))
    return resample(x, rate, sample_rate)


def decode_audio(data: bytes, sample_rate: int, name: str) -> np.ndarray:
    """Encoded audio bytes (an upload) → mono float32 at `sample_rate`."""
    x, rate = _decode(io.BytesIO(data), name)
    return resample(x, rate, sample_rate)


def read_many(paths: list[Path], sample_rate: int) -> list[np.ndarray]:
    """Decode files in parallel threads (libsndfile and scipy release the GIL)."""
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda p: read_audio(p, sample_rate), paths))


def fit_length(x: np.ndarray, samples: int) -> np.ndarray:
    """The centre `samples` of a clip, zero-padded on both sides when shorter (what evaluation and predict see)."""
    out = np.zeros(samples, dtype=np.float32)
    n = len(x)
    if n >= samples:
        s = (n - samples) // 2
        out[:] = x[s : s + samples]
    else:
        p = (samples - n) // 2
        out[p : p + n] = x
    return out


# ------------------------------------------------------------------------------------------------------- splits
@dataclass
class AudioSplit:
    """Whole clips in one flat buffer: clip i is `samples[offsets[i] : offsets[i] + lengths[i]]`."""

    samples: torch.Tensor  # (total,) float32
    offsets: torch.Tensor  # (N,) int64
    lengths: torch.Tensor  # (N,) int64
    y: torch.Tensor  # (N,) int64
    names: list[str] = field(default_factory=list)  # where each clip came from (file path or id)
    power: torch.Tensor | None = None  # (N,) each clip's mean power, when known (prepared folders store it)

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: torch.Tensor) -> AudioSplit:
        names = [self.names[i] for i in idx.tolist()] if self.names else []
        power = self.power[idx] if self.power is not None else None
        return AudioSplit(self.samples, self.offsets[idx], self.lengths[idx], self.y[idx], names, power)

    def clip(self, i: int) -> np.ndarray:
        o, n = int(self.offsets[i]), int(self.lengths[i])
        return self.samples[o : o + n].numpy()

    def windows(self, samples: int, idx: torch.Tensor | slice | None = None) -> torch.Tensor:
        """The evaluation view (B, samples): each clip's centre, zero-padded."""
        idx = torch.arange(len(self)) if idx is None else idx
        return cut(self, idx, samples, None)

    @classmethod
    def from_clips(cls, clips: list[np.ndarray], y: list[int], names: list[str]) -> AudioSplit:
        lengths = torch.tensor([len(c) for c in clips], dtype=torch.int64)
        offsets = torch.cumsum(lengths, 0) - lengths
        flat = torch.from_numpy(np.concatenate(clips)) if clips else torch.zeros(0)
        return cls(flat, offsets, lengths, torch.tensor(y, dtype=torch.int64), list(names))


@dataclass
class FileSplit:
    """A split's audio files and labels before decoding: what `finish_splits` carves (it needs `.y` and `.subset`),
    so only the clips a run keeps are decoded, and `bigmodel data prepare` decodes them a chunk at a time."""

    paths: list[Path]
    y: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx: torch.Tensor) -> FileSplit:
        return FileSplit([self.paths[i] for i in idx.tolist()], self.y[idx])

    def decode(self, sample_rate: int, start: int = 0, stop: int | None = None) -> AudioSplit:
        """Files [start, stop) decoded (in threads) into one AudioSplit."""
        paths = self.paths[start:stop]
        clips = read_many(paths, sample_rate)
        return AudioSplit.from_clips(clips, self.y[start:stop].tolist(), [str(p) for p in paths])


def cut(split: AudioSplit, idx: torch.Tensor | slice, samples: int, g: torch.Generator | None) -> torch.Tensor:
    """Clips `idx` as (B, samples): with a generator a random window (or a random place for a short clip), else the
    centre; zeros outside the clip. One gather, no per-clip Python."""
    offsets, lengths = split.offsets[idx], split.lengths[idx]
    slack = lengths - samples  # > 0: the clip is longer; < 0: it is padded
    if g is None:
        shift = torch.div(slack, 2, rounding_mode="floor")  # start in the clip (may be negative: padding)
    else:
        u = torch.rand(len(lengths), generator=g, dtype=torch.float64)
        shift = torch.where(slack >= 0, (u * (slack + 1)).floor(), -(u * (-slack + 1)).floor()).to(torch.int64)
    if not isinstance(split.samples, torch.Tensor):  # on disk (`data/audioshards.py`): each window's part in its clip
        first = shift.clamp(min=0)
        n = (torch.minimum(shift + samples, lengths) - first).clamp(min=0)
        return split.samples.spans((offsets + first).numpy(), n.numpy(), (first - shift).numpy(), samples)
    pos = shift.unsqueeze(1) + torch.arange(samples).unsqueeze(0)  # (B, S) positions in each clip
    valid = (pos >= 0) & (pos < lengths.unsqueeze(1))
    flat = (offsets.unsqueeze(1) + pos.clamp(min=0)).clamp(max=max(len(split.samples) - 1, 0))
    return torch.where(valid, split.samples[flat], torch.zeros((), dtype=split.samples.dtype))


@dataclass
class AudioDataset(Splits):
    train: AudioSplit
    val: AudioSplit | None
    test: AudioSplit | None
    labels: list[str]
    sample_rate: int


# ------------------------------------------------------------------------------------------------------ sources
def _list_folder(root: Path, split: str) -> dict[str, list[Path]]:
    folder = root / split
    return {
        d.name: sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES)
        for d in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    }


def _folder(cfg: AudioDataConfig) -> tuple[dict[str, list[tuple[Path, int]]], list[str]]:
    root = cfg.path
    assert root is not None
    if not root.is_dir():
        raise UserError(f"data.path {root}: folder not found (expected ROOT/<split>/<class>/*.wav)")
    if not (root / "train").is_dir():
        raise UserError(f"data.path {root}: no train/ folder (expected ROOT/train/<class>/*.wav, optional val/, test/)")
    train = _list_folder(root, "train")
    if not train:
        raise UserError(f"{root / 'train'}: no class folders (expected train/<class>/*.wav)")
    for name, files in train.items():
        if not files:
            raise UserError(f"{root / 'train' / name}: class folder has no audio files ({', '.join(AUDIO_SUFFIXES)})")
    labels = list(train)
    splits = {"train": [(f, labels.index(c)) for c, fs in train.items() for f in fs]}
    for split in ("val", "test"):
        if (root / split).is_dir():
            files = _list_folder(root, split)
            unknown = sorted(set(files) - set(labels))
            if unknown:
                raise UserError(f"{root / split}: class folders {unknown} do not exist in train/ (classes: {labels})")
            splits[split] = [(f, labels.index(c)) for c, fs in files.items() for f in fs]
    return splits, labels


def _csv(cfg: AudioDataConfig) -> tuple[dict[str, list[tuple[Path, int]]], list[str]]:
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
    for col in (cfg.path_column, cfg.label_column):
        if col not in header:
            raise UserError(
                f"{path}: no column {col!r} (columns: {', '.join(header) or 'none'}); "
                "set data.path_column / data.label_column"
            )
    has_split = cfg.split_column in header
    labels = sorted({r[cfg.label_column] for r in rows if not has_split or r[cfg.split_column].strip() == "train"})
    splits: dict[str, list[tuple[Path, int]]] = {"train": []}
    for i, r in enumerate(rows, start=2):
        split = r[cfg.split_column].strip() if has_split else "train"
        if split not in ("train", "val", "test"):
            raise UserError(f"{path}: line {i}: split {split!r}, expected train, val or test")
        if r[cfg.label_column] not in labels:
            raise UserError(f"{path}: line {i}: label {r[cfg.label_column]!r} does not occur in the train rows")
        p = Path(r[cfg.path_column])
        splits.setdefault(split, []).append(
            (p if p.is_absolute() else path.parent / p, labels.index(r[cfg.label_column]))
        )
    if not splits["train"]:
        raise UserError(f"{path}: no training rows")
    return splits, labels


def group_splits(groups: list[str], labels: list[str], val_fraction: float, test_fraction: float) -> dict[str, str]:
    """Assign whole groups (voices, levels) of labelled items to test, val and train. The groups go in a fixed
    shuffled order to test until it holds `test_fraction` of the items, then to val until it holds `val_fraction`,
    a group bringing a label the split lacks first; a group is passed over when taking it would leave one of its
    labels with no training group."""
    names = sorted(set(groups))
    order = [names[i] for i in np.random.default_rng(GROUP_SHUFFLE_SEED).permutation(len(names)).tolist()]
    size: dict[str, int] = {}
    in_group: dict[str, set[str]] = {}
    left: dict[str, set[str]] = {}  # label → the groups of it still in train
    for g, y in zip(groups, labels, strict=True):
        size[g] = size.get(g, 0) + 1
        in_group.setdefault(g, set()).add(y)
        left.setdefault(y, set()).add(g)
    out = dict.fromkeys(names, "train")
    total = len(groups)
    for split, fraction in (("test", test_fraction), ("val", val_fraction)):
        taken, seen = 0, set()
        while taken < fraction * total:
            free = [g for g in order if out[g] == "train" and all(left[y] != {g} for y in in_group[g])]
            if not free:
                break
            # First a group that brings a label this split lacks, so every label that can be is evaluated.
            g = next((g for g in free if in_group[g] - seen), free[0])
            out[g] = split
            taken += size[g]
            seen |= in_group[g]
            for y in in_group[g]:
                left[y].discard(g)
    return out


def _espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise UserError(
            "data.source 'spoken_digits' needs espeak-ng to synthesise the digits "
            "(Debian/Ubuntu: apt-get install espeak-ng; scripts/setup.sh installs it when it can)"
        )
    return exe


def espeak_voices(n: int) -> list[dict[str, Any]]:
    """`n` distinct synthetic voices (accent, variant, speed in words/minute, pitch 0..99), chosen with a fixed seed
    from every English accent x voice variant that this espeak-ng has."""
    exe = _espeak()
    out = subprocess.run([exe, "--voices=variant"], capture_output=True, text=True, check=True).stdout
    variants = sorted(
        {line.split()[4].split("/")[-1] for line in out.splitlines()[1:] if len(line.split()) >= 5}
        - {"whisper", "whisperf"}
    )
    combos = [(lang, v) for lang in ESPEAK_LANGS for v in variants]
    rng = np.random.default_rng(GROUP_SHUFFLE_SEED)
    pick = rng.permutation(len(combos))[:n]
    speeds = rng.integers(130, 200, size=len(pick))
    pitches = rng.integers(25, 75, size=len(pick))
    return [
        {"lang": combos[i][0], "variant": combos[i][1], "speed": int(s), "pitch": int(p)}
        for i, s, p in zip(pick.tolist(), speeds, pitches, strict=True)
    ]


def voice_name(v: dict[str, Any]) -> str:
    return f"{v['lang']}+{v['variant']}-s{v['speed']}-p{v['pitch']}"


def espeak_cache(
    kind: str,
    cache_dir: Path | None,
    key_parts: tuple[Any, ...],
    jobs: list[tuple[dict[str, Any], str, str]],
    columns: list[str],
    rows: list[list[str]],
) -> Path:
    """`<cache>/<kind>/<key>`: espeak-ng's reading of each job (voice, text, wav file name) and `clips.csv`
    (`columns`, one of `rows` per clip), generated on first use, in parallel, into a temporary folder renamed into
    place (the cache never holds a half-written set). The key hashes espeak-ng's version and `key_parts`."""
    from bigmodel.data.download import default_cache_dir

    exe = _espeak()
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    key = hashlib.sha256(repr((version, *key_parts)).encode()).hexdigest()[:12]
    root = (cache_dir or default_cache_dir()) / kind / key
    if (root / "clips.csv").is_file():
        return root
    tmp = root.with_name(f".{key}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    def say(job: tuple[dict[str, Any], str, str]) -> None:
        v, text, name = job
        out = tmp / name
        cmd = [exe, "-v", f"{v['lang']}+{v['variant']}", "-s", str(v["speed"]), "-p", str(v["pitch"])]
        r = subprocess.run([*cmd, "-w", str(out), text], capture_output=True, text=True)
        if r.returncode != 0 or not out.is_file():
            raise UserError(f"espeak-ng failed for voice {voice_name(v)} ({r.stderr.strip() or r.returncode})")

    with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        list(pool.map(say, jobs))
    with (tmp / "clips.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows(rows)
    if root.exists():
        shutil.rmtree(root)
    os.rename(tmp, root)
    return root


def spoken_digits(cache_dir: Path | None, voices: int) -> list[tuple[Path, str, str]]:
    """(wav path, digit, voice) of every clip: generated with espeak-ng into the cache on first use."""
    vs = espeak_voices(voices)
    jobs = [(v, d, f"{voice_name(v)}-{d}.wav") for v in vs for d in DIGITS]
    rows = [[name, d, voice_name(v)] for v, d, name in jobs]
    root = espeak_cache("spoken_digits", cache_dir, (vs, DIGITS), jobs, ["path", "label", "voice"], rows)
    with (root / "clips.csv").open(newline="", encoding="utf-8") as f:
        return [(root / r["path"], r["label"], r["voice"]) for r in csv.DictReader(f)]


def fillets_clips(sound: Path | None) -> list[tuple[Path, str, str]]:
    """(ogg path, speaker, level) of the Czech clips of Fish Fillets NG whose name says who speaks
    (`sound/<level>/cs/<level>-<speaker>-<line>.ogg`; the small fish is `m`, the big fish `v`)."""
    root = sound or FILLETS_SOUND
    if not root.is_dir():
        raise UserError(
            f"{root}: Fish Fillets NG voices not found (Debian/Ubuntu: apt-get install fillets-ng-data-cs; "
            "or set data.path to the game's sound/ folder)"
        )
    out = []
    for f in sorted(root.glob("*/cs/*.ogg")):
        parts = f.stem.split("-")
        if len(parts) >= 3 and parts[1]:  # <level>-<speaker>-<line>
            out.append((f, parts[1], f.parent.parent.name))
        elif len(parts) == 2 and parts[0] in ("m", "v"):  # a few levels leave the level out: <speaker>-<line>
            out.append((f, parts[0], f.parent.parent.name))
        # other two-part names (`<level>-<n>`, `b1-...`) do not say who speaks: left out
    if not out:
        raise UserError(f"{root}: no <level>/cs/*.ogg clips")
    return out


def _grouped(
    clips: list[tuple[Path, str, str]], cfg: AudioDataConfig, labels: list[str]
) -> dict[str, list[tuple[Path, int]]]:
    kept = [c for c in clips if c[1] in labels]
    where = group_splits([g for _, _, g in kept], [y for _, y, _ in kept], cfg.val_fraction, cfg.test_fraction)
    splits: dict[str, list[tuple[Path, int]]] = {"train": [], "val": [], "test": []}
    for p, label, group in kept:
        splits[where[group]].append((p, labels.index(label)))
    return splits


def audio_files(cfg: AudioDataConfig, seed: int) -> tuple[dict[str, FileSplit | None], list[str]]:
    """The recipe's train / val / test files and labels, carved (seeded, stratified; `imbalance`, `limit_train`) but
    not decoded, and the label names."""
    grouped = False
    if cfg.source == "audio_folder":
        files, labels = _folder(cfg)
    elif cfg.source == "audio_csv":
        files, labels = _csv(cfg)
    elif cfg.source == "spoken_digits":
        clips = spoken_digits(cfg.cache_dir, cfg.voices)
        labels = list(DIGITS)
        files, grouped = _grouped(clips, cfg, labels), True
    else:
        clips = fillets_clips(cfg.path)
        counts: dict[str, int] = {}
        levels: dict[str, set[str]] = {}
        for _, speaker, level in clips:
            counts[speaker] = counts.get(speaker, 0) + 1
            levels.setdefault(speaker, set()).add(level)
        # A speaker heard in one level only cannot be both trained on and tested on held-out levels.
        labels = sorted(s for s, n in counts.items() if n >= cfg.min_clips and len(levels[s]) >= 2)
        if len(labels) < 2:
            raise UserError(
                f"data.min_clips {cfg.min_clips}: fewer than two speakers have that many clips in two or more levels"
            )
        files, grouped = _grouped(clips, cfg, labels), True
    parts: dict[str, FileSplit | None] = {}
    for name in ("train", "val", "test"):
        items = files.get(name)
        if items is None or (grouped and name == "val" and cfg.val_fraction == 0):
            parts[name] = None
            continue
        parts[name] = FileSplit([p for p, _ in items], torch.tensor([y for _, y in items], dtype=torch.int64))
    train, val, test = finish_splits(parts["train"], parts["val"], parts["test"], labels, cfg, seed)
    return {"train": train, "val": val, "test": test}, labels


def load_audio(cfg: AudioDataConfig, seed: int) -> AudioDataset:
    """The recipe's audio at `cfg.sample_rate`, with train / val / test splits (only the clips they keep decoded)."""
    files, labels = audio_files(cfg, seed)
    parts = {k: f.decode(cfg.sample_rate) if f is not None else None for k, f in files.items()}
    assert parts["train"] is not None
    return AudioDataset(parts["train"], parts["val"], parts["test"], labels, cfg.sample_rate)


# ------------------------------------------------------------------------------------------------------- loader
class AudioLoader:
    """Batches of fixed-length waveforms (B, samples) and labels, in the sampling plan's order. Training batches cut
    a random window of each clip and, with SpecAugment on, carry its masks: x = (waveform, masks (B, K, 3))."""

    def __init__(
        self,
        split: AudioSplit,
        batch_size: int,
        samples: int,
        *,
        shuffle: bool,
        seed: int = 0,
        random_crop: bool = False,
        spec_augment: SpecAugmentConfig | None = None,
        noise: NoiseConfig | None = None,
        mel_channels: int = 0,
        frames: int = 0,
        drop_last: bool = False,
        device: torch.device | str = "cpu",
        sampling: str = "none",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.split = split
        self.y = split.y
        self.samples = samples
        self.seed = seed
        self.random_crop = random_crop
        self.spec_augment = spec_augment if spec_augment is not None and spec_augment.on else None
        self.noise = noise if random_crop and noise is not None and noise.prob > 0 else None
        power = split.power  # stored by a prepared folder (the source buffer's), else computed here
        if self.noise is not None and power is None:
            power = clip_power(split.samples, split.offsets, split.lengths)
        self.power = power if self.noise is not None else None
        self.mel_channels, self.frames = mel_channels, frames
        self.device = torch.device(device)
        self.plan = SamplingPlan.for_labels(
            split.y,
            batch_size,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            sampling=sampling,
            rank=rank,
            world_size=world_size,
        )

    def __len__(self) -> int:
        return len(self.plan)

    @property
    def num_examples(self) -> int:
        return len(self.y)

    def order(self, epoch: int) -> torch.Tensor | None:
        if self.plan.mode == "sequential":
            return None
        return torch.cat([torch.as_tensor(b) for b in self.plan.batches(epoch)])

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[Any, torch.Tensor]]:
        for i, idx in enumerate(self.plan.batches(epoch)[start:], start):
            yield self._batch(idx, epoch, i)

    def __iter__(self) -> Iterator[tuple[Any, torch.Tensor]]:
        return self.epoch(0)

    def _batch(self, idx: slice | torch.Tensor, epoch: int, i: int) -> tuple[Any, torch.Tensor]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, i)) if self.random_crop else None
        wave = cut(self.split, idx, self.samples, g)
        if self.noise is not None:
            assert g is not None and self.power is not None
            wave = noise_batch(wave, self.power[idx], self.noise, g)
        wave = wave.to(self.device)
        y = self.y[idx].to(self.device)
        if self.spec_augment is None:
            return wave, y
        assert g is not None
        return (
            wave,
            spec_augment_masks(len(wave), self.spec_augment, self.mel_channels, self.frames, g).to(self.device),
        ), y


def spec_augment_masks(
    b: int, cfg: SpecAugmentConfig, mel_channels: int, frames: int, g: torch.Generator
) -> torch.Tensor:
    """(b, freq_masks + time_masks, 3) rows of (axis, start, width): widths uniform in 0..max width, starts uniform
    over the positions where the band fits (as torchaudio's FrequencyMasking / TimeMasking draw them)."""
    rows = []
    for axis, count, limit, size in (
        (0, cfg.freq_masks, cfg.freq_width, mel_channels),
        (1, cfg.time_masks, cfg.time_width, frames),
    ):
        if count == 0:
            continue
        width = (torch.rand(b, count, generator=g) * (min(limit, size) + 1)).floor().to(torch.int64)
        start = (torch.rand(b, count, generator=g) * (size - width + 1)).floor().to(torch.int64)
        rows.append(torch.stack([torch.full_like(width, axis), start, width], dim=2))
    return torch.cat(rows, dim=1)


def add_noise(x: np.ndarray, snr_db: float, g: np.random.Generator) -> np.ndarray:
    """`x` plus white Gaussian noise at `snr_db` dB below the clip's mean power (robustness checks)."""
    power = float(np.mean(np.square(x, dtype=np.float64)))
    noise = g.standard_normal(len(x)) * math.sqrt(power / 10 ** (snr_db / 10))
    return (x + noise).astype(np.float32)
