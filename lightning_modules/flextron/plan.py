"""What one Flextron training step does, decided before any forward pass.

A step is planned from its stage and three named random draws taken from a generator seeded by the
step (so every rank plans the same step): whether it trains the full model, whether a routed step
asks for an in-between budget, and which budget it asks for. Keeping the decision apart from the
losses makes each stage's behaviour readable and testable without a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .elastic import SubnetConfig, WidthSpace

STAGES = ("elastic", "router", "joint")
ELASTIC_SAMPLINGS = ("per_layer", "uniform")


@dataclass(frozen=True)
class StepDraws:
    """The uniform [0, 1) draws of one step, each with one meaning.

    Attributes:
        full_model: below ``full_prob`` the step trains the full model (elastic and joint stages).
        interpolate: below ``interp_prob`` a routed step requests an in-between budget.
        budget_pick: picks the requested budget (a trained one, or a point between the extremes).
    """

    full_model: float
    interpolate: float
    budget_pick: float

    @classmethod
    def draw(cls, generator: torch.Generator) -> StepDraws:
        full_model, interpolate, budget_pick = torch.rand(3, generator=generator).tolist()
        return cls(full_model, interpolate, budget_pick)


@dataclass(frozen=True)
class StepPlan:
    """One training step.

    Attributes:
        stage: ``elastic``, ``router`` or ``joint``.
        train_llm: whether the LLM weights get gradients (False in the router stage).
        routed: whether the routers pick the sub-network (otherwise ``subnet`` is used).
        budget: the requested budget of a routed step (None otherwise).
        subnet: the fixed sub-network of an unrouted step (None: the full model).
    """

    stage: str
    train_llm: bool
    routed: bool
    budget: float | None = None
    subnet: SubnetConfig | None = None


def stage_at(step: int, elastic_steps: int, router_steps: int) -> str:
    """The stage of optimizer step ``step``: elastic, then router, then joint."""
    if step < elastic_steps:
        return "elastic"
    return "router" if step < elastic_steps + router_steps else "joint"


def random_nested_subnet(space: WidthSpace, sampling: str, generator: torch.Generator) -> SubnetConfig:
    """A random sub-network of the elastic stage.

    ``per_layer``: each layer draws its own MLP and attention width. ``uniform``: one MLP width for
    every layer and the attention width whose ratio is closest to it (MatFormer-style nested training).
    """
    num_layers = space.num_layers
    draws = 1 if sampling == "uniform" else num_layers
    mlp_idx = torch.randint(len(space.mlp), (draws,), generator=generator).expand(num_layers)
    if sampling == "uniform":
        ratio = space.mlp[int(mlp_idx[0])] / space.mlp[-1]
        closest = min(range(len(space.attn)), key=lambda j: abs(space.attn[j] / space.attn[-1] - ratio))
        attn_idx = torch.full((num_layers,), closest)
    else:
        attn_idx = torch.randint(len(space.attn), (num_layers,), generator=generator)
    return SubnetConfig.from_choices(space, mlp_idx.tolist(), attn_idx.tolist())


def requested_budget(draws: StepDraws, budgets: Sequence[float], interp_prob: float) -> float:
    """A trained budget, or (with probability ``interp_prob``) one between the smallest and largest."""
    if draws.interpolate < interp_prob:
        return budgets[0] + draws.budget_pick * (budgets[-1] - budgets[0])
    return budgets[int(draws.budget_pick * len(budgets)) % len(budgets)]


def plan_step(stage: str, generator: torch.Generator, budgets: Sequence[float], space: WidthSpace,
              full_prob: float, interp_prob: float, elastic_sampling: str) -> StepPlan:
    """Decide one step of ``stage``.

    The router stage always routes: a full-model step there would train nothing, since the LLM is
    frozen. The elastic stage trains the full model with probability ``full_prob`` and otherwise a
    random nested sub-network; the joint stage trains the full model with probability ``full_prob``
    and otherwise the routed sub-network for a requested budget.
    """
    draws = StepDraws.draw(generator)
    train_llm = stage != "router"
    wants_full = draws.full_model < full_prob
    if stage == "elastic":
        subnet = None if wants_full else random_nested_subnet(space, elastic_sampling, generator)
        return StepPlan(stage, train_llm, routed=False, subnet=subnet)
    if stage == "joint" and wants_full:
        return StepPlan(stage, train_llm, routed=False)
    return StepPlan(stage, train_llm, routed=True, budget=requested_budget(draws, budgets, interp_prob))
