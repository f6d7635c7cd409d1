"""Budget-exact decoding of a router's per-layer width distribution.

The router is trained so that its *expected* cost meets the budget, but the argmax sub-network it
deploys can land well off budget (each layer's argmax is taken independently). This module picks one
width per layer and unit (MLP, attention) that maximises the total router log-probability subject to
``cost <= budget * full``: a multiple-choice knapsack, solved by dynamic programming over the cost
axis cut into ``resolution`` buckets. Every bucket keeps its best partial solution together with that
solution's *exact* cost (plus its most and least expensive ones), so the budget is never exceeded by rounding;
only optimality is approximate (partial solutions within one bucket width of cost compete), and it
is exact once no two distinct partial costs share a bucket.

Maximum probability alone may undershoot a budget by a lot (if the router prefers narrow widths). So
among feasible solutions only those within ``slack`` of the largest reachable cost below the budget
compete: ``slack=0`` fills the budget as far as the widths allow, ``slack=1`` is pure maximum
probability under the budget. No Lightning, no model: log-probabilities and a cost table in, indices out.

This file imports only numpy and torch: dynamic exports copy it next to their weights so the exported
model decodes widths exactly as training-side validation and ``route_and_run`` do. ``constrained.py``
wraps it with the project's user-facing error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# relative rounding tolerance on the budget: cost tables are stored in float32 (checkpoints), so the
# full cost and a sum over the table's entries may differ in the 7th digit
RTOL = 1e-6


class LimitUnreachableError(ValueError):
    """The cost limit is below the cost of the narrowest width everywhere."""


@dataclass
class Decoded:
    """Result of :func:`constrained_choices`.

    Attributes:
        mlp: chosen MLP width index per layer.
        attn: chosen attention width index per layer.
        cost: exact cost of the choice (same unit as the table).
        log_prob: total router log-probability of the choice.
        clamped: True when the budget was unreachable and the narrowest widths were returned instead.
    """

    mlp: list[int]
    attn: list[int]
    cost: float
    log_prob: float
    clamped: bool = False


def min_cost(fixed: float, mlp_cost: Tensor, attn_cost: Tensor) -> float:
    """Cost of the narrowest width in every layer (the smallest reachable cost)."""
    return float(fixed + mlp_cost.min(-1).values.sum() + attn_cost.min(-1).values.sum())


def constrained_choices(mlp_logp: Tensor, attn_logp: Tensor, fixed: float, mlp_cost: Tensor, attn_cost: Tensor,
                        limit: float, slack: float = 0.03, resolution: int = 4096, clamp: bool = False) -> Decoded:
    """Highest-probability width per layer with total cost ``<= limit``.

    Args:
        mlp_logp, attn_logp: ``[L, K]`` log-probabilities (or logits: only differences within a row
            matter after ``log_softmax``, which is applied here).
        fixed, mlp_cost, attn_cost: the additive cost table (``[L, K]`` each, nonnegative).
        limit: the largest allowed total cost (``budget * full``; exceeded by at most ``RTOL``
            relative, for rounding).
        slack: compete only among solutions costing at least ``(1 - slack)`` times the largest
            reachable cost under ``limit``; in [0, 1].
        resolution: cost buckets between 0 and ``limit`` (more: closer to exact, slower).
        clamp: if ``limit`` is below the narrowest sub-network, return that one with ``clamped=True``
            instead of raising.

    Raises:
        LimitUnreachableError: ``limit`` is below the narrowest sub-network's cost and ``clamp`` is False.
    """
    if not 0.0 <= slack <= 1.0:
        raise ValueError(f"slack must be in [0, 1], got {slack}")
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    groups_lp = _interleave(torch.log_softmax(mlp_logp.double(), -1), torch.log_softmax(attn_logp.double(), -1))
    groups_c = _interleave(mlp_cost.double(), attn_cost.double())
    floor = min_cost(fixed, mlp_cost.double(), attn_cost.double())
    if floor > limit * (1 + RTOL):
        if not clamp:
            raise LimitUnreachableError(
                f"cost limit {limit:.6g} is below the narrowest sub-network's cost {floor:.6g}: raise the budget "
                "or add narrower width choices")
        idx = [int(c.argmin()) for c in groups_c]
        return _result(idx, groups_lp, groups_c, fixed, clamped=True)
    argmax = [int(lp.argmax()) for lp in groups_lp]
    width = max(limit - fixed, 1e-300) / resolution
    # state per surviving bucket: log-prob, exact cost, and back pointers (previous state, choice)
    lp = np.zeros(1)
    cost = np.zeros(1)
    back: list[tuple[np.ndarray, np.ndarray]] = []
    budget_left = limit * (1 + RTOL) - fixed
    for g_lp, g_c in zip(groups_lp, groups_c, strict=True):
        g_lp, g_c = g_lp.numpy(), g_c.numpy()
        cand_lp = (lp[:, None] + g_lp[None, :]).ravel()
        cand_cost = (cost[:, None] + g_c[None, :]).ravel()
        ok = np.flatnonzero(cand_cost <= budget_left)
        bucket = np.floor(cand_cost[ok] / width).astype(np.int64)
        # per bucket keep the most probable, the most expensive and the cheapest partial solution: the
        # first serves the objective, the second keeps the largest reachable cost (the slack window's
        # anchor) exact, the third keeps the all-narrowest prefix alive, so a solution always exists
        keep = np.unique(np.concatenate([ok[_first_per_bucket(bucket, key)]
                                         for key in (-cand_lp[ok], -cand_cost[ok], cand_cost[ok])]))
        lp, cost = cand_lp[keep], cand_cost[keep]
        back.append(np.divmod(keep, len(g_lp)))
    best_total = float(cost.max()) + fixed
    lowest = (1 - slack) * best_total - RTOL * abs(best_total)
    window = np.flatnonzero(cost + fixed >= lowest)
    state = int(window[np.argmax(lp[window])])
    idx = []
    for prev, choice in reversed(back):
        idx.append(int(choice[state]))
        state = int(prev[state])
    idx.reverse()
    out = _result(idx, groups_lp, groups_c, fixed)
    arg = _result(argmax, groups_lp, groups_c, fixed)
    # the argmax is the most probable sub-network of all; keep it whenever it is admissible
    if lowest <= arg.cost <= budget_left + fixed:
        return arg
    return out


def _first_per_bucket(bucket: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Index of the smallest ``key`` within each bucket."""
    order = np.lexsort((key, bucket))
    _, first = np.unique(bucket[order], return_index=True)
    return order[first]


def _interleave(mlp: Tensor, attn: Tensor) -> list[Tensor]:
    """Per-layer groups in layer order: MLP of layer 0, attention of layer 0, MLP of layer 1, ..."""
    return [t for pair in zip(mlp, attn, strict=True) for t in pair]


def _result(idx: list[int], groups_lp: list[Tensor], groups_c: list[Tensor], fixed: float,
            clamped: bool = False) -> Decoded:
    lp = sum(float(g[i]) for g, i in zip(groups_lp, idx, strict=True))
    cost = fixed + sum(float(g[i]) for g, i in zip(groups_c, idx, strict=True))
    return Decoded(idx[0::2], idx[1::2], float(cost), float(lp), clamped)
