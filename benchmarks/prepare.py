"""Memory of `bigmodel data prepare` against reading the same data whole, on generated data of two sizes.

    python benchmarks/prepare.py [--kinds lm text pairs audio speech] [--lm-mb 40] [--text-mb 40] [--pairs-mb 20]
                                 [--audio-clips 1500] [--speech-clips 2000] [--growth 4] [--json]

For each kind, two data sets are generated in a temporary folder, the second `--growth` times the first:
- `lm`: a folder of 10 MB text documents of random words (the last one shorter), `--lm-mb` MB in all, for a
  `language_modeling` recipe with a char tokenizer;
- `text`: a CSV of labelled texts of 20-120 random words (3 classes), `--text-mb` MB, for a `text_classification`
  recipe with a word tokenizer;
- `pairs`: a TSV of sentence pairs (4-30 random words, the target each word reversed), `--pairs-mb` MB, for a
  `translation` recipe with a byte-level BPE tokenizer;
- `audio`: 1-second 16 kHz WAV clips of four tones plus noise, `--audio-clips` of them (`audio_folder`, 4 classes);
- `speech`: 16 kHz WAV "words" of 6-13 tones (2.5-4.5 s) with their letters as transcripts (`audio_csv`).
Each is then read twice, each time in its own process, which reports its own peak resident memory (getrusage):
- `prepare`: `bigmodel.api.prepare_shards`, what `bigmodel data prepare` runs (documents one at a time, labelled
  texts a row at a time, clips a chunk at a time);
- `whole`: `bigmodel.api.prepare_data`, what a training run on the source does first (the baseline, in this job).
`<kind>_prepare_vs_whole_rss_ratio`: prepare's peak / the whole read's, at the larger size;
`<kind>_prepare_growth_ratio`: prepare's peak at the larger size / at the smaller (1.0: memory does not grow with the
data); `<kind>_whole_growth_ratio`: the same for the whole read.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit_json, environment, print_env, print_table  # noqa: E402

RATE = 16000
LETTERS = "abcdefgh"

MEASURE = """
import json, resource, sys, time
from bigmodel import api
from bigmodel.config import load_recipe
recipe = load_recipe(sys.argv[2], [])
t0 = time.perf_counter()
if sys.argv[1] == "prepare":
    api.prepare_shards(recipe, sys.argv[3])
else:
    api.prepare_data(recipe)
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_mb": peak_mb}))
"""


def vocabulary(rng: Any, n: int) -> list[str]:
    """`n` random lower-case "words" of 2-9 letters, the generated data's vocabulary."""
    return ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(2, 10))) for _ in range(n)]


def make_lm(root: Path, mb: float, seed: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    words = vocabulary(rng, 5000)
    root.mkdir(parents=True)
    left, i = int(mb * 1e6), 0
    while left > 0:
        lines, size = [], 0
        while size < min(left, 10_000_000):
            line = " ".join(words[j] for j in rng.integers(0, len(words), size=rng.integers(3, 15)))
            lines.append(line)
            size += len(line) + 1
        (root / f"doc{i:03d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        left, i = left - size, i + 1
    return {
        "name": "prepare_lm",
        "task": "language_modeling",
        "data": {"source": "text", "path": str(root), "context_length": 64, "tokenizer": {"kind": "char"}},
        "model": {"name": "gpt", "dim": 16, "num_heads": 2, "num_layers": 1},
        "train": {"epochs": 1, "batch_size": 8},
    }


def make_text(root: Path, mb: float, seed: int) -> dict[str, Any]:
    import csv

    import numpy as np

    rng = np.random.default_rng(seed)
    words = vocabulary(rng, 5000)
    root.mkdir(parents=True)
    left = int(mb * 1e6)
    with (root / "texts.csv").open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["text", "label"])
        while left > 0:
            text = " ".join(words[j] for j in rng.integers(0, len(words), size=rng.integers(20, 120)))
            out.writerow([text, "abc"[len(text) % 3]])
            left -= len(text) + 3
    return {
        "name": "prepare_text",
        "task": "text_classification",
        "data": {
            "source": "csv",
            "path": str(root / "texts.csv"),
            "tokenizer": {"kind": "word", "vocab_size": 4000, "max_length": 128},
        },
        "model": {"name": "transformer-classifier", "dim": 16, "num_heads": 2, "num_layers": 1, "ff_dim": 32},
        "train": {"epochs": 1, "batch_size": 32},
    }


def make_pairs(root: Path, mb: float, seed: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    words = vocabulary(rng, 3000)
    root.mkdir(parents=True)
    left = int(mb * 1e6)
    with (root / "pairs.tsv").open("w", encoding="utf-8") as f:
        while left > 0:
            src = [words[j] for j in rng.integers(0, len(words), size=rng.integers(4, 30))]
            line = " ".join(src) + "\t" + " ".join(w[::-1] for w in src) + "\n"
            f.write(line)
            left -= len(line)
    return {
        "name": "prepare_pairs",
        "task": "translation",
        "data": {
            "source": "tsv",
            "path": str(root / "pairs.tsv"),
            "tokenizer": {"kind": "bpe", "vocab_size": 2000, "max_length": 96},
        },
        "model": {"name": "transformer-seq2seq", "dim": 16, "num_heads": 2, "encoder_layers": 1, "decoder_layers": 1},
        "train": {"epochs": 1, "batch_size": 32},
    }


def make_audio(root: Path, clips: int, seed: int) -> dict[str, Any]:
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(RATE) / RATE
    for i in range(clips):
        d = root / "train" / f"c{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        x = 0.3 * np.sin(2 * np.pi * (200 + 150 * (i % 4)) * t) + 0.05 * rng.standard_normal(RATE)
        sf.write(d / f"{i:05d}.wav", x.astype(np.float32), RATE, subtype="PCM_16")
    return {
        "name": "prepare_audio",
        "task": "audio_classification",
        "data": {"source": "audio_folder", "path": str(root), "sample_rate": RATE, "clip_seconds": 1.0},
        "model": {"name": "audio-cnn", "widths": [8, 16]},
        "train": {"epochs": 1, "batch_size": 32},
    }


def make_speech(root: Path, clips: int, seed: int) -> dict[str, Any]:
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    rows = ["path,text"]
    n = int(RATE * 0.2)
    t = np.arange(n) / RATE
    for i in range(clips):
        word = "".join(rng.choice(list(LETTERS), size=rng.integers(6, 14)))
        parts = []
        for ch in word:
            parts += [0.3 * np.sin(2 * np.pi * (300 + 100 * LETTERS.index(ch)) * t), np.zeros(800)]
        x = np.concatenate(parts)
        x = x + 0.01 * rng.standard_normal(len(x))
        sf.write(root / f"{i:05d}.wav", x.astype(np.float32), RATE, subtype="PCM_16")
        rows.append(f"{i:05d}.wav,{word}")
    (root / "clips.csv").write_text("\n".join(rows) + "\n")
    return {
        "name": "prepare_speech",
        "task": "speech_recognition",
        "data": {"source": "audio_csv", "path": str(root / "clips.csv"), "sample_rate": RATE},
        "model": {"name": "ctc-bilstm", "hidden_size": 32, "num_layers": 1},
        "train": {"epochs": 1, "batch_size": 8},
    }


def disk_mb(root: Path) -> float:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 1e6


def measure(mode: str, recipe: Path, out: Path) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, mode, str(recipe), str(out)], capture_output=True, text=True, timeout=3600
    )
    if proc.returncode != 0:
        raise SystemExit(f"{mode} {recipe}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--kinds",
        nargs="+",
        default=["lm", "text", "pairs", "audio", "speech"],
        choices=["lm", "text", "pairs", "audio", "speech"],
    )
    ap.add_argument("--lm-mb", type=float, default=40.0, help="MB of text at the smaller size")
    ap.add_argument("--text-mb", type=float, default=40.0, help="MB of labelled texts at the smaller size")
    ap.add_argument("--pairs-mb", type=float, default=20.0, help="MB of sentence pairs at the smaller size")
    ap.add_argument("--audio-clips", type=int, default=1500, help="audio clips at the smaller size")
    ap.add_argument("--speech-clips", type=int, default=2000, help="speech clips at the smaller size")
    ap.add_argument("--growth", type=int, default=4, help="the larger size / the smaller")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    env = environment()
    if not args.json:
        print_env(env)
    makers = {
        "lm": (make_lm, args.lm_mb),
        "text": (make_text, args.text_mb),
        "pairs": (make_pairs, args.pairs_mb),
        "audio": (make_audio, args.audio_clips),
        "speech": (make_speech, args.speech_clips),
    }
    out: dict[str, Any] = {"environment": env, "growth": args.growth}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        for kind in args.kinds:
            make, size = makers[kind]
            peaks: dict[str, list[float]] = {"prepare": [], "whole": []}
            for k, scale in enumerate((1, args.growth)):
                data = Path(tmp) / f"{kind}-{k}"
                t0 = time.perf_counter()
                recipe = make(data, size * scale, seed=k)
                made_s = time.perf_counter() - t0
                path = Path(tmp) / f"{kind}-{k}.json"  # JSON is YAML: load_recipe reads it
                path.write_text(json.dumps(recipe))
                on_disk = disk_mb(data)
                for mode in ("prepare", "whole"):
                    m = measure(mode, path, Path(tmp) / f"{kind}-{k}-prepared")
                    peaks[mode].append(m["peak_mb"])
                    rows.append([kind, f"{on_disk:.1f} MB", mode, round(m["peak_mb"]), round(m["seconds"], 1)])
                    out[f"{kind}_{k}_{mode}_peak_mb"] = round(m["peak_mb"], 1)
                    out[f"{kind}_{k}_{mode}_seconds"] = round(m["seconds"], 2)
                out[f"{kind}_{k}_data_mb"] = round(on_disk, 1)
                out[f"{kind}_{k}_generate_seconds"] = round(made_s, 1)
            out[f"{kind}_prepare_vs_whole_rss_ratio"] = round(peaks["prepare"][1] / peaks["whole"][1], 3)
            out[f"{kind}_prepare_growth_ratio"] = round(peaks["prepare"][1] / peaks["prepare"][0], 3)
            out[f"{kind}_whole_growth_ratio"] = round(peaks["whole"][1] / peaks["whole"][0], 3)
    if args.json:
        emit_json(out)
        return
    print_table(["kind", "data on disk", "read", "peak RSS MB", "seconds"], rows)
    print(", ".join(f"{k}={v}" for k, v in out.items() if k.endswith("_ratio")))


if __name__ == "__main__":
    main()
