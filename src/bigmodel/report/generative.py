"""The language-model and translation sections of the report: perplexity / BLEU / chrF from the final evaluation,
greedy continuations of test-text prompts, and translations beside their references."""

from __future__ import annotations

from typing import Any

from bigmodel.report.html import Section, esc, fmt, note, table

PROMPTS = 3
PROMPT_TOKENS = 24
NEW_TOKENS = 60


def language_model_sections(ctx: Any) -> list[Section]:
    m = ctx.final_metrics()
    if m:
        rows = [[k, m[k]] for k in ("loss", "perplexity", "bits_per_token", "num_tokens") if k in m]
        head = table(["metric", "value"], rows, cls="lm")
    else:
        head = note("No final evaluation: no perplexity.")
    out = [Section(ctx.id("perplexity"), "Perplexity", head)]
    loaded = ctx.loaded()
    if loaded is None:
        why = "the report was made with --no-inference" if not ctx.inference else "the run has no saved model"
        out.append(Section(ctx.id("samples"), "Sample generations", note(f"No samples: {why}.")))
        return out
    art, data = loaded
    stream = data.split(ctx.eval_split)
    tok = art.preprocess.tokenizer
    ids = stream.ids
    step = max(PROMPT_TOKENS, len(ids) // PROMPTS)
    samples = []
    for k in range(PROMPTS):
        start = k * step
        piece = ids[start : start + PROMPT_TOKENS].tolist()
        if len(piece) < 4:
            break
        prompt = tok.decode(piece)
        text = art.generate_text(prompt, NEW_TOKENS, temperature=0.0, seed=0)
        reference = tok.decode(ids[start + PROMPT_TOKENS : start + PROMPT_TOKENS + NEW_TOKENS].tolist())
        samples.append({"prompt": prompt, "generated": text, "reference": reference})
    ctx.data["samples"] = samples
    rows = [
        f"<tr><td><pre>{esc(s['prompt'])}</pre></td><td><pre>{esc(s['generated'])}</pre></td>"
        f"<td><pre>{esc(s['reference'])}</pre></td></tr>"
        for s in samples
    ]
    body = (
        "<table><thead><tr><th>prompt (from the split)</th><th>greedy continuation</th><th>what the text says"
        f"</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        + note(f"Greedy decoding (temperature 0), {NEW_TOKENS} new tokens, prompts of {PROMPT_TOKENS} tokens.")
        + ctx.downloads.json(f"{ctx.prefix}samples.json", samples)
    )
    out.append(Section(ctx.id("samples"), "Sample generations", body))
    return out


def translation_sections(ctx: Any) -> list[Section]:
    m = ctx.final_metrics()
    rows = [[k, m[k]] for k in ("loss", "perplexity", "bleu", "chrf", "num_sentences", "beam_size") if k in m]
    head = table(["metric", "value"], rows, cls="translation") if rows else note("No final evaluation.")
    out = [Section(ctx.id("bleu"), "BLEU and chrF", head)]
    examples = m.get("examples") or []
    if not examples:
        out.append(Section(ctx.id("translations"), "Translations", note("No decoded translations in the summary.")))
        return out
    ctx.data["translations"] = examples
    trs = "".join(
        f"<tr><td>{esc(e['source'])}</td><td>{esc(e['translation'])}</td><td>{esc(e['reference'])}</td></tr>"
        for e in examples
    )
    body = (
        f"<table><thead><tr><th>source</th><th>translation</th><th>reference</th></tr></thead><tbody>{trs}</tbody>"
        "</table>" + note(f"The first translations of the final evaluation (beam {fmt(m.get('beam_size', ''))}).")
    )
    out.append(Section(ctx.id("translations"), "Translations", body))
    return out
