"""Translation: sentence pairs (TSV, aligned files, the bundled English-Spanish Bible), one shared or two tokenizers,
length-bucketed training batches, teacher-forced loss; BLEU / chrF of beam-searched translations at evaluation."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bigmodel.config import TranslationDataConfig
from bigmodel.errors import UserError
from bigmodel.tasks.base import InputError, LoaderOptions, TaskSpec, refuse_inputs, register_task
from bigmodel.tasks.generative import TranslationTask


class Translation(TaskSpec):
    name = "translation"
    kind = "translation"
    data_config = TranslationDataConfig
    inputs = "texts"
    generative = True

    def prepare(self, recipe: Any, pre: Any | None = None) -> tuple[Any, Any]:
        from bigmodel.data.parallel import load_pairs, tokenize_pairs

        cfg = recipe.data
        if cfg.source == "shards":  # token ids on disk (`bigmodel data prepare`), with their tokenizers
            from bigmodel.data.pairshards import load_pair_shards

            return load_pair_shards(recipe, pre)
        pairs = load_pairs(cfg, recipe.seed)
        pre = pre or self.pair_preprocess(recipe, pairs.train.source, pairs.train.target)
        tgt = pre.target_tokenizer or pre.tokenizer
        data = tokenize_pairs(pairs, pre.tokenizer, tgt, cfg.tokenizer.max_length)
        data.pii_masked = pairs.pii_masked
        return data, pre

    def pair_preprocess(self, recipe: Any, source: Iterable[str], target: Iterable[str]) -> Any:
        """The tokenizers (one shared, or one per side) trained on the training pairs, and the input description."""
        from bigmodel.data.parallel import train_pair_tokenizers
        from bigmodel.runs import Preprocess

        cfg = recipe.data
        src_tok, tgt_tok = train_pair_tokenizers(cfg, source, target)
        spec = {
            "kind": "translation",
            "src_vocab_size": src_tok.get_vocab_size(),
            "tgt_vocab_size": (tgt_tok or src_tok).get_vocab_size(),
            "shared_vocab": tgt_tok is None,
            "max_length": cfg.tokenizer.max_length,
            "tokenizer": cfg.tokenizer.kind,
        }
        return Preprocess(
            labels=[],
            mean=None,
            std=None,
            input_shape=spec,
            kind="translation",
            tokenizer=src_tok,
            target_tokenizer=tgt_tok,
        )

    def write_shards(self, recipe: Any, out: Any, shard_size: int) -> dict[str, Any]:
        """Each split's source and target ids with their offsets and raw texts, and the tokenizers
        (`data/pairshards.py`), the source read a pair at a time; `shard_size` does not apply."""
        from bigmodel.data.pairshards import write_pair_shards

        return write_pair_shards(recipe, out, lambda src, tgt: self.pair_preprocess(recipe, src, tgt))

    def prepared_summary(self, index: dict[str, Any]) -> str:
        splits = index["splits"].items()
        line = ", ".join(f"{k} {v['count']:,} pairs ({v['src_tokens'] + v['tgt_tokens']:,} tokens)" for k, v in splits)
        return line + (f"; {index['dropped']:,} training pairs over max_length dropped" if index.get("dropped") else "")

    def build_loader(self, recipe: Any, split: Any, pre: Any, opts: LoaderOptions) -> Any:
        from bigmodel.data.parallel import PairLoader

        bs = opts.batch_size if opts.train or not opts.default_batch_size else max(1, min(opts.batch_size, 256))
        return PairLoader(split, bs, shuffle=opts.train, **opts.plan_kwargs(recipe))

    def objective(self, recipe: Any, data: Any, num_classes: int, labels: list[str]) -> TranslationTask:
        return TranslationTask(recipe.train.label_smoothing if recipe is not None else 0.0)

    def evaluate_extra(self, art: Any, data: Any, split: str, **options: Any) -> dict[str, Any]:
        """BLEU and chrF of beam-searched translations (`decode=False` skips them; `beam_size`, `limit`)."""
        if not options.get("decode", True):
            return {}
        from bigmodel.models.seq2seq import score_translations

        return score_translations(
            art, data.split(split), beam_size=options.get("beam_size"), limit=options.get("limit")
        )

    def predict(
        self, art: Any, files: list[str | Path] | None, texts: list[str] | None, top_k: int
    ) -> list[dict[str, Any]]:
        refuse_inputs(art, files, texts, takes="texts")
        texts = list(texts or [])
        return [{"text": t, "translation": tr} for t, tr in zip(texts, art.translate(texts), strict=True)]

    def summary(self, metrics: dict[str, Any], split: str) -> str:
        m = metrics
        line = f"{split} loss {m['loss']:.4f}  perplexity {m['perplexity']:.3f}"
        return line + (f"  BLEU {m['bleu']:.2f}  chrF {m['chrf']:.2f}" if "bleu" in m else "")

    def format_prediction(self, result: dict[str, Any]) -> str:
        return str(result["translation"])

    def report_sections(self, ctx: Any) -> list[Any]:
        from bigmodel.report.generative import translation_sections

        return translation_sections(ctx)

    def serve_item(self, art: Any, i: int, x: Any) -> Any:
        raise InputError("this is a translation model: POST /v1/translate with sentences")

    def export_signature(self, art: Any, data: Any, n: int) -> Any:
        raise UserError(f"{art.folder}: a translation model; export takes classifiers (translate with bigmodel serve)")


register_task(Translation())
