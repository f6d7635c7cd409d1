"""The shipped SmolLM2-135M-Instruct loads offline and knows English."""

from __future__ import annotations

import math

import torch

from common.hf_loading import load_causal_lm, load_tokenizer

ENGLISH = (
    "The sun rose over the quiet village, and the people began their day. Children walked to school while "
    "their parents went to work in the fields and shops."
)


def test_smollm2_is_a_sensible_language_model() -> None:
    model = load_causal_lm("smollm2-135m-instruct")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    ids = tokenizer(ENGLISH, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    ppl = math.exp(loss)
    random_ppl = model.config.vocab_size  # a uniform model's perplexity
    assert ppl < 100, ppl
    assert ppl < random_ppl / 100
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_token = model(input_ids=prompt).logits[0, -1].argmax().item()
    assert tokenizer.decode([next_token]).strip() == "Paris"
