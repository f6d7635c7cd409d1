"""Rate control: the weight threshold of one tensor that spends a bit budget on W, m and v (no Lightning).

The method's ``alpha`` rule prunes ``|dW| <= median(|dW|) * alpha / sqrt(mean(v))``, so how much a
delta costs depends on the gradient scale: the same run with its loss multiplied by 100 (Adam's
updates unchanged, v 10^4 times larger) keeps almost every residual. In the budget mode the tensor's
threshold is instead the one whose *coded size* meets ``budget_bits``:

* entries still rank by ``|dW|`` (within a tensor the method's criterion is a threshold on ``|dW|``),
  or by ``|dW| * sqrt(v / mean(v))`` with ``weight_saliency="fisher"``;
* the momentum mask stays the method's ``|m| > beta * mean(|m|)`` nested in the weight mask, and v
  follows m, so one threshold sets the cost of all three streams: the *joint* cost of keeping the
  top ``q`` of ``|dW|`` is, with the m-kept share ``r(q)`` measured on the same ranking,

      n * [h(q) + q H_w + q h(r/q) + r H_m + r H_v] + fixed bits,

  the order-0 entropy of the three code streams (``h`` the binary entropy of a mask, ``H_*`` the
  entropy of a stream's k-means codes), which the rANS coder reaches within a few bytes;
* the first guess, the largest ``q`` within budget, is read off one sorted sample of ``|dW|``; the
  tensor is then quantized and coded for real and the threshold corrected from what coding spent
  (a step in proportion to the budget, then regula falsi between the ranks measured to fit and not
  to fit) until the coded size is within :data:`TOLERANCE` of the budget (two to four rounds, at
  most :data:`ROUNDS`). Measuring the real coder keeps it right where zstd beats order 0 (an
  embedding's untouched rows) or tables dominate (short streams).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

__all__ = ["SMALL_NUMEL", "TOLERANCE", "CostCurve", "RateModel", "cost_curve", "fit_budget", "sample_positions"]

Codes = TypeVar("Codes")
ROUNDS = 6
"""At most this many threshold/quantize rounds per tensor (two or three are typical)."""

TOLERANCE = 0.01
"""The search stops once a tensor's coded W, m, v are within 1% of its budget."""
SMALL_NUMEL = 1024
"""Tensors up to this size (norm weights, biases) keep every residual: a budget of a few hundred bits
cannot pay for their codebooks, and freezing them would cost quality for a negligible saving."""
SAMPLE = 1 << 17
"""``|dW|`` values ranked per tensor (all of them in smaller tensors): the kept share of a candidate
threshold is then known to ~0.3% of the tensor."""


@dataclass
class RateModel:
    """Bits per kept code of each stream (the first guess's code entropies)."""

    h_w: float
    h_m: float
    h_v: float


@dataclass
class _Ranking:
    """``|dW|`` of a sample in decreasing order, with the share of the tensor kept (q) and m-kept (r)
    when the top j sample entries are kept (index j)."""

    values: torch.Tensor
    q: np.ndarray
    r: np.ndarray | None


def _binary_entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return np.nan_to_num(h, nan=0.0)


def sample_positions(numel: int, generator: torch.Generator) -> torch.Tensor | None:
    """The positions a tensor's threshold search ranks: :data:`SAMPLE` drawn at random from a larger
    tensor, None (every entry) from a smaller one. A caller that needs the ranked values only (the
    budget split) computes them at these positions instead of over the whole tensor."""
    return torch.randint(0, numel, (SAMPLE,), generator=generator) if numel > SAMPLE else None


def _rank(saliency: torch.Tensor, m_candidates: torch.Tensor | None, generator: torch.Generator) -> _Ranking:
    pick = sample_positions(saliency.numel(), generator)
    if pick is None:
        return _rank_sample(saliency, m_candidates)
    return _rank_sample(saliency[pick], None if m_candidates is None else m_candidates[pick])


def _rank_sample(a: torch.Tensor, m_candidates: torch.Tensor | None) -> _Ranking:
    """The ranking of already sampled saliencies (and the momentum candidates at the same entries)."""
    order = torch.argsort(a, descending=True, stable=True)
    q = np.arange(a.numel() + 1, dtype=np.float64) / a.numel()
    r = None
    if m_candidates is not None:
        c = m_candidates[order]
        r = np.concatenate([[0.0], np.cumsum(c.numpy(), dtype=np.float64)]) / a.numel()
    return _Ranking(a[order], q, r)


def _fixed_bits(count: np.ndarray, bits: int) -> np.ndarray:
    """Codebook, stream headers and rANS table of a stream with ``count`` kept codes."""
    k = np.minimum(2**bits - 1, count)
    return 8.0 * (4 + 11 + 1) + 32.0 * k + 12.0 * (k + 1)


def _cost(ranking: _Ranking, n: int, has_v: bool, model: RateModel, bits: tuple[int, int, int]) -> np.ndarray:
    """Estimated coded bits of W, m, v for every candidate threshold of the ranking."""
    q, r = ranking.q, ranking.r
    cost = n * (_binary_entropy(q) + q * model.h_w) + _fixed_bits(q * n, bits[0])
    if r is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(q > 0, r / np.maximum(q, 1e-300), 0.0)
        cost += n * (q * _binary_entropy(share) + r * model.h_m) + _fixed_bits(r * n, bits[1])
        if has_v:
            cost += n * r * model.h_v + _fixed_bits(r * n, bits[2])
    return cost


@dataclass
class CostCurve:
    """A tensor's estimated coded bits (W, m, v) when every entry above a saliency threshold is kept.

    ``thresholds`` are sampled saliencies in decreasing order; ``bits[c]`` is the cost of keeping every
    entry down to the c-th of them (``bits[0]``: nothing kept). At most :data:`CURVE_POINTS` points,
    so a delta's curves stay small whatever its size; a threshold between two points reads the cost
    of the point above it.
    """

    thresholds: np.ndarray
    bits: np.ndarray

    def bits_above(self, threshold: float) -> float:
        """Estimated bits of keeping the entries whose saliency is above ``threshold``."""
        kept = int(np.searchsorted(-self.thresholds, -threshold, side="left"))
        return float(self.bits[kept])


CURVE_POINTS = 4096
"""Points of a :class:`CostCurve` (1/4096 of a tensor's sample between points)."""


def cost_curve(
    sample: torch.Tensor,
    m_candidates: torch.Tensor | None,
    numel: int,
    has_v: bool,
    bits: tuple[int, int, int],
) -> CostCurve:
    """The coded cost of a tensor against its saliency threshold, by the order-0 model of :func:`fit_budget`.

    Args:
        sample: what the weight mask ranks (any scale: only the order within the tensor and the
            thresholds' values matter) at the tensor's :func:`sample_positions` (every entry when those
            are None): a curve needs no more, and the whole tensor's saliency costs passes over all of it.
        m_candidates: where the momentum criterion alone would keep m, at the same entries (1-D bool),
            or None without m.
        numel: the size of the whole tensor.
        has_v: whether a second-moment stream follows m's mask.
        bits: bits per code of the W, m, v streams.
    """
    ranking = _rank_sample(sample, m_candidates)
    cost = _cost(ranking, numel, has_v, _first_guess_model(bits), bits)
    size = ranking.values.numel()
    if size == 0:
        return CostCurve(np.zeros(0), cost)
    picks = np.unique(np.linspace(0, size - 1, min(size, CURVE_POINTS)).round().astype(np.int64))
    # keeping the entries above values[j] keeps the top j + 1 of the sample: cost index j + 1
    return CostCurve(ranking.values[picks].double().numpy(), np.concatenate([cost[:1], cost[picks + 1]]))


def _first_guess_model(bits: tuple[int, int, int]) -> RateModel:
    return RateModel(*(math.log2(2**b - 1) - 0.25 for b in bits))  # k-means codes: a bit under log2(k)


def _mask(saliency: torch.Tensor, ranking: _Ranking, j: int) -> torch.Tensor:
    """Keep the entries above the j-th largest sampled saliency (all for j = sample size, none for 0)."""
    size = ranking.values.numel()
    if j >= size:
        return torch.ones(saliency.numel(), dtype=torch.bool)
    if j <= 0:
        return torch.zeros(saliency.numel(), dtype=torch.bool)
    return saliency > ranking.values[j]


def fit_budget(
    saliency: torch.Tensor,
    m_candidates: torch.Tensor | None,
    has_v: bool,
    budget_bits: float,
    bits: tuple[int, int, int],
    quantize: Callable[[torch.Tensor], tuple[Codes, int]],
    generator: torch.Generator,
) -> Codes:
    """Quantized codes of one tensor whose coded size is within TOLERANCE of the budget.

    Args:
        saliency: what the weight mask ranks, ``|dW|`` or its Fisher-weighted form (1-D).
        m_candidates: where the momentum criterion alone would keep m (1-D bool), or None without m.
        has_v: whether a second-moment stream follows m's mask.
        budget_bits: the tensor's budget (``target_bits_per_param * numel``).
        bits: bits per code of the W, m, v streams (codebook sizes and the first guess's entropies).
        quantize: weight mask -> (codes, their coded size in bits).
        generator: RNG of the ranked sample.

    Tensors of at most :data:`SMALL_NUMEL` entries keep every residual instead of freezing; a tensor
    that cannot reach the budget (fixed costs) gets the nearest it can.
    """
    n = saliency.numel()
    if n <= SMALL_NUMEL:
        return quantize(torch.ones(n, dtype=torch.bool))[0]
    ranking = _rank(saliency, m_candidates, generator)
    size = ranking.values.numel()
    model = _first_guess_model(bits)
    best: tuple[float, Codes] | None = None
    low, high = (0, 0.0), (size + 1, math.inf)  # (sample rank, coded bits) known to fit / not to fit
    within = np.flatnonzero(_cost(ranking, n, has_v, model, bits) <= budget_bits)
    j = int(within[-1]) if within.size else 0
    for _ in range(ROUNDS):
        codes, coded = quantize(_mask(saliency, ranking, j))
        if best is None or _closer(coded, best[0], budget_bits):
            best = (coded, codes)
        if abs(coded - budget_bits) <= TOLERANCE * budget_bits:
            break
        if coded <= budget_bits:
            low = (j, coded)
        else:
            high = (j, coded)
        if high[0] - low[0] <= 1:
            break  # the bracket is closed (or everything / nothing is kept)
        j = _next_rank(low, high, j, coded, budget_bits)
    assert best is not None
    return best[1]


def _next_rank(low: tuple[int, float], high: tuple[int, float], j: int, coded: float, budget: float) -> int:
    """The next sample rank to try: regula falsi inside a measured bracket, else a step in proportion
    to the budget (cost grows about linearly with the kept count), always strictly inside the bracket."""
    if math.isfinite(high[1]) and low[1] > 0:
        guess = low[0] + (budget - low[1]) * (high[0] - low[0]) / (high[1] - low[1])
    else:
        guess = j * budget / max(coded, 1.0)
    return int(min(max(round(guess), low[0] + 1), high[0] - 1))


def _closer(bits: float, best: float, budget: float) -> bool:
    """Whether a round that coded ``bits`` beats the best so far: within budget (+TOLERANCE) first,
    then the fuller one; over budget, the smaller one."""
    limit = budget * (1 + TOLERANCE)
    if (bits <= limit) != (best <= limit):
        return bits <= limit
    return bits > best if bits <= limit else bits < best
