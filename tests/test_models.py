"""Models: shapes, the computed flatten size, the classifier contract, gradients reach every parameter."""

from __future__ import annotations

import pytest
import torch

from bigmodel.models import build_model
from bigmodel.registry import get_model, model_names


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 17, 23), (1, 8, 8)])
def test_seed_cnn_flatten_size_follows_the_input(shape):
    m = build_model("seed-cnn", {}, shape, 10)
    x = torch.randn(2, *shape)
    assert m(x).shape == (2, 10)
    # The seed documents hard-code 64*6*6; for 32x32 the correct size is 64*8*8.
    if shape == (3, 32, 32):
        assert m.head[0].in_features == 64 * 8 * 8


def test_seed_cnn_is_the_documents_architecture():
    m = build_model("seed-cnn", {}, (3, 32, 32), 10)
    convs = [layer for layer in m.features if isinstance(layer, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (3, 32, (3, 3), (1, 1)),
        (32, 64, (3, 3), (1, 1)),
    ]
    assert [layer.out_features for layer in m.head if isinstance(layer, torch.nn.Linear)] == [128, 10]


@pytest.mark.parametrize("name", ["seed-cnn", "cnn-small"])
def test_contract_and_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    m = build_model(name, {}, (1, 28, 28), 7)
    x = torch.randn(4, 1, 28, 28)
    feats = m.forward_features(x)
    assert feats.ndim == 2 and feats.shape[0] == 4
    m.eval()
    torch.testing.assert_close(m.forward_head(m.forward_features(x)), m(x))
    m.train()
    m(x).logsumexp(1).sum().backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_cnn_small_options_and_registry():
    m = build_model("cnn-small", {"widths": [4, 8, 16, 32], "dropout": 0.0, "batchnorm": False}, (3, 40, 40), 3)
    assert m(torch.randn(2, 3, 40, 40)).shape == (2, 3)
    assert not any(isinstance(layer, torch.nn.BatchNorm2d) for layer in m.modules())
    assert {"seed-cnn", "cnn-small"} <= set(model_names())
    with pytest.raises(KeyError, match="unknown model"):
        get_model("nope")


def test_cnn_small_overfits_one_batch():
    torch.manual_seed(0)
    m = build_model("cnn-small", {"widths": [8, 16], "dropout": 0.0}, (1, 12, 12), 4)
    x, y = torch.randn(16, 1, 12, 12), torch.arange(16) % 4
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_cnn_small_rejects_images_too_small_for_its_stages():
    with pytest.raises(ValueError, match=r"halves the image 3 times; 4x4 is too small"):
        build_model("cnn-small", {}, (1, 4, 4), 10)
    assert build_model("cnn-small", {"pool_first": False}, (1, 4, 4), 10)(torch.randn(2, 1, 4, 4)).shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet", "resnet-8", "resnet-14", "resnet-20"])
def test_resnet_family(name):
    torch.manual_seed(0)
    m = build_model(name, {"widths": [8, 16, 32]}, (3, 32, 32), 10)
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 10) and m.forward_features(x).shape == (2, 32)
    m(x).logsumexp(1).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing
    blocks = {"resnet": 3, "resnet-8": 3, "resnet-14": 6, "resnet-20": 9}[name]
    from bigmodel.models.resnet import BasicBlock

    assert sum(isinstance(mod, BasicBlock) for mod in m.modules()) == blocks


def test_resnet_config_errors():
    with pytest.raises(ValueError, match="model.blocks has 2 stages but model.widths has 3"):
        build_model("resnet", {"blocks": [1, 1]}, (1, 28, 28), 10)
    with pytest.raises(ValueError, match="too small"):
        build_model("resnet", {}, (1, 2, 2), 10)
