"""The von Oswald construction is exactly GD; softmax and (multi-layer) causal masking break it."""

import pytest
import torch

from lightning_modules.probes import icl_von_oswald as V


def _data(d=3, n=10, batch=64):
    return V.sample_tasks(batch, n, d, torch.Generator().manual_seed(1))


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_construction_equals_gd_steps(steps):
    d, eta = 3, 0.7
    x, y, xq, _ = _data(d)
    model = V.LSA(d, layers=steps)
    w_kq, w_pv = V.gd_construction(d, eta)
    with torch.no_grad():
        for layer in range(steps):
            model.w_kq[layer].copy_(w_kq)
            model.w_pv[layer].copy_(w_pv)
        torch.testing.assert_close(model(x, y, xq), V.gd_predict(x, y, xq, eta, steps), atol=1e-12, rtol=0)


def test_softmax_and_causal_mask_break_the_construction():
    d, eta = 3, 0.7
    x, y, xq, _ = _data(d)
    w_kq, w_pv = V.gd_construction(d, eta)
    gd1, gd2 = V.gd_predict(x, y, xq, eta, 1), V.gd_predict(x, y, xq, eta, 2)
    e = V.tokens(x, y, xq)
    soft = -V.lsa_layer(e, w_kq, w_pv, causal=False, softmax=True)[:, -1, -1]
    assert (soft - gd1).abs().max() > 1e-2
    # one causal layer: the query still sees every context token, so it is still one GD step
    causal1 = -V.lsa_layer(e, w_kq, w_pv, causal=True, softmax=False)[:, -1, -1]
    torch.testing.assert_close(causal1 * 1.0, gd1, atol=1e-12, rtol=0)
    e2 = V.lsa_layer(V.lsa_layer(e, w_kq, w_pv, True, False), w_kq, w_pv, True, False)
    assert (-e2[:, -1, -1] - gd2).abs().max() > 1e-2


def test_trained_linear_attention_matches_one_gd_step_softmax_does_not():
    out = V.run_control(variants=("linear", "softmax"), train_steps=600, batch=256, eval_tasks=512)
    assert out["linear"]["model_cosine"] > 0.995
    assert out["linear"]["prediction_diff"] < 0.01
    assert out["softmax"]["model_cosine"] < out["linear"]["model_cosine"] - 0.05
    assert out["softmax"]["prediction_diff"] > 5 * out["linear"]["prediction_diff"]
