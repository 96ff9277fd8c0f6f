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
character LM on the stored training transcripts. Preparing decodes the whole data set into memory once (as a run on
the source does); training on the folder does not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bigmodel.data.audioshards import SPLITS, check_front_end, read_streams, write_stream
from bigmodel.errors import UserError

FORMAT = "bigmodel-speech/1"


def applied(cfg: Any) -> dict[str, Any]:
    """What prepare did to the training split beyond decoding (recorded, so training on the folder does not do it
    again, and a recipe asking for something else is told)."""
    return {"max_seconds": cfg.max_seconds, "limit_train": cfg.limit_train}


def write_speech_shards(data: Any, pre: Any, recipe: Any, out: Path) -> dict[str, Any]:
    """Write a `SpeechDataset`'s splits (decoded, at the recipe's rate, with transcripts) into `out` (a temporary
    folder renamed when complete); `pre`: its input description with the normalisation statistics."""
    from bigmodel.data.shards import prepared_folder

    with prepared_folder(Path(out)) as tmp:
        splits: dict[str, Any] = {}
        for name in SPLITS:
            split = getattr(data, name)
            if split is None:
                continue
            (tmp / f"{name}-texts.json").write_text(json.dumps(list(split.texts), ensure_ascii=False), encoding="utf-8")
            splits[name] = {**write_stream(tmp, name, split), "texts": f"{name}-texts.json"}
        index = {
            "format": FORMAT,
            "labels": list(data.labels),
            "sample_rate": int(data.sample_rate),
            "input_shape": dict(pre.input_shape),
            "applied": applied(recipe.data),
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
