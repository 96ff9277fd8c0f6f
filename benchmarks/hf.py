"""Pretrained Hugging Face models through bigmodel, against plain transformers code on the same weights, in one job.

    python benchmarks/hf.py [--quick] [--json]

Needs the `hf` extra and the bundled weights (scripts/setup.sh installs both); nothing is downloaded.

1. Decoding: SmolLM2-135M-Instruct (bundled GGUF, de-quantised to fp32) greedy, batch 1, a 17-token prompt, the
   same number of new tokens forced on both sides: `bigmodel generate`'s streaming loop (one token at a time,
   DynamicCache) against `model.generate` of transformers. tokens/s = new tokens / seconds (median of repeats);
   `stream_vs_hf_generate_ratio`; `same_tokens` says both chose the same tokens.
2. Fine-tuning: all-MiniLM-L6-v2 (bundled) on the tweets, batch 32, max_length 64: `recipes/tweets_minilm.yaml`
   through the Trainer (bf16 autocast where the CPU has it, layer-wise LR decay, cosine warm-up) against a
   hand-written transformers loop (AutoModelForSequenceClassification, AdamW, fp32, padding to the longest in the
   batch). samples/s over the steps after the first 10 (warm-up and evaluation left out);
   `train_vs_plain_loop_ratio`.
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


def decode_speed(new_tokens: int, repeats: int) -> dict[str, Any]:
    import torch

    from bigmodel.models.gpt import stream
    from bigmodel.runs import load_artifact

    art = load_artifact(ROOT / "recipes" / "smollm2_generate.yaml")
    model = art.model.eval()
    ids = torch.tensor([model.prompt_ids("Write a short poem about the sea.")])

    def ours() -> list[int]:
        return list(stream(model, ids, new_tokens, temperature=0, stop_ids=None))

    def ref() -> list[int]:
        out = model.hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=model.tokenizer.eos_token_id,
        )
        return out[0, ids.shape[1] :].tolist()

    def timed(fn: Any) -> tuple[float, list[int]]:
        toks = fn()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            toks = fn()
            times.append(time.perf_counter() - t0)
            assert len(toks) == new_tokens, len(toks)
        return new_tokens / statistics.median(times), toks

    with torch.inference_mode():
        ours_tok_s, a = timed(ours)
        hf_tok_s, b = timed(ref)
    return {
        "prompt_tokens": ids.shape[1],
        "new_tokens": new_tokens,
        "ours_tok_s": ours_tok_s,
        "hf_tok_s": hf_tok_s,
        "same_tokens": [int(t) for t in a] == b,
    }


def throughput(records: list[dict[str, Any]], batch: int) -> float:
    """samples/s between the first and the last training log (steps after the first log)."""
    train = [r for r in records if r.get("split") == "train"]
    first, last = train[0], train[-1]
    return (last["step"] - first["step"]) * batch / (last["time"] - first["time"])


def train_ours(steps: int, overrides: list[str] | None = None) -> dict[str, Any]:
    from bigmodel.api import train
    from bigmodel.config import load_recipe

    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(
            ROOT / "recipes" / "tweets_minilm.yaml",
            [f"train.max_steps={steps}", "train.log_every=10", "train.baseline=false", *(overrides or [])],
        )
        res = train(recipe, out=Path(tmp) / "run", progress=False)
        records = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"samples_s": throughput(records, recipe.train.batch_size), "steps": res.steps}


def train_plain(steps: int) -> dict[str, Any]:
    """The loop a transformers user writes by hand: same weights, batch, max_length, optimizer and lr."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from bigmodel.config import load_recipe
    from bigmodel.data.text import load_text
    from bigmodel.models.hf import HFConfig, resolve_source

    recipe = load_recipe(ROOT / "recipes" / "tweets_minilm.yaml")
    data = load_text(recipe.data, recipe.seed)  # the recipe's training split
    texts, y, labels = data.train.texts, data.train.y.tolist(), data.labels
    src, _gguf = resolve_source(HFConfig(pretrained="minilm-l6"))
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=len(labels))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    bs = recipe.train.batch_size
    order = torch.randperm(len(texts)).tolist()
    model.train()
    stamps = []
    t0 = time.perf_counter()
    for step in range(steps):
        idx = order[step * bs : (step + 1) * bs]
        batch = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=64, return_tensors="pt")
        out = model(**batch, labels=torch.tensor([y[i] for i in idx]))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 10 == 0:
            stamps.append({"split": "train", "step": step + 1, "time": time.perf_counter() - t0})
    return {"samples_s": throughput(stamps, bs), "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="Few tokens and steps: checks that everything runs.")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    env = environment()
    print_env(env)
    out: dict[str, Any] = {"environment": env}

    d = decode_speed(16 if args.quick else 64, 1 if args.quick else 3)
    out["decode_smollm2"] = d
    out["stream_vs_hf_generate_ratio"] = d["ours_tok_s"] / d["hf_tok_s"]
    print(f"\nSmolLM2-135M greedy decoding, batch 1, prompt {d['prompt_tokens']} tokens, {d['new_tokens']} new")
    print_table(
        ["ours tok/s", "HF generate tok/s", "ours/HF", "same tokens"],
        [[d["ours_tok_s"], d["hf_tok_s"], out["stream_vs_hf_generate_ratio"], d["same_tokens"]]],
    )

    steps = 21 if args.quick else 61
    ours, plain = train_ours(steps), train_plain(steps)
    out["train_minilm"] = {"ours": ours, "plain_loop": plain}
    out["train_vs_plain_loop_ratio"] = ours["samples_s"] / plain["samples_s"]
    print(f"\nall-MiniLM-L6-v2 fine-tuning on the tweets, batch 32, max_length 64, {steps} steps")
    print_table(
        ["run", "samples/s", "ratio"],
        [
            ["bigmodel Trainer (recipes/tweets_minilm.yaml)", ours["samples_s"], out["train_vs_plain_loop_ratio"]],
            ["hand-written transformers loop (fp32)", plain["samples_s"], 1.0],
        ],
    )
    if args.json:
        emit_json(out)


if __name__ == "__main__":
    main()
