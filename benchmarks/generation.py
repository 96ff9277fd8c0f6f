"""Generative models: decoding speed against Hugging Face `generate`, the Shakespeare char model's validation loss
against wall time, translation BLEU against training time — all in one job, on this machine.

    python benchmarks/generation.py [--quick] [--skip-train] [--large] [--translation-run RUN] [--json]

1. Decoding (random weights, nothing downloaded): our GPT with its KV cache, without a cache (full recompute each
   step), and Hugging Face `GPT2LMHeadModel.generate` (greedy, KV cache) on the same configuration with the same
   weights copied in — the Shakespeare model's shape (4 x 128) and GPT-2 small's (12 x 768, 50,257 tokens), batch 1
   and 8; tokens/s = new tokens x batch / seconds (median of repeats). `kv_vs_hf_generate_ratio` (batch 1, the
   Shakespeare shape) and `kv_vs_hf_generate_gpt2_small_ratio`.
2. `recipes/shakespeare_char_gpt.yaml` trained here: validation loss and training time (evaluation included), and
   nanoGPT's own CPU settings (lr 1e-3, 2,000 steps, no clipping) through the same code as the baseline.
   `shakespeare_val_loss_at_60s` is the recipe's validation loss when its training took ≤ 60 s (else null).
   With `--large`, `recipes/shakespeare_char_gpt_large.yaml` (10 minutes) gives `shakespeare_val_loss_at_600s`.
3. With `--translation-run RUN` (a trained `bible_en_es_transformer` run): test BLEU / chrF with beam search and
   greedy, and the run's training time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit_json, environment, print_env, print_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------- decoding
def decode_speed(
    shape: dict[str, int], batch: int, new_tokens: int, repeats: int, device: str = "cpu"
) -> dict[str, float]:
    import torch
    import transformers

    from bigmodel.models.gpt import GPT, GPTConfig, copy_gpt_to_hf, generate

    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=shape["vocab"],
        max_len=shape["ctx"],
        dim=shape["dim"],
        num_heads=shape["heads"],
        num_layers=shape["layers"],
    )
    ours = GPT(cfg).eval()
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.max_len,
            n_embd=cfg.dim,
            n_layer=cfg.num_layers,
            n_head=cfg.num_heads,
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    ).eval()
    copy_gpt_to_hf(ours, hf)
    ours, hf = ours.to(device), hf.to(device)
    prompt = torch.randint(0, cfg.vocab_size, (batch, 16)).to(device)
    mask = torch.ones_like(prompt)

    def timed(fn: Any) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            if prompt.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn()
            if prompt.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            assert out.shape[1] == 16 + new_tokens, out.shape
        return batch * new_tokens / statistics.median(times)

    with torch.inference_mode():
        kv = timed(lambda: generate(ours, prompt, new_tokens, temperature=0))
        nokv = timed(lambda: generate(ours, prompt, new_tokens, temperature=0, use_cache=False))
        ref = timed(
            lambda: hf.generate(
                prompt,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                use_cache=True,
            )
        )
        same = torch.equal(
            generate(ours, prompt, 16, temperature=0),
            hf.generate(
                prompt, attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0
            ),
        )
    return {"kv_tok_s": kv, "nokv_tok_s": nokv, "hf_tok_s": ref, "same_tokens": same}


# ------------------------------------------------------------------------------------------------- training
def train_recipe(path: Path, overrides: list[str]) -> dict[str, Any]:
    from bigmodel.api import train
    from bigmodel.config import load_recipe

    with tempfile.TemporaryDirectory() as tmp:
        res = train(load_recipe(path, overrides), out=Path(tmp) / "run", progress=False)
        records = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r.get("split") == "val"]
    return {
        "val_loss": val[-1]["loss"] if val else None,
        "val_time_s": val[-1]["time"] if val else None,
        "test_loss": res.metrics["loss"],
        "train_time_s": res.train_time_s,
        "steps": res.steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="Few tokens and steps: checks that everything runs.")
    ap.add_argument("--skip-train", action="store_true", help="Decoding speed only.")
    ap.add_argument("--no-baseline", action="store_true", help="Skip nanoGPT's settings (saves ~65 s).")
    ap.add_argument("--large", action="store_true", help="Also the 10-minute Shakespeare recipe.")
    ap.add_argument("--translation-run", type=Path, help="A trained translation run to score (beam vs greedy).")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    env = environment()
    print_env(env)
    out: dict[str, Any] = {"environment": env}

    shapes = {
        "shakespeare 4x128": {"vocab": 86, "ctx": 256, "dim": 128, "heads": 4, "layers": 4},
        "gpt2-small 12x768": {"vocab": 50257, "ctx": 1024, "dim": 768, "heads": 12, "layers": 12},
    }
    rows = []
    for name, shape in shapes.items():
        for batch in (1, 8):
            n = 16 if args.quick else (128 if shape["dim"] <= 256 else 48)
            r = decode_speed(shape, batch, n, 1 if args.quick else 3)
            rows.append(
                [
                    name,
                    batch,
                    n,
                    r["kv_tok_s"],
                    r["nokv_tok_s"],
                    r["hf_tok_s"],
                    r["kv_tok_s"] / r["hf_tok_s"],
                    r["same_tokens"],
                ]
            )
            out[f"decode_{name.split()[0].replace('-', '_')}_b{batch}"] = r
    print("\ngreedy decoding, tokens/s (prompt 16 tokens)")
    print_table(
        ["model", "batch", "new tokens", "ours (KV cache)", "ours (no cache)", "HF generate", "ours/HF", "same tokens"],
        rows,
    )
    out["kv_vs_hf_generate_ratio"] = out["decode_shakespeare_b1"]["kv_tok_s"] / out["decode_shakespeare_b1"]["hf_tok_s"]
    out["kv_vs_hf_generate_gpt2_small_ratio"] = (
        out["decode_gpt2_small_b1"]["kv_tok_s"] / out["decode_gpt2_small_b1"]["hf_tok_s"]
    )
    out["kv_vs_nocache_ratio"] = out["decode_shakespeare_b1"]["kv_tok_s"] / out["decode_shakespeare_b1"]["nokv_tok_s"]

    if not args.skip_train:
        quick = ["data.batches_per_epoch=20", "train.epochs=1"] if args.quick else []
        runs = {"recipe (shakespeare_char_gpt)": train_recipe(ROOT / "recipes" / "shakespeare_char_gpt.yaml", quick)}
        if not args.no_baseline:
            nano = [
                "train.optimizer.lr=1e-3",
                "train.grad_clip=null",
                "data.batches_per_epoch=500",
                "train.schedule.min_lr_ratio=0.1",
            ]
            runs["nanoGPT CPU settings (lr 1e-3, 2000 steps)"] = train_recipe(
                ROOT / "recipes" / "shakespeare_char_gpt.yaml", nano + quick
            )
        if args.large:
            large = ["train.max_steps=20"] if args.quick else []
            runs["large (shakespeare_char_gpt_large)"] = train_recipe(
                ROOT / "recipes" / "shakespeare_char_gpt_large.yaml", large
            )
        print("\nShakespeare characters: validation loss against training time (2 CPU cores; evaluation included)")
        print_table(
            ["run", "steps", "train time s", "val loss", "test loss"],
            [[k, v["steps"], v["train_time_s"], v["val_loss"], v["test_loss"]] for k, v in runs.items()],
        )
        rec = runs["recipe (shakespeare_char_gpt)"]
        out["shakespeare_runs"] = runs
        out["shakespeare_val_loss_at_60s"] = rec["val_loss"] if rec["train_time_s"] <= 60 else None
        if args.large:
            big = runs["large (shakespeare_char_gpt_large)"]
            out["shakespeare_val_loss_at_600s"] = big["val_loss"] if big["train_time_s"] <= 600 else None

    if args.translation_run is not None:
        from bigmodel.api import evaluate

        summary = json.loads((args.translation_run / "summary.json").read_text())
        limit = 200 if args.quick else None
        beam = evaluate(args.translation_run, "test", limit=limit)
        greedy = evaluate(args.translation_run, "test", beam_size=1, limit=limit)
        print(f"\ntranslation ({args.translation_run}): trained {summary['train_time_s']:.0f} s")
        print_table(
            ["decoding", "BLEU", "chrF", "sentences"],
            [
                [f"beam {beam['beam_size']}", beam["bleu"], beam["chrf"], beam["num_sentences"]],
                ["greedy", greedy["bleu"], greedy["chrf"], greedy["num_sentences"]],
            ],
        )
        out["translation"] = {"train_time_s": summary["train_time_s"], "beam": beam, "greedy": greedy}
        out["translation_bleu"] = beam["bleu"]
        out["beam_vs_greedy_bleu_ratio"] = beam["bleu"] / max(greedy["bleu"], 1e-9)

    if args.json:
        emit_json(out)


if __name__ == "__main__":
    main()
