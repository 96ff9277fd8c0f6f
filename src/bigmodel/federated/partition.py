"""Which training examples each federated client holds: a pure function of (labels, clients, kind, seed).

    iid        a shuffled split into `clients` parts of (nearly) equal size;
    dirichlet  for each class, its examples are divided among the clients by proportions drawn from
               Dirichlet(alpha, ..., alpha) (Hsu et al. 2019; Flower Datasets' DirichletPartitioner and the
               niid_bench baselines do the same): alpha 0.1 leaves most clients one or two classes, alpha 100 is
               close to iid. Drawn again (up to 100 times) until every client holds at least `min_size` examples;
    shards     McMahan et al. 2017's pathological split: the examples sorted by label are cut into
               clients x labels_per_client shards of equal size and each client takes labels_per_client of them.

Every client computes its own part from the same arguments, so no index list is sent anywhere.
"""

from __future__ import annotations

import numpy as np

from bigmodel.errors import UserError


def partition(
    labels: np.ndarray,
    clients: int,
    kind: str = "iid",
    *,
    seed: int = 0,
    alpha: float = 0.5,
    labels_per_client: int = 2,
    min_size: int = 10,
) -> list[np.ndarray]:
    """The sorted example indices of each client (a list of `clients` int64 arrays that together cover every
    example exactly once)."""
    labels = np.asarray(labels).reshape(-1)
    n = len(labels)
    if clients > n:
        raise UserError(f"federated.clients {clients} is more than the {n} training examples")
    rng = np.random.default_rng(seed)
    if kind == "iid":
        parts = np.array_split(rng.permutation(n), clients)
    elif kind == "dirichlet":
        parts = _dirichlet(labels, clients, alpha, min_size, rng)
    elif kind == "shards":
        parts = _shards(labels, clients, labels_per_client, rng)
    else:
        raise UserError(f"federated.partition.kind {kind!r}: expected iid, dirichlet or shards")
    return [np.sort(p).astype(np.int64) for p in parts]


def _dirichlet(
    labels: np.ndarray, clients: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    classes = np.unique(labels)
    if min_size * clients > len(labels):
        raise UserError(
            f"federated.partition.min_size {min_size} x {clients} clients is more than the {len(labels)} training "
            "examples"
        )
    for _ in range(100):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for i, piece in enumerate(np.split(idx, cuts)):
                parts[i].append(piece)
        out = [np.concatenate(p) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise UserError(
        f"federated.partition: no Dirichlet(alpha={alpha}) draw in 100 gave every one of {clients} clients "
        f"{min_size} examples; raise alpha, lower min_size or use fewer clients"
    )


def _shards(labels: np.ndarray, clients: int, per_client: int, rng: np.random.Generator) -> list[np.ndarray]:
    count = clients * per_client
    if count > len(labels):
        raise UserError(
            f"federated.partition: {clients} clients x labels_per_client {per_client} shards is more than the "
            f"{len(labels)} training examples"
        )
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, count)
    assign = rng.permutation(count).reshape(clients, per_client)
    return [np.concatenate([shards[s] for s in row]) for row in assign]


def describe(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> list[dict[str, object]]:
    """Per client: how many examples, and how many of each class (what the run directory records)."""
    labels = np.asarray(labels).reshape(-1)
    return [
        {
            "client": i,
            "examples": int(len(p)),
            "per_class": np.bincount(labels[p], minlength=num_classes).astype(int).tolist(),
        }
        for i, p in enumerate(parts)
    ]
