"""`bigmodel explain`: every method on every classifier kind and on a GPT, from the CLI and the API; the artifact's
model is left bit-identical; faithfulness beats a random control, the randomisation check passes for real methods and
fails for an edge map, IG is complete; /v1/explain answers like the CLI."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from bigmodel import api
from bigmodel.config import validate_recipe
from conftest import run_cli, tiny_recipe, train_lm_fixture_run

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("captum") is None, reason="captum is not installed (the explain extra)"
)

IMAGE_METHODS = ["saliency", "integrated_gradients", "gradcam", "occlusion", "lime", "kernel_shap"]


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    api.train(validate_recipe(tiny_recipe(**{"train.epochs": 6})), out=root / "run", progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def image_files(image_run, tmp_path_factory):
    from PIL import Image

    ev = api.evaluation(image_run, "test")
    d = tmp_path_factory.mktemp("imgs")
    files = []
    for i, x in enumerate(ev.data.split("test").x[:3]):
        p = d / f"digit{i}.png"
        Image.fromarray(x[0].numpy()).save(p)
        files.append(p)
    return files


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A tiny from-scratch Transformer on texts whose label is one word ("great" / "awful") among fillers."""
    import random

    root = tmp_path_factory.mktemp("text")
    rng = random.Random(0)
    fill = ["the", "movie", "plot", "was", "really", "quite", "a", "film", "story", "and"]
    rows = ["text,label"]
    for i in range(400):
        word, label = ("great", "pos") if i % 2 else ("awful", "neg")
        words = rng.sample(fill, 5)
        words.insert(rng.randrange(6), word)
        rows.append(f'"{" ".join(words)}",{label}')
    (root / "t.csv").write_text("\n".join(rows) + "\n")
    recipe = {
        "task": "text_classification",
        "data": {"source": "csv", "path": str(root / "t.csv"), "tokenizer": {"min_frequency": 1, "max_length": 16}},
        "model": {"name": "transformer-classifier", "dim": 16, "num_heads": 2, "num_layers": 1, "ff_dim": 32},
        "train": {"epochs": 4, "batch_size": 16, "optimizer": {"name": "adamw", "lr": 0.01}},
    }
    api.train(validate_recipe(recipe), out=root / "run", progress=False)
    return root / "run"


def test_every_image_method_writes_its_pictures_and_leaves_the_model_untouched(image_run, image_files, tmp_path):
    from PIL import Image

    from bigmodel.explain import explain_items
    from bigmodel.runs import load_artifact

    art = load_artifact(image_run)
    names, items = art.spec.explain_items(art, image_files, None)
    x = art.spec.model_inputs(art, items)[0]
    before = art.model(x).detach().clone()
    state = {k: v.clone() for k, v in art.model.state_dict().items()}
    from bigmodel.explain import explain

    for m in [*IMAGE_METHODS, "activations"]:
        res = explain(image_run, files=image_files, method=m, out=tmp_path / "out")
        assert len(res) == 3
        for r in res:
            assert r["method"] == m
            png = next(p for k, p in r["files"].items() if k in ("heatmap", "activations"))
            with Image.open(png) as im:
                assert im.width >= 8 and im.height >= 8
            if m != "activations":
                assert len(r["regions"]) == 7 and len(r["regions"][0]) == 7
                attr = np.load(r["files"]["attributions"], allow_pickle=False)
                assert attr.shape in ((1, 8, 8),) and np.isfinite(attr).all() and np.abs(attr).sum() > 0
                assert r["target"] == {k: r["prediction"][k] for k in ("label", "index", "score")}
            else:
                assert [lay["channels"] for lay in r["layers"]] == [8, 8, 16, 16]
    # The artifact's own model: same outputs bit for bit, same weights, no hooks, in-place ReLUs still in place.
    assert torch.equal(art.model(x), before)
    assert all(torch.equal(v, state[k]) for k, v in art.model.state_dict().items())
    for mod in art.model.modules():
        assert not mod._forward_hooks and not mod._backward_hooks and not mod._forward_pre_hooks
    assert any(getattr(mod, "inplace", False) for mod in art.model.modules())
    # A fixed target explains that label for every input.
    res = explain_items(art, names, items, "saliency", target="3", pictures=False)
    assert {r["target"]["label"] for r in res} == {"3"}


def test_image_saliency_is_the_signed_gradient_of_the_target_logit(image_run, image_files):
    """Image saliency keeps the gradient's sign (every pixel lies on one side of black, what deletion puts in its
    place), summed over channels per pixel; its picture uses the diverging colours of signed methods."""
    from bigmodel.explain import explain_items, render
    from bigmodel.explain.core import Batch, explainer_for
    from bigmodel.runs import load_artifact

    art = load_artifact(image_run)
    names, items = art.spec.explain_items(art, image_files, None)
    x = art.spec.model_inputs(art, items)[0].float()
    ex = explainer_for(art)
    t = ex.probabilities((x,)).argmax(dim=1)
    attr = ex.attribute("saliency", Batch((x,), t)).detach()
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(ex.model(xg)[torch.arange(len(t)), t].sum(), xg)
    torch.testing.assert_close(attr, grad, rtol=1e-5, atol=1e-7)
    assert (attr < 0).any() and (attr > 0).any()
    torch.testing.assert_close(ex.unit_scores("saliency", attr), grad.sum(dim=1).reshape(len(x), -1))
    res = explain_items(art, names, items, "saliency", pictures=False)
    assert min(min(row) for r in res for row in r["regions"]) < 0  # the 7 x 7 region sums keep the sign
    assert {r["method_name"] for r in res} == {"saliency (signed gradient)"}
    signed = render.colour(np.array([[-1.0, 0.0, 1.0]]), "saliency")
    assert signed[0, 0, 2] > signed[0, 0, 0] and signed[0, 2, 0] > signed[0, 2, 2]  # blue against, red for


def test_lime_weights_samples_like_lime_image():
    """LIME's kernel: lime_image's sqrt(exp(-d^2 / 0.25^2)) with d the cosine distance (scikit-learn's) between a
    sample's binary patch vector and the all-ones vector of the input itself."""
    from sklearn.metrics import pairwise_distances

    from bigmodel.explain.core import lime_kernel

    g = torch.Generator().manual_seed(0)
    z = (torch.rand(50, 49, generator=g) < torch.linspace(0.05, 1.0, 50)[:, None]).float()
    z[:, 0] = 1.0  # no all-zero sample (its cosine distance is undefined)
    d = pairwise_distances(z.numpy(), np.ones((1, 49)), metric="cosine")[:, 0]
    expected = np.sqrt(np.exp(-(d**2) / 0.25**2))
    got = np.array([lime_kernel(None, None, row[None]) for row in z])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)
    assert lime_kernel(None, None, torch.ones(1, 49)) == 1.0


def assert_surrogates_are_captums(run, items, monkeypatch):
    """LIME and KernelSHAP as bigmodel runs them (`Surrogate`: per-batch perturbed inputs) give Captum's own
    attributions with the same sampler, bit for bit: the same samples drawn in the same order, the same perturbed
    inputs, the same fits."""
    import captum.attr as A

    from bigmodel.explain import explain_items, explainer_for
    from bigmodel.explain.core import Explainer, kernel_shap_samples, lime_kernel, lime_samples
    from bigmodel.runs import load_artifact

    art = load_artifact(run)
    ex = explainer_for(art)
    names = [f"x{i}" for i in range(len(items))]

    def attributions(**kw):
        torch.manual_seed(0)
        res = explain_items(art, names, items, method, explainer=ex, pictures=False, n_samples=60, **kw)
        return np.stack([r["_files"]["attributions.npy"] for r in res])

    for method in ("lime", "kernel_shap"):
        for per_eval in (1, 25):
            ours = attributions(perturbations_per_eval=per_eval)
            with monkeypatch.context() as m:  # Captum's Lime / KernelShap called on the batch as they are

                def captums(self, meth):
                    if meth == "lime":
                        return A.Lime(self.forward, similarity_func=lime_kernel, perturb_func=lime_samples)
                    ks = A.KernelShap(self.forward)
                    ks.perturb_func = kernel_shap_samples
                    return ks

                m.setattr(Explainer, "surrogate", captums)
                theirs = attributions(perturbations_per_eval=per_eval)
            assert ours.shape == theirs.shape and np.array_equal(ours, theirs), (method, per_eval)
            assert np.abs(ours).sum() > 0


def test_block_samplers_draw_captums_distributions():
    """`kernel_shap_samples` draws Captum's KernelSHAP distribution (all, none, then k ~ the Shapley kernel's
    distribution, the k features uniform), `lime_samples` LIME's (each feature kept with probability 1/2); KernelSHAP
    with the block sampler recovers a linear model's Shapley values exactly."""
    import captum.attr as A
    from torch.distributions import Categorical

    from bigmodel.explain.core import kernel_shap_samples, lime_samples

    torch.manual_seed(0)
    n, draws = 12, 20_000
    idx = torch.arange(n, dtype=torch.float)
    probs = torch.tensor(float(n - 1)) / (idx * (n - idx))
    probs[0] = 0.0
    dist = Categorical(probs)
    it = kernel_shap_samples(torch.zeros(3), num_interp_features=n, num_select_distribution=dist)
    assert next(it).tolist() == [[1] * n] and next(it).tolist() == [[0] * n]
    z = torch.cat([next(it) for _ in range(draws)])
    assert z.shape == (draws, n) and z.dtype == torch.long
    k = z.sum(dim=1)
    assert int(k.min()) >= 1 and int(k.max()) <= n - 1
    freq = torch.bincount(k, minlength=n).float() / draws
    assert torch.allclose(freq, dist.probs, atol=0.012), (freq, dist.probs)
    for size in (2, 6, 10):  # given k, every feature equally likely to be among the k
        pos = z[k == size].float().mean(dim=0)
        assert torch.allclose(pos, torch.full((n,), size / n), atol=0.06), (size, pos)
    lime = lime_samples(torch.zeros(3), num_interp_features=n)
    z = torch.cat([next(lime) for _ in range(draws)])
    assert set(z.unique().tolist()) == {0, 1} and torch.allclose(z.float().mean(0), torch.full((n,), 0.5), atol=0.02)

    w = torch.randn(8)
    x, base = torch.randn(1, 8), torch.randn(1, 8)
    mask = torch.tensor([[0, 0, 1, 2, 2, 3, 4, 5]])
    ks = A.KernelShap(lambda v: (v * w).sum(dim=1, keepdim=True))
    ks.perturb_func = kernel_shap_samples
    attr = ks.attribute(x, baselines=base, target=0, feature_mask=mask, n_samples=300, perturbations_per_eval=50)
    assert torch.allclose(
        attr,
        (w * (x - base))
        .view(1, -1)
        .new_tensor([[float((w * (x - base))[0, mask[0] == g].sum()) for g in mask[0].tolist()]]),
        atol=1e-4,
    )


def test_lime_and_kernel_shap_are_captums_for_images_and_text(image_run, text_run, monkeypatch):
    x = api.evaluation(image_run, "test").data.split("test").x[:3]
    assert_surrogates_are_captums(image_run, list(x.float().numpy()), monkeypatch)
    assert_surrogates_are_captums(text_run, ["the plot was great", "awful film and story", "a"], monkeypatch)


def test_resnet_blocks_reuse_their_relu_and_still_explain(tmp_path):
    """ResNet's basic block calls one ReLU(inplace=True) twice: the explainable copy makes it out-of-place, so
    Grad-CAM's layer hook and IG's gradients work and the artifact keeps its in-place module."""
    from bigmodel.explain import explain_items
    from bigmodel.runs import load_artifact

    r = tiny_recipe(**{"model": {"name": "resnet-8", "widths": [8, 8, 16]}, "train.epochs": 2})
    run = api.train(validate_recipe(r), out=tmp_path / "run", progress=False).run_dir
    art = load_artifact(run)
    items = list(api.evaluation(run, "test").data.split("test").x[:4].float().numpy())
    for m in ("gradcam", "integrated_gradients", "activations"):
        res = explain_items(art, [f"x{i}" for i in range(4)], items, m)
        assert len(res) == 4
    assert any(getattr(mod, "inplace", False) for mod in art.model.modules())


def test_explain_cli_json_and_errors(image_run, image_files, tmp_path):
    p = run_cli("explain", str(image_run), str(image_files[0]), "--method", "gradcam", "--json", check=True)
    out = json.loads(p.stdout)["explanations"][0]
    assert out["method"] == "gradcam" and (image_run / "explanations").is_dir()
    assert out["files"]["heatmap"].endswith(".png")
    p = run_cli("explain", str(image_run), str(image_files[0]), "--out", str(tmp_path / "e"))
    assert p.returncode == 0 and "integrated gradients" in p.stdout and str(tmp_path / "e") in p.stdout
    for args, msg in [
        (["--target", "cat"], "--target 'cat': not a label of this model"),
        (["--method", "magic"], "--method 'magic'"),
    ]:
        p = run_cli("explain", str(image_run), str(image_files[0]), *args)
        assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
    p = run_cli("explain", str(image_run), str(tmp_path / "missing.png"))
    assert p.returncode == 2 and "missing.png: image file not found" in p.stderr


def test_faithfulness_sanity_and_completeness(image_run):
    from bigmodel.explain import evaluate

    res = evaluate(image_run, limit=120, steps=10, methods=["saliency", "integrated_gradients", "occlusion"])
    assert res["examples"] == 120 and res["kind"] == "image"
    for m in ("integrated_gradients", "occlusion"):
        row = res["methods"][m]
        assert row["vs_random"]["deletion"]["z"] <= -3, row  # deletes evidence faster than random
        assert row["vs_random"]["deletion_lerf"]["z"] > 0, row  # and the least relevant slower
        assert row["insertion_auc"] > res["random"]["insertion_auc"]
        assert row["faithful"]
    comp = res["methods"]["integrated_gradients"]["completeness"]
    assert comp["examples"] == 100 and comp["median_relative_error"] < 0.05
    san = res["sanity"]
    assert san["fully_randomised"]["saliency"] < 0.5 and san["fully_randomised"]["integrated_gradients"] < 0.5
    # The control shows the check can fail: an edge map ignores the model, so randomising changes nothing.
    assert san["fully_randomised"]["edge_control"] == 1.0 and san["passes"]["edge_control"] is False
    assert [s["randomised_layers"] for s in san["stages"]] == sorted(s["randomised_layers"] for s in san["stages"])

    # The same figures from the CLI, as JSON.
    p = run_cli("explain", str(image_run), "--evaluate", "--limit", "40", "--methods", "saliency", "--json", check=True)
    cli = json.loads(p.stdout)
    assert cli["examples"] == 40 and set(cli["methods"]) == {"saliency"}


def test_text_tokens_integrated_gradients_and_comprehensiveness(text_run, tmp_path):
    from bigmodel.explain import evaluate, explain

    res = explain(text_run, texts=["the movie was great", "a really awful story"], out=tmp_path)
    for r, word in zip(res, ["great", "awful"], strict=True):
        toks = [t["token"] for t in r["tokens"]]
        scores = [t["score"] for t in r["tokens"]]
        assert word in toks and toks[int(np.argmax(scores))] == word  # the one word that decides the label
        assert abs(r["completeness_delta"]) < 0.05 * 10  # logits of a few units: a tiny absolute delta
        assert (tmp_path / r["files"]["tokens"].split("/")[-1]).read_text().count("<span") == len(toks)
    ev = evaluate(text_run, limit=80, steps=5, sanity=False)
    comp = ev["comprehensiveness"]["integrated_gradients"]
    assert comp["top_beats_random"] >= 0.7 and comp["top_drop"] > comp["random_drop"]
    # Attention maps: one (heads, T, T) per layer; each row is a distribution over the tokens.
    act = explain(text_run, texts=["the movie was great"], method="activations")[0]
    att = np.array(act["attention"][0])
    assert att.shape == (2, len(act["tokens"]), len(act["tokens"])) and np.allclose(att.sum(-1), 1, atol=1e-3)
    p = run_cli("explain", str(text_run), "the plot was awful", "--method", "gradcam")
    assert p.returncode == 2 and "does not apply to text models" in p.stderr


def test_embedding_bag_explains_by_occlusion(tmp_path):
    from conftest import train_text_fixture_run

    run = train_text_fixture_run(tmp_path)
    p = run_cli("explain", str(run), "great fun", "--json", check=True)
    r = json.loads(p.stdout)["explanations"][0]
    assert r["method"] == "occlusion" and [t["token"] for t in r["tokens"]][-2:] == ["great", "fun"]
    p = run_cli("explain", str(run), "great fun", "--method", "integrated_gradients")
    assert p.returncode == 2 and "use occlusion, lime or kernel_shap" in p.stderr


def test_sequences_and_tables(tmp_path, monkeypatch):
    from bigmodel.explain import explain
    from test_tabular import recipe as table_recipe
    from test_tabular import write_table

    seq = {
        "task": "sequence_classification",
        "data": {"source": "ts", "name": "JapaneseVowels"},
        "model": {"name": "lstm-classifier", "hidden_size": 16},
        "train": {"epochs": 2, "batch_size": 32},
    }
    run = api.train(validate_recipe(seq), out=tmp_path / "seq", progress=False).run_dir
    arr = np.random.default_rng(0).normal(size=(9, 12)).astype(np.float32)
    np.save(tmp_path / "s.npy", arr)
    for m in ("integrated_gradients", "occlusion", "kernel_shap"):
        r = explain(run, files=[tmp_path / "s.npy"], method=m, out=tmp_path / "e")[0]
        assert np.array(r["scores"]).shape == (9, 12) and r["files"]["heatmap"].endswith(".png")
    assert_surrogates_are_captums(run, [arr, arr[:5] * 2], monkeypatch)

    table = write_table(tmp_path / "t.csv", n=160)
    trun = api.train(validate_recipe(table_recipe(table)), out=tmp_path / "tab", progress=False).run_dir
    (tmp_path / "rows.csv").write_text("size,colour,noise\n8.0,red,0.1\n2.0,blue,-0.3\n")
    res = explain(trun, files=[tmp_path / "rows.csv"])
    assert res[0]["method"] == "occlusion"
    assert {c["column"] for c in res[0]["columns"]} == {"size", "colour", "noise"}
    assert res[0]["columns"][-1]["column"] == "noise"  # the column the label never depends on matters least
    from bigmodel.runs import load_artifact

    tart = load_artifact(trun)
    _, rows = tart.spec.explain_items(tart, [tmp_path / "rows.csv"], None)  # the rows as `explain` reads them
    assert_surrogates_are_captums(trun, rows, monkeypatch)
    p = run_cli("explain", str(trun), str(tmp_path / "rows.csv"), "--method", "saliency")
    assert p.returncode == 2 and "categorical columns (colour) have no gradient" in p.stderr


def test_language_model_prompt_attributions(tmp_path):
    from bigmodel.explain import explain

    run = train_lm_fixture_run(tmp_path)
    r = explain(run, texts=["First Citizen:\nBefore we"], new_tokens=4)[0]
    P = len(r["prompt_tokens"])
    assert len(r["generated_tokens"]) == 4
    assert [len(row) for row in r["attributions"]] == [P, P + 1, P + 2, P + 3]
    assert all(0 <= s <= 1 for s in r["prompt_share"])
    # Greedy continuation equals `generate` at temperature 0.
    from bigmodel.runs import load_artifact

    art = load_artifact(run)
    assert r["generated_text"] == art.generate_text("First Citizen:\nBefore we", 4, temperature=0)
    att = explain(run, texts=["All:\nSpeak"], method="activations")[0]
    assert len(att["attention"]) == 2 and np.allclose(np.array(att["attention"][1]).sum(-1), 1, atol=1e-3)
    p = run_cli("explain", str(run), "All:", "--method", "occlusion", "--new-tokens", "2", check=True)
    assert "from the prompt" in p.stdout


def test_server_explains(image_run, image_files, text_run):
    import base64

    from fastapi.testclient import TestClient

    from bigmodel.runs import load_artifact
    from bigmodel.serving.server import create_app

    b64 = base64.b64encode(image_files[0].read_bytes()).decode()
    with TestClient(create_app(load_artifact(image_run))) as c:
        r = c.post("/v1/explain", json={"inputs": [{"image_base64": b64}], "method": "gradcam"})
        assert r.status_code == 200, r.text
        e = r.json()["explanations"][0]
        assert e["heatmap_png"].startswith("data:image/png;base64,") and e["method"] == "gradcam"
        cli = json.loads(
            run_cli("explain", str(image_run), str(image_files[0]), "-m", "gradcam", "--json", check=True).stdout
        )["explanations"][0]
        assert e["regions"] == cli["regions"] and e["prediction"] == cli["prediction"]
        assert c.post("/v1/explain", json={"inputs": ["text"]}).status_code == 422
        r = c.post("/v1/explain", json={"inputs": [{"image_base64": b64}], "target": "nope"})
        assert r.status_code == 422 and "not a label" in r.json()["detail"]
        assert c.post("/v1/explain", json={"inputs": [{"image_base64": b64}] * 17}).status_code == 413
    with TestClient(create_app(load_artifact(text_run))) as c:
        r = c.post("/v1/explain", json={"inputs": ["the movie was great"]})
        assert r.status_code == 200
        assert [t["token"] for t in r.json()["explanations"][0]["tokens"]][-1] == "great"
        r = c.post("/v1/explain", json={"inputs": ["the movie was great"], "method": "gradcam"})
        assert r.status_code == 422 and "does not apply" in r.json()["detail"]


def test_runtime_artifacts_say_why_not(image_run, tmp_path):
    from bigmodel.errors import UserError
    from bigmodel.explain import explainer_for
    from bigmodel.runs import load_artifact

    run_cli("compress", str(image_run), "--method", "quantize", "--out", str(tmp_path / "q"), check=True)
    with pytest.raises(UserError, match="runtime, whose weights have no gradients; explain the fp32 run"):
        explainer_for(load_artifact(tmp_path / "q"))
