"""A character n-gram language model for CTC beam search (shallow fusion, Hannun et al. 2014): interpolated
Kneser-Ney smoothing (Chen & Goodman 1998, one discount per order), estimated from the training split's transcripts
and saved with the model as `lm.json` (counts, not pickle).

A CTC model spells each word from its sound alone; the LM adds what spelling the training text makes likely (English
"their" over "thair"). Decoding ranks each prefix by log P_ctc + weight * log P_lm + bonus * characters; the bonus
offsets the LM's pull towards short outputs. The sentence end is scored at the last step.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from bigmodel.errors import UserError

BOS, EOS = "\x02", "\x03"  # never in a normalised transcript
LM_FILE = "lm.json"


class CharLMConfig(BaseModel):
    """`model.lm` of a speech recognizer: a character n-gram LM from the training transcripts, used by beam search
    (`model.beam_size` > 1 or `--beam-size`)."""

    model_config = ConfigDict(extra="forbid")

    order: Annotated[int, Field(ge=2, le=12)] = 6
    """Characters of context + 1."""
    weight: Annotated[float, Field(ge=0.0, le=10.0)] = 0.5
    """The LM's log-probability weight in the beam's ranking (0: the LM is not used)."""
    bonus: Annotated[float, Field(ge=-10.0, le=10.0)] = 1.0
    """Added per character in the beam's ranking."""
    discount: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.75


class CharNgramLM:
    """P(next character | the previous order-1 characters), interpolated Kneser-Ney: the highest order counts
    n-grams; lower orders count in how many distinct contexts an n-gram follows (continuation counts); the base is
    uniform over the characters and the sentence end."""

    def __init__(self, order: int, vocab: list[str], counts: list[dict[str, dict[str, int]]], **options: Any) -> None:
        self.order = order
        self.vocab = list(vocab)  # the characters the LM predicts, EOS included
        self.counts = counts  # counts[k][history of k characters][next] (k = 0..order-1)
        self.weight = float(options.get("weight", 0.5))
        self.bonus = float(options.get("bonus", 1.0))
        self.discount = float(options.get("discount", 0.75))
        self._totals = [{h: (sum(nx.values()), len(nx)) for h, nx in level.items()} for level in counts]
        self._cache: dict[tuple[str, str], float] = {}

    @classmethod
    def fit(cls, texts: list[str], cfg: CharLMConfig) -> CharNgramLM:
        n = cfg.order
        top: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for t in texts:
            s = BOS * (n - 1) + t + EOS
            for i in range(n - 1, len(s)):
                top[s[i - n + 1 : i]][s[i]] += 1
        counts: list[dict[str, dict[str, int]]] = [{} for _ in range(n)]
        counts[n - 1] = {h: dict(nx) for h, nx in top.items()}
        for k in range(n - 2, -1, -1):  # continuation counts: distinct characters before (history, next)
            seen: dict[str, set[tuple[str, str]]] = defaultdict(set)
            for h, nx in counts[k + 1].items():
                for c in nx:
                    seen[h[1:]].add((h[0], c))
            level: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
            for h, pairs in seen.items():
                for _, c in sorted(pairs):  # a set's order changes with the process's hash seed; the counts' must not
                    level[h][c] += 1
            counts[k] = {h: dict(nx) for h, nx in level.items()}
        vocab = sorted({c for t in texts for c in t}) + [EOS]
        return cls(n, vocab, counts, weight=cfg.weight, bonus=cfg.bonus, discount=cfg.discount)

    def with_settings(self, weight: float | None = None, bonus: float | None = None) -> CharNgramLM:
        """This LM (the same counts and cache) with another weight / bonus where given."""
        if weight is None and bonus is None:
            return self
        other = copy.copy(self)
        other.weight = self.weight if weight is None else float(weight)
        other.bonus = self.bonus if bonus is None else float(bonus)
        return other

    def prob(self, history: str, c: str) -> float:
        """P(c | history); `history` is the text so far (only its last order-1 characters count, BOS-padded)."""
        h = (BOS * (self.order - 1) + history[-(self.order - 1) :])[-(self.order - 1) :]
        key = (h, c)
        p = self._cache.get(key)
        if p is None:
            p = self._prob(h, c)
            if len(self._cache) < 2_000_000:
                self._cache[key] = p
        return p

    def _prob(self, h: str, c: str) -> float:
        p = 1.0 / len(self.vocab)
        for k in range(len(h) + 1):  # shortest history first, each order interpolated with the one below
            hk = h[len(h) - k :]
            nx = self.counts[k].get(hk)
            if nx is None:
                continue
            total, distinct = self._totals[k][hk]
            p = max(nx.get(c, 0) - self.discount, 0.0) / total + self.discount * distinct / total * p
        return p

    def log_prob(self, history: str, c: str) -> float:
        return math.log(self.prob(history, c))

    def end(self, history: str) -> float:
        """log P(sentence end | history)."""
        return self.log_prob(history, EOS)

    def score(self, text: str) -> float:
        """log P(text, then the sentence end)."""
        return sum(self.log_prob(text[:i], c) for i, c in enumerate(text)) + self.end(text)

    # ------------------------------------------------------------------------------------------------ storage
    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "char-ngram-kneser-ney",
            "order": self.order,
            "vocab": self.vocab,
            "weight": self.weight,
            "bonus": self.bonus,
            "discount": self.discount,
            "counts": self.counts,
        }

    def save(self, folder: Path) -> None:
        tmp = folder / f".{LM_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True), encoding="utf-8")
        os.replace(tmp, folder / LM_FILE)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CharNgramLM:
        options = {k: d[k] for k in ("weight", "bonus", "discount")}
        return cls(int(d["order"]), d["vocab"], d["counts"], **options)

    @classmethod
    def load(cls, path: Path) -> CharNgramLM:
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}: unreadable language model ({e})") from None
