"""The named terms of a routed Flextron step: routing draw, budget loss, surrogate fit, router objective.

Each function computes one term from plain tensors, so the LightningModule's step reads as a list of
what is optimised, and each term can be checked on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .budgets import CostTable
from .routers import LossSurrogate, budget_loss, expected_cost_tempered, sample_choices


@dataclass
class RoutingDraw:
    """The routers' choice for one routed step.

    Attributes:
        mlp_logits, attn_logits: router logits ``[..., L, K]``.
        mlp_choice, attn_choice: straight-through Gumbel one-hot samples of the same shape.
        expected_cost: differentiable expected cost under the tempered router distribution.
        budget_loss: mean budget loss of ``expected_cost`` against the requested budget.
    """

    mlp_logits: Tensor
    attn_logits: Tensor
    mlp_choice: Tensor
    attn_choice: Tensor
    expected_cost: Tensor
    budget_loss: Tensor


def draw_routing(mlp_logits: Tensor, attn_logits: Tensor, cost: CostTable, budget: float, tau: float,
                 tolerance: float) -> RoutingDraw:
    """Sample width choices at temperature ``tau`` and score the expected cost against ``budget``."""
    mlp_choice = sample_choices(mlp_logits, tau, True)
    attn_choice = sample_choices(attn_logits, tau, True)
    expected = expected_cost_tempered(cost, mlp_logits, attn_logits, tau)
    b_loss = budget_loss(expected, budget, cost.full, tolerance).mean()
    return RoutingDraw(mlp_logits, attn_logits, mlp_choice, attn_choice, expected, b_loss)


def surrogate_fit_loss(surrogate: LossSurrogate, routing: RoutingDraw, task_loss: Tensor) -> Tensor:
    """MSE of the surrogate's predicted loss for this choice to the observed task loss (trains the surrogate)."""
    return surrogate.fit_loss(routing.mlp_choice[None], routing.attn_choice[None], task_loss.detach()[None])


def surrogate_router_objective(surrogate: LossSurrogate, routing: RoutingDraw, budget_weight: float,
                               ready: bool) -> Tensor:
    """What the routers minimise in surrogate mode: budget loss plus the frozen surrogate's predicted loss.

    Until the surrogate is trustworthy (``ready``) the routers get no gradient at all (paper, Fig. 3):
    the objective is a zero that still belongs to the graph.
    """
    if not ready:
        return routing.budget_loss * 0.0
    predicted = surrogate.predict_frozen(routing.mlp_choice[None], routing.attn_choice[None]).mean()
    return budget_weight * routing.budget_loss + predicted
