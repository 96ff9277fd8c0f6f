"""`bigmodel audit RUN --membership | --canary SECRET --prefix P`: what a trained model gives away about its data.

Membership (classifiers):
A loss-threshold membership-inference attack (Yeom et al. 2018): a model fits its training examples better than
unseen ones, so an attacker who sees an example's loss guesses "member" when it is low. The audit scores the run's
training examples (members) and a held-out split (non-members, `--split`, default test) with the saved model, takes
equally many of each (a seeded sample of the larger group), and reports how well the negative loss separates them:
ROC AUC (0.5 = the attacker learns nothing) and the true-positive rate at a 1% false-positive rate (the regime that
matters: confident guesses about a few people, Carlini et al. 2022). A DP-trained run's ε and δ are printed beside
them.

Canary (language models; Carlini et al. 2019, "The Secret Sharer"): a secret planted in the training text (e.g. a
line `my phone is 617-555-0147` repeated) is *reproduced* when greedy decoding from its prefix writes it out, and its
*exposure* measures memorisation short of that: the secret's log-likelihood after the prefix is ranked among
`candidates` random values of the same format (every digit replaced by a random digit, every letter by a random letter
of the same case); exposure = log2(candidates + 1) − log2(rank), from 0 (no more likely than a random value) to
log2(candidates + 1) (the most likely of all). The secret is scored as raw text: the tokenizer, not the masking a
model applies to its prompts, so a masked run is audited for what it would say about the real value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bigmodel.errors import UserError


def per_example_losses(run_dir: str | Path, split: str) -> Any:
    import torch
    import torch.nn.functional as F

    from bigmodel.api import evaluation

    ev = evaluation(run_dir, split, keep_outputs=True)
    if ev.logits is None:
        raise UserError(
            f"{run_dir}: audit --membership takes classifiers (a {ev.recipe.task} run has no per-example class scores)"
        )
    return F.cross_entropy(ev.logits.float(), ev.targets.long(), reduction="none").to(torch.float64), ev


def membership(run_dir: str | Path, split: str = "test", seed: int = 0) -> dict[str, Any]:
    """The loss-threshold attack's ROC AUC and TPR at 1% FPR, members (train) against non-members (`split`)."""
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score, roc_curve

    if split == "train":
        raise UserError("--split train: the non-members must be a held-out split (test or val)")
    members, ev = per_example_losses(run_dir, "train")
    others, _ = per_example_losses(run_dir, split)
    n = min(len(members), len(others))
    if n < 10:
        raise UserError(f"{run_dir}: too few examples to audit ({len(members)} train, {len(others)} {split})")
    g = torch.Generator().manual_seed(seed)
    members = members[torch.randperm(len(members), generator=g)[:n]]
    others = others[torch.randperm(len(others), generator=g)[:n]]
    scores = -torch.cat([members, others]).numpy()  # low loss → "member"
    labels = np.concatenate([np.ones(n), np.zeros(n)])
    fpr, tpr, _ = roc_curve(labels, scores)
    out: dict[str, Any] = {
        "run_dir": str(run_dir),
        "attack": "loss threshold",
        "members": n,
        "non_members": n,
        "non_member_split": split,
        "auc": float(roc_auc_score(labels, scores)),
        "tpr_at_1pct_fpr": float(np.interp(0.01, fpr, tpr)),
        "member_loss_mean": float(members.mean()),
        "non_member_loss_mean": float(others.mean()),
    }
    privacy = ev.artifact.config.get("privacy")
    summary = Path(run_dir) / "summary.json"
    if privacy is None and summary.is_file():
        privacy = json.loads(summary.read_text(encoding="utf-8")).get("privacy")
    out["privacy"] = (
        {k: privacy[k] for k in ("epsilon", "delta", "noise_multiplier", "accountant")} if privacy else None
    )
    return out


def _format_like(secret: str, rng: Any) -> str:
    out = []
    for c in secret:
        if c.isdigit():
            out.append(str(rng.integers(10)))
        elif c.isalpha() and c.isascii():
            letter = chr(ord("a") + int(rng.integers(26)))
            out.append(letter.upper() if c.isupper() else letter)
        else:
            out.append(c)
    return "".join(out)


def _log_likelihoods(art: Any, prefix: str, continuations: list[str], batch_size: int = 64) -> list[float]:
    """log p(continuation | prefix) under a language model, summed over the continuation's tokens."""
    import torch

    tok = art.preprocess.tokenizer
    n_prefix = len(tok.encode(prefix, add_special_tokens=False).ids)
    rows = [tok.encode(prefix + c, add_special_tokens=False).ids for c in continuations]
    out: list[float] = []
    with torch.inference_mode():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            T = max(len(r) for r in chunk)
            x = torch.tensor([r + [0] * (T - len(r)) for r in chunk])
            logits = art.model(x)
            logits = getattr(logits, "logits", logits).float().log_softmax(-1)
            for j, r in enumerate(chunk):
                start = max(1, min(n_prefix, len(r) - 1))  # tokens after the prefix (a merge may move the boundary)
                ids = torch.tensor(r[start:])
                out.append(float(logits[j, start - 1 : len(r) - 1].gather(1, ids[:, None]).sum()))
    return out


def canary(run_dir: str | Path, secret: str, prefix: str, candidates: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Whether greedy decoding from `prefix` reproduces `secret`, and the secret's exposure (see the module)."""
    import math

    import numpy as np

    from bigmodel.api import load_artifact
    from bigmodel.models.base import Capability

    if not secret or not prefix:
        raise UserError("audit --canary: give the secret and its --prefix (the text the secret followed)")
    if candidates < 1:
        raise UserError(f"--candidates {candidates}: expected ≥ 1")
    art = load_artifact(run_dir)
    if not art.can(Capability.GENERATES) or art.kind != "lm":
        raise UserError(f"{run_dir}: audit --canary takes language models (this is a {art.kind} model)")
    n_tokens = len(art.preprocess.tokenizer.encode(secret, add_special_tokens=False).ids)
    greedy = art.generate_text(prefix, max_new_tokens=n_tokens + 4, temperature=0.0)
    rng = np.random.default_rng(seed)
    others: list[str] = []
    seen = {secret}
    tries = 0
    while len(others) < candidates and tries < 20 * candidates:  # distinct values of the same format
        tries += 1
        c = _format_like(secret, rng)
        if c not in seen:
            seen.add(c)
            others.append(c)
    scores = _log_likelihoods(art, prefix, [secret, *others])
    rank = 1 + sum(s > scores[0] for s in scores[1:])
    total = len(scores)
    return {
        "run_dir": str(run_dir),
        "prefix": prefix,
        "greedy": greedy,
        "reproduced": greedy.startswith(secret),
        "candidates": len(others),
        "rank": rank,
        "exposure": round(math.log2(total) - math.log2(rank), 4),
        "max_exposure": round(math.log2(total), 4),
        "secret_log_likelihood": round(scores[0], 4),
        "pii_mask": art.config.get("pii_mask"),
        "privacy": art.config.get("privacy"),
    }
