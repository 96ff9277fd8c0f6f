"""Speech recognition: transcripts (normalisation, the game's dialogue files), CTC decoding against brute force, error
rates against jiwer, the model's lengths and padding, and a run that learns tone "words" through the CLI."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_same_run_weights, run_cli

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("soundfile") is None or importlib.util.find_spec("jiwer") is None,
    reason="the audio extra (soundfile, jiwer) is not installed",
)
SCRIPT = Path("/usr/share/games/fillets-ng/script")


def test_normalize_text():
    from bigmodel.data.speech import normalize_text

    assert normalize_text("  Vidíš to OKO?  Němý — svědek…") == "vidíš to oko němý svědek"
    assert normalize_text("It’s 737, isn't it?!") == "it's 737 isn't it"
    assert normalize_text("ﬁne") == "fine"  # NFKC


def test_dialog_files_are_parsed(tmp_path):
    from bigmodel.data.speech import fillets_dialogs

    (tmp_path / "lvl").mkdir()
    (tmp_path / "lvl" / "dialogs_en.lua").write_text(
        'dialogId("a-m-x", "font_small", "What \\"strange\\" ship?")\n\ndialogId("a-v-y", "font_big", "Yes.")\n'
    )
    (tmp_path / "lvl" / "dialogs_cs.lua").write_text(
        'dialogId("a-m-x", "font_small", "What?")\ndialogStr("Co je to?")\n\n'
        'dialogId("a-v-z", "font_big", "No text")\n\ndialogId("a-v-y", "font_big", "Yes.")\ndialogStr("Ano.")\n'
    )
    assert fillets_dialogs(tmp_path, "en") == {"a-m-x": 'What "strange" ship?', "a-v-y": "Yes."}
    assert fillets_dialogs(tmp_path, "cs") == {"a-m-x": "Co je to?", "a-v-y": "Ano."}


@pytest.mark.skipif(not SCRIPT.is_dir(), reason="fillets-ng-data is not installed")
def test_the_games_czech_transcripts_cover_its_clips():
    from bigmodel.data.speech import fillets_dialogs

    cs = fillets_dialogs(SCRIPT, "cs")
    assert cs["let-v-vrak0"] == "To je vrak dopravního letadla LC-10 Lemura."
    clips = [p.stem for p in SCRIPT.parent.glob("sound/*/cs/*.ogg")]
    assert sum(c in cs for c in clips) / len(clips) > 0.9


# ---------------------------------------------------------------------------------------------------- decoding
def brute_force(probs: np.ndarray) -> tuple[int, ...]:
    """The most probable collapsed prefix, summing every path (T x V small enough to enumerate)."""
    totals: dict[tuple[int, ...], float] = {}
    T, V = probs.shape
    for path in itertools.product(range(V), repeat=T):
        p = float(np.prod([probs[t, c] for t, c in enumerate(path)]))
        collapsed = tuple(c for i, c in enumerate(path) if c != 0 and (i == 0 or c != path[i - 1]))
        totals[collapsed] = totals.get(collapsed, 0.0) + p
    return max(totals, key=totals.get)


def test_prefix_beam_search_finds_the_most_probable_transcript():
    from bigmodel.models.ctc import greedy_decode, prefix_beam_decode

    # The classic case: the best single path is "blank" everywhere, but the paths of "1" sum to more.
    probs = np.array([[0.4, 0.35, 0.25], [0.4, 0.35, 0.25], [0.4, 0.35, 0.25]])
    lp = torch.from_numpy(np.log(probs))[None].float()
    assert greedy_decode(lp, torch.tensor([3])) == [[]]
    assert tuple(prefix_beam_decode(lp, torch.tensor([3]), 8)[0]) == brute_force(probs) != ()
    g = np.random.default_rng(0)
    for _ in range(20):
        probs = g.dirichlet(np.ones(3) * 0.7, size=4)
        lp = torch.from_numpy(np.log(probs))[None].float()
        assert tuple(prefix_beam_decode(lp, torch.tensor([4]), 16)[0]) == brute_force(probs)


def test_the_character_lm_is_a_distribution_and_learns_context():
    from bigmodel.models.charlm import CharLMConfig, CharNgramLM

    texts = ["the queen quits", "quite a quiz", "that is the thing", "then there"]
    lm = CharNgramLM.fit(texts, CharLMConfig(order=4))
    for history in ["", "q", "the ", "xyz", "quite a quiz the thing"]:  # seen, unseen and long histories
        assert sum(lm.prob(history, c) for c in lm.vocab) == pytest.approx(1.0, abs=1e-9)
    assert lm.prob("the q", "u") > 0.5 > lm.prob("the q", "x") > 0  # context counts; unseen is smoothed, not 0
    assert lm.score("the thing") > lm.score("tge thinh")
    again = CharNgramLM.from_dict(json.loads(json.dumps(lm.to_dict())))
    assert again.score("quite the queen") == lm.score("quite the queen")


def test_beam_search_with_the_lm_prefers_what_the_text_spells():
    from bigmodel.models.charlm import CharLMConfig, CharNgramLM
    from bigmodel.models.ctc import prefix_beam_decode

    alphabet = ["<blank>", " ", "a", "e", "h", "t"]
    # t, h, then a sound between "a" (0.55) and "e" (0.45): acoustically "tha", in English "the".
    probs = np.full((5, 6), 1e-4)
    for step, spread in enumerate([{5: 0.97}, {0: 0.97}, {4: 0.97}, {2: 0.55, 3: 0.43}, {0: 0.97}]):
        for c, p in spread.items():
            probs[step, c] = p
    lp = torch.from_numpy(np.log(probs / probs.sum(1, keepdims=True)))[None].float()
    n = torch.tensor([5])
    lm = CharNgramLM.fit(["the hat", "at the heath", "the the"], CharLMConfig(order=3, weight=1.0, bonus=0.0))
    assert prefix_beam_decode(lp, n, 8) == [[5, 4, 2]]  # tha
    assert prefix_beam_decode(lp, n, 8, lm, alphabet) == [[5, 4, 3]]  # the
    lm.weight = 0.0  # off: exactly the search without an LM
    assert prefix_beam_decode(lp, n, 8, lm, alphabet) == [[5, 4, 2]]


def test_greedy_decode_merges_repeats_and_drops_blanks():
    from bigmodel.models.ctc import greedy_decode

    ids = torch.tensor([[1, 1, 0, 1, 2, 2, 0, 0, 3, 3]])
    lp = torch.nn.functional.one_hot(ids, 4).float().log()
    assert greedy_decode(lp, torch.tensor([10])) == [[1, 1, 2, 3]]
    assert greedy_decode(lp, torch.tensor([4])) == [[1, 1]]  # only the valid steps


def test_error_rates_are_jiwers():
    import jiwer

    from bigmodel.tasks.speech import SpeechMetrics

    refs = ["the cat sat", "on the mat", "hello world"]
    hyps = ["the cat sad", "on mat", "hello world and more"]
    m = SpeechMetrics()
    m.update(torch.tensor(3.0), refs[:2], hyps[:2])
    m.update(torch.tensor(6.0), refs[2:], hyps[2:])
    out = m.compute()
    assert out["cer"] == pytest.approx(jiwer.cer(refs, hyps)) and out["wer"] == pytest.approx(jiwer.wer(refs, hyps))
    assert out["loss"] == pytest.approx(3.0) and out["num_examples"] == 3
    m2 = SpeechMetrics()
    m2.update(torch.tensor(0.0), ["", "ab"], ["xy", "ab"])  # an empty reference: its hypothesis is all insertions
    assert m2.compute()["cer"] == pytest.approx(2 / 2)


# ------------------------------------------------------------------------------------------------------- model
def test_output_lengths_and_padding_invariance():
    from bigmodel.models import build_model

    shape = {
        "kind": "speech",
        "sample_rate": 8000,
        "features": {"n_fft": 256, "win_length": 200, "hop_length": 80, "n_mels": 16, "f_min": 0.0, "f_max": None},
    }
    torch.manual_seed(0)
    model = build_model("ctc-bilstm", {"hidden_size": 16, "num_layers": 2, "conv_channels": 4}, shape, 6).eval()
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([8000, 5123, 2400])
    batch = torch.zeros(3, 8000)
    for i, n in enumerate(lengths.tolist()):
        batch[i, :n] = 0.3 * torch.randn(n, generator=g)
    with torch.no_grad():
        lp, out_len = model(batch, lengths)
        for i, n in enumerate(lengths.tolist()):
            alone, alone_len = model(batch[i : i + 1, :n], torch.tensor([n]))
            assert alone.shape[1] == int(alone_len[0]) == int(out_len[i])
            torch.testing.assert_close(alone[0], lp[i, : int(out_len[i])], rtol=1e-4, atol=1e-4)
    assert lp.shape == (3, int(out_len.max()), 6) and torch.allclose(lp.exp().sum(-1), torch.ones(()), atol=1e-5)


def test_the_unpacked_bidirectional_lstm_equals_packed_sequences():
    """`bidirectional_lstm` (each clip reversed within its length, no packing: it exports) gives what the LSTM gives
    over packed sequences at every valid step, forward and backward (gradients too)."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    from bigmodel.models.ctc import bidirectional_lstm

    torch.manual_seed(0)
    rnn = torch.nn.LSTM(6, 5, num_layers=2, batch_first=True, bidirectional=True).double()
    lengths = torch.tensor([9, 4, 1, 7])
    x = torch.randn(4, 9, 6, dtype=torch.float64, requires_grad=True)
    valid = (torch.arange(9)[None] < lengths[:, None]).unsqueeze(2)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    ref = pad_packed_sequence(rnn(packed)[0], batch_first=True, total_length=9)[0]
    got = bidirectional_lstm(rnn, x, lengths)
    torch.testing.assert_close(got * valid, ref * valid, rtol=1e-10, atol=1e-12)
    w = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * valid * w).sum(), [x, *rnn.parameters()])
    g_got = torch.autograd.grad((got * valid * w).sum(), [x, *rnn.parameters()])
    for a, b in zip(g_ref, g_got, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


# --------------------------------------------------------------------------------------------------- a real run
TONES = {"a": 400.0, "b": 1300.0, "c": 2600.0}


def tone_word(word: str, rate: int, g: np.random.Generator) -> np.ndarray:
    """Each letter a tone of 0.12-0.2 s, a short silence between letters."""
    parts = []
    for ch in word:
        n = int(rate * g.uniform(0.12, 0.2))
        t = np.arange(n) / rate
        parts += [0.4 * np.sin(2 * np.pi * TONES[ch] * t), np.zeros(int(rate * 0.05))]
    return (np.concatenate(parts) + 0.01 * g.standard_normal(sum(len(p) for p in parts))).astype(np.float32)


def tones_asr(d: Path, epochs: int) -> Path:
    """Tone "words" (as a CSV of FLAC files and transcripts) and a ctc-bilstm trained on them for `epochs`."""
    import soundfile as sf
    import yaml

    g = np.random.default_rng(0)
    rows = ["path,text,split"]
    for i in range(120):
        word = "".join(g.choice(list(TONES), size=g.integers(2, 5)))
        split = "test" if i < 12 else "val" if i < 20 else "train"
        sf.write(d / f"{i}.flac", tone_word(word, 8000, g), 8000)
        rows.append(f"{i}.flac,{word},{split}")
    (d / "clips.csv").write_text("\n".join(rows) + "\n")
    recipe = {
        "task": "speech_recognition",
        "data": {
            "source": "audio_csv",
            "path": str(d / "clips.csv"),
            "sample_rate": 8000,
            "features": {"n_mels": 16, "n_fft": 256, "win_length": 200, "hop_length": 80},
            "spec_augment": {"time_masks": 1, "time_width": 3},
        },
        "model": {
            "name": "ctc-bilstm",
            "hidden_size": 48,
            "num_layers": 1,
            "conv_channels": 8,
            "dropout": 0.0,
            "lm": {"order": 3},
        },
        "train": {"epochs": epochs, "batch_size": 8, "optimizer": {"name": "adamw", "lr": 0.01}, "checkpoint_every": 6},
        "seed": 0,
    }
    (d / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run_cli("train", str(d / "recipe.yaml"), "--out", str(d / "run"), "--no-progress", check=True)
    return d


@pytest.fixture(scope="module")
def tones_asr_run(tmp_path_factory):
    return tones_asr(tmp_path_factory.mktemp("asr"), epochs=2)


def test_evaluate_and_predict_through_the_cli(tones_asr_run):
    import json

    from bigmodel import api

    d = tones_asr_run
    m = api.evaluate(d / "run", beam_size=4)
    assert m["num_examples"] == 12 and m["cer"] >= 0 and m["beam_size"] == 4 and m["beam_cer"] >= 0
    assert m["baseline_cer"] > 0.5 and len(m["examples"]) == 5
    pre = json.loads((d / "run" / "model" / "preprocess.json").read_text())
    assert pre["kind"] == "speech" and pre["labels"] == ["<blank>", "a", "b", "c"]
    # the recipe's character LM is saved with the model, from the training transcripts, and fused into beam search
    lm = json.loads((d / "run" / "model" / "lm.json").read_text())
    assert lm["order"] == 3 and sorted(lm["vocab"][:-1]) == ["a", "b", "c"]
    assert m["lm"] == {"order": 3, "weight": 0.5, "bonus": 1.0} and m["beam_cer_without_lm"] >= 0
    off = api.evaluate(d / "run", beam_size=4, lm_weight=0.0)
    assert "lm" not in off and off["beam_cer"] == m["beam_cer_without_lm"]
    p = run_cli("evaluate", str(d / "run"), "--beam-size", "4", "--lm-weight", "0.3", check=True).stdout
    assert "+ LM (order 3, weight 0.3, bonus 1)" in p and "without the LM" in p
    out = run_cli("predict", str(d / "run"), str(d / "0.flac"), str(d / "1.flac"), check=True).stdout.splitlines()
    assert [line.split("\t")[0] for line in out] == [str(d / "0.flac"), str(d / "1.flac")]
    p = run_cli("evaluate", str(d / "run"), check=True).stdout
    assert "CER" in p and "trivial baseline" in p and "ref:" in p
    p = run_cli("compress", str(d / "run"), "--method", "quantize", "--out", str(d / "q"))
    assert p.returncode != 0 and "speech recognition model" in p.stderr and "Traceback" not in p.stderr
    plain = d / "plain"  # a model without an LM: the LM options are refused in one line
    shutil.copytree(d / "run", plain)
    (plain / "model" / "lm.json").unlink()
    p = run_cli("evaluate", str(plain), "--beam-size", "2", "--lm-weight", "1")
    assert p.returncode != 0 and "no language model" in p.stderr and "Traceback" not in p.stderr
    bad = d / "bad.flac"
    bad.write_bytes(b"fLaC" + b"\0" * 40)
    p = run_cli("predict", str(d / "run"), str(bad))
    assert p.returncode != 0 and str(bad) in p.stderr and "Traceback" not in p.stderr


def test_the_kept_model_is_the_one_with_the_lowest_validation_cer(tones_asr_run):
    import yaml

    from bigmodel.config import validate_recipe
    from bigmodel.errors import UserError

    d = tones_asr_run
    best = json.loads((d / "run" / "summary.json").read_text())["best"]
    evals = [json.loads(line) for line in (d / "run" / "metrics.jsonl").read_text().splitlines()]
    cers = {e["epoch"]: e["cer"] for e in evals if e.get("split") == "val"}
    assert best["monitor"] == "val_cer" and best["value"] == min(cers.values()) == cers[best["epoch"]]
    recipe = yaml.safe_load((d / "recipe.yaml").read_text())
    recipe["train"]["monitor"] = "val_accuracy"
    with pytest.raises(UserError, match="speech_recognition monitors val_cer or val_wer or val_loss"):
        validate_recipe(recipe)


@pytest.mark.slow
def test_a_ctc_run_learns_and_predict_equals_evaluate(tmp_path):
    from bigmodel import api

    d = tones_asr(tmp_path, epochs=40)
    m = api.evaluate(d / "run", beam_size=4)
    assert m["cer"] < 0.2 and m["beam_cer"] < 0.2 and m["cer"] < m["baseline_cer"] / 3, m
    # a file transcribed alone = the same clip decoded in an evaluation batch
    got = api.predict(d / "run", [d / f"{i}.flac" for i in range(5)])
    greedy = api.evaluate(d / "run")["examples"]
    assert [r["text"] for r in got] == [e["hypothesis"] for e in greedy]


def test_resume_with_spec_augment_is_bit_identical(tones_asr_run, tmp_path):
    import signal

    d = tones_asr_run
    run = tmp_path / "run"
    killed = run_cli(
        "train", str(d / "recipe.yaml"), "--out", str(run), "--no-progress", env={"BIGMODEL_FAULT": "kill_after_step:9"}
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_cli("train", "--resume", str(run), "--no-progress", check=True)
    assert_same_run_weights(d / "run", run)


@pytest.mark.skipif(
    shutil.which("espeak-ng") is None or not SCRIPT.is_dir(), reason="espeak-ng or fillets-ng-data is not installed"
)
def test_prepared_speech_trains_as_the_source_in_memory_and_on_disk(tones_asr_run, tmp_path):
    """`bigmodel data prepare` on a speech recipe (noise, SpecAugment and a character LM on): training on the folder,
    in memory or reading each batch's clips from disk, gives the source recipe's weights and LM bit for bit, resumes
    exactly after kill -9 and transcribes; recipes that ask for another rate, other features or another training
    subset, and a folder of another task, get one-line errors."""
    import signal

    import yaml

    from bigmodel.api import build_experiment
    from bigmodel.config import validate_recipe
    from bigmodel.data.audioshards import DiskSamples

    d = tones_asr_run
    src = yaml.safe_load((d / "recipe.yaml").read_text())
    src["data"]["noise"] = {"prob": 0.5, "snr_db": [5.0, 20.0]}
    source = tmp_path / "source.yaml"
    source.write_text(yaml.safe_dump(src))
    out = run_cli("data", "prepare", str(source), "--out", str(tmp_path / "prep"), check=True)
    assert out.stdout.strip().splitlines()[-1] == str(tmp_path / "prep")
    index = json.loads((tmp_path / "prep" / "index.json").read_text())
    assert index["format"] == "bigmodel-speech/1" and index["labels"] == ["<blank>", "a", "b", "c"]
    assert {k: v["count"] for k, v in index["splits"].items()} == {"train": 100, "val": 8, "test": 12}

    def on_folder(limit: float, **data) -> dict:
        r = json.loads(json.dumps(src))
        keep = {k: src["data"][k] for k in ("sample_rate", "features", "spec_augment", "noise")}
        r["data"] = {"source": "shards", "path": str(tmp_path / "prep"), "in_memory_limit_mb": limit, **keep, **data}
        return r

    exp = build_experiment(validate_recipe(src))
    disk_exp = build_experiment(validate_recipe(on_folder(0.001)))
    assert disk_exp.data.on_disk and isinstance(disk_exp.data.train.samples, DiskSamples)
    assert disk_exp.preprocess.input_shape == exp.preprocess.input_shape  # the normalisation statistics included
    assert disk_exp.preprocess.labels == exp.preprocess.labels
    for split in ("train", "val", "test"):
        a, b = exp.data.split(split), disk_exp.data.split(split)
        assert a.texts == b.texts and torch.equal(a.lengths, b.lengths)
        assert all(np.array_equal(a.clip(i), b.clip(i)) for i in range(len(a)))
    a_batches, b_batches = (list(e.loader("train", train=True).epoch(1)) for e in (exp, disk_exp))
    for (xa, ya), (xb, yb) in zip(a_batches, b_batches, strict=True):  # waves with noise, lengths, masks, targets
        assert all(torch.equal(u, v) for u, v in zip(xa, xb, strict=True)) and torch.equal(ya, yb)

    for name, r in (("memory", on_folder(64)), ("disk", on_folder(0.001))):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(r))
        run_cli("train", str(path), "--out", str(tmp_path / name), "--no-progress", check=True)
    run_cli("train", str(source), "--out", str(tmp_path / "source"), "--no-progress", check=True)
    for name in ("memory", "disk"):
        assert_same_run_weights(tmp_path / "source", tmp_path / name)
        assert (tmp_path / name / "model" / "lm.json").read_bytes() == (
            tmp_path / "source" / "model" / "lm.json"
        ).read_bytes()
    killed = run_cli(
        "train",
        str(tmp_path / "disk.yaml"),
        "--out",
        str(tmp_path / "killed"),
        "--no-progress",
        env={"BIGMODEL_FAULT": "kill_after_step:9"},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_cli("train", "--resume", str(tmp_path / "killed"), "--no-progress", check=True)
    assert_same_run_weights(tmp_path / "source", tmp_path / "killed")
    said = run_cli("predict", str(tmp_path / "disk"), str(d / "0.flac"), check=True).stdout
    assert said == run_cli("predict", str(tmp_path / "source"), str(d / "0.flac"), check=True).stdout

    audio_folder = tmp_path / "audio-prep"  # a folder of decoded clips without transcripts
    audio_folder.mkdir()
    (audio_folder / "index.json").write_text(json.dumps({"format": "bigmodel-audio/1", "splits": {"train": {}}}))
    for name, r, message in (
        ("rate", on_folder(64, sample_rate=16000), "data.sample_rate 16000"),
        ("mels", on_folder(64, features={**src["data"]["features"], "n_mels": 12}), "data.features (n_mels)"),
        ("limit", on_folder(64, limit_train=10), "data.limit_train 10"),
        ("other", {**on_folder(64), "data": {**on_folder(64)["data"], "path": str(audio_folder)}}, "holds decoded"),
    ):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(r))
        res = run_cli("train", str(path), "--out", str(tmp_path / f"bad-{name}"), "--no-progress")
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert not (tmp_path / f"bad-{name}" / "model").exists()


def test_spoken_sentences_split_voices_and_sentences(tmp_path):
    from bigmodel.data.speech import SpeechDataConfig, load_speech

    cfg = SpeechDataConfig(
        source="spoken_sentences",
        voices=5,
        sentences_per_voice=4,
        val_fraction=0.2,
        test_fraction=0.2,
        cache_dir=tmp_path,
    )
    data = load_speech(cfg, seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (12, 4, 4)
    assert not set(data.train.texts) & (set(data.val.texts) | set(data.test.texts))
    assert data.labels[0] == "<blank>" and " " in data.labels
    assert all(len(data.test.clip(i)) > 0.3 * 16000 for i in range(len(data.test)))
    assert math.isclose(float(data.train.lengths.sum()), float(sum(len(data.train.clip(i)) for i in range(12))))


def test_onnx_export_of_a_ctc_model_takes_raw_waveforms(tones_asr_run, tmp_path):
    """The exported graph takes (waveform, lengths) and gives (log_probs, out_lengths) within 1e-4 of eager; greedy
    decoding of ONNX Runtime's output is the transcript `transcribe` gives for every test clip."""
    pytest.importorskip("onnxruntime")
    import json

    import onnxruntime as ort

    from bigmodel.data.audio import read_audio
    from bigmodel.data.speech import decode_ids
    from bigmodel.models.ctc import greedy_decode
    from bigmodel.runs import load_artifact

    d = tones_asr_run
    p = run_cli("export", str(d / "run"), "--format", "onnx", "--out", str(tmp_path / "exp"), check=True)
    assert "parity ok" in p.stdout + p.stderr
    report = json.loads((tmp_path / "exp" / "export.json").read_text())
    assert [i["name"] for i in report["inputs"]] == ["waveform", "lengths"]
    assert [o["name"] for o in report["outputs"]] == ["log_probs", "out_lengths"]
    assert report["parity"]["passed"] and report["parity"]["checked_inputs"] == 12
    art = load_artifact(d / "run")
    sess = ort.InferenceSession(str(tmp_path / "exp" / "model.onnx"))
    clips = [read_audio(d / f"{i}.flac", 8000) for i in range(12)]  # the test split
    lengths = np.array([len(c) for c in clips], dtype=np.int64)
    wave = np.zeros((len(clips), int(lengths.max())), dtype=np.float32)
    for i, c in enumerate(clips):
        wave[i, : len(c)] = c
    log_probs, out_lengths = sess.run(None, {"waveform": wave, "lengths": lengths})
    onnx_text = [decode_ids(ids, art.labels) for ids in greedy_decode(torch.from_numpy(log_probs), out_lengths)]
    assert onnx_text == art.transcribe(clips, beam_size=1)
    # the bundle carries the character LM, so beam search over ONNX Runtime's output can use it as well
    assert (tmp_path / "exp" / "lm.json").read_bytes() == (d / "run" / "model" / "lm.json").read_bytes()


def test_serve_transcribes_uploads_and_refuses_what_it_cannot(tones_asr_run):
    pytest.importorskip("fastapi")
    import base64

    from fastapi.testclient import TestClient

    from bigmodel import api
    from bigmodel.data.audio import read_audio
    from bigmodel.runs import load_artifact
    from bigmodel.serving.server import create_app

    d = tones_asr_run
    files = [d / f"{i}.flac" for i in range(3)]
    expected = [r["text"] for r in api.predict(d / "run", files)]
    art = load_artifact(d / "run")
    assert art.transcribe(files) == expected == art.transcribe([str(f) for f in files])
    with TestClient(create_app(art, max_delay_ms=2), raise_server_exceptions=False) as c:
        body = {"inputs": [{"audio_base64": base64.b64encode(f.read_bytes()).decode()} for f in files]}
        r = c.post("/v1/transcribe", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["transcripts"] == expected
        arr = c.post(
            "/v1/transcribe", json={"inputs": [{"array": read_audio(files[0], 8000).tolist()}], "beam_size": 4}
        )
        assert arr.status_code == 200 and arr.json()["transcripts"] == art.transcribe(files[:1], beam_size=4)
        bad = c.post("/v1/transcribe", json={"inputs": [{"audio_base64": base64.b64encode(b"junk" * 50).decode()}]})
        assert bad.status_code == 422 and "inputs[0].audio_base64" in bad.text
        predict = c.post("/v1/predict", json={"inputs": body["inputs"][:1]})
        assert predict.status_code == 422 and "/v1/predict" in predict.text
        page = c.get("/")
        assert page.status_code == 200 and '"kind": "speech"' in page.text


def test_prepare_decodes_a_chunk_at_a_time_and_stores_what_the_source_run_keeps(tones_asr_run, tmp_path, monkeypatch):
    """Speech `data prepare` decodes `CHUNK` clips at a time (here 7): the training clips no longer than
    `max_seconds` go to a scratch stream, then those `limit_train` keeps into the folder, adding each to the
    statistics. The folder holds exactly the source run's clips, transcripts, clip powers, alphabet and statistics,
    and no scratch stream."""
    import yaml

    import bigmodel.data.speechshards as speechshards
    from bigmodel.api import build_experiment, prepare_shards
    from bigmodel.config import validate_recipe
    from bigmodel.data.audio import clip_power

    monkeypatch.setattr(speechshards, "CHUNK", 7)
    r = yaml.safe_load((tones_asr_run / "recipe.yaml").read_text())
    r["data"] |= {"max_seconds": 0.6, "limit_train": 40}
    out = tmp_path / "prep"
    index = prepare_shards(validate_recipe(r), out)
    exp = build_experiment(validate_recipe(r))
    assert index["input_shape"] == exp.preprocess.input_shape and index["labels"] == exp.preprocess.labels
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == []
    rows = len(list(csv_rows(tones_asr_run / "clips.csv", "train")))
    for split in ("train", "val", "test"):
        a = exp.data.split(split)
        entry = index["splits"][split]
        samples = torch.from_numpy(np.fromfile(out / entry["samples"], dtype="<f4"))
        offsets = np.load(out / entry["offsets"])
        assert entry["count"] == len(a) and len(offsets) == len(a) + 1
        assert all(
            torch.equal(samples[offsets[i] : offsets[i + 1]], torch.from_numpy(a.clip(i))) for i in range(len(a))
        )
        assert json.loads((out / entry["texts"]).read_text()) == a.texts
        power = torch.from_numpy(np.load(out / entry["power"]))
        assert torch.equal(power, clip_power(a.samples, a.offsets, a.lengths))
    r["data"]["limit_train"] = None
    short = len(build_experiment(validate_recipe(r)).data.train)
    assert len(exp.data.train) == 40 < short < rows  # max_seconds dropped some rows, then limit_train chose 40
    assert int(exp.data.train.lengths.max()) <= 0.6 * 8000


def csv_rows(path, split):
    import csv

    with open(path, newline="") as f:
        yield from (r for r in csv.DictReader(f) if r["split"] == split)
