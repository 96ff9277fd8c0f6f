"""Transcribed clips on disk: `bigmodel data prepare` for a speech-recognition recipe, read back a batch at a time.

A prepared folder holds (format `bigmodel-speech/1`), for each split the source gives or carves (train / val / test):
- the clips, decoded and resampled to the recipe's rate, as in an audio-classification folder (`data/audioshards.py`:
  `<split>-samples.bin` raw float32, `<split>-offsets.npy`, `<split>-power.npy`, `<split>-names.json`);
- `<split>-texts.json`: the normalised transcripts;
and `index.json`: the format, the alphabet (fitted on the training transcripts), the sample rate, the model's input
description with the log-mel normalisation statistics over the training clips (computed at prepare time, as training
from the source computes them), what prepare applied to the training split (`max_seconds`, `limit_train`) and each
split's clip and sample counts.

`data.source: shards` with `data.path: FOLDER` trains on it. Streams that fit `data.in_memory_limit_mb` together are
read into memory; larger ones stay on disk as `DiskSamples`, and each batch reads its clips (one `pread` each): a run
on the folder trains as the source recipe does, bit for bit, and resumes exactly. A recipe with `model.lm` fits its
character LM on the stored training transcripts. Preparing decodes `CHUNK` clips at a time (`write_speech_shards`):
its memory is one chunk, not the data set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bigmodel.data.audioshards import StreamWriter, check_front_end, read_stream, read_streams
from bigmodel.errors import UserError

FORMAT = "bigmodel-speech/1"


def applied(cfg: Any) -> dict[str, Any]:
    """What prepare did to the training split beyond decoding (recorded, so training on the folder does not do it
    again, and a recipe asking for something else is told)."""
    return {"max_seconds": cfg.max_seconds, "limit_train": cfg.limit_train}


CHUNK = 256  # clips decoded (and held) at a time


def write_speech_shards(recipe: Any, out: Path) -> dict[str, Any]:
    """Decode a speech-recognition recipe's splits (at its rate, with transcripts) into `out` (a temporary folder
    renamed when complete), `CHUNK` clips at a time. The training split takes two passes, as `load_speech` decides
    which clips it keeps only once they are decoded: the clips no longer than `data.max_seconds` go to a scratch
    stream, then those `data.limit_train` keeps are copied from it into the split's stream, each added to the
    normalisation statistics on the way. Memory is one chunk, not the data set. Returns the index."""
    import shutil

    from bigmodel.data.audio import read_many
    from bigmodel.data.shards import prepared_folder
    from bigmodel.data.speech import SpeechSplit, fit_alphabet, limit_train_rows, speech_items
    from bigmodel.tasks.speech import FrontendStats

    cfg = recipe.data
    rate = cfg.sample_rate
    items = speech_items(cfg, recipe.seed)
    features = cfg.features.spec()
    features["mean"] = features["std"] = None
    shape = {"kind": "speech", "sample_rate": rate, "features": features}

    def decoded(rows: list[tuple[Path, str, str]], train: bool) -> Any:  # SpeechSplit per chunk of rows
        for a in range(0, len(rows), CHUNK):
            chunk = rows[a : a + CHUNK]
            clips = read_many([p for p, _, _ in chunk], rate)
            keep = [i for i, c in enumerate(clips) if not train or len(c) <= cfg.max_seconds * rate]
            yield SpeechSplit.from_clips(
                [clips[i] for i in keep], [chunk[i][1] for i in keep], [str(chunk[i][0]) for i in keep]
            )

    def save_texts(tmp: Path, name: str, texts: list[str]) -> str:
        (tmp / f"{name}-texts.json").write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
        return f"{name}-texts.json"

    with prepared_folder(Path(out)) as tmp:
        splits: dict[str, Any] = {}
        scratch = tmp / "scratch"
        scratch.mkdir()
        writer, texts = StreamWriter(scratch, "train"), []
        for part in decoded(items.get("train") or [], train=True):
            writer.add(part)
            texts += part.texts
        entry = writer.close()
        if not texts:
            raise UserError(f"data.max_seconds {cfg.max_seconds:g}: no training clip is that short")
        samples, offsets, power, names = read_stream(scratch, "train", entry)
        keep = limit_train_rows(cfg, recipe.seed, len(texts))
        stats = FrontendStats(shape) if cfg.features.normalize else None
        writer = StreamWriter(tmp, "train")
        for a in range(0, len(keep), CHUNK):
            ids = keep[a : a + CHUNK]
            clips = [samples[int(offsets[i]) : int(offsets[i + 1])].numpy() for i in ids]
            part = SpeechSplit.from_clips(clips, [texts[i] for i in ids], [names[i] for i in ids])
            part.power = power[ids]  # each clip's own sum: what the source run computes for it
            writer.add(part)
            if stats is not None:
                for clip in clips:
                    stats.add(clip)
        kept = [texts[i] for i in keep]
        splits["train"] = {**writer.close(), "texts": save_texts(tmp, "train", kept)}
        del samples
        shutil.rmtree(scratch)
        for name in ("val", "test"):
            rows = items.get(name) or []
            if not rows:
                continue
            writer, texts = StreamWriter(tmp, name), []
            for part in decoded(rows, train=False):
                writer.add(part)
                texts += part.texts
            splits[name] = {**writer.close(), "texts": save_texts(tmp, name, texts)}
        if stats is not None:
            features["mean"], features["std"] = stats.result()
        index = {
            "format": FORMAT,
            "labels": fit_alphabet(kept),
            "sample_rate": int(rate),
            "input_shape": shape,
            "applied": applied(cfg),
            "splits": splits,
        }
        (tmp / "index.json").write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return index


def load_speech_shards(recipe: Any, pre: Any | None) -> tuple[Any, Any]:
    """`data.source: shards` for a speech recogniser → (SpeechDataset, Preprocess): the folder's clips, in memory or
    on disk by `data.in_memory_limit_mb`, and its input description and alphabet (or `pre`'s, which must be at the
    folder's rate). The character LM, when the recipe has one, is the caller's to fit (`SpeechRecognition.prepare`)."""
    from bigmodel.data.shards import read_prepared_index
    from bigmodel.data.speech import SpeechDataset, SpeechSplit
    from bigmodel.runs import Preprocess

    cfg = recipe.data
    root = Path(cfg.path)
    meta = read_prepared_index(root, FORMAT)
    rate, shape = int(meta["sample_rate"]), meta["input_shape"]
    done = meta.get("applied") or {}
    for key in ("max_seconds", "limit_train"):
        asked = getattr(cfg, key)
        # the recipe's default max_seconds is taken as "what the folder holds"; an explicit other value is refused
        if asked is not None and asked != done.get(key) and key in cfg.model_fields_set:
            raise UserError(
                f"data.{key} {asked}: {root} was prepared with {done.get(key)} (prepare it again with this setting, "
                "or drop it from the recipe)"
            )
    if pre is None:
        check_front_end(cfg, shape, rate, root)
        pre = Preprocess(list(meta["labels"]), None, None, dict(shape), kind="speech")
    elif int(pre.input_shape["sample_rate"]) != rate:
        raise UserError(f"{root}: audio at {rate} Hz, the model was trained at {pre.input_shape['sample_rate']} Hz")

    def read_texts(name: str, entry: dict[str, Any], count: int) -> list[str]:
        try:
            texts = json.loads((root / entry["texts"]).read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{root}: split {name!r}: cannot read its transcripts ({e})") from None
        if not isinstance(texts, list) or len(texts) != count:
            raise UserError(f"{root}: split {name!r}: transcripts and clips disagree (prepare again)")
        return texts

    streams, in_memory = read_streams(root, meta, cfg.in_memory_limit_mb, read_texts)
    splits = {
        name: SpeechSplit(s.samples, s.starts, s.lengths, s.extra, s.names, s.power)  # type: ignore[arg-type]
        for name, s in streams.items()
    }
    data = SpeechDataset(splits["train"], splits.get("val"), splits.get("test"), list(pre.labels), rate)
    data.on_disk = not in_memory
    return data, pre
