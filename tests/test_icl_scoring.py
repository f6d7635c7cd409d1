"""Batched, prefix-reusing label-word scoring equals one plain forward per choice."""

import pytest
import torch

from common.hf_loading import load_causal_lm, tiny_llama_config
from lightning_modules.probes.icl_scoring import (
    encode_pair,
    encode_requests,
    score_requests,
    score_requests_unbatched,
)


class ByteTokenizer:
    """Bytes + 3, with an optional BOS (id 1): enough to exercise the lm-eval split rules."""

    def __init__(self, bos: bool = False):
        self.bos = bos

    def encode(self, text, add_special_tokens=True):
        return ([1] if self.bos and add_special_tokens else []) + [b + 3 for b in text.encode()]


def tiny_llama(dtype=torch.float64):
    config = tiny_llama_config(vocab_size=260, hidden_size=32, intermediate_size=64, max_position_embeddings=512)
    return load_causal_lm(model_config=config, seed=0).to(dtype).eval()


def test_encode_pair_moves_trailing_space_into_continuation():
    tok = ByteTokenizer(bos=True)
    ctx, cont = encode_pair(tok, "Sentiment: ", "positive")
    assert ctx == tok.encode("Sentiment:") and cont == tok.encode(" positive", add_special_tokens=False)
    with pytest.raises(ValueError, match="non-empty"):
        encode_pair(tok, "", "x")


@pytest.mark.parametrize("choices", [[" a", " b", " c"], [" no", " yes"], [" x", " xy"]])
def test_batched_prefix_reuse_matches_unbatched(choices):
    model = tiny_llama()
    tok = ByteTokenizer(bos=True)
    demos = "Input: good movie\nLabel: a\n\nInput: bad film\nLabel: b\n\n"
    contexts = [demos + f"Input: {q}\nLabel:" for q in ["fine", "a much longer query text", "meh", "ok!"]]
    reqs = encode_requests(tok, contexts, choices)
    ref = score_requests_unbatched(model, reqs)
    for batch_size in (1, 3, 16):
        for reuse in (False, True):
            res = score_requests(model, reqs, batch_size=batch_size, reuse_prefix=reuse, full_vocab=True)
            torch.testing.assert_close(res.loglik, ref, atol=1e-10, rtol=0)
            assert res.next_token_logprobs.shape == (4, 260)
    # the full-vocabulary distribution agrees with single-token choice scores
    first = torch.tensor([r.continuations[0][0] for r in reqs])
    if all(len(r.continuations[0]) == 1 for r in reqs):
        torch.testing.assert_close(
            res.next_token_logprobs[torch.arange(4), first].double(), ref[:, 0], atol=1e-6, rtol=0
        )


def test_float32_prefix_reuse_within_lm_eval_tolerance():
    model = tiny_llama(torch.float32)
    tok = ByteTokenizer()
    demos = "".join(f"Q{i}: text {i}\nA: {'yes' if i % 2 else 'no'}\n\n" for i in range(8))
    reqs = encode_requests(tok, [demos + f"Q: item {j}\nA:" for j in range(10)], [" no", " yes"])
    res = score_requests(model, reqs, batch_size=4, reuse_prefix=True)
    assert (res.loglik - score_requests_unbatched(model, reqs)).abs().max() < 1e-4
