"""The model contract, over every registered model name (timm's registry-wide test): a tiny config builds, forward
and backward have the right shapes, every parameter gets a gradient, classifiers split exactly into
forward_features / forward_head, declared capabilities hold (cam_layer, input_embedding, decoder, export), and a
save → load round trip through safetensors is bit-identical."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from safetensors.torch import load_file, save_file

from bigmodel.models import build_model
from bigmodel.models.base import Capability, Classifier, ConvClassifier, ModelBase
from bigmodel.registry import get_model, model_names

V = 50  # vocabulary of the token inputs
IMAGE = (1, 16, 16)
SEQUENCE = {"kind": "sequence", "features": 3}
TEXT = {"kind": "text", "vocab_size": V, "pad_id": 0, "has_cls": False, "max_length": 16}
LM = {"kind": "lm", "vocab_size": V, "context_length": 16}
TABLE = {"kind": "tabular", "numeric": ["a", "b", "c"], "categorical": {"d": ["x", "y"]}, "cardinalities": [3]}
HF_BERT = {**TEXT, "hf": "bert"}  # hf classifiers: a tiny BERT (pooler + classifier) and GPT-2 (score) layout
HF_GPT2 = {**TEXT, "hf": "gpt2"}
AUDIO = {
    "kind": "audio",
    "sample_rate": 8000,
    "samples": 400,  # 11 frames
    "features": {"n_fft": 128, "win_length": 100, "hop_length": 40, "n_mels": 12, "f_min": 0.0, "f_max": None},
}
SPEECH = {"kind": "speech", "sample_rate": 8000, "features": AUDIO["features"]}
TRANSLATION = {"kind": "translation", "src_vocab_size": V, "tgt_vocab_size": V, "shared_vocab": True, "max_length": 16}

# Tiny options per registered name; a new model name without an entry here fails test_every_model_has_a_case.
TINY: dict[str, dict] = {
    "cnn-small": {"widths": [4, 8]},
    "seed-cnn": {"conv1_channels": 4, "conv2_channels": 8, "hidden": 16},
    "resnet": {"widths": [4, 8, 8], "blocks": [1, 1, 1]},
    "resnet-8": {"widths": [4, 8, 8]},
    "resnet-14": {"widths": [4, 8, 8]},
    "resnet-20": {"widths": [4, 8, 8]},
    "lstm-classifier": {"hidden_size": 8, "embedding_dim": 8},
    "gru-classifier": {"hidden_size": 8, "embedding_dim": 8},
    "rnn-classifier": {"hidden_size": 8, "embedding_dim": 8},
    "transformer-classifier": {"dim": 16, "num_heads": 2, "num_layers": 1, "ff_dim": 32, "max_length": 16},
    "embedding-bag": {"embedding_dim": 8, "ngram_buckets": 16},
    "gpt-classifier": {"dim": 16, "num_heads": 2, "num_layers": 1},
    "mlp": {"hidden": [8, 8]},
    "audio-cnn": {"widths": [4, 8]},
    "ctc-bilstm": {"conv_channels": 2, "hidden_size": 8, "num_layers": 1},
    "gpt": {"dim": 16, "num_heads": 2, "num_layers": 1},
    "transformer-seq2seq": {"dim": 16, "num_heads": 2, "encoder_layers": 1, "decoder_layers": 1, "ff_dim": 32},
    "hf": {},  # a tiny random-init GPT-2 written by the `hf_gpt2` fixture
    "linear": {"C": 1.0},
    "tfidf-linear": {},
    "gradient-boosting": {"fitted": [4, 7, 2]},
}


def _inputs(shape) -> tuple:
    g = torch.Generator().manual_seed(0)
    if isinstance(shape, tuple):
        return (torch.randn(2, *shape, generator=g),)
    kind = shape["kind"]
    if kind == "sequence":
        return torch.randn(2, 5, 3, generator=g), torch.tensor([5, 3])
    if kind == "text":
        ids = torch.randint(4, V, (2, 6), generator=g)
        ids[1, 4:] = 0
        return ids, torch.tensor([6, 4])
    if kind == "lm":
        return (torch.randint(0, V, (2, 8), generator=g),)
    if kind == "tabular":
        return torch.randn(2, 3, generator=g), torch.tensor([[1], [2]])
    if kind == "audio":
        return (0.1 * torch.randn(2, shape["samples"], generator=g),)
    if kind == "speech":  # waveforms and their lengths (the second clip padded)
        return 0.1 * torch.randn(2, 400, generator=g), torch.tensor([400, 300])
    src = torch.randint(4, V, (2, 6), generator=g)
    return src, torch.tensor([6, 5]), torch.randint(4, V, (2, 5), generator=g)


def _cases() -> list[tuple[str, object]]:
    out = []
    for name in model_names():
        tasks = get_model(name).tasks
        if "image_classification" in tasks:
            out.append((name, IMAGE))
        if "sequence_classification" in tasks:
            out.append((name, SEQUENCE))
        if "text_classification" in tasks:
            out.extend([(name, TEXT)] if name != "hf" else [(name, HF_BERT), (name, HF_GPT2)])
        if "tabular_classification" in tasks:
            out.append((name, TABLE))
        if "audio_classification" in tasks:
            out.append((name, AUDIO))
        if "speech_recognition" in tasks:
            out.append((name, SPEECH))
        if "language_modeling" in tasks:
            out.append((name, LM))
        if "translation" in tasks:
            out.append((name, TRANSLATION))
    return out


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """Tiny random-init GPT-2 and BERT folders (save_pretrained layout, with tokenizers)."""
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (the hf extra)")
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    from test_hf import _fast_tokenizer

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    _fast_tokenizer("bpe", root / "gpt2")
    GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=32)).save_pretrained(
        root / "gpt2"
    )
    _fast_tokenizer("wordpiece", root / "bert")
    bert = BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(bert).save_pretrained(root / "bert")
    return root


def _build(name: str, shape, request) -> torch.nn.Module:
    options = dict(TINY[name])
    if name == "hf":
        which = shape.get("hf", "gpt2")
        options["pretrained"] = str(request.getfixturevalue("hf_models") / which)
        shape = {k: v for k, v in shape.items() if k != "hf"}
    if name == "tfidf-linear":  # reads the `ngrams` tokenizer's ids: words 5..29, character n-grams 30..V-1
        shape = {**shape, "ngram_words": [5, 30]}
    return build_model(name, options, shape, 3)


def test_every_model_has_a_case():
    assert sorted(TINY) == model_names()


def _id(v) -> str:
    return v if isinstance(v, str) else ("image" if isinstance(v, tuple) else v.get("hf", v["kind"]))


@pytest.mark.parametrize(("name", "shape"), _cases(), ids=_id)
def test_model_contract(name, shape, request, tmp_path):
    entry = get_model(name)
    torch.manual_seed(0)
    model = _build(name, shape, request)
    assert isinstance(model, ModelBase), "every model follows the contract in models/base.py"
    x = _inputs(shape)
    # forward / backward: shapes, and every trainable parameter gets a gradient
    model.train()
    out = model(*x)
    if shape is SPEECH:  # CTC: per-step log-probabilities over the alphabet and each clip's step count
        out, steps = out
        assert out.shape == (2, int(steps.max()), 3) and steps[1] < steps[0]
    classifying = shape not in (LM, TRANSLATION, SPEECH)
    if classifying:
        assert entry.can(Capability.CLASSIFIER) and isinstance(model, Classifier)
        assert out.shape == (2, 3)
    elif shape is TRANSLATION:
        assert out.shape == (2, 5, V)
    elif shape is not SPEECH:
        assert out.shape[:2] == (2, 8) and out.shape[-1] >= V
    out.float().square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without a gradient: {missing}"
    # FSDP2's units: distinct submodules; the Transformer families declare their blocks
    units = model.shard_units()
    inside = {id(m) for m in model.modules() if m is not model}
    assert len({id(u) for u in units}) == len(units) and all(id(u) in inside for u in units)
    if name in ("gpt", "gpt-classifier", "transformer-classifier", "transformer-seq2seq", "hf"):
        assert units, f"{name} declares no blocks for FSDP2"
    model.eval()
    with torch.no_grad():
        ref = model(*x)
        ref = ref[0] if shape is SPEECH else ref
    # declared capabilities hold
    assert entry.can(Capability.CLASSIFIER) == isinstance(model, Classifier)
    if classifying:
        with torch.no_grad():
            features = model.forward_features(*x)
            assert features.ndim == 2 and features.shape[0] == 2
            if name == "hf":  # transformers scores every position, then pools; forward_head scores the pooled row:
                # the same function through GEMMs of other shapes, whose last bits differ on some CPUs (Intel AMX)
                torch.testing.assert_close(model.forward_head(features), ref, rtol=1e-5, atol=1e-6)
            elif not entry.can(Capability.SOLVED):
                assert torch.equal(model.forward_head(features), ref)
            else:  # tfidf-linear's own forward (no dense (B, V) rows) computes the same function, summed otherwise
                torch.testing.assert_close(model.forward_head(features), ref, rtol=1e-5, atol=1e-6)
    if entry.can(Capability.CONVNET):
        assert isinstance(model, ConvClassifier)
        seen = []
        handle = model.cam_layer().register_forward_hook(lambda m, i, o: seen.append(o))
        with torch.no_grad():
            model(*x)
        handle.remove()
        assert seen and seen[0].ndim == 4, "cam_layer() must output a spatial map (B, C, H, W)"
    if classifying and isinstance(shape, dict) and shape["kind"] == "text" and not entry.can(Capability.SOLVED):
        emb = model.input_embedding()
        assert isinstance(emb, (torch.nn.Embedding, torch.nn.EmbeddingBag))
    if entry.can(Capability.TOKEN_INPUT) and classifying:
        assert model.input_embedding() is not None
    if entry.can(Capability.GENERATES):
        assert callable(getattr(model, "decoder", None))
    # save → load: bit-identical outputs from a model built with other random weights
    save_file({k: v.contiguous() for k, v in model.artifact_state_dict().items()}, str(tmp_path / "m.safetensors"))
    torch.manual_seed(1)
    again = _build(name, shape, request)
    if name == "hf":
        # the tied LM head is stored once (artifact_state_dict); everything stored must be a key of the model
        assert not again.load_state_dict(load_file(str(tmp_path / "m.safetensors")), strict=False).unexpected_keys
    else:
        again.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    again.eval()
    with torch.no_grad():
        got = again(*x)
        assert torch.equal(got[0] if shape is SPEECH else got, ref)
    if entry.can(Capability.EXPORTABLE):
        ep = torch.export.export(model, x, strict=False)
        with torch.no_grad():
            out = ep.module()(*x)
            torch.testing.assert_close(out[0] if shape is SPEECH else out, ref, rtol=1e-5, atol=1e-5)
