"""Language models: which prompt tokens drove the tokens the model generates next.

The model continues the prompt greedily (`new_tokens` tokens, default 8); for each generated token, the log
probability the model gave it is attributed to every token before it (prompt and earlier generated tokens):
integrated gradients or |gradient| at `input_embedding()`'s output (summed / normed over the embedding), or
occlusion (each earlier token replaced by the first token id of the vocabulary in turn). The result is a
(generated x context) matrix; the prompt part of each row is what the prompt contributed.
"""

from __future__ import annotations

from typing import Any

import torch

from bigmodel.errors import UserError
from bigmodel.explain.core import IG_STEPS, Explainer, explainable_copy, require_captum


class LanguageModelExplainer(Explainer):
    kind = "lm"
    methods = ("integrated_gradients", "saliency", "occlusion")
    default = "integrated_gradients"

    def __init__(self, art: Any) -> None:
        self.art = art
        self.model = explainable_copy(art.model)
        self.captum = require_captum()
        self.embedding = self.model.input_embedding()
        self.max_len = int(
            getattr(getattr(self.model, "cfg", None), "max_len", 0) or art.preprocess.input_shape.get("context_length")
        )

    def next_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, V) log probabilities of the token after `ids` (B, T)."""
        return self.model(ids[:, -self.max_len :]).float()[:, -1].log_softmax(dim=-1)

    def explain_prompt(self, prompt_ids: list[int], method: str, new_tokens: int = 8, **options: Any) -> dict[str, Any]:
        """Generate greedily, then attribute each generated token's log probability to the tokens before it."""
        self.check_method(method)
        if not prompt_ids:
            raise UserError("explain: the prompt has no tokens")
        A = self.captum
        ids = torch.tensor([prompt_ids])
        generated: list[int] = []
        with torch.no_grad():
            for _ in range(new_tokens):
                nxt = int(self.next_logits(ids).argmax(dim=-1))
                generated.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        P = len(prompt_ids)
        full = ids[0]
        rows: list[list[float]] = []
        logprobs: list[float] = []
        for j, tok in enumerate(generated):
            ctx = full[: P + j].unsqueeze(0)  # everything before generated token j
            target = torch.tensor([tok])
            if method == "integrated_gradients":
                lig = A.LayerIntegratedGradients(self.next_logits, self.embedding)
                steps = int(options.get("n_steps", IG_STEPS))
                attr = lig.attribute(ctx, baselines=torch.zeros_like(ctx), target=target, n_steps=steps)
                scores = attr.sum(dim=-1)[0]
            elif method == "saliency":
                grad = A.LayerGradientXActivation(self.next_logits, self.embedding, multiply_by_inputs=False)
                scores = grad.attribute(ctx, target=target).norm(dim=-1)[0]
            else:
                fa = A.FeatureAblation(self.next_logits)
                mask = torch.arange(ctx.shape[1]).view(1, -1)
                scores = fa.attribute(ctx, baselines=0, target=target, feature_mask=mask, perturbations_per_eval=64)[0]
            with torch.no_grad():
                logprobs.append(float(self.next_logits(ctx)[0, tok]))
            rows.append([float(v) for v in scores.detach()])
        tok = self.art.preprocess.tokenizer
        names = [tok.id_to_token(int(i)) or "?" for i in full.tolist()]
        return {
            "prompt_tokens": names[:P],
            "generated_tokens": names[P:],
            "generated_text": tok.decode(generated, skip_special_tokens=True),
            "generated_logprob": logprobs,
            # rows[j][i]: what context token i contributed to generated token j (i < P + j)
            "attributions": rows,
            "prompt_share": [float(sum(abs(v) for v in r[:P]) / max(1e-12, sum(abs(v) for v in r))) for r in rows],
        }
