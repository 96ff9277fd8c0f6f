"""The `ngrams` tokenizer (`data.tokenizer.kind: ngrams`): a text becomes the ids of its word 1-2-grams and its
character 2-5-grams within words — the features of TF-IDF text classification (`tfidf-linear`), and fastText-style
sub-word features for `embedding-bag`.

The n-grams are scikit-learn's own analyzers (`CountVectorizer(analyzer="word", ngram_range=(1, 2))` and
`analyzer="char_wb", ngram_range=(2, 5)`), so the vocabulary and the counts are exactly those of scikit-learn's
`TfidfVectorizer` on the same texts. The vocabulary is fitted on the training split: every word n-gram, and the
character n-grams found in at least `min_frequency` training texts; `vocab_size` keeps the ones in the most texts.
Ids: the special tokens 0-4 (`[PAD]` = 0), then the word n-grams, then the character n-grams, each part in sorted
order (scikit-learn's column order). An n-gram not in the vocabulary is dropped (there is no `[UNK]` feature).

It quacks like the Hugging Face tokenizers the other kinds are (`encode_batch`, `get_vocab_size`, `id_to_token`,
`decode`, `to_str`), and is saved in the artifact as `tokenizer.json` in its own small JSON format
(`"bigmodel_tokenizer": "ngrams"`), read back by `load_tokenizer`.
"""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Any

FORMAT = "ngrams"
WORD_NGRAMS = (1, 2)
CHAR_NGRAMS = (2, 5)


@dataclass
class Encoding:
    ids: list[int]
    attention_mask: list[int]


class NgramTokenizer:
    def __init__(
        self,
        words: list[str],
        chars: list[str],
        *,
        lowercase: bool,
        normalization: str,
        max_length: int,
        special: list[str],
    ) -> None:
        self.words, self.chars = list(words), list(chars)
        self.lowercase, self.normalization, self.max_length = lowercase, normalization, max_length
        self.special = list(special)
        n0 = len(self.special)
        self.word_ids = {w: n0 + i for i, w in enumerate(self.words)}
        self.char_ids = {c: n0 + len(self.words) + i for i, c in enumerate(self.chars)}
        self._word, self._char = _analyzers(lowercase)

    # ------------------------------------------------------------------------------------------------- fitting
    @classmethod
    def train(cls, cfg: Any, texts: list[str], special: list[str]) -> NgramTokenizer:
        """Fit the vocabulary on `texts` (the training split): word n-grams in ≥ 1 text, character n-grams in
        ≥ `cfg.min_frequency` texts, at most `cfg.vocab_size` ids in all (the n-grams in the most texts)."""
        word, char = _analyzers(cfg.lowercase)
        wdf: Counter[str] = Counter()
        cdf: Counter[str] = Counter()
        for t in texts:
            t = _normalize(t, cfg.normalization)
            wdf.update(set(word(t)))
            cdf.update(set(char(t)))
        kept = [("w", g, n) for g, n in wdf.items()] + [("c", g, n) for g, n in cdf.items() if n >= cfg.min_frequency]
        room = max(0, cfg.vocab_size - len(special))
        if len(kept) > room:
            kept = sorted(kept, key=lambda k: (-k[2], k[0], k[1]))[:room]
        words = sorted(g for p, g, _ in kept if p == "w")
        chars = sorted(g for p, g, _ in kept if p == "c")
        return cls(
            words,
            chars,
            lowercase=cfg.lowercase,
            normalization=cfg.normalization,
            max_length=cfg.max_length,
            special=special,
        )

    # ------------------------------------------------------------------------------------------------ encoding
    @property
    def num_words(self) -> int:
        """How many word n-grams: ids [len(special), len(special) + num_words) are words, the rest characters."""
        return len(self.words)

    def ngrams(self, text: str) -> list[int]:
        """The ids of the text's n-grams in order (words first, then characters), repeated as they occur."""
        t = _normalize(text, self.normalization)
        w, c = self.word_ids, self.char_ids
        ids = [w[g] for g in self._word(t) if g in w] + [c[g] for g in self._char(t) if g in c]
        return ids[: self.max_length]

    def encode_batch(self, texts: list[str]) -> list[Encoding]:
        return [Encoding(ids, [1] * len(ids)) for ids in map(self.ngrams, texts)]

    def get_vocab_size(self) -> int:
        return len(self.special) + len(self.words) + len(self.chars)

    def id_to_token(self, i: int) -> str | None:
        n0, nw = len(self.special), len(self.words)
        if 0 <= i < n0:
            return self.special[i]
        if n0 <= i < n0 + nw:
            return self.words[i - n0]
        if n0 + nw <= i < self.get_vocab_size():
            return repr(self.chars[i - n0 - nw])  # quoted: character n-grams keep their word-boundary spaces
        return None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """The word unigrams of `ids`, in order (what can be read back of a bag of n-grams)."""
        n0 = len(self.special)
        out = [self.words[i - n0] for i in ids if n0 <= i < n0 + len(self.words) and " " not in self.words[i - n0]]
        return " ".join(out)

    # ----------------------------------------------------------------------------------------------- the file
    def to_str(self) -> str:
        return json.dumps(
            {
                "bigmodel_tokenizer": FORMAT,
                "version": 1,
                "word_ngrams": list(WORD_NGRAMS),
                "char_ngrams": list(CHAR_NGRAMS),
                "lowercase": self.lowercase,
                "normalization": self.normalization,
                "max_length": self.max_length,
                "special": self.special,
                "words": self.words,
                "chars": self.chars,
            },
            ensure_ascii=False,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NgramTokenizer:
        if (
            d.get("version") != 1
            or d.get("word_ngrams") != list(WORD_NGRAMS)
            or d.get("char_ngrams") != list(CHAR_NGRAMS)
        ):
            raise ValueError("an n-gram tokenizer of another version")
        return cls(
            d["words"],
            d["chars"],
            lowercase=bool(d["lowercase"]),
            normalization=str(d["normalization"]),
            max_length=int(d["max_length"]),
            special=list(d["special"]),
        )


def _normalize(text: str, form: str) -> str:
    return text if form == "none" else unicodedata.normalize(form, text)


def _analyzers(lowercase: bool) -> tuple[Any, Any]:
    from sklearn.feature_extraction.text import CountVectorizer

    word = CountVectorizer(analyzer="word", ngram_range=WORD_NGRAMS, lowercase=lowercase).build_analyzer()
    char = CountVectorizer(analyzer="char_wb", ngram_range=CHAR_NGRAMS, lowercase=lowercase).build_analyzer()
    return word, char
