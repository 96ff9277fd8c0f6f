"""Speech recognition: raw audio → characters with a CTC model (`models/ctc.py`); character and word error rates
(CER / WER) from jiwer's edit operations, streamed as sums; greedy or prefix-beam decoding; `predict` transcribes
audio files of any common format, channel count and sample rate.

Added through the seams: this file, `data/speech.py`, `models/ctc.py` and registration lines.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bigmodel.data.speech import SpeechDataConfig, decode_ids
from bigmodel.errors import UserError
from bigmodel.tasks.base import ExportSignature, LoaderOptions, TaskSpec, refuse_inputs, register_task

EVAL_BATCH = 16  # clips per evaluation batch unless asked otherwise (long clips: activations grow with length)


def edit_counts(refs: list[str], hyps: list[str]) -> tuple[int, int, int, int]:
    """(character edits, reference characters, word edits, reference words) over pairs, with jiwer; an empty
    reference counts its hypothesis as insertions."""
    from bigmodel.data.audio import need

    jiwer = need("jiwer")
    ce = cn = we = wn = 0
    pairs = [(r, h) for r, h in zip(refs, hyps, strict=True) if r]
    for r, h in zip(refs, hyps, strict=True):
        if not r:
            ce += len(h)
            we += len(h.split())
    if pairs:
        rs, hs = [r for r, _ in pairs], [h for _, h in pairs]
        c = jiwer.process_characters(rs, hs)
        w = jiwer.process_words(rs, hs)
        ce += c.substitutions + c.deletions + c.insertions
        cn += c.substitutions + c.deletions + c.hits
        we += w.substitutions + w.deletions + w.insertions
        wn += w.substitutions + w.deletions + w.hits
    return ce, cn, we, wn


class SpeechMetrics:
    """Summed CTC loss and edit counts → loss per clip, CER, WER (corpus level: total edits / total reference
    length, as jiwer and the literature compute them)."""

    KEYS = ("loss_sum", "clips", "char_edits", "chars", "word_edits", "words")

    def __init__(self, device: torch.device | str = "cpu") -> None:
        for k in self.KEYS:
            setattr(self, k, torch.zeros((), dtype=torch.float64 if k == "loss_sum" else torch.int64, device=device))

    def update(self, loss_sum: torch.Tensor, refs: list[str], hyps: list[str]) -> None:
        ce, cn, we, wn = edit_counts(refs, hyps)
        self.loss_sum += loss_sum.double()
        self.clips += len(refs)
        self.char_edits += ce
        self.chars += cn
        self.word_edits += we
        self.words += wn

    def sums(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.KEYS}

    def compute(self) -> dict[str, Any]:
        n = int(self.clips)
        return {
            "loss": float(self.loss_sum) / max(n, 1),
            "cer": int(self.char_edits) / max(int(self.chars), 1),
            "wer": int(self.word_edits) / max(int(self.words), 1),
            "num_examples": n,
            "num_chars": int(self.chars),
        }


def _beam(model: nn.Module) -> int:
    inner = getattr(model, "module", model)  # a strategy's wrapper (DDP, Opacus) holds the model as .module
    return int(getattr(inner, "beam_size", 1))


class CTCTask:
    """batch = ((waveform, lengths[, masks]), targets (B, L) padded with 0); the model gives (log_probs,
    out_lengths)."""

    name = "speech_recognition"

    def __init__(self, alphabet: list[str]) -> None:
        self.alphabet = alphabet

    def loss(self, model: nn.Module, batch: tuple[Any, Any]) -> torch.Tensor:
        from bigmodel.models.ctc import ctc_loss

        x, targets = batch
        log_probs, out_lengths = model(*x)
        return ctc_loss(log_probs.float(), out_lengths, targets, (targets != 0).sum(dim=1))

    def new_metrics(self, device: torch.device | str = "cpu") -> SpeechMetrics:
        return SpeechMetrics(device)

    def references(self, targets: torch.Tensor) -> list[str]:
        return [decode_ids(row.tolist(), self.alphabet) for row in targets.cpu()]

    def eval_batch(self, model: nn.Module, batch: tuple[Any, Any], metrics: SpeechMetrics) -> None:
        from bigmodel.models.ctc import ctc_loss, greedy_decode

        x, targets = batch
        log_probs, out_lengths = model(*x)
        loss = ctc_loss(log_probs.float(), out_lengths, targets, (targets != 0).sum(dim=1), reduction="sum")
        # Greedy: validation while training stays cheap; `evaluate` adds beam search (and the LM).
        hyps = [decode_ids(ids, self.alphabet) for ids in greedy_decode(log_probs, out_lengths)]
        metrics.update(loss.detach(), self.references(targets), hyps)


class SpeechExport(nn.Module):
    """(waveform (B, samples) at the model's rate, lengths (B,)) → (log-probabilities (B, steps, V), valid steps
    (B,)): what `bigmodel export` traces for a CTC model; greedy decoding of the output is `decode` in
    `models/ctc.py` (argmax per step, repeats merged, blanks dropped)."""

    def __init__(self, art: Any) -> None:
        super().__init__()
        self.model = art.model

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(waveform, lengths)


class FrontendStats:
    """Per mel channel mean and std over every frame of the training clips (float64 sums), a clip at a time: the
    source run adds its clips in order, `data prepare` adds each as it writes it, so both store the same numbers."""

    def __init__(self, shape: dict[str, Any]) -> None:
        from bigmodel.tasks.audio import feature_frontend

        self.fe = feature_frontend(shape, stats=False)
        self.total = torch.zeros(self.fe.n_mels, dtype=torch.float64)
        self.sq = torch.zeros(self.fe.n_mels, dtype=torch.float64)
        self.n = 0

    def add(self, clip: np.ndarray) -> None:
        with torch.inference_mode():
            f = self.fe(torch.from_numpy(clip)[None])[0].double()  # (M, T)
        self.total += f.sum(dim=1)
        self.sq += f.square().sum(dim=1)
        self.n += f.shape[1]

    def result(self) -> tuple[list[float], list[float]]:
        mean = self.total / self.n
        std = (self.sq / self.n - mean.square()).clamp(min=1e-10).sqrt().clamp(min=1e-5)
        return mean.tolist(), std.tolist()


def frontend_stats(shape: dict[str, Any], split: Any) -> tuple[list[float], list[float]]:
    """Per mel channel mean and std over every frame of the training clips (`FrontendStats`)."""
    stats = FrontendStats(shape)
    for i in range(len(split)):
        stats.add(split.clip(i))
    return stats.result()


class SpeechRecognition(TaskSpec):
    name = "speech_recognition"
    kind = "speech"
    data_config = SpeechDataConfig

    def check_recipe(self, recipe: Any) -> None:
        if recipe.eval.tta_flip:
            raise ValueError("eval.tta_flip applies to image_classification only")
        # The best model is the one that transcribes best: CTC's validation loss turns up while the error rate
        # still falls (measured: the loss was lowest at epoch 7 of 16, at 12.8% CER against 11.0% at the end).
        self.monitor_val_loss(recipe, ("val_cer", "val_wer", "val_loss"))
        if recipe.train.early_stopping is not None and not recipe.data.may_have_val_split():
            raise ValueError("train.early_stopping needs a validation split; set data.val_fraction > 0")

    def prepare(self, recipe: Any, pre: Any | None = None) -> tuple[Any, Any]:
        fresh = pre is None
        if recipe.data.source == "shards":  # clips and transcripts on disk (`bigmodel data prepare`)
            from bigmodel.data.speechshards import load_speech_shards

            data, pre = load_speech_shards(recipe, pre)
        else:
            data = self.load_source(recipe, pre)
            pre = pre or self.speech_preprocess(recipe, data)
        lm_cfg = getattr(recipe.model.build_config(), "lm", None)
        if fresh and lm_cfg is not None:  # a character LM from the training transcripts, saved with the model
            from bigmodel.models.charlm import CharNgramLM

            pre.lm = CharNgramLM.fit(data.train.texts, lm_cfg)
        return data, pre

    @staticmethod
    def load_source(recipe: Any, pre: Any | None) -> Any:
        """The recipe's own source, decoded (the model's alphabet when `pre` is given)."""
        from bigmodel.data.speech import load_speech

        cfg = recipe.data
        if pre is not None and int(pre.input_shape["sample_rate"]) != cfg.sample_rate:
            raise UserError(
                f"data.sample_rate {cfg.sample_rate}: the model was trained at {pre.input_shape['sample_rate']} Hz"
            )
        return load_speech(cfg, recipe.seed, alphabet=pre.labels if pre is not None else None)

    @staticmethod
    def speech_preprocess(recipe: Any, data: Any) -> Any:
        """The input description: rate, log-mel settings and their normalisation statistics over the training clips;
        the alphabet."""
        from bigmodel.runs import Preprocess

        cfg = recipe.data
        features = cfg.features.spec()
        features["mean"] = features["std"] = None
        shape = {"kind": "speech", "sample_rate": cfg.sample_rate, "features": features}
        if cfg.features.normalize:
            features["mean"], features["std"] = frontend_stats(shape, data.train)
        return Preprocess(data.labels, None, None, shape, kind="speech")

    def write_shards(self, recipe: Any, out: Any, shard_size: int) -> dict[str, Any]:
        """Each split's decoded clips as one float32 stream with offsets, clip powers, names and transcripts, and the
        normalisation statistics (`data/speechshards.py`), decoded a chunk of clips at a time; `shard_size` does not
        apply."""
        from bigmodel.data.speechshards import write_speech_shards

        return write_speech_shards(recipe, out)

    def prepared_summary(self, index: dict[str, Any]) -> str:
        from bigmodel.data.audioshards import clips_summary

        return clips_summary(index)

    def build_loader(self, recipe: Any, split: Any, pre: Any, opts: LoaderOptions) -> Any:
        from bigmodel.data.speech import SpeechLoader

        feats = pre.input_shape["features"]
        batch = opts.batch_size if opts.train or not opts.default_batch_size else min(opts.batch_size, EVAL_BATCH)
        return SpeechLoader(
            split,
            pre.labels,
            batch,
            train=opts.train,
            seed=recipe.seed,
            hop_length=int(feats["hop_length"]),
            mel_channels=int(feats["n_mels"]),
            spec_augment=recipe.data.spec_augment if opts.train else None,
            noise=recipe.data.noise if opts.train else None,
            device=opts.device,
            rank=opts.rank,
            world_size=opts.world_size,
        )

    def objective(self, recipe: Any, data: Any, num_classes: int, labels: list[str]) -> CTCTask:
        return CTCTask(labels)

    def evaluate_extra(self, art: Any, data: Any, split: str, **options: Any) -> dict[str, Any]:
        """A trivial baseline (each clip transcribed as the training split's most frequent letter, repeated at the
        training rate of characters per second of audio), beam-search CER / WER when `beam_size` > 1 is asked (with
        the model's LM when it has one, `lm_weight` / `lm_bonus` overriding its settings, and then also without it),
        and five decoded examples."""
        s = data.split(split)
        train = data.train
        chars = Counter(c for t in train.texts for c in t if c != " ")  # a run of spaces would normalise away
        top = chars.most_common(1)[0][0] if chars else " "
        rate = sum(len(t) for t in train.texts) / max(float(train.lengths.sum()), 1.0)  # characters per sample
        refs = list(s.texts)
        trivial = [top * round(rate * int(n)) for n in s.lengths.tolist()]
        ce, cn, we, wn = edit_counts(refs, trivial)
        out: dict[str, Any] = {"baseline_cer": ce / max(cn, 1), "baseline_wer": we / max(wn, 1)}
        beam = options.get("beam_size") or _beam(art.model)
        n = len(s) if options.get("limit") is None else min(len(s), int(options["limit"]))
        lm = self.language_model(art, options.get("lm_weight"), options.get("lm_bonus"))
        outputs = self.outputs(art, [s.clip(i) for i in range(n)])
        hyps = self.decode(art, outputs, beam, lm)
        if beam > 1:
            ce, cn, we, wn = edit_counts(refs[:n], hyps)
            out.update({"beam_size": beam, "beam_cer": ce / max(cn, 1), "beam_wer": we / max(wn, 1)})
            if lm is not None:
                out["lm"] = {"order": lm.order, "weight": lm.weight, "bonus": lm.bonus}
                ce, cn, we, wn = edit_counts(refs[:n], self.decode(art, outputs, beam, None))
                out.update({"beam_cer_without_lm": ce / max(cn, 1), "beam_wer_without_lm": we / max(wn, 1)})
        out["examples"] = [{"file": s.names[i], "reference": refs[i], "hypothesis": hyps[i]} for i in range(min(5, n))]
        return out

    @staticmethod
    def language_model(art: Any, weight: float | None = None, bonus: float | None = None) -> Any:
        """The artifact's character LM (None when it has none or its weight is 0), with `weight` / `bonus` in place
        of the saved ones when given."""
        lm = art.preprocess.lm
        if lm is None:
            if weight or bonus is not None:
                raise UserError("--lm-weight / --lm-bonus: this model has no language model (recipe: model.lm)")
            return None
        lm = lm.with_settings(weight, bonus)
        return lm if lm.weight > 0 else None

    # ------------------------------------------------------------------------------------------- prediction
    inputs = "files"

    def transcribe(self, art: Any, clips: list[np.ndarray], beam_size: int | None = None) -> list[str]:
        """Mono clips at the model's rate → text (one clip per forward: no padding, any length); beam search uses
        the model's character LM when it has one."""
        return self.decode(art, self.outputs(art, clips), beam_size or _beam(art.model), self.language_model(art))

    @staticmethod
    def outputs(art: Any, clips: list[np.ndarray]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(log-probabilities, valid steps) of each clip."""
        with torch.inference_mode():
            waves = [torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32))[None] for c in clips]
            return [art.model(w, torch.tensor([w.shape[1]])) for w in waves]

    @staticmethod
    def decode(art: Any, outputs: list[tuple[torch.Tensor, torch.Tensor]], beam: int, lm: Any) -> list[str]:
        from bigmodel.models.ctc import decode

        return [decode_ids(decode(lp, n, beam, lm, art.labels)[0], art.labels) for lp, n in outputs]

    def predict(
        self, art: Any, files: list[str | Path] | None, texts: list[str] | None, top_k: int
    ) -> list[dict[str, Any]]:
        from bigmodel.data.audio import read_audio

        refuse_inputs(art, files, texts, takes="files")
        rate = int(art.preprocess.input_shape["sample_rate"])
        clips = [read_audio(f, rate) for f in files or []]
        return [{"file": str(f), "text": t} for f, t in zip(files or [], self.transcribe(art, clips), strict=True)]

    def format_prediction(self, result: dict[str, Any]) -> str:
        return f"{result['file']}\t{result['text']}"

    # ---------------------------------------------------------------------------------------------- serving
    def serve_item(self, art: Any, i: int, x: Any) -> Any:
        from bigmodel.tasks.base import InputError

        raise InputError("this is a speech recognition model; /v1/predict does not take it: POST /v1/transcribe")

    def transcribe_item(self, art: Any, i: int, x: Any) -> np.ndarray:
        """`inputs[i]` of /v1/transcribe (`{"audio_base64": ...}` or `{"array": mono samples}`) → the clip."""
        from bigmodel.tasks.audio import served_waveform

        return served_waveform(art, i, x)

    # ----------------------------------------------------------------------------------------------- export
    def export_signature(self, art: Any, data: Any, n: int) -> ExportSignature:
        """Raw waveforms (B, samples) padded with zeros and their lengths (B,) → log-probabilities (B, steps, V)
        and valid steps (B,): the front-end and the padding masks are inside the graph."""
        test = data.split("test")
        k = min(n, len(test))
        lengths = test.lengths[:k].clone()
        S = int(lengths.max())
        wave = torch.zeros((k, S), dtype=torch.float32)
        for i in range(k):
            wave[i, : int(lengths[i])] = torch.from_numpy(test.clip(i))
        batch = torch.export.Dim("batch", min=1, max=65_536)
        samples = torch.export.Dim("samples", min=2048, max=10_000_000)
        return ExportSignature(
            module=SpeechExport(art),
            inputs=(wave, lengths),
            names=["waveform", "lengths"],
            dynamic_shapes=({0: batch, 1: samples}, {0: batch}),
            shapes=[["batch", "samples"], ["batch"]],
            padded=True,
            outputs={"log_probs": ["batch", "steps", len(art.labels)], "out_lengths": ["batch"]},
        )

    def summary(self, metrics: dict[str, Any], split: str) -> str:
        m = metrics
        return f"{split} CER {m.get('cer', float('nan')):.4f}  WER {m.get('wer', float('nan')):.4f}"


register_task(SpeechRecognition())
