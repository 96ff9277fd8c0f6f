"""The model artifact: a format, not a prediction API.

`model/` holds `model.safetensors` (or a runtime's own file, e.g. `model.onnx`), `config.json` (task, model name and
options, input shape, format version; it rebuilds the model), `preprocess.json` (label names, normalisation, input
description, kind), for token models `tokenizer.json` (+ `target_tokenizer.json`) and, for speech recognition with
a language model, `lm.json` (n-gram counts). No pickle anywhere.

Loading rebuilds the model from the registry and its weights; artifacts written by other runtimes (ONNX Runtime
graphs, int8 kernels) are loaded by the runtime named in `config.json`, which registers itself
(`register_runtime`, or the `bigmodel.runtimes` entry-point group in pyproject.toml), so this core
module never imports `deploy/`. What an input is and how outputs become predictions is the task spec's
(`bigmodel.tasks`); `Artifact` keeps the inference helpers the specs share.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigmodel.errors import UserError
from bigmodel.rundir import is_recipe_file, is_run_dir

ARTIFACT_FORMAT = 1

# ------------------------------------------------------------------------------------------------------ runtimes
RuntimeLoader = Callable[[Path, dict[str, Any], Callable[[], Any]], Any]
"""`load(folder, config, build)` → the model: `build()` gives the registry's fp32 module (without weights)."""
_RUNTIMES: dict[str, RuntimeLoader] = {}


def register_runtime(name: str, loader: RuntimeLoader) -> None:
    """Register how artifacts whose `config.json` names `runtime: NAME` are loaded."""
    _RUNTIMES[name] = loader


def runtime_name(config: dict[str, Any]) -> str | None:
    """The runtime an artifact needs (artifacts of format 1 name int8 weights by their `quantization` block only)."""
    return config.get("runtime") or ("int8" if config.get("quantization") else None)


def load_weights(model: Any, folder: Path) -> None:
    """Load `folder/model.safetensors` into `model` (strict: every key must match)."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(folder / "model.safetensors"))
    except (OSError, ValueError) as e:
        raise UserError(f"{folder / 'model.safetensors'}: unreadable weights ({e})") from None
    model.load_state_dict(state)


def get_runtime(name: str) -> RuntimeLoader:
    if name not in _RUNTIMES:
        from importlib.metadata import entry_points

        for ep in entry_points(group="bigmodel.runtimes"):
            if ep.name == name:
                _RUNTIMES[name] = ep.load()
                break
    if name not in _RUNTIMES:
        raise UserError(f"this artifact needs the {name!r} runtime; install it: pip install 'bigmodel[deploy]'")
    return _RUNTIMES[name]


@dataclass
class Preprocess:
    """Everything between raw input and the model, saved with it: label names, input description, normalisation
    (images: per channel; sequences: per feature, or none) and, for text, the tokenizer (`tokenizer.json`)."""

    labels: list[str]
    mean: list[float] | None
    std: list[float] | None
    input_shape: Any  # [C, H, W] for images; {"kind": "sequence" | "text", ...} otherwise
    tta_flip: bool = False  # average the logits of each image and its mirror image
    kind: str = "image"  # image | sequence | text | lm | translation
    tokenizer: Any = field(default=None, repr=False, compare=False)  # a `tokenizers.Tokenizer` (text)
    target_tokenizer: Any = field(default=None, repr=False, compare=False)  # translation with separate vocabularies
    lm: Any = field(default=None, repr=False, compare=False)  # speech: a `CharNgramLM` for beam search (`lm.json`)

    def to_dict(self) -> dict[str, Any]:
        return {
            "labels": self.labels,
            "mean": self.mean,
            "std": self.std,
            "input_shape": self.input_shape,
            "tta_flip": self.tta_flip,
            "kind": self.kind,
        }


def save_artifact(
    folder: Path,
    model: Any,
    task: str,
    model_cfg: dict[str, Any],
    preprocess: Preprocess,
    extra: dict[str, Any] | None = None,
    files: dict[str, Path] | None = None,
) -> Path:
    """Write the model artifact into `folder` atomically (a temporary folder renamed into place). `files` are copied
    in as well (e.g. `model.onnx` for an ONNX Runtime artifact, whose `model` then writes no safetensors)."""
    from safetensors.torch import save_file

    import bigmodel

    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, src in (files or {}).items():
        shutil.copy2(src, tmp / name)
    if model is not None:
        from bigmodel.models.base import ModelBase

        # A model may define its artifact weights (merged adapters, tied tensors once) and extra files (hf/).
        weights = model.artifact_state_dict() if isinstance(model, ModelBase) else model.state_dict()
        state = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if isinstance(model, ModelBase):
            model.save_artifact_files(tmp)
    config = {
        "format_version": ARTIFACT_FORMAT,
        "bigmodel_version": bigmodel.__version__,
        "task": task,
        "model": model_cfg,
        "input_shape": preprocess.input_shape,
        "num_classes": len(preprocess.labels),
        **(extra or {}),
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (tmp / "preprocess.json").write_text(json.dumps(preprocess.to_dict(), indent=2) + "\n", encoding="utf-8")
    if preprocess.tokenizer is not None:
        (tmp / "tokenizer.json").write_text(preprocess.tokenizer.to_str(), encoding="utf-8")
    if preprocess.target_tokenizer is not None:
        (tmp / "target_tokenizer.json").write_text(preprocess.target_tokenizer.to_str(), encoding="utf-8")
    if preprocess.lm is not None:
        preprocess.lm.save(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.rename(tmp, folder)
    return folder


def artifact_dir(path: str | Path) -> Path:
    """Accept a run directory or the artifact folder itself."""
    path = Path(path)
    if (path / "model" / "config.json").is_file():
        return path / "model"
    if (path / "config.json").is_file() and any((path / f).is_file() for f in ("model.safetensors", "model.onnx")):
        return path
    if not path.exists():
        raise UserError(f"{path}: not found")
    if is_run_dir(path):
        raise UserError(f"{path}: this run has no model/ yet (did training finish? `bigmodel train --resume {path}`)")
    raise UserError(f"{path}: not a bigmodel run directory or model artifact (no model/config.json)")


class Artifact:
    """A model rebuilt from its artifact folder alone, ready to predict (CPU, eval mode)."""

    def __init__(self, folder: Path) -> None:
        from bigmodel.models import build_model
        from bigmodel.registry import get_model

        self.folder = folder
        try:
            self.config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            pre = json.loads((folder / "preprocess.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{folder}: unreadable artifact ({e})") from None
        if self.config.get("format_version") != ARTIFACT_FORMAT:
            raise UserError(f"{folder}: artifact format {self.config.get('format_version')} is not {ARTIFACT_FORMAT}")
        self.preprocess = Preprocess(**pre)
        if (folder / "tokenizer.json").is_file():  # text, language models, translation
            from bigmodel.data.text import load_tokenizer

            self.preprocess.tokenizer = load_tokenizer(folder / "tokenizer.json")
            if (folder / "target_tokenizer.json").is_file():
                self.preprocess.target_tokenizer = load_tokenizer(folder / "target_tokenizer.json")
        if (folder / "lm.json").is_file():  # speech recognition with a character LM
            from bigmodel.models.charlm import CharNgramLM

            self.preprocess.lm = CharNgramLM.load(folder / "lm.json")
        model_cfg = dict(self.config["model"])
        name = model_cfg.pop("name")
        entry = get_model(name)

        def build() -> Any:
            model = build_model(name, model_cfg, self.config["input_shape"], self.config["num_classes"])
            fix = self.config.get("model_fix")
            if fix is not None:  # trained with DP-SGD: the same layer replacements
                from bigmodel.privacy.dp import FIXES, fix_model

                if fix not in FIXES:
                    raise UserError(f"{folder}: model_fix {fix!r} is not one of {FIXES} (written by another bigmodel)")
                model = fix_model(model)
            return model

        runtime = runtime_name(self.config)
        if runtime is not None:  # e.g. an ONNX Runtime graph or int8 kernels (registered by deploy/)
            self.model = get_runtime(runtime)(folder, self.config, build)
        elif entry.load_artifact is not None:  # a model that stores more than weights (hf: its config in hf/)
            self.model = entry.load_artifact(folder, model_cfg, self.config["num_classes"])
        else:
            self.model = build()
            load_weights(self.model, folder)
        self._finish()

    def _finish(self) -> None:
        import torch

        from bigmodel.evaluation.tta import FlipTTA
        from bigmodel.tasks import get_task

        self.model.eval()
        self.inference_model = FlipTTA(self.model) if self.preprocess.tta_flip else self.model
        self.normalizer: Any = None
        self._torch = torch
        self.spec = get_task(self.config["task"])
        self.spec.prepare_artifact(self)  # e.g. images: the normaliser of raw pixels

    @classmethod
    def from_model(cls, model: Any, preprocess: Preprocess, config: dict[str, Any], folder: Path) -> Artifact:
        """An artifact held in memory (a pretrained model used as it is, straight from its recipe)."""
        art = cls.__new__(cls)
        art.folder, art.config, art.preprocess, art.model = folder, config, preprocess, model
        art._finish()
        return art

    @property
    def kind(self) -> str:
        return self.preprocess.kind

    def can(self, capability: Any) -> bool:
        """Whether the artifact's model declares `capability` (`bigmodel.models.base.Capability`)."""
        from bigmodel.registry import get_model

        return get_model(self.config["model"]["name"]).can(capability)

    @property
    def labels(self) -> list[str]:
        return self.preprocess.labels

    def predict_proba(self, images: Any, batch_size: int = 256) -> Any:
        """Class probabilities for uint8 images (N, C, H, W) already at the model's input size."""
        torch = self._torch
        assert self.normalizer is not None, "predict_proba takes images; use predict_texts / predict_sequences"
        outs = []
        with torch.inference_mode():
            for i in range(0, len(images), batch_size):
                logits = self.inference_model(self.normalizer(images[i : i + batch_size])).float()
                outs.append(logits.softmax(dim=1))
        return torch.cat(outs) if outs else torch.zeros((0, len(self.labels)))

    def load_images(self, files: list[str | Path]) -> Any:
        import numpy as np

        from bigmodel.data.images import read_image

        C, H, W = self.preprocess.input_shape
        arrays = [read_image(f, C, (H, W)) for f in files]
        return (
            self._torch.from_numpy(np.stack(arrays))
            if arrays
            else self._torch.zeros((0, C, H, W), dtype=self._torch.uint8)
        )

    def _proba_padded(self, x: Any, lengths: Any, batch_size: int = 256) -> Any:
        """Probabilities for padded sequences / token ids with lengths; batches sorted by length (less padding)."""
        torch = self._torch
        order = torch.argsort(lengths, descending=True)
        probs = torch.zeros((len(lengths), len(self.labels)))
        with torch.inference_mode():
            for i in range(0, len(order), batch_size):
                idx = order[i : i + batch_size]
                T = int(lengths[idx].max())
                logits = self.model(x[idx][:, :T], lengths[idx]).float()
                probs[idx] = logits.softmax(dim=1)
        return probs

    def mask_texts(self, texts: list[str]) -> list[str]:
        """`texts` with the PII the model was trained without masked the same way (`data.mask_pii`), else as given."""
        spec = self.config.get("pii_mask")
        if not spec:
            return texts
        from bigmodel.privacy.pii import masker

        return masker(tuple(spec["types"]), spec["style"], spec.get("model")).mask_all(texts)[0]

    def encode_texts(self, texts: list[str]) -> tuple[Any, Any]:
        from bigmodel.data.text import encode

        if self.preprocess.tokenizer is None:
            raise UserError(f"{self.folder}: this is a {self.kind} model; it does not take text")
        return encode(self.preprocess.tokenizer, self.mask_texts(texts))

    def predict_texts_proba(self, texts: list[str], batch_size: int = 256) -> Any:
        x, lengths = self.encode_texts(texts)
        return self._proba_padded(x, lengths, batch_size)

    def prepare_sequences(self, seqs: list[Any]) -> tuple[Any, Any]:
        """(T, F) float arrays → standardised, zero-padded (N, T, F) and lengths, as in training."""
        from bigmodel.data.sequences import SeqSplit, pad_sequences, standardize

        x, lengths = pad_sequences(seqs)
        if self.preprocess.mean is not None and self.preprocess.std is not None:
            split = standardize(SeqSplit(x, lengths, lengths), self.preprocess.mean, self.preprocess.std)
            x = split.x
        return x, lengths

    def predict_sequences_proba(self, seqs: list[Any], batch_size: int = 256) -> Any:
        x, lengths = self.prepare_sequences(seqs)
        return self._proba_padded(x, lengths, batch_size)

    def top_k(self, names: list[str], probs: Any, top_k: int, key: str) -> list[dict[str, Any]]:
        """`[{key: name, label, score, top_k: [{label, score}, ...]}]` for (N, K) probabilities."""
        k = max(1, min(top_k, len(self.labels)))
        results = []
        for name, p in zip(names, probs, strict=True):
            scores, idx = p.topk(k)
            top = [
                {"label": self.labels[i], "score": round(s, 6)}
                for s, i in zip(scores.tolist(), idx.tolist(), strict=True)
            ]
            results.append({key: name, "label": top[0]["label"], "score": top[0]["score"], "top_k": top})
        return results

    def predict_files(self, files: list[str | Path], top_k: int = 1) -> list[dict[str, Any]]:
        """Top-k labels for input files: images, sequence files (.ts, .npy, .npz, .csv), tables (CSV, Parquet)."""
        return self.spec.predict_files(self, [Path(f) for f in files], top_k)

    def predict_texts(self, texts: list[str], top_k: int = 1) -> list[dict[str, Any]]:
        out = self.top_k(texts, self.predict_texts_proba(texts), top_k, "text")
        if self.config.get("pii_mask"):  # what the model read
            for r, masked in zip(out, self.mask_texts(texts), strict=True):
                r["masked_text"] = masked
        return out

    # ------------------------------------------------------------------------------------------ generative models
    def stream_text(
        self,
        prompt: str,
        max_new_tokens: int = 200,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Continue `prompt` with a language model, yielding text as it is generated (the prompt not included).
        Byte-level pieces that do not yet form a whole character are held back; a `stop` string ends the text
        (it is not included)."""
        from bigmodel.models.base import Capability
        from bigmodel.models.gpt import stream

        if not self.can(Capability.GENERATES):
            raise UserError(f"{self.folder}: this is a {self.kind} model; `generate` needs a language model run")
        if temperature < 0 or max_new_tokens < 0:
            raise UserError("temperature and max_new_tokens must be ≥ 0")
        if top_p is not None and not 0 < top_p <= 1:
            raise UserError(f"top_p {top_p}: expected a probability in (0, 1]")
        if repetition_penalty <= 0:
            raise UserError(f"repetition_penalty {repetition_penalty}: expected a positive number")
        tok = self.preprocess.tokenizer
        from bigmodel.models.base import ModelBase

        own = isinstance(self.model, ModelBase)
        ids = self.prompt_ids(prompt)
        stop_ids = self.model.stop_token_ids() if own else None
        torch = self._torch
        new: list[int] = []
        emitted = ""
        stops = [s for s in (stop or []) if s]
        for nxt in stream(
            self.model,
            torch.tensor([ids]),
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            stop_ids=stop_ids,
            seed=seed,
        ):
            if stop_ids and int(nxt[0, 0]) in stop_ids:
                break
            new.append(int(nxt[0, 0]))
            text = tok.decode(new, skip_special_tokens=True)
            hit = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if hit >= 0:
                if hit > len(emitted):
                    yield text[len(emitted) : hit]
                return
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its other bytes
                continue
            hold = max((len(s) - 1 for s in stops), default=0)  # a stop string may be forming at the end
            safe = len(text) - hold
            if safe > len(emitted):
                yield text[len(emitted) : safe]
                emitted = text[:safe]
        text = tok.decode(new, skip_special_tokens=True)
        if len(text) > len(emitted):
            yield text[len(emitted) :]

    def prompt_ids(self, prompt: str) -> list[int]:
        """The token ids a language model continues for `prompt` (a pretrained chat model: its template, BOS)."""
        from bigmodel.models.base import ModelBase

        prompt = self.mask_texts([prompt])[0]
        ids = self.model.prompt_ids(prompt) if isinstance(self.model, ModelBase) else None
        if ids is None:
            ids = self.preprocess.tokenizer.encode(prompt or "\n", add_special_tokens=False).ids or [1]
        return ids

    def generate_text(self, prompt: str, max_new_tokens: int = 200, **kw: Any) -> str:
        return "".join(self.stream_text(prompt, max_new_tokens, **kw))

    def translate(
        self,
        texts: list[str],
        *,
        beam_size: int | None = None,
        max_new_tokens: int | None = None,
        length_penalty: float | None = None,
    ) -> list[str]:
        """Translations of `texts` by a translation model (beam search; `beam_size` 1 = greedy)."""
        from bigmodel.data.parallel import encode_sources
        from bigmodel.models.base import Capability
        from bigmodel.models.seq2seq import translate_ids

        if not self.can(Capability.TRANSLATES):
            raise UserError(f"{self.folder}: this is a {self.kind} model; `translate` needs a translation run")
        src, lengths = encode_sources(
            self.preprocess.tokenizer, self.mask_texts(texts), int(self.preprocess.input_shape["max_length"])
        )
        ids = translate_ids(
            self.model,
            src,
            lengths,
            beam_size=beam_size or self.model.cfg.beam_size,
            max_new_tokens=max_new_tokens,
            length_penalty=self.model.cfg.length_penalty if length_penalty is None else length_penalty,
        )
        tgt = self.preprocess.target_tokenizer or self.preprocess.tokenizer
        return [t.strip() for t in tgt.decode_batch(ids, skip_special_tokens=True)]

    def transcribe(self, audio: list[Any], *, beam_size: int | None = None) -> list[str]:
        """Transcripts of a speech recognition model for `audio`: file paths (WAV/FLAC/Ogg/MP3, any rate, any
        channels) or mono float arrays at the model's rate. `beam_size` 1 = greedy; default: the model's. Beam search
        uses the model's character LM when it has one (`lm.json`)."""
        import numpy as np

        from bigmodel.data.audio import read_audio
        from bigmodel.models.base import Capability
        from bigmodel.tasks import get_task

        if not self.can(Capability.TRANSCRIBES):
            raise UserError(f"{self.folder}: this is a {self.kind} model; `transcribe` needs a speech recognition run")
        rate = int(self.preprocess.input_shape["sample_rate"])
        clips = [
            np.asarray(a, dtype=np.float32) if not isinstance(a, str | Path) else read_audio(a, rate) for a in audio
        ]
        return get_task(self.config["task"]).transcribe(self, clips, beam_size)


def load_artifact(path: str | Path, key: bytes | str | None = None) -> Artifact:
    """Rebuild a trained model from a run directory or its `model/` folder. A recipe file of a pretrained language
    model (`model.name: hf`) gives that model as it is, untrained (generate, serve and evaluate it directly). An
    encrypted model (`bigmodel export --encrypt`) is decrypted with `key` (else the key file or BIGMODEL_KEY)."""
    from bigmodel.privacy.encrypt import decrypted, is_encrypted

    if is_encrypted(path):
        with decrypted(path, key) as folder:
            art = Artifact(folder / "model")
        art.folder = Path(path)
        return art
    if is_recipe_file(path):
        from bigmodel.api import pretrained_artifact

        return pretrained_artifact(path)
    return Artifact(artifact_dir(path))
