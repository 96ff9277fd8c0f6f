"""The seed documents' two Hugging Face snippets, corrected (tested in tests/test_hf.py on tiny local models).

1. GPT-2 generation: the seed loads `GPT2Model`, which has no language-model head (its output has no `logits`);
   `GPT2LMHeadModel` does. Greedy decoding appends the argmax of the LAST position's logits, one token at a time.
2. BERT classification: the seed reads `outputs.loss`, which is None unless `labels` are passed.

Offline: the named weights must be in the local Hugging Face cache (or pass a local directory); bigmodel's own
recipes use the bundled `minilm-l6` / `smollm2-135m` instead (docs/pretrained.md).
"""

from __future__ import annotations

import torch
from transformers import AutoTokenizer, BertForSequenceClassification, GPT2LMHeadModel


def gpt2_greedy(name: str = "gpt2", prompt: str = "Hello, my name is John.", max_new_tokens: int = 20) -> str:
    tokenizer = AutoTokenizer.from_pretrained(name)
    model = GPT2LMHeadModel.from_pretrained(name)  # not GPT2Model: that one has no LM head, hence no logits
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(ids).logits  # (1, T, vocab)
            next_id = logits[:, -1].argmax(dim=-1, keepdim=True)  # greedy: the last position only
            ids = torch.cat([ids, next_id], dim=1)
            if next_id.item() == tokenizer.eos_token_id:
                break
    return tokenizer.decode(ids[0], skip_special_tokens=True)


def bert_classify(
    name: str = "bert-base-uncased", text: str = "Hello, my dog is cute", label: int = 1
) -> tuple[float, list[float]]:
    tokenizer = AutoTokenizer.from_pretrained(name)
    model = BertForSequenceClassification.from_pretrained(name, num_labels=2)  # the head is new: fine-tune it
    inputs = tokenizer(text, return_tensors="pt")
    outputs = model(**inputs, labels=torch.tensor([label]))  # without labels, outputs.loss is None
    outputs.loss.backward()  # a training step would follow: optimizer.step()
    return outputs.loss.detach().item(), outputs.logits.detach().softmax(dim=-1)[0].tolist()
