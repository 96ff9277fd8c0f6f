"""Audio classification: the log-mel front-end against librosa, decoding (formats, channels, rates, broken files),
the bundled sets (espeak-ng digits split by voice, every Fish Fillets clip), the seeded loader and SpecAugment, and
one small run through train → evaluate → predict → export → serve → resume."""

from __future__ import annotations

import base64
import importlib.util
import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_same_run_weights, run_cli

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("soundfile") is None, reason="the audio extra is not installed"
)

FILLETS = Path("/usr/share/games/fillets-ng/sound")
RATE = 8000  # the tiny run's model rate


def tone(freq: float, seconds: float, rate: int, seed: int, channels: int = 1) -> np.ndarray:
    """A noisy tone with a random phase and loudness (one class per frequency band)."""
    g = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    x = g.uniform(0.2, 0.6) * np.sin(2 * np.pi * freq * g.uniform(0.9, 1.1) * t + g.uniform(0, 6.3))
    x = x + 0.05 * g.standard_normal(len(t))
    return np.stack([x] * channels, axis=1).astype(np.float32) if channels > 1 else x.astype(np.float32)


def make_audio_folder(root: Path, per_class: int = 14) -> Path:
    """ROOT/{train,test}/{low,high}/*: WAV, FLAC and Ogg files at several rates, mono and stereo, 0.3 to 0.9 s."""
    import soundfile as sf

    classes = {"low": 300.0, "high": 1800.0}
    i = 0
    for split, n in (("train", per_class), ("test", per_class // 2)):
        for name, f in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                rate = (8000, 16000, 22050)[k % 3]
                ext, fmt = (("wav", "WAV"), ("flac", "FLAC"), ("ogg", "OGG"))[k % 3]
                x = tone(f, 0.3 + 0.6 * ((k * 7) % 10) / 10, rate, seed=i, channels=1 + k % 2)
                sf.write(root / split / name / f"{k}.{ext}", x, rate, format=fmt)
                i += 1
    return root


def audio_recipe(root: Path, **data) -> dict:
    return {
        "name": "tones",
        "task": "audio_classification",
        "data": {
            "source": "audio_folder",
            "path": str(root),
            "sample_rate": RATE,
            "clip_seconds": 0.5,
            "features": {"n_mels": 20, "n_fft": 256, "win_length": 200, "hop_length": 80},
            "spec_augment": {"freq_masks": 1, "freq_width": 3, "time_masks": 1, "time_width": 5},
            **data,
        },
        "model": {"name": "audio-cnn", "widths": [8, 16]},
        "train": {
            "epochs": 8,
            "batch_size": 8,
            "optimizer": {"name": "adamw", "lr": 0.01},
            "checkpoint_every": 2,
            "log_every": 1,  # every step's loss in metrics.jsonl: a resume mismatch names the step where runs part
        },
        "seed": 0,
    }


# ------------------------------------------------------------------------------------------------ front-end
def _librosa_case(y: np.ndarray, sr: int, htk: bool, norm):
    librosa = pytest.importorskip("librosa", reason="librosa (the reference implementation) is a test dependency")
    from bigmodel.models.audio import LogMel

    kw = {"n_fft": 1024, "win_length": 800, "hop_length": 256, "n_mels": 64, "f_min": 30.0, "f_max": 8000.0}
    ref = librosa.feature.melspectrogram(
        y=y, sr=sr, htk=htk, norm=norm, fmin=30.0, fmax=8000.0, n_fft=1024, win_length=800, hop_length=256, n_mels=64
    )
    fe = LogMel({**kw, "mel_scale": "htk" if htk else "slaney", "norm": norm}, sr)
    got = fe.power(torch.from_numpy(y)[None])[0].double().numpy()
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-5 * ref.max()
    db_ref, db = (10 * np.log10(np.maximum(s, 1e-10)) for s in (ref, got))
    loud = db_ref > db_ref.max() - 60
    assert loud.sum() > 500 and np.abs(db - db_ref)[loud].max() <= 0.01


def real_clip() -> tuple[np.ndarray, int]:
    import soundfile as sf

    clips = sorted(FILLETS.glob("*/cs/*.ogg"))
    if not clips:
        pytest.skip("fillets-ng-data-cs is not installed (a real speech clip for the parity test)")
    y, sr = sf.read(clips[len(clips) // 2], dtype="float32")
    return y, sr


@pytest.mark.parametrize(("htk", "norm"), [(False, "slaney"), (True, "slaney"), (True, None)])
def test_log_mel_matches_librosa_on_a_chirp(htk, norm):
    sr = 22050
    t = np.arange(2 * sr) / sr
    chirp = (0.5 * np.sin(2 * np.pi * (100 * t + (8000 - 100) / 4 * t**2))).astype(np.float32)  # 100 Hz → 8 kHz
    _librosa_case(chirp, sr, htk, norm)


@pytest.mark.parametrize(("htk", "norm"), [(False, "slaney"), (True, "slaney")])
def test_log_mel_matches_librosa_on_real_speech(htk, norm):
    y, sr = real_clip()
    _librosa_case(y, sr, htk, norm)


def test_front_end_stays_float32_under_bf16_autocast():
    from bigmodel.models.audio import LogMel

    fe = LogMel({"n_fft": 256, "hop_length": 80, "n_mels": 20}, 8000)
    x = torch.from_numpy(tone(500, 0.5, 8000, 0))[None]
    ref = fe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fe(x)
    assert out.dtype == torch.float32 and torch.equal(out, ref)


def test_spec_augment_masks_exactly_the_drawn_bands():
    from bigmodel.data.audio import SpecAugmentConfig, spec_augment_masks
    from bigmodel.models.audio import apply_masks

    feats = torch.randn(4, 20, 30) + 5.0
    masks = torch.tensor([[[0, 2, 3], [1, 10, 4]]] * 4)
    out = apply_masks(feats, masks)
    assert (out[:, 2:5] == 0).all() and (out[:, :, 10:14] == 0).all()
    keep = torch.ones(20, 30, dtype=torch.bool)
    keep[2:5] = False
    keep[:, 10:14] = False
    assert torch.equal(out[:, keep], feats[:, keep])
    cfg = SpecAugmentConfig(freq_masks=2, freq_width=6, time_masks=3, time_width=8)
    drawn = [spec_augment_masks(64, cfg, 20, 30, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[0], drawn[2])
    m = drawn[0]
    assert m.shape == (64, 5, 3) and (m[:, :2, 0] == 0).all() and (m[:, 2:, 0] == 1).all()
    assert (m[:, :2, 2] <= 6).all() and (m[:, :2, 1] + m[:, :2, 2] <= 20).all()
    assert (m[:, 2:, 2] <= 8).all() and (m[:, 2:, 1] + m[:, 2:, 2] <= 30).all() and m[:, :, 2].max() > 0


# ---------------------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG", "MP3"])
def test_decode_any_format_channels_and_rate_to_mono_at_the_model_rate(tmp_path, fmt):
    import soundfile as sf

    from bigmodel.data.audio import read_audio

    stereo = tone(440, 1.0, 44100, 0, channels=2)
    stereo[:, 1] *= 0.5
    path = tmp_path / f"clip.{fmt.lower()}"
    sf.write(path, stereo, 44100, format=fmt)
    y = read_audio(path, 16000)
    assert y.dtype == np.float32 and y.ndim == 1 and abs(len(y) - 16000) <= (1200 if fmt == "MP3" else 0)
    if fmt in ("WAV", "FLAC"):  # lossless (16-bit): the mono mix of the two channels, resampled
        from bigmodel.data.audio import resample

        expected = resample(stereo.mean(axis=1), 44100, 16000)
        assert np.abs(y - expected).max() < 1e-3
    spectrum = np.abs(np.fft.rfft(y))  # the tone survives resampling at its frequency
    assert abs(np.argmax(spectrum) * 16000 / len(y) - 440 * 0.9) < 0.25 * 440


@pytest.mark.parametrize("case", ["garbage", "truncated-wav", "truncated-flac", "empty", "missing"])
def test_unreadable_audio_is_one_line_naming_the_file(tmp_path, case):
    import soundfile as sf

    from bigmodel.data.audio import read_audio
    from bigmodel.errors import UserError

    ext = "flac" if case == "truncated-flac" else "wav"
    path = tmp_path / f"bad.{ext}"
    if case == "garbage":
        path.write_bytes(b"not audio at all " * 20)
    elif case.startswith("truncated"):
        sf.write(path, tone(440, 1.0, 16000, 0), 16000, format=ext.upper())
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "empty":
        sf.write(path, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(UserError) as e:
        read_audio(path, 16000)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg


@pytest.mark.skipif(not FILLETS.is_dir(), reason="fillets-ng-data-cs is not installed")
def test_every_fillets_clip_decodes():
    from bigmodel.data.audio import read_many

    clips = sorted(p for p in FILLETS.rglob("*.ogg") if p.parent.name == "cs")  # the levels' and share/'s
    assert len(clips) > 1850
    waves = read_many(clips, 16000)
    assert all(len(w) > 1000 and np.isfinite(w).all() for w in waves)
    assert sum(len(w) for w in waves) / 16000 / 60 > 90  # about 105 minutes of speech


@pytest.mark.skipif(not FILLETS.is_dir(), reason="fillets-ng-data-cs is not installed")
def test_fillets_speakers_split_by_level():
    from bigmodel.config import validate_recipe
    from bigmodel.tasks import get_task

    recipe = validate_recipe(
        {
            "task": "audio_classification",
            "data": {"source": "fillets_speakers", "val_fraction": 0.15, "test_fraction": 0.25, "clip_seconds": 2.0},
            "model": {"name": "audio-cnn"},
        }
    )
    data, pre = get_task("audio_classification").prepare(recipe)
    assert data.labels == ["hs", "m", "v", "x"]  # c speaks in one level only: it cannot be held out by level

    def levels(s):
        return {Path(n).parent.parent.name for n in s.names}

    assert not levels(data.train) & levels(data.test) and not levels(data.train) & levels(data.val)
    assert set(data.train.y.tolist()) == set(data.test.y.tolist()) == {0, 1, 2, 3}
    assert len(pre.input_shape["features"]["mean"]) == 40


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_spoken_digits_are_generated_once_and_split_by_voice(tmp_path):
    from bigmodel.data.audio import AudioDataConfig, load_audio

    cfg = AudioDataConfig(source="spoken_digits", voices=5, val_fraction=0.2, test_fraction=0.2, cache_dir=tmp_path)
    data = load_audio(cfg, seed=0)
    assert data.labels[:3] == ["zero", "one", "two"]

    def voices(s):
        return {Path(n).name.rsplit("-", 1)[0] for n in s.names}

    assert (len(voices(data.train)), len(voices(data.val)), len(voices(data.test))) == (3, 1, 1)
    assert not voices(data.train) & (voices(data.val) | voices(data.test))
    assert all(sorted(s.y.tolist()) == sorted(list(range(10)) * (len(s) // 10)) for s in (data.train, data.test))
    folder = next((tmp_path / "spoken_digits").iterdir())
    stamp = (folder / "clips.csv").stat().st_mtime_ns
    again = load_audio(cfg.model_copy(update={}), seed=1)  # another seed: the same voices in the same splits
    assert (folder / "clips.csv").stat().st_mtime_ns == stamp and voices(again.test) == voices(data.test)
    assert torch.equal(again.test.samples, data.test.samples)


# ------------------------------------------------------------------------------------------------------ loader
def test_loader_windows_are_seeded_random_in_training_and_centred_otherwise():
    from bigmodel.data.audio import AudioLoader, AudioSplit, SpecAugmentConfig, fit_length

    clips = [np.arange(n, dtype=np.float32) + 1 for n in (50, 100, 30, 100)]
    split = AudioSplit.from_clips(clips, [0, 1, 0, 1], ["a", "b", "c", "d"])
    ev = AudioLoader(split, 4, 60, shuffle=False)
    ((wave, y),) = list(ev.epoch(0))
    assert torch.equal(wave, torch.from_numpy(np.stack([fit_length(c, 60) for c in clips])))
    sa = SpecAugmentConfig(freq_masks=1, time_masks=1)
    tr = AudioLoader(split, 2, 60, shuffle=True, seed=3, random_crop=True, spec_augment=sa, mel_channels=8, frames=7)
    e0, e0b, e1 = list(tr.epoch(0)), list(tr.epoch(0)), list(tr.epoch(1))
    assert all(torch.equal(a[0][0], b[0][0]) and torch.equal(a[0][1], b[0][1]) for a, b in zip(e0, e0b, strict=True))
    assert not all(torch.equal(a[0][0], b[0][0]) for a, b in zip(e0, e1, strict=True))
    assert torch.equal(list(tr.epoch(0, start=1))[0][0][0], e0[1][0][0])  # resume mid-epoch: the same batch
    for (w, masks), _ in e0 + e1:
        assert w.shape == (2, 60) and masks.shape == (2, 2, 3)
        for row in w:  # each window is a contiguous run of one clip (values k+1), zero-padded
            nz = row[row != 0]
            assert len(nz) and bool((nz[1:] - nz[:-1] == 1).all())


# --------------------------------------------------------------------------------------------- the whole path
@pytest.fixture(scope="module")
def tones_run(tmp_path_factory):
    import yaml

    d = tmp_path_factory.mktemp("tones")
    root = make_audio_folder(d / "data")
    recipe = d / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(audio_recipe(root)))
    run_cli("train", str(recipe), "--out", str(d / "run"), "--no-progress", check=True)
    return d, recipe, d / "run"


def test_train_evaluate_predict_agree(tones_run):
    from bigmodel import api
    from bigmodel.runs import load_artifact

    d, _, run = tones_run
    m = api.evaluate(run)
    assert m["accuracy"] >= 0.9 and m["num_examples"] == 14
    assert m["baseline"]["accuracy"] >= 0.8
    cfg = json.loads((run / "model" / "preprocess.json").read_text())
    assert cfg["kind"] == "audio" and len(cfg["input_shape"]["features"]["mean"]) == 20
    # predict on a file = the prediction evaluation made for that clip (same window, same model)
    files = sorted((d / "data" / "test").rglob("*.*"))
    got = api.predict(run, files, top_k=2)
    from bigmodel.config import load_recipe
    from bigmodel.tasks import get_task

    art = load_artifact(run)
    spec = get_task("audio_classification")
    data, _ = spec.prepare(load_recipe(run / "recipe.yaml"), art.preprocess)
    test = data.split("test")
    probs = spec.probabilities(art, list(test.windows(int(art.preprocess.input_shape["samples"])).numpy()))
    by_name = dict(zip(test.names, probs, strict=True))
    for r in got:
        p = by_name[r["file"]]
        assert r["label"] == art.labels[int(p.argmax())] and r["score"] == pytest.approx(float(p.max()), abs=1e-6)
    # the CLI prints one line per file; a broken file is a one-line error
    out = run_cli("predict", str(run), str(files[0]), check=True).stdout
    assert out.startswith(str(files[0])) and "\t" in out
    bad = d / "bad.wav"
    bad.write_bytes(b"RIFF....WAVEfmt nonsense")
    p = run_cli("predict", str(run), str(bad))
    assert p.returncode != 0 and str(bad) in p.stderr and "Traceback" not in p.stderr


def test_onnx_export_takes_raw_waveforms(tones_run, tmp_path):
    pytest.importorskip("onnxruntime")
    d, _, run = tones_run
    p = run_cli("export", str(run), "--format", "onnx", "--out", str(tmp_path / "exp"), check=True)
    assert "parity ok" in p.stdout + p.stderr
    assert "waveform" in (tmp_path / "exp" / "export.json").read_text()
    import onnxruntime as ort

    from bigmodel.data.audio import fit_length, read_audio
    from bigmodel.runs import load_artifact

    art = load_artifact(run)
    sess = ort.InferenceSession(str(tmp_path / "exp" / "model.onnx"))
    files = sorted((d / "data" / "test").rglob("*.*"))
    waves = np.stack([fit_length(read_audio(f, RATE), 4000) for f in files])
    onnx_logits = sess.run(None, {sess.get_inputs()[0].name: waves})[0]
    with torch.no_grad():
        eager = art.model(torch.from_numpy(waves)).numpy()
    assert np.abs(onnx_logits - eager).max() <= 1e-4 and (onnx_logits.argmax(1) == eager.argmax(1)).all()


def test_serve_takes_base64_audio_and_sample_arrays(tones_run):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from bigmodel import api
    from bigmodel.runs import load_artifact
    from bigmodel.serving.server import create_app

    d, _, run = tones_run
    files = sorted((d / "data" / "test").rglob("*.*"))[:4]
    expected = api.predict(run, files, top_k=2)
    from bigmodel.data.audio import read_audio

    with TestClient(create_app(load_artifact(run), max_delay_ms=2), raise_server_exceptions=False) as c:
        body = {"inputs": [{"audio_base64": base64.b64encode(f.read_bytes()).decode()} for f in files], "top_k": 2}
        r = c.post("/v1/predict", json=body)
        assert r.status_code == 200, r.text
        arr = c.post("/v1/predict", json={"inputs": [{"array": read_audio(files[0], RATE).tolist()}]})
        assert arr.status_code == 200, arr.text
        bad = c.post("/v1/predict", json={"inputs": [{"audio_base64": base64.b64encode(b"junk" * 50).decode()}]})
        assert bad.status_code == 422 and "inputs[0].audio_base64" in bad.text
        wrong = c.post("/v1/predict", json={"inputs": [{"array": [[0.1, 0.2]]}]})
        assert wrong.status_code == 422 and "mono samples" in wrong.text
        asr = c.post("/v1/transcribe", json={"inputs": body["inputs"][:1]})
        assert asr.status_code == 422 and "speech recognition model" in asr.text
    for g, e in zip(r.json()["predictions"], expected, strict=True):
        assert g["label"] == e["label"] and g["score"] == pytest.approx(e["score"], abs=1e-5)
    assert arr.json()["predictions"][0]["label"] == expected[0]["label"]


def test_resume_with_spec_augment_is_bit_identical(tones_run, tmp_path):
    _, recipe, ref = tones_run
    run = tmp_path / "run"
    killed = run_cli(
        "train", str(recipe), "--out", str(run), "--no-progress", env={"BIGMODEL_FAULT": "kill_after_step:5"}
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_cli("train", "--resume", str(run), "--no-progress", check=True)
    assert_same_run_weights(ref, run)


def test_bad_audio_recipes_are_one_line_errors(tmp_path, write_recipe):
    root = make_audio_folder(tmp_path / "data", per_class=3)
    cases = [
        ({"data.sample_rate": 8000, "data.features": {"f_max": 6000}}, "sample_rate / 2"),
        ({"data.clip_seconds": 0.01}, "shorter than one FFT window"),
        ({"data.path": str(tmp_path / "nope")}, "folder not found"),
        ({"model.name": "cnn-small"}, "does not do task"),
    ]
    for over, needle in cases:
        r = audio_recipe(root)
        for k, v in over.items():
            node = r
            *head, last = k.split(".")
            for h in head:
                node = node[h]
            node[last] = v
        p = run_cli("train", str(write_recipe(r)), "--out", str(tmp_path / "run"), "--no-progress")
        assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, (over, p.stderr)


def test_sequence_models_take_mel_frames(tmp_path):
    from bigmodel import api
    from bigmodel.config import validate_recipe

    root = make_audio_folder(tmp_path / "data", per_class=6)
    for model in ({"name": "gru-classifier", "hidden_size": 16}, {"name": "transformer-classifier", "dim": 16}):
        r = audio_recipe(root)
        r["model"] = {**model, **({"max_length": 64} if model["name"].startswith("transformer") else {})}
        r["train"] = {"epochs": 1, "batch_size": 8}
        run = api.train(validate_recipe(r), out=tmp_path / model["name"], progress=False)
        got = api.predict(run.run_dir, [next((root / "test" / "high").iterdir())], top_k=2)
        assert got[0]["label"] in ("low", "high") and len(got[0]["top_k"]) == 2
    r["model"] = {"name": "transformer-classifier", "dim": 16, "max_length": 16}  # 51 frames do not fit
    import yaml

    (tmp_path / "short.yaml").write_text(yaml.safe_dump(r))
    p = run_cli("train", str(tmp_path / "short.yaml"), "--out", str(tmp_path / "short"), "--no-progress")
    assert p.returncode == 2 and "shorter than a clip's 51 mel frames" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.skipif(importlib.util.find_spec("opacus") is None, reason="the privacy extra is not installed")
def test_dp_sgd_trains_an_audio_model(tones_run, tmp_path):
    import yaml

    from bigmodel import api

    d, recipe, _ = tones_run
    r = yaml.safe_load(recipe.read_text())
    r["privacy"] = {"dp": {"target_epsilon": 8.0, "max_grad_norm": 1.0}}
    r["train"] = {**r["train"], "epochs": 2, "precision": "fp32"}
    (tmp_path / "dp.yaml").write_text(yaml.safe_dump(r))
    run_cli("train", str(tmp_path / "dp.yaml"), "--out", str(tmp_path / "run"), "--no-progress", check=True)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0 < summary["privacy"]["epsilon"] <= 8.0
    got = api.predict(tmp_path / "run", sorted((d / "data" / "test").rglob("*.*"))[:2])
    assert all(g["label"] in ("low", "high") for g in got)


def test_prepared_audio_trains_as_the_source_in_memory_and_on_disk(tones_run, tmp_path):
    """`bigmodel data prepare` on an audio recipe (noise and SpecAugment on): training on the folder, in memory or read
    a window at a time from disk, gives the source recipe's weights bit for bit, and resumes exactly after kill -9;
    a recipe whose rate or features differ from the folder's gets a one-line error."""
    import yaml
    from safetensors.torch import load_file

    from bigmodel.api import build_experiment
    from bigmodel.config import validate_recipe
    from bigmodel.data.audioshards import DiskSamples

    d, recipe, _ = tones_run
    src = yaml.safe_load(recipe.read_text())
    src["data"]["noise"] = {"prob": 0.5, "snr_db": [5.0, 20.0]}
    src["train"]["epochs"] = 3
    source = tmp_path / "source.yaml"
    source.write_text(yaml.safe_dump(src))
    out = run_cli("data", "prepare", str(source), "--out", str(tmp_path / "prep"), check=True)
    assert out.stdout.strip().splitlines()[-1] == str(tmp_path / "prep")

    def on_folder(limit: float, **data) -> dict:
        r = json.loads(json.dumps(src))
        keep = {k: src["data"][k] for k in ("sample_rate", "clip_seconds", "features", "spec_augment", "noise")}
        r["data"] = {"source": "shards", "path": str(tmp_path / "prep"), "in_memory_limit_mb": limit, **keep, **data}
        return r

    exp = build_experiment(validate_recipe(src))
    disk_exp = build_experiment(validate_recipe(on_folder(0.001)))
    assert disk_exp.data.on_disk and isinstance(disk_exp.data.train.samples, DiskSamples)
    assert disk_exp.preprocess.input_shape == exp.preprocess.input_shape  # the normalisation statistics included
    for split in ("train", "test"):
        a, b = exp.data.split(split), disk_exp.data.split(split)
        assert torch.equal(a.windows(4000), b.windows(4000)) and torch.equal(a.y, b.y)
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        from bigmodel.data.audio import cut

        assert torch.equal(cut(a, torch.arange(len(a)), 4000, g1), cut(b, torch.arange(len(b)), 4000, g2))
    runs = {}
    for name, r in (("source", src), ("memory", on_folder(64)), ("disk", on_folder(0.001))):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(r))
        run_cli("train", str(path), "--out", str(tmp_path / name), "--no-progress", check=True)
        runs[name] = load_file(str(tmp_path / name / "model" / "model.safetensors"))
    a = runs["source"]
    assert all(torch.equal(a[k], runs[n][k]) for n in ("memory", "disk") for k in a)
    killed = run_cli(
        "train",
        str(tmp_path / "disk.yaml"),
        "--out",
        str(tmp_path / "killed"),
        "--no-progress",
        env={"BIGMODEL_FAULT": "kill_after_step:5"},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_cli("train", "--resume", str(tmp_path / "killed"), "--no-progress", check=True)
    c = load_file(str(tmp_path / "killed" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)
    for name, r, message in (
        ("rate", on_folder(64, sample_rate=16000), "data.sample_rate 16000"),
        ("mels", on_folder(64, features={**src["data"]["features"], "n_mels": 16}), "data.features (n_mels)"),
    ):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(r))
        res = run_cli("train", str(path), "--out", str(tmp_path / f"bad-{name}"), "--no-progress")
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_prepare_decodes_a_chunk_at_a_time_and_stores_what_the_source_run_computes(tmp_path, monkeypatch):
    """`data prepare` decodes the carved splits `STATS_CHUNK` clips at a time (here 5, so the 21 training clips take
    five chunks, the last one short) and merges the training chunks' log-mel statistics; the folder holds the source
    run's clips, labels, clip powers and statistics exactly, and only the clips the splits keep (`limit_train`)."""
    import bigmodel.tasks.audio as audio_task
    from bigmodel.api import build_experiment, prepare_shards
    from bigmodel.config import validate_recipe
    from bigmodel.data.audio import clip_power

    monkeypatch.setattr(audio_task, "STATS_CHUNK", 5)
    root = make_audio_folder(tmp_path / "tones")
    for over in ({}, {"limit_train": 11}):
        r = audio_recipe(root, val_fraction=0.25, **over)
        out = tmp_path / f"prep{len(over)}"
        index = prepare_shards(validate_recipe(r), out)
        exp = build_experiment(validate_recipe(r))
        assert index["input_shape"] == exp.preprocess.input_shape  # the statistics merged over chunks, equal
        features = index["input_shape"]["features"]
        assert features["mean"] is not None and min(features["std"]) > 1e-3
        for split in ("train", "val", "test"):
            a = exp.data.split(split)
            entry = index["splits"][split]
            samples = torch.from_numpy(np.fromfile(out / entry["samples"], dtype="<f4"))
            offsets = torch.from_numpy(np.load(out / entry["offsets"]))
            stored = [samples[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
            assert len(stored) == len(a) == entry["count"]
            assert all(torch.equal(stored[i], torch.from_numpy(a.clip(i))) for i in range(len(a)))
            assert torch.equal(torch.from_numpy(np.load(out / entry["labels"])), a.y)
            power = torch.from_numpy(np.load(out / entry["power"]))
            assert torch.equal(power, clip_power(a.samples, a.offsets, a.lengths))
        if over:
            assert index["splits"]["train"]["count"] == 11
            assert index["splits"]["train"]["samples_total"] == int(exp.data.train.lengths.sum())
    # the statistics do not depend on the chunk size beyond rounding
    monkeypatch.setattr(audio_task, "STATS_CHUNK", 512)
    whole = build_experiment(validate_recipe(audio_recipe(root, val_fraction=0.25))).preprocess.input_shape
    chunked = json.loads((tmp_path / "prep0" / "index.json").read_text())["input_shape"]
    for key in ("mean", "std"):
        assert np.allclose(whole["features"][key], chunked["features"][key], rtol=1e-12, atol=1e-12)
