"""Audio models: a log-mel front-end that lives inside the model, and a small CNN on its output.

The front-end (`LogMel`) turns raw waveforms (B, S) at the model's sample rate into log-mel features (B, M, T):
an STFT written as one strided convolution with a windowed DFT basis (so it runs under torch.export and ONNX, where
`torch.stft` does not), the power spectrum, a mel filterbank (Slaney or HTK scale, Slaney area normalisation or none,
computed as librosa's `filters.mel` computes it), a log, and optional per-mel-channel standardisation with statistics
fitted on the training split. Because it is part of the model, the exported graph takes raw waveforms and no feature
code outside the model can disagree with training.

SpecAugment (Park et al. 2019) masks bands of mel channels and runs of frames. The masks are drawn by the loader,
seeded by (seed, epoch, batch), and passed to `forward(waveform, masks)`; evaluation passes none. So the model holds
no random state and resume stays bit-identical.

Input (from `tasks/audio.py`): `forward(waveform (B, S) float, masks (B, K, 3) int64 | None) -> logits (B, C)`;
`input_shape` = `{"kind": "audio", "sample_rate", "samples", "features": {n_fft, win_length, hop_length, n_mels,
f_min, f_max, mel_scale, norm, mean, std}}`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from bigmodel.models.base import Capability, Classifier, ConvClassifier
from bigmodel.registry import register_model

LOG_EPS = 1e-6  # log(mel power + eps): -13.8 for silence (librosa's power_to_db uses amin 1e-10 on a dB scale)


# ------------------------------------------------------------------------------------------------ mel filterbank
def hz_to_mel(f: np.ndarray | float, htk: bool = False) -> np.ndarray:
    """Hz → mel: HTK's 2595 log10(1 + f / 700), or Slaney's (linear below 1 kHz, logarithmic above), as librosa."""
    f = np.asanyarray(f, dtype=np.float64)
    if htk:
        return 2595.0 * np.log10(1.0 + f / 700.0)
    f_sp = 200.0 / 3
    mels = f / f_sp
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, math.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mels)


def mel_to_hz(m: np.ndarray, htk: bool = False) -> np.ndarray:
    m = np.asanyarray(m, dtype=np.float64)
    if htk:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    f_sp = 200.0 / 3
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(
    sample_rate: int,
    n_fft: int,
    n_mels: int,
    f_min: float = 0.0,
    f_max: float | None = None,
    *,
    htk: bool = False,
    norm: str | None = "slaney",
) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters on the mel scale (float64), as `librosa.filters.mel`."""
    f_max = sample_rate / 2.0 if f_max is None else f_max
    fft_freqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sample_rate)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(f_min, htk), hz_to_mel(f_max, htk), n_mels + 2), htk)
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fft_freqs)
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    if norm == "slaney":
        weights *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, None]
    return weights


# ------------------------------------------------------------------------------------------------------ front-end
class LogMel(nn.Module):
    """Waveforms (B, S) → log-mel features (B, n_mels, frames), frames = S // hop_length + 1 (centred frames, zero
    padding as librosa's default). `power(x)` gives the mel power spectrogram before the log (the parity tests')."""

    def __init__(self, features: dict[str, Any], sample_rate: int) -> None:
        super().__init__()
        n_fft = int(features["n_fft"])
        win = int(features.get("win_length") or n_fft)
        self.n_fft, self.hop = n_fft, int(features["hop_length"])
        self.n_mels = int(features["n_mels"])
        # Periodic Hann window (scipy's get_window('hann', fftbins=True)), centred in n_fft.
        n = np.arange(win)
        window = np.zeros(n_fft)
        left = (n_fft - win) // 2
        window[left : left + win] = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / win)
        bins = n_fft // 2 + 1
        k = np.arange(bins)[:, None] * np.arange(n_fft)[None, :]
        angle = 2.0 * np.pi * (k % n_fft) / n_fft  # k mod N keeps the angles small: exact cos/sin in float64
        basis = np.concatenate([np.cos(angle) * window, -np.sin(angle) * window])  # (2 * bins, n_fft)
        self.register_buffer("basis", torch.from_numpy(basis).to(torch.float32).unsqueeze(1), persistent=False)
        fb = mel_filterbank(
            sample_rate,
            n_fft,
            self.n_mels,
            float(features.get("f_min", 0.0)),
            features.get("f_max"),
            htk=features.get("mel_scale", "slaney") == "htk",
            norm=features.get("norm", "slaney"),
        )
        self.register_buffer("filters", torch.from_numpy(fb).to(torch.float32), persistent=False)
        mean, std = features.get("mean"), features.get("std")
        self.normalize = mean is not None and std is not None
        if self.normalize:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1), persistent=False)
            inv = 1.0 / torch.tensor(std, dtype=torch.float32).clamp(min=1e-5)
            self.register_buffer("inv_std", inv.view(1, -1, 1), persistent=False)

    def frames(self, samples: int) -> int:
        return samples // self.hop + 1

    def power(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S) → mel power spectrogram (B, n_mels, frames), float32."""
        bins = self.n_fft // 2 + 1
        x = F.pad(x.to(torch.float32).unsqueeze(1), (self.n_fft // 2, self.n_fft // 2))
        spec = F.conv1d(x, self.basis, stride=self.hop)  # (B, 2 * bins, frames): real and imaginary parts
        power = spec[:, :bins].square() + spec[:, bins:].square()
        return torch.matmul(self.filters, power)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
            # Features in float32 whatever the training precision: bf16 would round the log-mels to 3 digits.
            with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
                return self._features(x)
        return self._features(x)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.log(self.power(x) + LOG_EPS)
        if self.normalize:
            out = (out - self.mean) * self.inv_std
        return out


def apply_masks(feats: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """SpecAugment: zero (the training mean, after standardisation) the bands and runs in `masks` (B, K, 3) rows of
    (axis 0 = mel channels | 1 = frames, start, width); width 0 masks nothing."""
    B, M, T = feats.shape
    axis, start, width = masks[..., 0:1], masks[..., 1:2], masks[..., 2:3]  # (B, K, 1)
    f = torch.arange(M, device=feats.device).view(1, 1, M)
    t = torch.arange(T, device=feats.device).view(1, 1, T)
    in_f = ((axis == 0) & (f >= start) & (f < start + width)).any(dim=1)  # (B, M)
    in_t = ((axis == 1) & (t >= start) & (t < start + width)).any(dim=1)  # (B, T)
    hit = in_f.unsqueeze(2) | in_t.unsqueeze(1)
    return feats.masked_fill(hit, 0.0)


def audio_shape(input_shape: Any, name: str) -> dict[str, Any]:
    if not isinstance(input_shape, dict) or input_shape.get("kind") != "audio":
        raise ValueError(f"{name} needs audio (task audio_classification), got input shape {input_shape!r}")
    return input_shape


# ------------------------------------------------------------------------------------------------------- audio CNN
class AudioCNNConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    widths: Annotated[list[Annotated[int, Field(ge=1, le=1024)]], Field(min_length=1, max_length=8)] = [24, 48, 96]
    """Channels of each stage; every stage after the first halves the mel and time resolution."""
    blocks: Annotated[int, Field(ge=1, le=8)] = 1
    """Residual blocks (two 3x3 convolutions each) per stage."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    pooling: Literal["time", "global"] = "time"
    """`time`: average over frames only, each channel keeping its mel bands (which band a pattern sits in tells a
    low voice from a high one); `global`: over frames and bands (fewer head weights; pitch-shift invariant)."""


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.skip(x))


class AudioCNN(ConvClassifier):
    """Log-mels as a one-channel picture (mel channels x frames) → residual 3x3 stages → average over time (each
    channel keeps its mel bands) → dropout → linear head (a small ResNet on spectrograms, after the keyword-spotting
    baselines of Tang & Lin 2018)."""

    def __init__(self, cfg: AudioCNNConfig, shape: dict[str, Any], num_classes: int) -> None:
        super().__init__()
        self.frontend = LogMel(shape["features"], int(shape["sample_rate"]))
        w = cfg.widths
        self.stem = nn.Sequential(nn.Conv2d(1, w[0], 3, 1, 1, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU())
        blocks: list[nn.Module] = []
        cin = w[0]
        for i, cout in enumerate(w):
            for b in range(cfg.blocks):
                blocks.append(_Block(cin, cout, 2 if (i > 0 and b == 0) else 1))
                cin = cout
        self.stages = nn.Sequential(*blocks)
        mels = int(shape["features"]["n_mels"])
        for _ in w[1:]:
            mels = (mels + 1) // 2  # each later stage's first block has stride 2 (3x3, padding 1)
        self.pooling = cfg.pooling
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cin * mels if cfg.pooling == "time" else cin, num_classes)

    def features_map(self, waveform: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        feats = self.frontend(waveform)
        if masks is not None:
            feats = apply_masks(feats, masks)
        return self.stages(self.stem(feats.unsqueeze(1)))

    def forward_features(self, waveform: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        # Pooled over time only, a pattern keeps its mel band; pooled over bands too, a convnet can only learn where
        # in the spectrum it sits from the zero padding at the band edges.
        fmap = self.features_map(waveform, masks)
        return fmap.mean(dim=3).flatten(1) if self.pooling == "time" else fmap.mean(dim=(2, 3))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(features))

    def cam_layer(self) -> nn.Module:
        return self.stages


@register_model(
    "audio-cnn",
    AudioCNNConfig,
    tasks=("audio_classification",),
    capabilities=(Capability.CLASSIFIER, Capability.CONVNET, Capability.EXPORTABLE),
    description="residual CNN on log-mel features computed inside the model from raw waveforms (audio)",
)
def build_audio_cnn(cfg: AudioCNNConfig, input_shape: Any, num_classes: int) -> AudioCNN:
    return AudioCNN(cfg, audio_shape(input_shape, "audio-cnn"), num_classes)


# ------------------------------------------------------------------------------------ sequence models on mel frames
class MelFrames(Classifier):
    """A sequence classifier (LSTM / GRU / RNN / Transformer, `models/sequence.py`) over log-mel frames: the
    front-end's (B, n_mels, T) become T steps of n_mels features, every clip the same length. The sequence model's
    weights sit under `sequence.`; `forward(waveform, masks=None)` as every audio model."""

    def __init__(self, shape: dict[str, Any], build_sequence: Callable[[dict[str, Any]], Classifier]) -> None:
        super().__init__()
        self.frontend = LogMel(shape["features"], int(shape["sample_rate"]))
        self.sequence = build_sequence({"kind": "sequence", "features": self.frontend.n_mels})

    def forward_features(self, waveform: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        feats = self.frontend(waveform)
        if masks is not None:
            feats = apply_masks(feats, masks)
        x = feats.transpose(1, 2)  # (B, T, n_mels)
        lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.int64, device=x.device)
        return self.sequence.forward_features(x, lengths)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.sequence.forward_head(features)

    def shard_units(self) -> list[nn.Module]:
        return self.sequence.shard_units()


def is_audio(input_shape: Any) -> bool:
    return isinstance(input_shape, dict) and input_shape.get("kind") == "audio"
