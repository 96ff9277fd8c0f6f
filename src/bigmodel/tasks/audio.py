"""Audio classification (keyword spotting, speaker identification, any labelled clips): audio files of any common
format, channel count and sample rate, resampled to the model's rate; the log-mel front-end lives inside the model,
so `predict`, `serve` and the exported ONNX graph all take raw waveforms.

Added through the seams: this file, `data/audio.py`, `models/audio.py` and registration lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bigmodel.data.audio import AudioDataConfig
from bigmodel.errors import UserError
from bigmodel.tasks.base import ExportSignature, InputError, LoaderOptions, register_task
from bigmodel.tasks.classification import ClassificationSpec, as_array

MAX_UPLOAD_SECONDS = 600  # a served clip longer than this is refused (it would be cut to the model's length anyway)


class AudioExport(nn.Module):
    """Raw waveforms (B, samples) at the model's rate → logits: the log-mel front-end is inside the model."""

    def __init__(self, art: Any) -> None:
        super().__init__()
        self.model = art.inference_model

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.model(waveform)


def feature_frontend(shape: dict[str, Any], stats: bool = True) -> Any:
    from bigmodel.models.audio import LogMel

    features = dict(shape["features"])
    if not stats:
        features["mean"] = features["std"] = None
    return LogMel(features, int(shape["sample_rate"]))


def log_mels(shape: dict[str, Any], waves: torch.Tensor, stats: bool = False, chunk: int = 256) -> torch.Tensor:
    """(N, samples) → (N, n_mels, frames) log-mels, in chunks (the statistics and the baseline's features)."""
    fe = feature_frontend(shape, stats)
    with torch.inference_mode():
        return torch.cat([fe(waves[i : i + chunk]) for i in range(0, len(waves), chunk)]) if len(waves) else waves


STATS_CHUNK = 512  # clips per chunk of the normalisation statistics (and of `data prepare`'s decoding)


class FeatureStats:
    """Per mel channel mean and (unbiased) std over every frame of the training clips' evaluation windows, added a
    chunk of clips at a time (float64; chunks merged with Chan et al.'s pairwise update): the memory is one chunk's
    log-mels, not the training set's, and a run on the source and `data prepare` (which decodes a chunk at a time)
    add the same chunks, so they store the same statistics."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, feats: torch.Tensor) -> None:
        """`feats`: (B, n_mels, frames) log-mels."""
        f = feats.double()
        n = f.shape[0] * f.shape[2]
        if n == 0:
            return
        mean = f.mean(dim=(0, 2))
        m2 = (f - mean[None, :, None]).square().sum(dim=(0, 2))
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.n * n / total)
        self.n = total

    def result(self) -> tuple[list[float], list[float]]:
        assert self.mean is not None and self.m2 is not None and self.n > 1, "no training frames"
        return self.mean.tolist(), (self.m2 / (self.n - 1)).sqrt().clamp(min=1e-5).tolist()


def served_waveform(art: Any, i: int, x: Any) -> np.ndarray:
    """`inputs[i]` of a request: `{"audio_base64": WAV/FLAC/Ogg/MP3 bytes}` (any rate, any channels) or `{"array":
    mono samples at the model's rate, -1..1}` → mono float32 samples at the model's rate (`InputError` if bad)."""
    import base64
    import binascii

    from bigmodel.data.audio import decode_audio

    where = f"inputs[{i}]"
    rate = int(art.preprocess.input_shape["sample_rate"])
    if isinstance(x, str):
        raise InputError(f"{where}: this is an audio model; expected an object, not a string")
    if isinstance(x, dict) and "audio_base64" in x:
        if set(x) != {"audio_base64"} or not isinstance(x["audio_base64"], str):
            raise InputError(f'{where}: expected {{"audio_base64": "<base64 of a WAV/FLAC/Ogg/MP3 file>"}}')
        try:
            data = base64.b64decode(x["audio_base64"], validate=True)
        except (binascii.Error, ValueError):
            raise InputError(f"{where}.audio_base64: not valid base64") from None
        try:
            wave = decode_audio(data, rate, f"{where}.audio_base64")
        except UserError as e:
            raise InputError(str(e)) from None
    elif isinstance(x, dict) and "image_base64" in x:
        raise InputError(f"{where}: this is an audio model; image_base64 is for image models")
    else:
        wave = as_array(where, x)
        if wave.ndim != 1 or len(wave) == 0:
            raise InputError(f"{where}.array: expected mono samples [n] at {rate} Hz, got shape {list(wave.shape)}")
        wave = wave.astype(np.float32)
    if len(wave) > MAX_UPLOAD_SECONDS * rate:
        raise InputError(f"{where}: the clip is longer than {MAX_UPLOAD_SECONDS} s")
    return wave


class AudioClassification(ClassificationSpec):
    name = "audio_classification"
    kind = "audio"
    data_config = AudioDataConfig

    def check_recipe(self, recipe: Any) -> None:
        super().check_recipe(recipe)
        if recipe.eval.tta_flip:
            raise ValueError("eval.tta_flip applies to image_classification only")

    # ------------------------------------------------------------------------------------------------- data
    def prepare(self, recipe: Any, pre: Any | None = None) -> tuple[Any, Any]:
        from bigmodel.data.audio import load_audio

        cfg = recipe.data
        if cfg.source == "shards":  # clips decoded on disk (`bigmodel data prepare`), with their statistics
            from bigmodel.data.audioshards import load_audio_shards

            return load_audio_shards(recipe, pre)
        if pre is not None and int(pre.input_shape["sample_rate"]) != cfg.sample_rate:
            raise UserError(
                f"data.sample_rate {cfg.sample_rate}: the model was trained at {pre.input_shape['sample_rate']} Hz"
            )
        data = load_audio(cfg, recipe.seed)
        return data, pre or self.audio_preprocess(recipe, data)

    def audio_preprocess(self, recipe: Any, data: Any) -> Any:
        """The input description: rate, window, log-mel settings and their normalisation statistics."""
        from bigmodel.runs import Preprocess

        cfg = recipe.data
        shape = {"kind": "audio", "sample_rate": cfg.sample_rate, "samples": cfg.samples}
        features = cfg.features.spec()
        features["mean"] = features["std"] = None
        if cfg.features.normalize:
            stats, train = FeatureStats(), data.train
            for a in range(0, len(train), STATS_CHUNK):
                idx = torch.arange(a, min(a + STATS_CHUNK, len(train)))
                stats.add(log_mels({**shape, "features": features}, train.windows(cfg.samples, idx)))
            features["mean"], features["std"] = stats.result()
        return Preprocess(data.labels, None, None, {**shape, "features": features}, kind="audio")

    def write_shards(self, recipe: Any, out: Any, shard_size: int) -> dict[str, Any]:
        """Each split's decoded clips as one float32 stream, with offsets, labels, clip powers and names, and the
        normalisation statistics (`data/audioshards.py`), decoded `STATS_CHUNK` clips at a time; `shard_size` does
        not apply."""
        from bigmodel.data.audioshards import write_audio_shards

        return write_audio_shards(recipe, out)

    def prepared_summary(self, index: dict[str, Any]) -> str:
        from bigmodel.data.audioshards import clips_summary

        return clips_summary(index)

    def build_loader(self, recipe: Any, split: Any, pre: Any, opts: LoaderOptions) -> Any:
        from bigmodel.data.audio import AudioLoader

        shape = pre.input_shape
        samples = int(shape["samples"])
        return AudioLoader(
            split,
            opts.batch_size,
            samples,
            random_crop=opts.train,
            spec_augment=recipe.data.spec_augment if opts.train else None,
            noise=recipe.data.noise if opts.train else None,
            mel_channels=int(shape["features"]["n_mels"]),
            frames=samples // int(shape["features"]["hop_length"]) + 1,
            **self.loader_kwargs(recipe, opts),
        )

    def baseline_features(self, recipe: Any, data: Any, pre: Any, split: str) -> Any:
        """`linear`: logistic regression on each mel channel's mean and std over the clip's frames (the classic
        "bag of frames" baseline), from the evaluation window of each clip."""
        from bigmodel.evaluation.baseline import from_splits

        shape = pre.input_shape

        def featurize(s: Any) -> np.ndarray:
            feats = log_mels(shape, s.windows(int(shape["samples"])))
            return torch.cat([feats.mean(dim=2), feats.std(dim=2)], dim=1).numpy()

        return from_splits("linear", data, split, featurize)

    def report_example(self, art: Any, split: Any, i: int) -> str:
        from bigmodel.report.html import esc

        name = split.names[i] if split.names else f"clip {i}"
        return f"<code>{esc(name)}</code>"

    # ------------------------------------------------------------------------------------------- prediction
    file_noun = "audio file"

    def _window(self, art: Any, x: np.ndarray) -> np.ndarray:
        from bigmodel.data.audio import fit_length

        return fit_length(x, int(art.preprocess.input_shape["samples"]))

    def read_items(self, art: Any, files: list[Path]) -> tuple[list[str], list[Any]]:
        from bigmodel.data.audio import read_audio

        rate = int(art.preprocess.input_shape["sample_rate"])
        return [str(f) for f in files], [self._window(art, read_audio(f, rate)) for f in files]

    def predict_files(self, art: Any, files: list[Path], top_k: int) -> list[dict[str, Any]]:
        names, items = self.read_items(art, files)
        probs = self.probabilities(art, items) if items else torch.zeros((0, len(art.labels)))
        return art.top_k(names, probs, top_k, "file")

    def model_inputs(self, art: Any, items: list[Any]) -> tuple[Any, ...]:
        """(samples,) waveforms at the model's rate → the batch (B, samples)."""
        return (torch.from_numpy(np.stack(items)),)

    def probabilities(self, art: Any, batch: list[Any], batch_size: int = 256) -> torch.Tensor:
        outs = []
        with torch.inference_mode():
            for i in range(0, len(batch), batch_size):
                wave = torch.from_numpy(np.stack(batch[i : i + batch_size]))
                outs.append(art.inference_model(wave).float().softmax(dim=1))
        return torch.cat(outs) if outs else torch.zeros((0, len(art.labels)))

    def serve_item(self, art: Any, i: int, x: Any) -> Any:
        """A served clip (`served_waveform`) → the model's window (samples,)."""
        return self._window(art, served_waveform(art, i, x))

    # ------------------------------------------------------------------------------------------------ export
    def export_signature(self, art: Any, data: Any, n: int) -> ExportSignature:
        test = data.split("test")
        samples = int(art.preprocess.input_shape["samples"])
        k = min(n, len(test))
        x = test.windows(samples, torch.arange(k))
        return ExportSignature(
            module=AudioExport(art),
            inputs=(x,),
            names=["waveform"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65_536)},),
            shapes=[["batch", samples]],
        )


register_task(AudioClassification())
