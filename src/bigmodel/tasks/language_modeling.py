"""Language modelling: a corpus (text files, the bundled Shakespeare, or the text column of a classification
source), a reversible tokenizer (char / byte-level BPE, or a Hugging Face model's), random training windows and
non-overlapping evaluation windows. A language model generates: `predict` points to `generate`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bigmodel.config import LanguageModelDataConfig
from bigmodel.errors import UserError
from bigmodel.tasks.base import InputError, LoaderOptions, TaskSpec, register_task
from bigmodel.tasks.generative import LanguageModelingTask


class LanguageModeling(TaskSpec):
    name = "language_modeling"
    kind = "lm"
    data_config = LanguageModelDataConfig
    inputs = "prompt"
    generative = True

    def prepare(self, recipe: Any, pre: Any | None = None) -> tuple[Any, Any]:
        from bigmodel.api import hf_lm_preprocess
        from bigmodel.data.corpus import load_corpus, tokenize_corpus, train_lm_tokenizer
        from bigmodel.runs import Preprocess

        cfg = recipe.data
        if cfg.source == "shards":  # token ids on disk, with the tokenizer they were made with
            from bigmodel.data.tokenshards import load_token_shards

            return load_token_shards(recipe, pre)
        corpus = load_corpus(cfg, recipe.seed)
        if pre is None and recipe.model.name == "hf":
            pre = hf_lm_preprocess(recipe)
        if pre is None:
            tok = train_lm_tokenizer(cfg.tokenizer, corpus.train)
            spec = {
                "kind": "lm",
                "vocab_size": tok.get_vocab_size(),
                "context_length": cfg.context_length,
                "tokenizer": cfg.tokenizer.kind,
            }
            pre = Preprocess(labels=[], mean=None, std=None, input_shape=spec, kind="lm", tokenizer=tok)
        data = tokenize_corpus(corpus, pre.tokenizer)
        data.pii_masked = corpus.pii_masked
        return data, pre

    def build_loader(self, recipe: Any, split: Any, pre: Any, opts: LoaderOptions) -> Any:
        from bigmodel.data.corpus import WindowLoader

        T, bs = recipe.data.context_length, opts.batch_size
        if not opts.train and opts.default_batch_size:  # keep an evaluation batch's logits under ~256 MB
            bs = max(1, min(bs, (1 << 26) // (T * int(pre.input_shape["vocab_size"]))))
        batches = recipe.data.batches_per_epoch if opts.train else None
        poisson = opts.train and recipe.privacy.dp is not None  # DP-SGD: Poisson-sampled disjoint windows
        return WindowLoader(
            split, T, bs, train=opts.train, batches=batches, poisson=poisson, **opts.plan_kwargs(recipe, drop=False)
        )

    def write_shards(self, recipe: Any, out: Any, shard_size: int) -> dict[str, Any]:
        """Token ids of each split in one raw file, with the tokenizer (`data/tokenshards.py`); `shard_size` does not
        apply (a stream is read by window, not by file)."""
        from bigmodel.data.tokenshards import write_token_shards

        return write_token_shards(recipe, out)

    prepared_unit = "tokens"

    def objective(self, recipe: Any, data: Any, num_classes: int, labels: list[str]) -> LanguageModelingTask:
        return LanguageModelingTask(recipe.train.label_smoothing if recipe is not None else 0.0)

    def predict(
        self, art: Any, files: list[str | Path] | None, texts: list[str] | None, top_k: int
    ) -> list[dict[str, Any]]:
        raise UserError(f"{art.folder}: a language model generates text: `bigmodel generate RUN --prompt ...`")

    def explain_items(
        self, art: Any, files: list[str | Path] | None, texts: list[str] | None
    ) -> tuple[list[str], list[Any]]:
        """Prompts: which of their tokens drove the tokens the model generates next."""
        if files:
            raise UserError(f"{art.folder}: a language model explains prompts (strings), not files")
        prompts = [t for t in texts or [] if t.strip()]
        if len(prompts) != len(texts or []):
            raise UserError("explain: empty prompt")
        return prompts, prompts

    def model_inputs(self, art: Any, items: list[Any]) -> tuple[Any, ...]:
        """Prompts of the same token length → ids (B, T) (explain takes one prompt at a time)."""
        import torch

        return (torch.tensor([art.prompt_ids(p) for p in items]),)

    def summary(self, metrics: dict[str, Any], split: str) -> str:
        return f"{split} loss {metrics['loss']:.4f}  perplexity {metrics['perplexity']:.3f}"

    def report_sections(self, ctx: Any) -> list[Any]:
        from bigmodel.report.generative import language_model_sections

        return language_model_sections(ctx)

    def serve_item(self, art: Any, i: int, x: Any) -> Any:
        raise InputError("this is a language model: POST /v1/generate with a prompt")

    def export_signature(self, art: Any, data: Any, n: int) -> Any:
        raise UserError(f"{art.folder}: a language model; export takes classifiers (generate with bigmodel serve)")


register_task(LanguageModeling())
