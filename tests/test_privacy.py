"""DP-SGD (`privacy.dp`, Opacus): the printed ε is the accountant's ε recomputed from (σ, q, steps) and stays within
the target; Poisson-sampled batches (empty ones too) train; a resumed DP run equals an uninterrupted one bit for bit;
layers are fixed for per-example gradients and the artifact replays the fix; unsupported layers are one-line errors."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_cli

pytest.importorskip("opacus", reason="the privacy extra (Opacus) is not installed")

RECIPE = str(ROOT / "recipes" / "breast_cancer_mlp.yaml")  # an MLP with BatchNorm and dropout
SMALL = ["train.epochs=3", "data.limit_train=200", "train.checkpoint_every=7", "train.log_every=5"]


def train(out, *args, env=None, check=True):
    return run_cli("train", RECIPE, *SMALL, *args, "--out", str(out), "--no-progress", env=env, check=check)


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp") / "run"
    train(out, "privacy.dp.target_epsilon=3", "privacy.dp.accountant=rdp")
    return out


def test_epsilon_is_the_accountants_and_within_the_target(dp_run):
    from bigmodel.privacy.dp import epsilon_of

    p = json.loads((dp_run / "summary.json").read_text())["privacy"]
    assert p["accountant"] == "rdp" and p["delta"] == 1e-5 and p["steps"] == 18  # 3 epochs x 200 // 32 batches
    assert p["sample_rate"] == pytest.approx(32 / 200)
    # recomputed from (σ, q, steps) alone, by a fresh accountant
    assert abs(epsilon_of([[p["noise_multiplier"], p["sample_rate"], 18]], "rdp", 1e-5) - p["epsilon"]) < 1e-6
    assert 2.9 < p["epsilon"] <= 3.0
    # ε spent so far is logged with the training loss, growing
    logged = [r for r in map(json.loads, (dp_run / "metrics.jsonl").read_text().splitlines()) if "epsilon" in r]
    assert [r["step"] for r in logged] == [5, 10, 15]
    eps = [r["epsilon"] for r in logged]
    assert eps == sorted(eps) and eps[-1] < p["epsilon"]
    assert eps[-1] == pytest.approx(epsilon_of([[p["noise_multiplier"], p["sample_rate"], 15]], "rdp", 1e-5), abs=1e-9)
    # the artifact records it and replays the layer fix (BatchNorm1d → GroupNorm with one group) when it loads
    config = json.loads((dp_run / "model" / "config.json").read_text())
    assert config["model_fix"] == "dp-v2" and config["privacy"]["epsilon"] == p["epsilon"]
    from bigmodel import load_artifact

    model = load_artifact(dp_run).model
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 1 for m in norms)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())
    proc = run_cli("evaluate", str(dp_run), "--json", check=True)
    summary = json.loads((dp_run / "summary.json").read_text())
    assert json.loads(proc.stdout)["accuracy"] == summary["metrics"]["accuracy"]


def test_no_noise_is_infinite_epsilon_not_a_crash():
    """σ → 0 (ε = ∞: the price of clipping alone) made the PRV accountant's grid overflow inside the first log."""
    import math

    from bigmodel.config import DPConfig
    from bigmodel.privacy.dp import DPSGDStrategy

    strategy = DPSGDStrategy(DPConfig(noise_multiplier=1e-9), num_examples=1000, batch_size=100, total_steps=10)
    assert strategy.epsilon() == 0.0
    strategy.accountant.step(noise_multiplier=strategy.sigma, sample_rate=strategy.sample_rate)
    assert strategy.epsilon() == math.inf


def test_the_report_carries_the_privacy_figures(dp_run, tmp_path):
    p = json.loads((dp_run / "summary.json").read_text())["privacy"]
    html = tmp_path / "r.html"
    run_cli("report", str(dp_run), "-o", str(html), "--no-inference", check=True)
    text = html.read_text()
    section = text[text.index('id="privacy') :][:3000]
    assert "epsilon" in section and "noise_multiplier" in section and f"{p['epsilon']:.4g}"[:4] in section


@pytest.mark.slow
def test_a_resumed_dp_run_equals_an_uninterrupted_one(tmp_path):
    dp = ["privacy.dp.noise_multiplier=1.0"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(full, *dp)
    proc = train(resumed, *dp, env={"BIGMODEL_FAULT": "kill_after_step:10"}, check=False)
    assert proc.returncode != 0 and not (resumed / "model").exists()
    run_cli("train", "--resume", str(resumed), "--no-progress", check=True)
    a, b = load_file(str(full / "model" / "model.safetensors")), load_file(str(resumed / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # noise, Poisson batches and the accountant all restored
    pa, pb = (json.loads((r / "summary.json").read_text())["privacy"] for r in (full, resumed))
    assert pa == pb


def test_physical_batches_give_the_logical_batch_step(tmp_path):
    """`max_physical_batch_size` computes each Poisson batch in pieces (each clipped and summed, the noise once): the
    same ε and, to float rounding, the same weights as each batch computed whole."""
    from bigmodel import load_recipe
    from bigmodel.api import build_experiment

    # fp32 (bf16 autocast rounds activations to 3 digits, so any regrouping moves the sums by ~0.5%), no dropout (its
    # draws would follow the pieces), SGD (Adam's first steps turn rounding in near-zero coordinates into ±lr)
    dp = ["privacy.dp.noise_multiplier=1.0", "model.dropout=0", "train.optimizer.name=sgd", "train.optimizer.lr=0.1"]
    dp += ["train.precision=fp32", "train.select_best=false"]
    exp = build_experiment(load_recipe(RECIPE, overrides=[*SMALL, *dp, "privacy.dp.max_physical_batch_size=7"]))
    trainer = exp.trainer(validate=False)
    batch = next(iter(trainer.train_loader.epoch(0)))
    pieces = trainer.strategy.physical_batches(batch)
    assert len(pieces) == -(-len(batch[1]) // 7) >= 3 and all(len(p[1]) <= 7 for p in pieces)
    assert torch.equal(torch.cat([p[1] for p in pieces]), batch[1])
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(whole, *dp)
    train(split, *dp, "privacy.dp.max_physical_batch_size=7")
    a, b = (load_file(str(r / "model" / "model.safetensors")) for r in (whole, split))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    pa, pb = (json.loads((r / "summary.json").read_text())["privacy"] for r in (whole, split))
    assert pa == pb


def test_poisson_batches_vary_and_empty_ones_train(tmp_path):
    """Batch size 2 of 200 examples: q = 0.01, so about one batch in 7.5 is empty; the run trains through them."""
    from bigmodel import load_recipe
    from bigmodel.api import build_experiment

    args = ["privacy.dp.noise_multiplier=1.0", "train.batch_size=2", "train.epochs=1", "data.limit_train=200"]
    exp = build_experiment(load_recipe(RECIPE, overrides=args))
    sizes = [int(y.shape[0]) for _, y in exp.loader("train", train=True).epoch(0)]
    assert len(sizes) == 100 and 0 in sizes and max(sizes) > 2
    out = tmp_path / "run"
    run_cli("train", RECIPE, *args, "--out", str(out), "--no-progress", check=True)
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert all(x == x for x in losses)  # no NaN from an empty batch


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train.grad_accum_steps=2"], "train.grad_accum_steps must be 1"),
        (["train.grad_clip=1.0"], "remove train.grad_clip"),
        (["privacy.dp.noise_multiplier=1.0"], "exactly one of target_epsilon and noise_multiplier"),
    ],
)
def test_what_dp_cannot_do_is_a_one_line_error(args, message, tmp_path):
    proc = run_cli("train", RECIPE, "privacy.dp.target_epsilon=3", *args, "--out", str(tmp_path / "x"))
    assert proc.returncode != 0 and message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


class _Mixed(torch.nn.Module):
    """Every path of `grad_sample_mode: bk`: a conv (Opacus' sampler), a rank-one Linear head (factored), an
    Embedding with repeated ids and padding (factored), a Linear over a sequence (B, T, F) (Opacus' sampler) and a
    Linear used twice in one forward (Opacus' sampler)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.seq = torch.nn.Linear(6, 5)
        self.twice = torch.nn.Linear(5, 5)
        self.embed = torch.nn.Embedding(10, 4, padding_idx=0)
        self.head = torch.nn.Linear(4 * 6 * 6 + 5 + 4, 3)
        self.out = torch.nn.Linear(3, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        img = torch.tanh(self.conv(x)).flatten(1)  # (B, 144)
        seq = self.seq(x[:, 0]).mean(1)  # the image rows as a sequence: (B, 6, 6) → (B, 5)
        seq = self.twice(torch.tanh(self.twice(seq)))  # (B, 5), one weight in two places
        ids = (x[:, 0].abs() * 3).long().clamp(max=9)  # (B, 6, 6) ids in 0..9: repeats, and 0 is padding
        tokens = self.embed(ids).mean((1, 2))  # (B, 4)
        return self.out(torch.tanh(self.head(torch.cat([img, seq, tokens], 1))))


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("n", [7, 0])
def test_book_keeping_clips_each_example_like_its_own_backward(n, clipping):
    """The clipped, summed gradient of `bk` (no noise) equals the one built example by example with plain autograd,
    and Opacus' hooks mode, to float rounding, with flat and per-layer clipping; an empty batch gives zeros."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer, DPPerLayerOptimizer

    from bigmodel.privacy.bookkeeping import (
        BookKeepingDPOptimizer,
        BookKeepingGradSampleModule,
        BookKeepingPerLayerDPOptimizer,
    )

    torch.manual_seed(0)
    ref = _Mixed()
    x, y = torch.randn(n, 1, 6, 6) * 3, torch.randint(0, 3, (n,))
    clip = 4.0
    names = [k for k, _ in ref.named_parameters()]
    bounds = [clip / len(names) ** 0.5] * len(names)  # per_layer: each parameter's share, as the strategy sets them
    want = {k: torch.zeros_like(v) for k, v in ref.named_parameters()}
    factors = []
    for i in range(n):  # each example's own gradient, clipped, summed
        ref.zero_grad()
        torch.nn.functional.cross_entropy(ref(x[i : i + 1]), y[i : i + 1]).backward()
        g = {k: v.grad.clone() for k, v in ref.named_parameters()}
        norm = float(torch.sqrt(sum(v.pow(2).sum() for v in g.values())))
        for k, bound in zip(names, bounds, strict=True):
            c = min(1.0, clip / (norm + 1e-6)) if clipping == "flat" else min(1.0, bound / (float(g[k].norm()) + 1e-6))
            factors.append(c)
            want[k] += g[k] * c
    if n:
        assert min(factors) < 1.0 and max(factors) == 1.0  # some gradients clipped, some not
    got = {}
    flat = clipping == "flat"
    for name, gsm, opt_cls in (
        ("bk", BookKeepingGradSampleModule, BookKeepingDPOptimizer if flat else BookKeepingPerLayerDPOptimizer),
        ("hooks", GradSampleModule, DPOptimizer if flat else DPPerLayerOptimizer),
    ):
        model = _Mixed()
        model.load_state_dict(ref.state_dict())
        wrapped = gsm(model, batch_first=True, loss_reduction="mean")
        opt = opt_cls(
            torch.optim.SGD(model.parameters(), lr=0.0),
            noise_multiplier=0.0,
            max_grad_norm=clip if flat else bounds,
            expected_batch_size=1,
            loss_reduction="mean",
        )
        for _ in range(2):  # two steps: the factors are cleared by zero_grad and rebuilt
            loss = torch.nn.functional.cross_entropy(wrapped(x), y) if n else wrapped(x).sum() * 0
            loss.backward()
            if name == "bk" and n:  # which path each layer took
                assert model.head.weight._bk_factors is not None and model.head.weight.grad_sample is None
                assert model.out.weight._bk_factors is not None and model.embed.weight._bk_factors is not None
                assert all(getattr(m.weight, "_bk_factors", None) is None for m in (model.seq, model.twice))
                assert model.seq.weight.grad_sample is not None and model.twice.weight.grad_sample is not None
            assert opt.pre_step()
            got[name] = {k: v.grad.clone() for k, v in model.named_parameters()}
            opt.zero_grad(set_to_none=True)
        if name == "bk" and n:
            assert model.head.weight.grad_sample is None and model.seq.weight.grad_sample is None  # cleared
    for k, v in want.items():
        torch.testing.assert_close(got["bk"][k], v, atol=1e-6, rtol=1e-5)
        if k == "embed.weight":  # Opacus' embedding sampler gives the padding row gradients autograd does not
            assert n == 0 or got["hooks"][k][0].abs().max() > 1e-4
            if not flat:  # and they enter the layer's own norm
                continue
            got["hooks"][k], v = got["hooks"][k][1:], v[1:]
        torch.testing.assert_close(got["hooks"][k], v, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["mean", "sum", "max"])
def test_pooled_embedding_is_the_bag_with_per_example_gradients(mode):
    """The EmbeddingBag fix gives the bag's outputs from the same weights, and Opacus' per-example gradients of it
    equal each example's own gradient."""
    from opacus import GradSampleModule

    from bigmodel.privacy.dp import PooledEmbedding

    torch.manual_seed(0)
    bag = torch.nn.EmbeddingBag(50, 8, mode=mode, padding_idx=0)
    ids = torch.randint(1, 50, (5, 7))
    ids[1, 4:] = 0  # padding
    ids[3] = 0  # an empty text
    pooled = PooledEmbedding(bag)
    torch.testing.assert_close(pooled(ids), bag(ids))
    head = torch.nn.Linear(8, 3)
    model = GradSampleModule(torch.nn.Sequential(pooled, head), loss_reduction="sum")
    y = torch.randint(0, 3, (5,))
    torch.nn.functional.cross_entropy(model(ids), y, reduction="sum").backward()
    per_example = pooled.embedding.weight.grad_sample
    for i in range(5):
        ref = torch.nn.Sequential(PooledEmbedding(bag), head)
        ref.zero_grad()
        torch.nn.functional.cross_entropy(ref(ids[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        torch.testing.assert_close(per_example[i], ref[0].embedding.weight.grad, atol=1e-6, rtol=0)


def test_embedding_bag_trains_with_dp_and_its_artifact_replays_the_fix(tmp_path):
    out = tmp_path / "bag"
    run_cli(
        "train", str(ROOT / "recipes" / "tweets_fasttext.yaml"), "privacy.dp.target_epsilon=8",
        "data.limit_train=400", "data.tokenizer.vocab_size=2000", "train.epochs=2", "train.min_steps=1",
        "train.batch_size=100", "--out", str(out), "--no-progress", check=True,
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"]["epsilon"] <= 8.0
    assert "bag.embedding.weight" in load_file(str(out / "model" / "model.safetensors"))
    again = json.loads(run_cli("evaluate", str(out), "--json", check=True).stdout)
    assert again["accuracy"] == summary["metrics"]["accuracy"]


@pytest.mark.parametrize(
    ("recipe", "model", "fixed"),
    [
        (
            "tweets_transformer.yaml",
            ["model.dim=16", "model.num_heads=2", "model.num_layers=1", "model.ff_dim=32"],
            None,
        ),
        pytest.param(  # DPLSTM steps through time in Python: ~1 min here
            "tweets_lstm.yaml", ["model.embedding_dim=16", "model.hidden_size=16"], "DPLSTM", marks=pytest.mark.slow
        ),
        (
            "tweets_pretrained_gpt.yaml",  # learned positions: looked up per example under DP
            ["model.init_from=null", "model.dim=16", "model.num_heads=2", "model.num_layers=1", "train.grad_clip=null"],
            None,
        ),
    ],
)
def test_attention_lstm_and_gpt_classifiers_train_with_dp(recipe, model, fixed, tmp_path):
    """Self-attention built from Linear layers (Opacus' sampler takes their (B, T, F) inputs), a bidirectional LSTM
    (fixed to DPLSTM, and the artifact replays the fix) and the GPT classifier (its position table looked up per
    example) train under DP-SGD; the artifact evaluates to the run's numbers."""
    from bigmodel import load_artifact

    out = tmp_path / "run"
    run_cli(
        "train", str(ROOT / "recipes" / recipe), *model, "privacy.dp.target_epsilon=8", "data.limit_train=400",
        "data.tokenizer.vocab_size=2000", "data.tokenizer.max_length=16", "train.epochs=2", "train.min_steps=1",
        "train.batch_size=100", "--out", str(out), "--no-progress", check=True,
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"]["steps"] == 8 and 0 < summary["privacy"]["epsilon"] <= 8.0
    modules = [type(m).__name__ for m in load_artifact(out).model.modules()]
    if fixed:
        assert fixed in modules and "LSTM" not in modules
    again = json.loads(run_cli("evaluate", str(out), "--json", check=True).stdout)
    assert again["accuracy"] == summary["metrics"]["accuracy"]


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_the_gpt_language_model_clips_each_window_like_its_own_backward(tmp_path):
    """The GPT's LM head is tied to its token embedding; the DP fix routes it through a Linear that holds the same
    Parameter, so each window's gradient of that weight is the lookup's share plus the head's. The clipped sum (no
    noise) equals the one built window by window with autograd; the state dict keeps one name for the weight."""
    from bigmodel.models.gpt import GPT, GPTConfig
    from bigmodel.privacy.bookkeeping import BookKeepingDPOptimizer, BookKeepingGradSampleModule
    from bigmodel.privacy.dp import fix_model

    torch.manual_seed(0)
    ref = GPT(GPTConfig(vocab_size=11, max_len=8, dim=8, num_heads=2, num_layers=1))
    model = fix_model(GPT(GPTConfig(vocab_size=11, max_len=8, dim=8, num_heads=2, num_layers=1)))
    model.load_state_dict(ref.state_dict())  # strict: the head's name is filled from tok.weight
    assert model.head.weight is model.tok.weight and "head.weight" not in model.state_dict()
    ids = torch.randint(0, 11, (5, 6))
    x, y = ids, torch.roll(ids, -1, 1)
    torch.testing.assert_close(model(x), ref(x))

    def loss(m, a, b):
        return torch.nn.functional.cross_entropy(m(a).reshape(-1, 11), b.reshape(-1))

    clip, want = 1.0, {k: torch.zeros_like(v) for k, v in ref.named_parameters()}
    factors = []
    for i in range(len(x)):  # each window's own gradient (the tied weight's two uses summed by autograd)
        ref.zero_grad()
        loss(ref, x[i : i + 1], y[i : i + 1]).backward()
        norm = float(torch.sqrt(sum(v.grad.pow(2).sum() for v in ref.parameters())))
        factors.append(min(1.0, clip / (norm + 1e-6)))
        for k, v in ref.named_parameters():
            want[k] += v.grad * factors[-1]
    assert min(factors) < 1.0
    wrapped = BookKeepingGradSampleModule(model, batch_first=True, loss_reduction="mean")
    opt = BookKeepingDPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=1
    )
    loss(wrapped, x, y).backward()
    assert opt.pre_step()
    for k, v in model.named_parameters():
        torch.testing.assert_close(v.grad, want[k], atol=1e-6, rtol=1e-5)


def test_dp_trains_the_gpt_language_model_on_disjoint_windows(tmp_path):
    """`privacy.dp` on the from-scratch GPT: Poisson-sampled disjoint windows (the record), ε within the target, an
    artifact that generates; translation and pretrained language models stay one-line errors."""
    from bigmodel import load_recipe
    from bigmodel.api import build_experiment

    recipe = str(ROOT / "recipes" / "shakespeare_char_gpt.yaml")
    args = [
        "data.batches_per_epoch=null", "train.grad_clip=null", "privacy.dp.target_epsilon=8", "model.dim=32",
        "model.num_heads=2", "model.num_layers=1", "train.epochs=1", "train.batch_size=64", "train.max_steps=12",
        "train.log_every=4",
    ]  # fmt: skip
    out = tmp_path / "lm"
    run_cli("train", recipe, *args, "--out", str(out), "--no-progress", check=True)
    p = json.loads((out / "summary.json").read_text())["privacy"]
    assert p["steps"] == 12 and 7.5 < p["epsilon"] <= 8.0
    exp = build_experiment(load_recipe(recipe, overrides=args))
    loader = exp.loader("train", train=True)
    windows = len(range(0, len(exp.data.train) - 64, 64))  # disjoint windows of context_length 64
    assert loader.plan.mode == "poisson" and loader.plan.num_examples == windows
    assert p["sample_rate"] == pytest.approx(64 / windows)
    sizes = [len(y) for _, y in itertools.islice(loader.epoch(0), 20)]
    assert len(set(sizes)) > 1  # Poisson batches vary
    assert "head.weight" not in load_file(str(out / "model" / "model.safetensors"))
    gen = run_cli("generate", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "8", check=True)
    assert gen.stdout.strip()
    proc = run_cli("train", str(ROOT / "recipes" / "bible_en_es_transformer.yaml"), "privacy.dp.target_epsilon=3")
    assert proc.returncode != 0 and "privacy.dp trains classifiers and the from-scratch gpt" in proc.stderr


class _LSTMNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = torch.nn.LSTM(4, 5, batch_first=True, bidirectional=True)
        self.head = torch.nn.Linear(10, 2)


def test_a_fixed_lstm_inside_a_model_saves_one_name_per_weight(tmp_path):
    """DPLSTM registers each weight under two names; inside a model both reached `state_dict()`, and safetensors
    refused the artifact. After the fix: nn.LSTM's names only, and a strict load into a freshly fixed model works."""
    from safetensors.torch import save_file

    from bigmodel.privacy.dp import fix_model

    torch.manual_seed(0)
    a = fix_model(_LSTMNet())
    assert type(a.rnn).__name__ == "DPLSTM"
    sd = a.state_dict()
    assert sorted(k for k in sd if k.startswith("rnn.")) == sorted(
        f"rnn.{k}" for k in torch.nn.LSTM(4, 5, bidirectional=True).state_dict()
    )
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    b = fix_model(_LSTMNet())
    b.load_state_dict(load_file(str(tmp_path / "w.safetensors")))  # strict
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_a_lookup_shared_by_the_batch_is_a_one_line_error():
    """A position table indexed once for the whole batch has no per-example gradient; `bk` says so instead of
    clipping the table's T rows as if they were T examples."""
    from bigmodel.errors import UserError
    from bigmodel.models.layers import LearnedPositionalEmbedding
    from bigmodel.privacy.bookkeeping import BookKeepingGradSampleModule

    x = torch.randn(3, 5, 4)
    for per_example in (False, True):  # True: what the DP fix sets
        pos = LearnedPositionalEmbedding(4, 16)
        pos.per_example_positions = per_example
        model = torch.nn.Sequential(pos, torch.nn.Flatten(), torch.nn.Linear(4 * 5, 2))
        wrapped = BookKeepingGradSampleModule(model, batch_first=True, loss_reduction="mean")
        if not per_example:
            with pytest.raises(UserError, match=r"embedding '0.embedding' is looked up once for the whole batch"):
                wrapped(x).sum().backward()
        else:
            wrapped(x).sum().backward()
            assert pos.embedding.weight._bk_factors is not None


# ----------------------------------------------------------------------------------------------- encrypted models
def test_encrypted_model_round_trips_and_refuses_wrong_keys_and_tampering(dp_run, tmp_path):
    key = tmp_path / "k.key"
    out = tmp_path / "enc"
    proc = run_cli("export", str(dp_run), "--encrypt", "--new-key", str(key), "--out", str(out), check=True)
    enc = out / "model.bmenc"
    assert proc.stdout.strip().splitlines()[-1] == str(enc)
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_text().strip()) == 64
    blob = enc.read_bytes()
    weights = (dp_run / "model" / "model.safetensors").read_bytes()
    assert weights[-64:] not in blob  # the weights are not in the file in the clear
    # evaluate and predict through the key file (or BIGMODEL_KEY): the same numbers as the run
    plain = json.loads(run_cli("evaluate", str(dp_run), "--json", check=True).stdout)
    got = json.loads(run_cli("evaluate", str(enc), "--key-file", str(key), "--json", check=True).stdout)
    assert got["accuracy"] == plain["accuracy"] and got["confusion_matrix"] == plain["confusion_matrix"]
    from bigmodel import load_artifact

    art = load_artifact(enc, key=key.read_text().strip())
    assert art.config["privacy"]["epsilon"] > 0 and art.folder == enc
    # no key, a wrong key, a flipped byte, a truncated file: one line, exit 2, nothing decrypted
    other = tmp_path / "other.key"
    other.write_text("ab" * 32)
    flipped = tmp_path / "flipped.bmenc"
    flipped.write_bytes(blob[:-200] + bytes([blob[-200] ^ 1]) + blob[-199:])
    header = tmp_path / "header.bmenc"  # the header is authenticated too
    header.write_bytes(blob.replace(b'"format": 1', b'"format":  1', 1))
    cases = [
        ([str(enc)], "give its key with --key-file"),
        ([str(enc), "--key-file", str(other)], "wrong key, or the file was modified"),
        ([str(flipped), "--key-file", str(key)], "wrong key, or the file was modified"),
        ([str(header), "--key-file", str(key)], "wrong key, or the file was modified"),
    ]
    for args, message in cases:
        proc = run_cli("evaluate", *args, env={"BIGMODEL_KEY": "", "BIGMODEL_KEY_FILE": ""})
        assert proc.returncode == 2 and message in proc.stderr, args
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    bad_key = tmp_path / "short.key"
    bad_key.write_text("abcd")
    proc = run_cli("evaluate", str(enc), "--key-file", str(bad_key))
    assert proc.returncode == 2 and "expected a 256-bit key as 64 hex characters" in proc.stderr
    env = {"BIGMODEL_KEY": key.read_text().strip()}
    again = json.loads(run_cli("evaluate", str(enc), "--json", env=env, check=True).stdout)
    assert again["accuracy"] == got["accuracy"]


# ---------------------------------------------------------------------------------------------------------- audit
def test_membership_audit_reports_the_attack_and_the_runs_privacy(dp_run):
    proc = run_cli("audit", str(dp_run), "--membership", "--json", check=True)
    r = json.loads(proc.stdout)
    assert r["members"] == r["non_members"] > 0 and r["non_member_split"] == "test"
    assert 0.0 <= r["auc"] <= 1.0 and 0.0 <= r["tpr_at_1pct_fpr"] <= 1.0
    p = json.loads((dp_run / "summary.json").read_text())["privacy"]
    assert r["privacy"]["epsilon"] == p["epsilon"]
    # the AUC is the probability that a member's loss is below a non-member's (the attack's ranking), recomputed
    from bigmodel.privacy.audit import per_example_losses

    members, _ = per_example_losses(dp_run, "train")
    others, _ = per_example_losses(dp_run, "test")
    n = min(len(members), len(others))
    assert n == r["members"]
    g = torch.Generator().manual_seed(0)  # the audit's seeded, balanced sample
    m = members[torch.randperm(len(members), generator=g)[:n]]
    o = others[torch.randperm(len(others), generator=g)[:n]]
    pairs = (m[:, None] < o[None, :]).double().mean() + 0.5 * (m[:, None] == o[None, :]).double().mean()
    assert r["auc"] == pytest.approx(float(pairs), abs=1e-9)
    assert r["member_loss_mean"] == pytest.approx(float(m.mean()))
    proc = run_cli("audit", str(dp_run))
    assert proc.returncode == 2 and "choose an audit (--membership, or --canary" in proc.stderr


@pytest.mark.slow
def test_membership_audit_catches_an_overfit_model(tmp_path):
    """200 Fashion-MNIST images, 80 epochs, no regularisation: the attack's AUC ≥ 0.65 (measured 0.69)."""
    from bigmodel.data import standard

    if not standard.has_idx_files(standard.IDX_SETS["fashion_mnist"].local_dirs[0]):
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    recipe = {
        "name": "overfit",
        "task": "image_classification",
        "data": {"source": "fashion_mnist", "val_fraction": 0.01, "limit_train": 200},
        "model": {"name": "seed-cnn", "conv1_channels": 16, "conv2_channels": 32, "hidden": 64},
        "train": {
            "epochs": 80,
            "batch_size": 32,
            "optimizer": {"name": "adamw", "lr": 3.0e-3, "weight_decay": 0.0},
            "select_best": False,
            "baseline": False,
            "eval_every": 40,
            "precision": "fp32",
        },
        "seed": 0,
    }
    import yaml

    path = tmp_path / "overfit.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    run_cli("train", str(path), "--out", str(out), "--no-progress", check=True)
    r = json.loads(run_cli("audit", str(out), "--membership", "--json", check=True).stdout)
    assert r["auc"] >= 0.65 and r["privacy"] is None
