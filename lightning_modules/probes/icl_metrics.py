"""Metrics comparing in-context learning with gradient descent (pure torch + torchmetrics, no Lightning).

Inputs are per-example tensors so every figure can be recomputed from the stored records:
label-word log-likelihoods ``[n, K]``, full-vocabulary next-token log-probabilities ``[n, V]``,
predictions ``[n]``, attention outputs and attention maps captured by ``icl_internals``.

Conventions: distributions are compared after normalising over their support (label words or the
full vocabulary); KL is ``KL(a || b)`` in nats; JS uses natural logs (bounded by ln 2); ratios whose
denominator is empty are ``nan`` (the report turns them into null), never a made-up 0.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchmetrics.functional import kl_divergence
from torchmetrics.functional.classification import multiclass_accuracy


def accuracy(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Share of correct predictions (micro accuracy)."""
    return float(multiclass_accuracy(preds, labels, num_classes=num_classes, average="micro"))


def predictions(loglik: torch.Tensor) -> torch.Tensor:
    """Top-1 label word per example (ties go to the lower class index)."""
    return loglik.argmax(-1)


def token_overlap(preds_a: torch.Tensor, preds_b: torch.Tensor) -> float:
    """Share of examples whose top-1 label word agrees between two methods (Shen et al.'s metric 2)."""
    return float((preds_a == preds_b).double().mean())


def normalise(logp: torch.Tensor) -> torch.Tensor:
    """Renormalise log-scores over the last axis (label-word log-likelihoods -> a distribution)."""
    return logp.double().log_softmax(-1)


def distribution_similarity(logp_a: torch.Tensor, logp_b: torch.Tensor) -> dict[str, float]:
    """Mean over examples of cosine (of probabilities), KL(a||b), KL(b||a) and JS divergence.

    Args:
        logp_a: ``[n, K]`` log-scores; renormalised over K first, so raw label-word log-likelihoods work.
        logp_b: Same shape.
    """
    la, lb = normalise(logp_a), normalise(logp_b)
    pa, pb = la.exp(), lb.exp()
    log_m = torch.logaddexp(la, lb) - math.log(2.0)
    js = 0.5 * (pa * (la - log_m)).sum(-1) + 0.5 * (pb * (lb - log_m)).sum(-1)
    return {
        "cosine": float(F.cosine_similarity(pa, pb, dim=-1).mean()),
        "kl": float(kl_divergence(la, lb, log_prob=True, reduction="mean")),
        "kl_reverse": float(kl_divergence(lb, la, log_prob=True, reduction="mean")),
        "js": float(js.clamp_min(0).mean()),
    }


def rec2ftp(zs_correct: torch.Tensor, icl_correct: torch.Tensor, ft_correct: torch.Tensor) -> float:
    """Dai et al.'s recall to fine-tuning predictions.

    ``#(zero-shot wrong, ICL right, FT right) / #(zero-shot wrong, FT right)``: of the examples that
    fine-tuning fixes, the share ICL fixes too. ``nan`` when fine-tuning fixes none.
    """
    zs_wrong = ~zs_correct.bool()
    denom = (zs_wrong & ft_correct.bool()).sum()
    if denom == 0:
        return math.nan
    return float((zs_wrong & ft_correct.bool() & icl_correct.bool()).sum() / denom)


def _rowwise_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-12)


def sim_aou(
    zs: torch.Tensor, icl: torch.Tensor, ft: torch.Tensor, generator: torch.Generator | None = None
) -> dict[str, list[float]]:
    """Dai et al.'s SimAOU: per-layer cosine of the ICL and FT updates to the attention output.

    Args:
        zs, icl, ft: ``[n, layers, hidden]`` attention outputs at the query's last token under
            zero-shot, ICL and the fine-tuned model (zero-shot prompt).
        generator: Seeds the random-update baseline.

    Returns:
        ``per_layer``: mean over examples of cos(ICL - ZS, FT - ZS) per layer; ``random_baseline``:
        the same with FT - ZS replaced by a random Gaussian update (what "no relation" scores).
    """
    d_icl, d_ft = icl - zs, ft - zs
    rand = torch.randn(d_ft.shape, generator=generator, dtype=torch.float64)
    return {
        "per_layer": _rowwise_cosine(d_icl, d_ft).mean(0).tolist(),
        "random_baseline": _rowwise_cosine(d_icl, rand).mean(0).tolist(),
    }


def sim_am(
    icl_maps: Sequence[torch.Tensor], ft_maps: Sequence[torch.Tensor], zs_maps: Sequence[torch.Tensor]
) -> dict[str, list[float]]:
    """Dai et al.'s SimAM: per-layer cosine between attention maps over the query tokens.

    Args:
        icl_maps, ft_maps, zs_maps: One ``[layers, heads, query_len]`` tensor per example: the last
            token's attention weights over the query's tokens (for ICL, the query part of the prompt).

    Returns:
        ``icl_vs_ft`` and the baseline ``icl_vs_zs`` per layer (mean over examples and heads).
    """

    def per_layer(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> list[float]:
        return (
            torch.stack([_rowwise_cosine(x, y).mean(-1) for x, y in zip(a, b, strict=True)]).mean(0).tolist()
        )

    return {"icl_vs_ft": per_layer(icl_maps, ft_maps), "icl_vs_zs": per_layer(icl_maps, zs_maps)}


def order_sensitivity(
    preds_per_order: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> dict[str, float]:
    """Spread of accuracy and pairwise prediction disagreement across demonstration orders.

    Args:
        preds_per_order: ``[orders, n]`` predictions, one row per order of the same demonstrations.
        labels: ``[n]`` gold classes.

    Returns:
        ``accuracy_min/max/std``, ``accuracy_spread`` (max - min) and ``pairwise_disagreement`` (mean
        over order pairs of the share of examples predicted differently; 0 for an order-invariant method).
    """
    accs = torch.tensor([accuracy(p, labels, num_classes) for p in preds_per_order], dtype=torch.float64)
    pairs = list(itertools.combinations(range(preds_per_order.shape[0]), 2))
    disagree = [1.0 - token_overlap(preds_per_order[i], preds_per_order[j]) for i, j in pairs]
    return {
        "accuracy_mean": float(accs.mean()),
        "accuracy_min": float(accs.min()),
        "accuracy_max": float(accs.max()),
        "accuracy_std": float(accs.std(unbiased=False)),
        "accuracy_spread": float(accs.max() - accs.min()),
        "pairwise_disagreement": float(sum(disagree) / len(disagree)) if disagree else math.nan,
    }


def max_logprob_spread(logliks_per_order: torch.Tensor) -> float:
    """Largest difference of any score across orders (0 for an exactly order-invariant method)."""
    return float((logliks_per_order.max(0).values - logliks_per_order.min(0).values).abs().max())
