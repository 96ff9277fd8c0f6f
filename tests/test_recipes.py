"""Every shipped recipe trains in its debug size (1 epoch on at most 512 examples) through the real CLI.

Recipes whose data is not available offline (MNIST, CIFAR, IMDB) train on a small fixture written in the data set's true
on-disk format, passed as `data.path`. A recipe with no data block (a pretrained model used as it is) has nothing to
train: tests/test_hf.py generates with it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from bigmodel.config import load_recipe
from bigmodel.data import standard
from bigmodel.models.base import Capability
from bigmodel.registry import get_model
from conftest import ROOT, run_cli, write_aclimdb_fixture, write_cifar_fixture, write_fashion_fixture

RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.yaml") if load_recipe(p).data is not None)
# One recipe per task (and the pretrained text classifier) also writes its run report: every task's sections.
REPORTED = {
    "quickstart",
    "japanese_vowels_lstm",
    "tweets_transformer",
    "tweets_minilm",
    "breast_cancer_mlp",
    "shakespeare_char_gpt",
    "bible_en_es_transformer",
    "speech_digits_cnn",
    "speech_sentences_ctc",
}
# The slowest debug runs (20-80 s each: pretrained weights, a pretraining run first, the largest models); their code
# paths also run, smaller, in test_hf.py, test_generative.py and the other recipes. They run in CI (conftest.py).
# (bible_en_es_transformer, 26 s, stays: it is the one recipe whose report shows the translation sections.)
SLOW = {
    "smollm2_shakespeare",
    "tweets_pretrained_gpt",
    "tweets_minilm",
    "shakespeare_char_gpt_large",
    "fashion_mnist_resnet",
    "fillets_czech_ctc",
}
DATALESS = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml") if load_recipe(p).data is None)


def test_recipes_without_data_are_the_ones_test_hf_generates_with():
    assert DATALESS == ["smollm2_generate"]


@pytest.mark.parametrize(
    "path", [pytest.param(p, marks=[pytest.mark.slow] if p.stem in SLOW else []) for p in RECIPES], ids=lambda p: p.stem
)
def test_recipe_debug_size_trains(path, tmp_path):
    recipe = load_recipe(path)
    if recipe.task in ("audio_classification", "speech_recognition") and importlib.util.find_spec("soundfile") is None:
        pytest.skip("the audio extra is not installed")
    extra = []
    source = recipe.data.source
    if source == "fashion_mnist" and not standard.has_idx_files(standard.IDX_SETS["fashion_mnist"].local_dirs[0]):
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    if source in ("mnist", "kmnist"):
        write_fashion_fixture(tmp_path / "idx", n_train=300, n_test=50)
        extra = [f"data.path={tmp_path / 'idx'}"]
    elif source in ("cifar10", "cifar100"):
        write_cifar_fixture(tmp_path / "cifar", source, n_train=300, n_test=50)
        extra = [f"data.path={tmp_path / 'cifar'}"]
    elif source == "aclimdb":
        extra = [f"data.path={write_aclimdb_fixture(tmp_path / 'aclImdb', n_train=40, n_test=10)}"]
    elif source == "bible" and not Path("/usr/share/sword/modules/texts/ztext/engKJV2006eb").is_dir():
        pytest.skip("the SWORD Bibles are not installed (apt-get install sword-text-kjv sword-text-sparv)")
    elif source == "spoken_digits":
        if shutil.which("espeak-ng") is None:
            pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
        extra = ["data.voices=10"]  # 100 clips to synthesise instead of 800
    elif source == "spoken_sentences":
        if shutil.which("espeak-ng") is None or not Path("/usr/share/games/fillets-ng/script").is_dir():
            pytest.skip("espeak-ng or fillets-ng-data is not installed")
        extra = ["data.voices=5", "data.sentences_per_voice=4"]
    elif (
        source in ("fillets_speakers", "fillets_transcripts") and not Path("/usr/share/games/fillets-ng/sound").is_dir()
    ):
        pytest.skip("the Fish Fillets voices are not installed (apt-get install fillets-ng-data-cs)")
    elif source == "fillets_transcripts" and not Path("/usr/share/games/fillets-ng/script").is_dir():
        pytest.skip("the Fish Fillets scripts (the clips' text) are not installed (apt-get install fillets-ng-data)")
    if recipe.task in ("language_modeling", "translation"):  # small held-out splits: evaluation dominates here
        extra += ["data.val_fraction=0.01", "data.test_fraction=0.01"]
    if recipe.model.name == "hf":  # pretrained models: evaluation over full held-out splits would dominate
        extra += (
            ["data.val_fraction=0.002", "data.test_fraction=0.002"]
            if recipe.task == "language_modeling"
            else ["data.val_fraction=0.01", "data.test_fraction=0.01"]
        )
    if recipe.task == "language_modeling":
        extra += ["data.batches_per_epoch=5", "train.max_steps=5"]
    if recipe.task == "translation":
        extra += ["eval.decode_limit=8"]
    if recipe.model.init_from is not None:  # pretrain → fine-tune: the pretraining recipe first, at debug size
        pre = tmp_path / "pre"
        run_cli(
            "train",
            str(ROOT / "recipes" / f"{recipe.model.init_from}.yaml"),
            "train.epochs=1",
            "data.batches_per_epoch=5",
            "data.val_fraction=0.02",
            "data.test_fraction=0.02",
            "--out",
            str(pre),
            "--no-progress",
            check=True,
        )
        extra.append(f"model.init_from={pre}")
    out = tmp_path / "run"
    run_cli(
        "train",
        str(path),
        "train.epochs=1",
        "data.limit_train=512",
        *extra,
        "--out",
        str(out),
        "--no-progress",
        *(["--report"] if path.stem in REPORTED else []),
        check=True,
    )
    summary = json.loads((out / "summary.json").read_text())
    m = summary["metrics"]
    if get_model(recipe.model.name).can(Capability.SOLVED):  # fitted by its solver in one pass, no steps
        assert summary["steps"] == 0 and summary["epochs_done"] == 1
    else:
        assert summary["steps"] >= 1
    if recipe.task == "speech_recognition":
        assert m["cer"] >= 0 and m["wer"] >= 0 and m["num_examples"] > 0
    elif recipe.task in ("language_modeling", "translation"):
        assert m["perplexity"] > 1 and m["num_tokens"] > 0
        if recipe.task == "translation":
            assert 0 <= m["bleu"] <= 100 and m["num_sentences"] == 8
    else:
        assert 0.0 <= m["accuracy"] <= 1.0
    assert (out / "model" / "model.safetensors").is_file()
    if path.stem in REPORTED:
        check_report(out, recipe.task, summary)


def test_every_task_has_a_reported_recipe():
    assert {load_recipe(ROOT / "recipes" / f"{n}.yaml").task for n in REPORTED} == {
        load_recipe(p).task for p in RECIPES
    }


def check_report(out, task, summary):
    """The run report works for every task: its sections are the task's, its numbers the summary's."""
    html = (out / "report.html").read_text()
    data = json.loads(html.split('id="report-data">', 1)[1].split("</script>", 1)[0].replace("<\\/", "</"))
    run = data["runs"][0]
    assert run["overview"]["status"] in ("finished", "early-stopped")
    assert run["final_metrics"] == {k: v for k, v in summary["metrics"].items() if type(v) in (int, float)}
    if task == "language_modeling":
        assert run["samples"] and all(s["generated"] for s in run["samples"])
    elif task == "translation":
        assert run["translations"] == summary["metrics"]["examples"]
    elif task == "speech_recognition":
        assert run["final_metrics"]["cer"] == summary["metrics"]["cer"]
    else:
        assert run["confusion_matrix"] == summary["metrics"]["confusion_matrix"]
        assert len(run["worst"]) == min(12, summary["metrics"]["num_examples"])
        assert run["calibration"]["num_examples"] == summary["metrics"]["num_examples"]
