"""Checks of FlextronModule's settings, made before anything is loaded, with messages that name the fix."""

from __future__ import annotations

from collections.abc import Sequence

from common.errors import UserFacingError

from .budgets import METRICS
from .losses import LOSSES
from .plan import ELASTIC_SAMPLINGS

ROUTERS = ("static", "dynamic")
ROUTINGS = ("constrained", "argmax")
UPDATES = ("direct", "surrogate")


def check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    """Raise :class:`UserFacingError` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise UserFacingError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def check_fraction(name: str, value: float) -> None:
    """Raise :class:`UserFacingError` unless ``value`` lies in [0, 1]."""
    if not 0.0 <= value <= 1.0:
        raise UserFacingError(f"{name} must be in [0, 1], got {value}")


def check_settings(*, budgets: Sequence[float], budget_metric: str, router: str, router_update: str, loss: str,
                   routing: str, routing_slack: float, elastic_sampling: str, full_prob: float,
                   interp_prob: float) -> None:
    """Validate the settings a user writes in a config (each failure is one clear line)."""
    check_choice("budget_metric", budget_metric, METRICS)
    check_choice("router", router, ROUTERS)
    check_choice("router_update", router_update, UPDATES)
    check_choice("loss", loss, LOSSES)
    if not budgets or any(not 0.0 < b <= 1.0 for b in budgets):
        raise UserFacingError(f"budgets must be fractions in (0, 1], got {list(budgets)}")
    if router == "dynamic" and router_update == "surrogate":
        raise UserFacingError("the loss surrogate scores one width choice per batch: use router_update='direct' "
                              "with router='dynamic'")
    check_choice("routing", routing, ROUTINGS)
    check_fraction("routing_slack", routing_slack)
    check_choice("elastic_sampling", elastic_sampling, ELASTIC_SAMPLINGS)
    check_fraction("full_prob", full_prob)
    check_fraction("interp_prob", interp_prob)
