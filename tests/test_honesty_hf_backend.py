"""Local HF backend: prefix-cached scoring equals a plain full forward; chat vs plain rendering."""

import numpy as np
import pytest
import torch

from common.hf_loading import load_causal_lm, load_tokenizer, tiny_llama_config
from datamodules.honesty_prompts import build_messages
from datamodules.honesty_trials import signaling_trials, time_trials
from lightning_modules.probes.honesty.backends import HFBackend


@pytest.fixture(scope="module")
def tiny():
    from common.hf_loading import TINY_LLAMA_CONFIG

    model = load_causal_lm(model_config=dict(TINY_LLAMA_CONFIG), seed=0).eval()
    return HFBackend(model, load_tokenizer("byt5"), "tiny", chat=False)


def _full_logprob(backend, prompt, continuation):
    head = backend._encode(prompt)
    tail = backend.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = backend.model(input_ids=torch.tensor([head + tail])).logits[0]
    logp = torch.log_softmax(logits, -1)
    return float(sum(logp[len(head) - 1 + i, t] for i, t in enumerate(tail)))


def test_option_logprobs_match_full_forward(tiny):
    trial = time_trials(1, seed=0)[0]
    msgs = build_messages(trial, "text")
    got = tiny.option_logprobs(msgs, trial.options)
    prompt = tiny.prompt(msgs)
    assert prompt.endswith("Answer:")
    want = [_full_logprob(tiny, prompt, " " + o) for o in trial.options]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # a second call is served from the prefix cache and gives the same numbers
    np.testing.assert_allclose(tiny.option_logprobs(msgs, trial.options), got, rtol=1e-6)
    reasoning = "It is close to the mark."
    with_r = tiny.option_logprobs(msgs, trial.options, reasoning)
    want_r = [_full_logprob(tiny, tiny.prompt(msgs, reasoning), " " + o) for o in trial.options]
    np.testing.assert_allclose(with_r, want_r, rtol=1e-4, atol=1e-4)
    assert "Reasoning:" + reasoning + "\nAnswer:" in tiny.prompt(msgs, reasoning)


def test_letter_logprobs_match_full_forward(tiny):
    trial = signaling_trials(1, seed=1, n_options=4)[0]
    msgs = build_messages(trial, "letter")
    got = tiny.letter_logprobs(msgs, ["A", "B", "C", "D"])
    ids = torch.tensor([tiny._encode(tiny.prompt(msgs))])
    with torch.no_grad():
        logp = torch.log_softmax(tiny.model(input_ids=ids).logits[0, -1], -1)
    for letter, value in zip("ABCD", got, strict=True):
        toks = {tiny.tokenizer(v, add_special_tokens=False)["input_ids"][0] for v in (letter, " " + letter)}
        assert value == pytest.approx(float(torch.logsumexp(logp[list(toks)], 0)), abs=1e-4)


def test_generation_with_cached_prefix_equals_plain_generate(tiny):
    msgs = build_messages(time_trials(1, seed=2)[0], "text")
    got = tiny.generate(msgs, max_new_tokens=6)
    ids = torch.tensor([tiny._encode(tiny.prompt(msgs))])
    with torch.no_grad():
        plain = tiny.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=tiny.tokenizer.pad_token_id,
        )
    assert got == [tiny.tokenizer.decode(plain[0, ids.shape[1] :], skip_special_tokens=True)]
    a = tiny.generate(msgs, max_new_tokens=5, n=3, temperature=1.0, seed=4)
    assert a == tiny.generate(msgs, max_new_tokens=5, n=3, temperature=1.0, seed=4) and len(a) == 3
    with pytest.raises(ValueError, match="temperature > 0"):
        tiny.generate(msgs, n=2)


def test_chat_template_rendering_for_chat_models(tmp_cache):
    tok = load_tokenizer("smollm2-135m-instruct")
    trial = signaling_trials(1, seed=0, n_options=3)[0]
    model = load_causal_lm(
        model_config=tiny_llama_config(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        ),
        seed=0,
    ).eval()
    chat = HFBackend(model, tok, "chat", chat=True)
    prompt = chat.prompt(build_messages(trial, "letter"))
    assert "<|im_start|>assistant" in prompt and prompt.rstrip().endswith("assistant")
    assert "<|im_start|>system\n" + build_messages(trial, "letter")[0]["content"] in prompt
    assert chat.prompt(build_messages(trial, "letter"), "because").endswith("because\nAnswer:")
    assert np.isfinite(chat.letter_logprobs(build_messages(trial, "letter"), ["A", "B", "C"])).all()
    base = HFBackend(model, tok, "base", chat=False)
    assert "<|im_start|>" not in base.prompt(build_messages(trial, "letter"))
