"""Metric functions against values computed by hand."""

import math

import pytest
import torch

from lightning_modules.probes import icl_metrics as M


def test_accuracy_and_token_overlap():
    preds, labels = torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2])
    assert M.accuracy(preds, labels, 3) == pytest.approx(0.75)
    assert M.token_overlap(preds, torch.tensor([0, 0, 1, 1])) == pytest.approx(0.5)
    assert M.predictions(torch.tensor([[-1.0, -2.0], [-3.0, -0.5]])).tolist() == [0, 1]


def test_distribution_similarity_by_hand():
    p = torch.tensor([[0.5, 0.5]], dtype=torch.float64).log()
    q = torch.tensor([[0.25, 0.75]], dtype=torch.float64).log()
    out = M.distribution_similarity(p, q)
    kl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    kl_rev = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    m = [0.375, 0.625]
    js = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + 0.5 * (
        0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1])
    )
    cos = (0.5 * 0.25 + 0.5 * 0.75) / (math.sqrt(0.5) * math.sqrt(0.25**2 + 0.75**2))
    assert out["kl"] == pytest.approx(kl, abs=1e-12)
    assert out["kl_reverse"] == pytest.approx(kl_rev, abs=1e-12)
    assert out["js"] == pytest.approx(js, abs=1e-12)
    assert out["cosine"] == pytest.approx(cos, abs=1e-12)
    # raw (unnormalised) log-likelihoods are renormalised first: adding a constant changes nothing
    assert M.distribution_similarity(p - 3.0, q + 1.0)["kl"] == pytest.approx(kl, abs=1e-12)
    same = M.distribution_similarity(q, q)
    assert same["kl"] == pytest.approx(0, abs=1e-12) and same["js"] == pytest.approx(0, abs=1e-12)


def test_rec2ftp_by_hand():
    zs = torch.tensor([0, 0, 0, 0, 1])
    ft = torch.tensor([1, 1, 1, 0, 1])
    icl = torch.tensor([1, 0, 1, 1, 0])
    # zs wrong & ft right: examples 0,1,2 ; of those icl right: 0,2 -> 2/3
    assert M.rec2ftp(zs, icl, ft) == pytest.approx(2 / 3)
    assert math.isnan(M.rec2ftp(torch.ones(3), icl[:3], ft[:3]))


def test_sim_aou_by_hand():
    zs = torch.zeros(2, 1, 2, dtype=torch.float64)
    icl = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]], dtype=torch.float64)
    ft = torch.tensor([[[1.0, 1.0]], [[2.0, 2.0]]], dtype=torch.float64)
    out = M.sim_aou(zs, icl, ft, generator=torch.Generator().manual_seed(0))
    assert out["per_layer"] == pytest.approx([(1 / math.sqrt(2) + 1.0) / 2])
    assert len(out["random_baseline"]) == 1 and abs(out["random_baseline"][0]) <= 1


def test_sim_am_by_hand():
    icl = [torch.tensor([[[1.0, 0.0]], [[0.5, 0.5]]])]  # 2 layers, 1 head, query of 2 tokens
    ft = [torch.tensor([[[1.0, 1.0]], [[0.5, 0.5]]])]
    zs = [torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]])]
    out = M.sim_am(icl, ft, zs)
    assert out["icl_vs_ft"] == pytest.approx([1 / math.sqrt(2), 1.0])
    assert out["icl_vs_zs"] == pytest.approx([0.0, 1 / math.sqrt(2)])


def test_order_sensitivity_by_hand():
    labels = torch.tensor([0, 1, 1, 0])
    preds = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0], [1, 1, 0, 0]])  # accs 1, .75, .5
    out = M.order_sensitivity(preds, labels, 2)
    assert out["accuracy_spread"] == pytest.approx(0.5)
    assert out["accuracy_mean"] == pytest.approx(0.75)
    assert out["pairwise_disagreement"] == pytest.approx((0.25 + 0.5 + 0.25) / 3)
    invariant = M.order_sensitivity(preds[:1].repeat(3, 1), labels, 2)
    assert invariant["accuracy_spread"] == 0 and invariant["pairwise_disagreement"] == 0
    assert M.max_logprob_spread(torch.tensor([[[-1.0, -2.0]], [[-1.5, -2.0]]])) == pytest.approx(0.5)
