"""Text classification: CSV / TSV / JSONL / aclImdb / the bundled tweets, a tokenizer trained on the training split
(or a pretrained run's, or a Hugging Face model's own), padded token ids; predicts strings."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from bigmodel.config import TextDataConfig
from bigmodel.errors import UserError
from bigmodel.tasks.base import ExportSignature, InputError, LoaderOptions, refuse_inputs, register_task
from bigmodel.tasks.classification import ClassificationSpec
from bigmodel.tasks.sequence import padded_signature


class TextClassification(ClassificationSpec):
    name = "text_classification"
    kind = "text"
    data_config = TextDataConfig
    inputs = "texts"

    def check_recipe(self, recipe: Any) -> None:
        super().check_recipe(recipe)
        shards = recipe.data.source == "shards"  # the folder's tokenizer counts (checked when it is read)
        if recipe.model.name == "tfidf-linear" and recipe.data.tokenizer.kind != "ngrams" and not shards:
            raise ValueError(
                f"model.name 'tfidf-linear' reads word and character n-grams: set data.tokenizer.kind: ngrams "
                f"(got {recipe.data.tokenizer.kind!r})"
            )

    def prepare(self, recipe: Any, pre: Any | None = None) -> tuple[Any, Any]:
        from bigmodel.data.text import load_text, tokenize_dataset

        cfg = recipe.data
        if cfg.source == "shards":  # token ids on disk (`bigmodel data prepare`), with their tokenizer
            from bigmodel.data.textshards import load_text_shards

            data, pre = load_text_shards(recipe, pre)
            if recipe.model.name == "tfidf-linear" and pre.input_shape.get("tokenizer") != "ngrams":
                raise UserError(
                    f"model.name 'tfidf-linear' reads word and character n-grams: {cfg.path} holds "
                    f"{pre.input_shape.get('tokenizer')!r} token ids (prepare it with data.tokenizer.kind: ngrams)"
                )
            return data, pre
        text = load_text(cfg, recipe.seed)
        pre = pre or self.text_preprocess(recipe, text.labels, text.train.texts)
        data = tokenize_dataset(text, pre.tokenizer)
        data.pii_masked = text.pii_masked
        return data, pre

    def text_preprocess(self, recipe: Any, labels: list[str], train_texts: Iterable[str]) -> Any:
        """The tokenizer and input description: the `hf` model's own, a pretrained run's (`model.init_from`), or one
        trained on the training texts (read only in that case)."""
        from bigmodel.api import hf_text_preprocess, init_from_artifact
        from bigmodel.data.text import PAD_ID, train_tokenizer
        from bigmodel.runs import Preprocess

        cfg = recipe.data
        pre = None
        if recipe.model.name == "hf":
            pre = hf_text_preprocess(recipe, labels)
        if pre is None:
            init = init_from_artifact(recipe)
            if init is not None:  # fine-tuning a pretrained run: its tokenizer, with this recipe's length limit
                tok = init.preprocess.tokenizer
                tok.enable_truncation(max_length=cfg.tokenizer.max_length)
                tok.enable_padding(pad_id=PAD_ID, pad_token="[PAD]")
            else:
                tok = train_tokenizer(cfg.tokenizer, train_texts)
            spec = {
                "kind": "text",
                "vocab_size": tok.get_vocab_size(),
                "pad_id": 0,
                "has_cls": cfg.tokenizer.add_cls if init is None else False,
                "tokenizer": cfg.tokenizer.kind if init is None else init.preprocess.input_shape.get("tokenizer"),
                "max_length": cfg.tokenizer.max_length,
            }
            if hasattr(tok, "num_words"):  # the `ngrams` tokenizer: ids of word n-grams first, then characters
                n0 = len(tok.special)
                spec |= {"has_cls": False, "ngram_words": [n0, n0 + tok.num_words]}
            pre = Preprocess(labels=labels, mean=None, std=None, input_shape=spec, kind="text", tokenizer=tok)
        return pre

    def write_shards(self, recipe: Any, out: Any, shard_size: int) -> dict[str, Any]:
        """Each split's token ids, offsets and labels, with the tokenizer (`data/textshards.py`), the source read a row
        at a time; `shard_size` does not apply (texts are read one by one from one stream per split)."""
        from bigmodel.data.textshards import write_text_shards

        return write_text_shards(recipe, out, lambda labels, texts: self.text_preprocess(recipe, labels, texts))

    def prepared_summary(self, index: dict[str, Any]) -> str:
        return ", ".join(f"{k} {v['count']:,} texts ({v['tokens']:,} tokens)" for k, v in index["splits"].items())

    def build_loader(self, recipe: Any, split: Any, pre: Any, opts: LoaderOptions) -> Any:
        from bigmodel.data.loader import SequenceLoader

        return SequenceLoader(split, opts.batch_size, **self.loader_kwargs(recipe, opts))

    def baseline_features(self, recipe: Any, data: Any, pre: Any, split: str) -> Any:
        """`tfidf-linear`: the same split's raw texts (read again: the prepared data holds token ids), TF-IDF of
        word and character n-grams, logistic regression."""
        from bigmodel.data.text import load_text
        from bigmodel.evaluation.baseline import from_splits

        if recipe.data.source == "shards":
            return None  # the folder holds token ids, not the texts the baseline reads
        return from_splits("tfidf-linear", load_text(recipe.data, recipe.seed), split, lambda s: list(s.texts))

    def predict(
        self, art: Any, files: list[str | Path] | None, texts: list[str] | None, top_k: int
    ) -> list[dict[str, Any]]:
        refuse_inputs(art, files, texts, takes="texts")
        return art.predict_texts(list(texts or []), top_k=top_k)

    def explain_items(
        self, art: Any, files: list[str | Path] | None, texts: list[str] | None
    ) -> tuple[list[str], list[Any]]:
        refuse_inputs(art, files, texts, takes="texts")
        texts = list(texts or [])
        for i, t in enumerate(texts):
            self.serve_item(art, i, t)
        return texts, texts

    def model_inputs(self, art: Any, items: list[Any]) -> tuple[Any, ...]:
        """Strings → token ids (B, T), right-padded, and lengths (B,)."""
        return art.encode_texts(items)

    def report_example(self, art: Any, split: Any, i: int) -> str:
        from bigmodel.report.classification import tokens_view

        return tokens_view(art.preprocess.tokenizer, split.x[i], int(split.lengths[i]))

    def serve_item(self, art: Any, i: int, x: Any) -> Any:
        if not isinstance(x, str):
            raise InputError(f"inputs[{i}]: this is a text model; expected a string")
        if not x.strip():
            raise InputError(f"inputs[{i}]: empty text")
        return x

    def probabilities(self, art: Any, batch: list[Any]) -> torch.Tensor:
        return art.predict_texts_proba(batch)

    def export_signature(self, art: Any, data: Any, n: int) -> ExportSignature:
        return padded_signature(art, data, n)


register_task(TextClassification())
