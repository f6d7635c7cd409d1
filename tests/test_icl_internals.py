"""Attention captures for SimAOU/SimAM: shapes, real attention weights, attention implementation restored."""

import torch

from lightning_modules.probes.icl_internals import attention_modules, capture
from tests.test_icl_scoring import tiny_llama


def test_capture_shapes_and_restores_attention_implementation():
    torch.set_num_threads(1)
    model = tiny_llama(torch.float32)
    model.set_attn_implementation("sdpa")
    ids = list(range(5, 25))
    outs, maps = capture(model, ids, query_len=6)
    assert outs.shape == (2, 32) and maps.shape == (2, 4, 6)
    assert model.config._attn_implementation == "sdpa"
    assert len(attention_modules(model)) == 2
    # weights over the whole prompt sum to 1, so the query's share is in (0, 1]
    _, full = capture(model, ids, query_len=len(ids))
    torch.testing.assert_close(full.sum(-1), torch.ones(2, 4, dtype=torch.float64), atol=1e-5, rtol=0)
    assert (maps.sum(-1) <= 1 + 1e-6).all() and (maps > 0).all()
