"""Rate control: the weight threshold of one tensor that spends a bit budget on W, m and v (no Lightning).

The method's ``alpha`` rule prunes ``|dW| <= median(|dW|) * alpha / sqrt(mean(v))``, so how much a
delta costs depends on the gradient scale: the same run with its loss multiplied by 100 (Adam's
updates unchanged, v 10^4 times larger) keeps almost every residual. In the budget mode the tensor's
threshold is instead the one whose *coded size* meets ``budget_bits``:

* entries still rank by ``|dW|`` (within a tensor the method's criterion is a threshold on ``|dW|``);
* the momentum mask stays the method's ``|m| > beta * mean(|m|)`` nested in the weight mask, and v
  follows m, so one threshold sets the cost of all three streams: the *joint* cost of keeping the
  top ``q`` of ``|dW|`` is, with the m-kept share ``r(q)`` measured on the same ranking,

      n * [h(q) + q H_w + q h(r/q) + r H_m + r H_v] + fixed bits,

  the order-0 entropy of the three code streams (``h`` the binary entropy of a mask, ``H_*`` the
  entropy of a stream's k-means codes), which the rANS coder reaches within a few bytes;
* the largest ``q`` within budget is read off one sorted sample of ``|dW|`` (no pass over the full
  tensor per candidate); the tensor is then quantized and coded for real, the model refitted to what
  coding spent, and the search repeated (bracketed by the shares measured to fit and not to fit)
  until the coded size is within :data:`TOLERANCE` of the budget or the model's best is measured
  (two or three rounds, at most :data:`ROUNDS`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from callbacks.excp.entropy import entropy_bits

__all__ = ["SMALL_NUMEL", "TOLERANCE", "RateModel", "fit_budget"]

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
    """Bits per kept code of each stream (entropies, scaled to what the coder really spent)."""

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


def _rank(absdw: torch.Tensor, m_candidates: torch.Tensor | None, generator: torch.Generator) -> _Ranking:
    n = absdw.numel()
    pick = torch.randint(0, n, (SAMPLE,), generator=generator) if n > SAMPLE else None
    a = absdw if pick is None else absdw[pick]
    order = torch.argsort(a, descending=True, stable=True)
    q = np.arange(a.numel() + 1, dtype=np.float64) / a.numel()
    r = None
    if m_candidates is not None:
        c = (m_candidates if pick is None else m_candidates[pick])[order]
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


def _mask(absdw: torch.Tensor, ranking: _Ranking, j: int) -> torch.Tensor:
    """Keep the entries above the j-th largest sampled ``|dW|`` (all for j = sample size, none for 0)."""
    size = ranking.values.numel()
    if j >= size:
        return torch.ones(absdw.numel(), dtype=torch.bool)
    if j <= 0:
        return torch.zeros(absdw.numel(), dtype=torch.bool)
    return absdw > ranking.values[j]


def fit_budget(
    absdw: torch.Tensor,
    m_candidates: torch.Tensor | None,
    has_v: bool,
    budget_bits: float,
    bits: tuple[int, int, int],
    quantize: Callable[[torch.Tensor], tuple[Codes, list[tuple[int, np.ndarray]], int]],
    generator: torch.Generator,
) -> Codes:
    """Quantized codes of one tensor whose coded size is within TOLERANCE of the budget.

    Args:
        absdw: ``|dW|`` of the tensor (1-D).
        m_candidates: where the momentum criterion alone would keep m (1-D bool), or None without m.
        has_v: whether a second-moment stream follows m's mask.
        budget_bits: the tensor's budget (``target_bits_per_param * numel``).
        bits: bits per code of the W, m, v streams (codebook sizes; the first round's entropy guess).
        quantize: weight mask -> (codes, ``[(codebook size, code stream), ...]`` of W, m, v, the
            coded size in bits of those streams).
        generator: RNG of the ranked sample.

    Each round takes the largest threshold the rate model says fits, codes, and refits the model to
    what the coding really spent (code entropies measured, scaled by real size over estimate: zstd
    beats the order-0 entropy on structured masks such as an embedding's untouched rows). Kept
    shares measured to fit / not to fit bracket the next proposals (bisection when the model
    proposes outside). Tensors of at most :data:`SMALL_NUMEL` entries keep every residual instead
    of freezing; a tensor that cannot reach the budget gets the nearest it can.
    """
    n = absdw.numel()
    if n <= SMALL_NUMEL:
        return quantize(torch.ones(n, dtype=torch.bool))[0]
    ranking = _rank(absdw, m_candidates, generator)
    size = ranking.values.numel()
    model = RateModel(*map(float, bits))
    best: tuple[float, Codes] | None = None
    low, high, measured_low = 0, size + 1, False  # sample ranks known to fit / not to fit
    for _ in range(ROUNDS):
        within = np.flatnonzero(_cost(ranking, n, has_v, model, bits) <= budget_bits)
        j = int(within[-1]) if within.size else 0
        if measured_low and j <= low:
            if high > size:
                break  # the model says the best fit is already measured
            j = (low + high) // 2
        elif j >= high:
            j = (low + high) // 2
        if (measured_low and j <= low) or j >= high:
            break  # the bracket is closed
        wmask = _mask(absdw, ranking, j)
        codes, streams, coded = quantize(wmask)
        if best is None or _closer(coded, best[0], budget_bits):
            best = (coded, codes)
        if abs(coded - budget_bits) <= TOLERANCE * budget_bits:
            break
        if coded <= budget_bits:
            low, measured_low = j, True
            if j >= size:
                break
        else:
            high = j
            if j <= 0:
                break
        model = _refit(model, streams, coded, bits)
    assert best is not None
    return best[1]


def _refit(
    model: RateModel, streams: list[tuple[int, np.ndarray]], coded: float, bits: tuple[int, int, int]
) -> RateModel:
    """The rate model measured on one round: code entropies scaled by what coding really spent.

    A stream with no kept codes says nothing about its entropy: its previous value stays.
    """
    estimate = fixed = 0.0
    for (_, idx), b in zip(streams, bits, strict=False):
        entropy = stream_bits(idx)
        estimate += entropy
        fixed += float(_fixed_bits(np.array(np.count_nonzero(idx)), b))
    scale = (coded - fixed) / estimate if estimate > 0 and coded > fixed else 1.0
    old = [model.h_w, model.h_m, model.h_v]
    new = [scale * nonzero_entropy(idx) if np.any(idx) else old[i] for i, (_, idx) in enumerate(streams)]
    return RateModel(*(new + old[len(new) :]))


def _closer(bits: float, best: float, budget: float) -> bool:
    """Whether a round that coded ``bits`` beats the best so far: within budget (+TOLERANCE) first,
    then the fuller one; over budget, the smaller one."""
    limit = budget * (1 + TOLERANCE)
    if (bits <= limit) != (best <= limit):
        return bits <= limit
    return bits > best if bits <= limit else bits < best


def stream_bits(codes: np.ndarray) -> float:
    """Order-0 entropy in bits of one code stream (what rANS spends on it, tables aside)."""
    return entropy_bits(np.bincount(codes)) if codes.size else 0.0


def nonzero_entropy(codes: np.ndarray) -> float:
    """Bits per nonzero code of a stream (the ``H_*`` of :class:`RateModel`); 0 when none."""
    nz = codes[codes != 0]
    return entropy_bits(np.bincount(nz)) / nz.size if nz.size else 0.0
