"""Run directories, model artifacts and the run index.

A run directory holds `recipe.yaml` (resolved), `env.json`, `metrics.jsonl`, `checkpoints/`, `summary.json` and
`model/` — the artifact: `model.safetensors`, `config.json` (rebuilds the model), `preprocess.json` (label names,
normalisation, input size) and a format version. No pickle anywhere. Every later command takes a run directory or
an artifact folder, so nothing is retyped.

The run index is a small SQLite database (`$BIGMODEL_HOME/runs.sqlite`) behind `bigmodel runs list|show|compare`.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigmodel.errors import UserError

ARTIFACT_FORMAT = 1


# -------------------------------------------------------------------------------------------------- environment
def git_sha(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: str, seed: int) -> dict[str, Any]:
    import numpy
    import torch

    import bigmodel
    from bigmodel.training.trainer import cpu_has_native_bf16

    return {
        "bigmodel": bigmodel.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "device": device,
        "git_sha": git_sha(),
        "seed": seed,
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ---------------------------------------------------------------------------------------------------- run dirs
def is_run_dir(path: Path) -> bool:
    return (path / "recipe.yaml").is_file()


def require_run_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: run directory not found")
    if not is_run_dir(path):
        raise UserError(
            f"{path}: not a bigmodel run directory (no recipe.yaml); pass the folder `bigmodel train` printed"
        )
    return path


def new_run_dir(out: str | Path | None, name: str) -> Path:
    if out is None:
        base = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        path, i = base, 1
        while path.exists():
            path, i = Path(f"{base}-{i}"), i + 1
    else:
        path = Path(out)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UserError(f"--out {path}: already exists and is not empty (use --resume {path} to continue that run)")
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------------------------------- artifacts
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
        from safetensors.torch import load_file

        from bigmodel.models import build_model

        self.folder = folder
        try:
            self.config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            pre = json.loads((folder / "preprocess.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{folder}: unreadable artifact ({e})") from None
        if self.config.get("format_version") != ARTIFACT_FORMAT:
            raise UserError(f"{folder}: artifact format {self.config.get('format_version')} is not {ARTIFACT_FORMAT}")
        self.preprocess = Preprocess(**pre)
        if self.preprocess.kind in ("text", "lm", "translation"):
            from bigmodel.data.text import load_tokenizer

            self.preprocess.tokenizer = load_tokenizer(folder / "tokenizer.json")
            if (folder / "target_tokenizer.json").is_file():
                self.preprocess.target_tokenizer = load_tokenizer(folder / "target_tokenizer.json")
        model_cfg = dict(self.config["model"])
        name = model_cfg.pop("name")
        if self.config.get("runtime") == "onnxruntime":  # static int8 (deploy/ort.py): the graph is the model
            from bigmodel.deploy.ort import OrtClassifier

            self.model = OrtClassifier(folder / "model.onnx")
        elif name == "hf":  # a Hugging Face model: its config and tokenizer in hf/, weights in model.safetensors
            from bigmodel.models.hf import load_hf_artifact

            self.model = load_hf_artifact(folder, model_cfg, self.config["num_classes"])
        else:
            self.model = build_model(name, model_cfg, self.config["input_shape"], self.config["num_classes"])
            quant = self.config.get("quantization")
            if quant:  # int8 layers in place of Linear / Embedding / LSTM (deploy/quantize.py): plain int8 tensors
                from bigmodel.deploy.quantize import quantize_model

                self.model.eval()
                quantize_model(self.model, quant.get("mode", "dynamic"))
            try:
                state = load_file(str(folder / "model.safetensors"))
            except (OSError, ValueError) as e:
                raise UserError(f"{folder / 'model.safetensors'}: unreadable weights ({e})") from None
            self.model.load_state_dict(state)
        self._finish()

    def _finish(self) -> None:
        import torch

        from bigmodel.data.loader import Normalizer
        from bigmodel.evaluation.tta import FlipTTA

        self.model.eval()
        self.inference_model = FlipTTA(self.model) if self.preprocess.tta_flip else self.model
        self.normalizer = (
            Normalizer(self.preprocess.mean, self.preprocess.std)
            if self.preprocess.kind == "image" and self.preprocess.mean is not None
            else None
        )
        self._torch = torch

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

    def encode_texts(self, texts: list[str]) -> tuple[Any, Any]:
        from bigmodel.data.text import encode

        if self.kind != "text":
            raise UserError(f"{self.folder}: this is a {self.kind} model; it does not take text")
        return encode(self.preprocess.tokenizer, texts)

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

    def _top(self, names: list[str], probs: Any, top_k: int, key: str) -> list[dict[str, Any]]:
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
        """Images, or sequence files (.ts, .npy, .npz, .csv) for a sequence model."""
        if self.kind == "sequence":
            from bigmodel.data.sequences import read_sequence_file

            seqs, names = [], []
            for f in files:
                s, n = read_sequence_file(Path(f), int(self.preprocess.input_shape["features"]))
                seqs += s
                names += n
            return self._top(names, self.predict_sequences_proba(seqs), top_k, "file")
        if self.kind == "text":
            raise UserError(f"{self.folder}: a text model takes strings (or --lines FILE), not files")
        return self._top([str(f) for f in files], self.predict_proba(self.load_images(files)), top_k, "file")

    def predict_texts(self, texts: list[str], top_k: int = 1) -> list[dict[str, Any]]:
        return self._top(texts, self.predict_texts_proba(texts), top_k, "text")

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
        from bigmodel.models.gpt import stream

        if self.kind != "lm":
            raise UserError(f"{self.folder}: this is a {self.kind} model; `generate` needs a language model run")
        if temperature < 0 or max_new_tokens < 0:
            raise UserError("temperature and max_new_tokens must be ≥ 0")
        if top_p is not None and not 0 < top_p <= 1:
            raise UserError(f"top_p {top_p}: expected a probability in (0, 1]")
        if repetition_penalty <= 0:
            raise UserError(f"repetition_penalty {repetition_penalty}: expected a positive number")
        tok = self.preprocess.tokenizer
        encode_prompt = getattr(self.model, "prompt_ids", None)  # pretrained models: chat template, BOS
        if encode_prompt is not None:
            ids = encode_prompt(prompt)
        else:
            ids = tok.encode(prompt or "\n", add_special_tokens=False).ids or [1]
        stop_ids = getattr(self.model, "stop_token_ids", lambda: None)()
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
        from bigmodel.models.seq2seq import translate_ids

        if self.kind != "translation":
            raise UserError(f"{self.folder}: this is a {self.kind} model; `translate` needs a translation run")
        src, lengths = encode_sources(self.preprocess.tokenizer, texts, int(self.preprocess.input_shape["max_length"]))
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


def is_recipe_file(path: str | Path) -> bool:
    """A recipe given where a run is expected (a pretrained model used as it is)."""
    p = Path(path)
    return p.suffix in (".yaml", ".yml") and p.is_file()


def load_artifact(path: str | Path) -> Artifact:
    """Rebuild a trained model from a run directory or its `model/` folder. A recipe file of a pretrained language
    model (`model.name: hf`) gives that model as it is, untrained (generate, serve and evaluate it directly)."""
    if is_recipe_file(path):
        from bigmodel.api import pretrained_artifact

        return pretrained_artifact(path)
    return Artifact(artifact_dir(path))


# ---------------------------------------------------------------------------------------------------- run index
def index_path() -> Path:
    from bigmodel.data.download import bigmodel_home

    return bigmodel_home() / "runs.sqlite"


class RunIndex:
    """SQLite (stdlib) list of runs and their final metrics. Only rank 0 writes."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or index_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS runs (run_dir TEXT PRIMARY KEY, name TEXT, task TEXT, model TEXT, data TEXT,"
            " seed INTEGER, status TEXT, created TEXT, updated TEXT, train_time_s REAL, metrics TEXT)"
        )
        self.db.commit()

    def upsert(self, run_dir: Path, **fields: Any) -> None:
        key = str(Path(run_dir).resolve())
        now = time.strftime("%Y-%m-%d %H:%M:%S")
        if "metrics" in fields and not isinstance(fields["metrics"], str):
            fields["metrics"] = json.dumps(fields["metrics"])
        fields["updated"] = now
        exists = self.db.execute("SELECT 1 FROM runs WHERE run_dir = ?", (key,)).fetchone()
        if exists:
            sets = ", ".join(f"{k} = ?" for k in fields)
            self.db.execute(f"UPDATE runs SET {sets} WHERE run_dir = ?", (*fields.values(), key))  # noqa: S608
        else:
            fields.setdefault("created", now)
            cols = ", ".join(["run_dir", *fields])
            marks = ", ".join("?" * (len(fields) + 1))
            self.db.execute(f"INSERT INTO runs ({cols}) VALUES ({marks})", (key, *fields.values()))  # noqa: S608
        self.db.commit()

    def list(self) -> list[dict[str, Any]]:
        self.db.row_factory = sqlite3.Row
        rows = self.db.execute("SELECT * FROM runs ORDER BY created").fetchall()
        return [self._row(r) for r in rows]

    def get(self, ref: str) -> dict[str, Any]:
        """A run by its directory (any spelling of the path) or by a unique name prefix."""
        runs = self.list()
        p = str(Path(ref).resolve())
        for r in runs:
            if r["run_dir"] == p:
                return r
        matches = [r for r in runs if Path(r["run_dir"]).name.startswith(ref) or (r["name"] or "") == ref]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise UserError(f"run {ref!r} not found in the run index {self.path} (`bigmodel runs list` shows them)")
        raise UserError(f"run {ref!r} is ambiguous: {', '.join(Path(r['run_dir']).name for r in matches)}")

    @staticmethod
    def _row(r: sqlite3.Row) -> dict[str, Any]:
        d = dict(r)
        d["metrics"] = json.loads(d["metrics"]) if d.get("metrics") else {}
        return d
