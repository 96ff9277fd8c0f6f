"""Classic models fitted by a solver, not by gradient steps: the baselines (`train.baseline`) as models of their own.

- `linear` (images, sequences, tables): fixed features computed in torch from the task's usual inputs — images
  average-pooled to at most 32 x 32 and flattened; sequences pooled per feature (mean, std, min, max, first and last
  value over the real steps, and the length); tables as the numeric columns and one-hot categories — standardised,
  then a linear layer: multinomial logistic regression fitted by scikit-learn (L-BFGS).
- `tfidf-linear` (text, with `data.tokenizer.kind: ngrams`): the TF-IDF of word 1-2-grams and character 2-5-grams
  (sublinear term frequencies, smoothed idf, each part L2-normalised, as scikit-learn's `TfidfVectorizer`) computed
  in torch from the n-gram ids, then logistic regression (SAGA).

Both fit through `bigmodel.evaluation.baseline.solve` (C chosen on the validation split unless `model.C` is set), the
same code as `train.baseline`, so the model and the baseline of the same split agree. The fitted statistics and
coefficients are buffers and parameters: the artifact is `model.safetensors` like every model's, and evaluation,
prediction, serving and ONNX export need nothing new. (The coefficients are parameters, so gradient methods work
on them too: `bigmodel explain` and fine-tuning from them.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from bigmodel.models.base import Capability, SolvedClassifier
from bigmodel.registry import register_model

Batches = Callable[[], Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]]
MAX_SIDE = 32  # images are average-pooled so that neither side exceeds this
ABSENT = -1e4  # the logit of a class the training split lacks (probability 0, as scikit-learn's baseline gives it)


class LinearConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    C: Annotated[float, Field(gt=0)] | None = None
    """Inverse L2 regularisation strength; unset: the best of 0.1, 1 and 10 on the validation split (1 without one)."""


def pooled_sequence(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(N, T, F) padded values → (N, 6F + 1): per feature mean, std, min, max, first and last over the real steps,
    and the length."""
    N, T, _ = x.shape
    valid = (torch.arange(T, device=x.device)[None, :] < lengths[:, None])[..., None]  # (N, T, 1)
    n = lengths.clamp(min=1).to(x.dtype)[:, None]
    xs = x.float()
    mean = (xs * valid).sum(1) / n
    std = (((xs - mean[:, None]) ** 2) * valid).sum(1).div(n).sqrt()
    big = torch.finfo(torch.float32).max
    mn = xs.masked_fill(~valid, big).amin(1)
    mx = xs.masked_fill(~valid, -big).amax(1)
    first = xs[:, 0]
    last = xs.gather(1, (lengths - 1).clamp(min=0).view(N, 1, 1).expand(N, 1, xs.shape[2])).squeeze(1)
    return torch.cat([mean, std, mn, mx, first, last, lengths.float()[:, None]], dim=1)


def table_features(num: torch.Tensor, cat: torch.Tensor, cardinalities: list[int]) -> torch.Tensor:
    """(numeric (N, Fn), categorical (N, Fc) indices) → (N, Fn + Σ cardinalities): the numbers, then each category
    one-hot (an index past the known ones counts as the last)."""
    parts = [num.float()] + [F.one_hot(cat[:, j].clamp(0, c - 1), c).float() for j, c in enumerate(cardinalities)]
    return torch.cat(parts, dim=1)


def set_head(head: nn.Linear, est: Any) -> None:
    """Copy a fitted scikit-learn LogisticRegression into `head` (K outputs): a binary model's one row becomes the
    second class's logit (the first class's is 0), and classes the training split lacked get `ABSENT`."""
    coef = torch.from_numpy(np.asarray(est.coef_, dtype=np.float64)).float()
    intercept = torch.from_numpy(np.asarray(est.intercept_, dtype=np.float64)).float()
    classes = torch.from_numpy(np.asarray(est.classes_, dtype=np.int64))
    w = torch.zeros_like(head.weight)
    b = torch.full_like(head.bias, ABSENT)
    if len(classes) == 2 and coef.shape[0] == 1:
        w[classes[1]], b[classes[1]], b[classes[0]] = coef[0], intercept[0], 0.0
    else:
        w[classes], b[classes] = coef, intercept
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)


def _collect(batches: Batches, featurize: Callable[..., Any]) -> tuple[list[Any], np.ndarray]:
    feats, ys = [], []
    for inputs, y in batches():
        feats.append(featurize(*inputs))
        ys.append(y.cpu().numpy().astype(np.int64))
    return feats, (np.concatenate(ys) if ys else np.zeros(0, dtype=np.int64))


# ----------------------------------------------------------------------------------------------------------- linear
class LinearClassifier(SolvedClassifier):
    """Standardised fixed features → a linear layer (multinomial logistic regression)."""

    def __init__(self, cfg: LinearConfig, input_shape: Any, num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        if isinstance(input_shape, (list, tuple)):  # images [C, H, W]
            C, H, W = (int(v) for v in input_shape)
            self.kind, self.pool = "image", (min(H, MAX_SIDE), min(W, MAX_SIDE))
            self.resize = max(H, W) > MAX_SIDE
            dim = C * self.pool[0] * self.pool[1]
        elif isinstance(input_shape, dict) and input_shape.get("kind") == "sequence":
            self.kind = "sequence"
            dim = 6 * int(input_shape["features"]) + 1
        elif isinstance(input_shape, dict) and input_shape.get("kind") == "tabular":
            self.kind = "tabular"
            self.cardinalities = [int(c) for c in input_shape["cardinalities"]]
            dim = len(input_shape["numeric"]) + sum(self.cardinalities)
            if dim == 0:
                raise ValueError("linear needs at least one feature column")
        else:
            raise ValueError(f"linear takes images, sequences or tables, got input shape {input_shape!r}")
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.head = nn.Linear(dim, num_classes)

    def raw_features(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The features before standardisation, (B, D) float32."""
        if self.kind == "image":
            x = inputs[0].float()
            if self.resize:
                x = F.adaptive_avg_pool2d(x, self.pool)
            return x.flatten(1)
        if self.kind == "sequence":
            return pooled_sequence(inputs[0], inputs[1])
        return table_features(inputs[0], inputs[1], self.cardinalities)

    def forward_features(self, *inputs: torch.Tensor) -> torch.Tensor:
        return (self.raw_features(*inputs) - self.mean) / self.scale

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def fit_solver(self, train: Batches, val: Batches | None, seed: int) -> dict[str, Any]:
        from sklearn.preprocessing import StandardScaler

        from bigmodel.evaluation.baseline import solve

        def feats(*inputs: torch.Tensor) -> np.ndarray:
            return self.raw_features(*inputs).cpu().numpy()

        xs, y = _collect(train, feats)
        scaler = StandardScaler().fit(x := np.concatenate(xs))
        xv, yv = _collect(val, feats) if val is not None else ([], None)
        x_val = scaler.transform(np.concatenate(xv)) if xv else None
        est, c, val_acc = solve("linear", scaler.transform(x), y, x_val, yv, seed, self.cfg.C)
        with torch.no_grad():
            self.mean.copy_(torch.from_numpy(scaler.mean_))
            self.scale.copy_(torch.from_numpy(scaler.scale_))
        set_head(self.head, est)
        return {"C": c, "features": int(x.shape[1]), "train_examples": len(y)}


@register_model(
    "linear",
    LinearConfig,
    tasks=("image_classification", "sequence_classification", "tabular_classification"),
    capabilities=(Capability.CLASSIFIER, Capability.SOLVED, Capability.EXPORTABLE, Capability.EXPLAINABLE),
    description="logistic regression on pooled pixels, pooled sequence statistics or table columns (fitted by "
    "scikit-learn; the classic baseline)",
)
def build_linear(cfg: LinearConfig, input_shape: Any, num_classes: int) -> LinearClassifier:
    return LinearClassifier(cfg, input_shape, num_classes)


# ----------------------------------------------------------------------------------------------------- tfidf-linear
class TfidfLinear(SolvedClassifier):
    """TF-IDF of the `ngrams` tokenizer's ids (word n-grams and character n-grams, each part L2-normalised) → a
    linear layer. `forward_features` gives the dense (B, V) TF-IDF rows."""

    def __init__(self, cfg: LinearConfig, input_shape: dict[str, Any], num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        V = int(input_shape["vocab_size"])
        w0, w1 = (int(v) for v in input_shape["ngram_words"])
        self.first, self.words_end, self.vocab = w0, w1, V
        ids = torch.arange(V)
        self.register_buffer("idf", torch.zeros(V))
        self.register_buffer("word_part", ((ids >= w0) & (ids < w1)).float(), persistent=False)
        self.register_buffer("char_part", (ids >= w1).float(), persistent=False)
        self.head = nn.Linear(V, num_classes)

    def forward_features(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        keep = (torch.arange(T, device=ids.device)[None, :] < lengths[:, None]) & (ids >= self.first)
        tf = torch.zeros(B, self.vocab, device=ids.device).scatter_add(1, ids, keep.float())
        tf = torch.where(tf > 0, 1 + tf.clamp(min=1).log(), torch.zeros_like(tf)) * self.idf
        out = torch.zeros_like(tf)
        for part in (self.word_part, self.char_part):
            x = tf * part
            out = out + x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
        return out

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """`forward_head(forward_features(...))` without the dense (B, V) rows: each position's n-gram weighs its
        coefficient row by (1 + ln count) * idf / (count * its part's norm), so memory is O(B * T), not O(B * V).
        Positions are sorted first (the sum does not care about order), so equal ids are adjacent and their counts
        are segment sizes."""
        B, T = ids.shape
        valid = torch.arange(T, device=ids.device)[None, :] < lengths[:, None]
        s = torch.where(valid, ids, torch.zeros_like(ids)).sort(dim=1).values
        keep = (s >= self.first).float()
        new = torch.cat([torch.ones_like(s[:, :1]), (s[:, 1:] != s[:, :-1]).long()], dim=1)
        seg = new.cumsum(1) - 1  # (B, T): which run of equal ids each position is in
        count = torch.zeros(B, T, device=ids.device).scatter_add(1, seg, torch.ones(B, T, device=ids.device))
        c = count.gather(1, seg)
        v = (1 + c.log()) * self.idf[s]
        contrib = keep * v * v / c  # each distinct n-gram contributes v^2 once over its c positions
        word = (s < self.words_end).float()
        n_word = (contrib * word).sum(1, keepdim=True).sqrt()
        n_char = (contrib * (1 - word)).sum(1, keepdim=True).sqrt()
        norm = (word * n_word + (1 - word) * n_char).clamp(min=1e-12)
        w = keep * v / (c * norm)  # (B, T)
        rows = F.embedding(s, self.head.weight.t())  # (B, T, K): each position's coefficients
        return (w.unsqueeze(-1) * rows).sum(1) + self.head.bias

    def _counts(self, ids: torch.Tensor, lengths: torch.Tensor) -> Any:
        """One batch's n-gram counts as a scipy CSR matrix (B, V)."""
        from scipy import sparse

        ids_np, lens = ids.cpu().numpy(), lengths.cpu().numpy()
        rows, cols = [], []
        for i, (r, n) in enumerate(zip(ids_np, lens, strict=True)):
            c = r[:n][r[:n] >= self.first]
            rows.append(np.full(len(c), i))
            cols.append(c)
        r, c = np.concatenate(rows), np.concatenate(cols)
        return sparse.csr_matrix((np.ones(len(c)), (r, c)), shape=(len(ids_np), self.vocab))  # duplicates summed

    def fit_solver(self, train: Batches, val: Batches | None, seed: int) -> dict[str, Any]:
        from scipy import sparse
        from sklearn.preprocessing import normalize

        from bigmodel.evaluation.baseline import solve

        parts, y = _collect(train, self._counts)
        counts = sparse.vstack(parts).tocsr()
        n = counts.shape[0]
        df = np.bincount(counts.indices, minlength=self.vocab)  # CSR without duplicates: one entry per text
        idf = np.log((1 + n) / (1 + df)) + 1.0  # scikit-learn's smoothed idf
        w0, w1 = self.first, self.words_end

        def tfidf(m: Any) -> Any:
            m = m.astype(np.float64)
            m.data = 1.0 + np.log(m.data)
            m = m.multiply(idf[None, :]).tocsr()
            return sparse.hstack([normalize(m[:, w0:w1]), normalize(m[:, w1:])]).tocsr()

        vparts, yv = _collect(val, self._counts) if val is not None else ([], None)
        x_val = tfidf(sparse.vstack(vparts).tocsr()) if vparts else None
        est, c, _ = solve("tfidf-linear", tfidf(counts), y, x_val, yv, seed, self.cfg.C)

        from types import SimpleNamespace

        # The coefficients of columns w0.. placed at their ids (the special ids' columns are always 0).
        coef = np.concatenate([np.zeros((est.coef_.shape[0], w0)), est.coef_], axis=1)
        with torch.no_grad():
            self.idf.copy_(torch.from_numpy(idf))
        set_head(self.head, SimpleNamespace(coef_=coef, intercept_=est.intercept_, classes_=est.classes_))
        return {"C": c, "features": int(self.vocab - w0), "train_examples": n}


@register_model(
    "tfidf-linear",
    LinearConfig,
    tasks=("text_classification",),
    capabilities=(Capability.CLASSIFIER, Capability.SOLVED, Capability.EXPORTABLE),
    description="TF-IDF of word and character n-grams + logistic regression (data.tokenizer.kind: ngrams; fitted "
    "by scikit-learn; the classic text baseline)",
)
def build_tfidf_linear(cfg: LinearConfig, input_shape: Any, num_classes: int) -> TfidfLinear:
    if not isinstance(input_shape, dict) or "ngram_words" not in input_shape:
        raise ValueError("tfidf-linear reads n-gram ids: set data.tokenizer.kind: ngrams")
    return TfidfLinear(cfg, input_shape, num_classes)


# ------------------------------------------------------------------------------------------------ gradient-boosting
class GradientBoostingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_iter: Annotated[int, Field(ge=1, le=10_000)] = 100
    """Boosting rounds (one tree per class per round; fewer when scikit-learn's early stopping ends them)."""
    learning_rate: Annotated[float, Field(gt=0, le=1)] = 0.1
    max_leaf_nodes: Annotated[int, Field(ge=2, le=4096)] = 31
    l2_regularization: Annotated[float, Field(ge=0)] = 0.0
    fitted: list[int] | None = None
    """Written by training into the artifact (the fitted ensemble's trees, nodes per tree and depth); leave unset."""


class GradientBoosting(SolvedClassifier):
    """scikit-learn's `HistGradientBoostingClassifier` on the numeric columns and one-hot categories, its trees then
    evaluated in torch: node arrays (feature, threshold, children, leaf value) of every tree, walked `depth` times
    in one batched gather per level. `forward_features` gives each tree's leaf value (B, trees); the head adds the
    trees of each class to scikit-learn's baseline score. Leaf values and the baseline are parameters."""

    def __init__(self, cfg: GradientBoostingConfig, input_shape: dict[str, Any], num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.cardinalities = [int(c) for c in input_shape["cardinalities"]]
        self.dim = len(input_shape["numeric"]) + sum(self.cardinalities)
        if self.dim == 0:
            raise ValueError("gradient-boosting needs at least one feature column")
        self.num_classes = num_classes
        trees, nodes, depth = cfg.fitted or (1, 1, 0)
        self._allocate(trees, nodes, depth)

    def _allocate(self, trees: int, nodes: int, depth: int, device: Any = None) -> None:
        self.depth = depth
        T, M, i64 = trees, nodes, torch.int64
        self.register_buffer("feature", torch.zeros(T, M, dtype=i64, device=device))
        self.register_buffer("threshold", torch.zeros(T, M, device=device))
        self.register_buffer("left", torch.zeros(T, M, dtype=i64, device=device))
        self.register_buffer("right", torch.zeros(T, M, dtype=i64, device=device))
        self.register_buffer("leaf", torch.ones(T, M, dtype=torch.bool, device=device))
        self.register_buffer("missing_left", torch.zeros(T, M, dtype=torch.bool, device=device))
        self.register_buffer("tree_class", torch.zeros(T, self.num_classes, device=device))  # the logit each adds to
        self.value = nn.Parameter(torch.zeros(T, M, device=device))
        self.bias = nn.Parameter(torch.zeros(self.num_classes, device=device))

    def raw_features(self, num: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
        return table_features(num, cat, self.cardinalities)

    def forward_features(self, num: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
        x = self.raw_features(num, cat)
        B, (T, M) = x.shape[0], self.feature.shape

        def at(table: torch.Tensor, node: torch.Tensor) -> torch.Tensor:  # table[t, node[b, t]] → (B, T)
            return table.unsqueeze(0).expand(B, T, M).gather(2, node.unsqueeze(2)).squeeze(2)

        node = torch.zeros(B, T, dtype=torch.int64, device=x.device)
        for _ in range(self.depth):
            v = x.gather(1, at(self.feature, node))
            nan = torch.isnan(v)  # (logical ops, not a `where` on booleans, which ONNX Runtime lacks)
            go_left = (nan & at(self.missing_left, node)) | (~nan & (v <= at(self.threshold, node)))
            nxt = torch.where(go_left, at(self.left, node), at(self.right, node))
            node = torch.where(at(self.leaf, node), node, nxt)
        return at(self.value, node)  # (B, trees)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.tree_class + self.bias

    def artifact_options(self) -> dict[str, Any] | None:
        return self.cfg.model_dump()

    def fit_solver(self, train: Batches, val: Batches | None, seed: int) -> dict[str, Any]:
        import warnings

        from sklearn.ensemble import HistGradientBoostingClassifier

        xs, y = _collect(train, lambda n, c: self.raw_features(n, c).cpu().numpy())
        x = np.concatenate(xs).astype(np.float64)
        cfg = self.cfg
        est = HistGradientBoostingClassifier(
            max_iter=cfg.max_iter,
            learning_rate=cfg.learning_rate,
            max_leaf_nodes=cfg.max_leaf_nodes,
            l2_regularization=cfg.l2_regularization,
            random_state=seed,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            est.fit(x, y)
        # The fitted trees (scikit-learn's predictor node arrays, stable since 0.21; tests hold us to its
        # predict_proba) and the baseline score.
        per_round = est.n_trees_per_iteration_
        trees = [(k, t.nodes) for rnd in est._predictors for k, t in enumerate(rnd)]
        M = max(len(n) for _, n in trees)
        depth = int(max(n["depth"].max() for _, n in trees))
        self.cfg = cfg.model_copy(update={"fitted": [len(trees), M, depth]})
        self._allocate(len(trees), M, depth, self.feature.device)
        classes = np.asarray(est.classes_, dtype=np.int64)
        base = np.asarray(est._baseline_prediction, dtype=np.float64).reshape(-1)
        with torch.no_grad():
            for i, (k, n) in enumerate(trees):
                m = len(n)
                self.feature[i, :m] = torch.from_numpy(n["feature_idx"].astype(np.int64))
                self.threshold[i, :m] = torch.from_numpy(n["num_threshold"].astype(np.float64))
                self.left[i, :m] = torch.from_numpy(n["left"].astype(np.int64))
                self.right[i, :m] = torch.from_numpy(n["right"].astype(np.int64))
                self.leaf[i, :m] = torch.from_numpy(n["is_leaf"].astype(bool))
                self.missing_left[i, :m] = torch.from_numpy(n["missing_go_to_left"].astype(bool))
                self.value[i, :m] = torch.from_numpy(n["value"].astype(np.float64))
                # binary: one tree per round, the second class's logit (the first's is 0)
                self.tree_class[i, classes[1] if per_round == 1 else classes[k]] = 1.0
            self.bias.fill_(ABSENT)
            if per_round == 1:
                self.bias[classes[0]], self.bias[classes[1]] = 0.0, float(base[0])
            else:
                self.bias[torch.from_numpy(classes)] = torch.from_numpy(base).float()
        return {"trees": len(trees), "rounds": int(est.n_iter_), "depth": depth, "train_examples": len(y)}


@register_model(
    "gradient-boosting",
    GradientBoostingConfig,
    tasks=("tabular_classification",),
    capabilities=(Capability.CLASSIFIER, Capability.SOLVED, Capability.EXPORTABLE),
    description="gradient-boosted trees on table columns (scikit-learn's HistGradientBoostingClassifier, its trees "
    "evaluated in torch)",
)
def build_gradient_boosting(cfg: GradientBoostingConfig, input_shape: Any, num_classes: int) -> GradientBoosting:
    if not isinstance(input_shape, dict) or input_shape.get("kind") != "tabular":
        raise ValueError(f"gradient-boosting needs a table, got input shape {input_shape!r}")
    return GradientBoosting(cfg, input_shape, num_classes)
