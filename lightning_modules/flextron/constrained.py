"""Budget-exact decoding of a router's per-layer width distribution, with the project's error type.

The algorithm (a multiple-choice knapsack over per-layer widths, see :mod:`.knapsack`) lives in a file
that imports only numpy and torch, because dynamic exports ship it next to their weights. This module
is what the rest of the package calls: the same function, with an unreachable budget reported as a
:class:`~common.errors.UserFacingError` (one line on the command line) instead of a ``ValueError``.
"""

from __future__ import annotations

from torch import Tensor

from common.errors import UserFacingError

from . import knapsack
from .knapsack import RTOL, Decoded, min_cost


class BudgetUnreachableError(UserFacingError):
    """The requested budget is below the cost of the narrowest width everywhere."""


def constrained_choices(mlp_logp: Tensor, attn_logp: Tensor, fixed: float, mlp_cost: Tensor, attn_cost: Tensor,
                        limit: float, slack: float = 0.03, resolution: int = 4096, clamp: bool = False) -> Decoded:
    """:func:`.knapsack.constrained_choices` (same arguments and result).

    Raises:
        BudgetUnreachableError: ``limit`` is below the narrowest sub-network's cost and ``clamp`` is False.
    """
    try:
        return knapsack.constrained_choices(mlp_logp, attn_logp, fixed, mlp_cost, attn_cost, limit, slack=slack,
                                            resolution=resolution, clamp=clamp)
    except knapsack.LimitUnreachableError as error:
        raise BudgetUnreachableError(str(error)) from error


__all__ = ["RTOL", "BudgetUnreachableError", "Decoded", "constrained_choices", "min_cost"]
