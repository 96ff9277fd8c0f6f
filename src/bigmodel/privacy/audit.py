"""`bigmodel audit RUN --membership`: how much a trained classifier gives away about who was in its training set.

A loss-threshold membership-inference attack (Yeom et al. 2018): a model fits its training examples better than
unseen ones, so an attacker who sees an example's loss guesses "member" when it is low. The audit scores the run's
training examples (members) and a held-out split (non-members, `--split`, default test) with the saved model, takes
equally many of each (a seeded sample of the larger group), and reports how well the negative loss separates them:
ROC AUC (0.5 = the attacker learns nothing) and the true-positive rate at a 1% false-positive rate (the regime that
matters: confident guesses about a few people, Carlini et al. 2022). A DP-trained run's ε and δ are printed beside
them.
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
