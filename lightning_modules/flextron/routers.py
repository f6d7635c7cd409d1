"""Routers that pick per-layer widths for a budget, and the loss surrogate (Flextron section 3.2).

* :class:`StaticRouter`: budget -> per-layer width logits. The budget enters as a one-hot over the
  trained budgets, linearly blended between the two neighbours for an in-between value, so any
  budget in the trained range gets a sub-network.
* :class:`DynamicRouter`: additionally reads the (embedded) input, pooled per sequence or per token,
  and returns width logits per input.
* :class:`LossSurrogate`: predicts the LM loss from router probabilities, so routers can be trained
  against a cheap differentiable stand-in once its prediction error is small.

Choices are made with Gumbel-softmax (straight-through hard one-hot) during training and argmax at
inference; :func:`widths_to_masks` turns choice probabilities into nested unit masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from common.errors import UserFacingError

from . import hf_dynamic


def budget_encoding(budgets: Tensor, budget: float | Tensor) -> Tensor:
    """:func:`.hf_dynamic.budget_encoding`, a budget outside the trained range being a :class:`UserFacingError`."""
    _check_range(budgets, budget)
    return hf_dynamic.budget_encoding(budgets, budget)


def _check_range(budgets: Tensor, budget: float | Tensor) -> None:
    error = hf_dynamic.budget_range_error(budgets, budget)
    if error:
        raise UserFacingError(error)


class StaticRouter(nn.Module):
    """Budget -> per-layer width logits (Linear(N->hidden, no bias), LeakyReLU(0.1), Linear).

    Args:
        budgets: the trained budgets (fractions of the full cost), any order.
        num_layers: decoder layers.
        k_mlp, k_attn: number of MLP / attention width choices.
        hidden: hidden units.
    """

    def __init__(self, budgets: Sequence[float], num_layers: int, k_mlp: int, k_attn: int, hidden: int = 128) -> None:
        super().__init__()
        self.register_buffer("budgets", torch.tensor(sorted(budgets), dtype=torch.float32))
        self.head = hf_dynamic.WidthHead(len(budgets), hidden, num_layers, k_mlp, k_attn)

    def forward(self, budget: float | Tensor) -> tuple[Tensor, Tensor]:
        """Logits ``([..., L, K_mlp], [..., L, K_attn])`` for ``budget`` (scalar or ``[B]``)."""
        return self.head(budget_encoding(self.budgets, budget))


class DynamicRouter(hf_dynamic.DynamicRouter):
    """Input-adaptive router (see :class:`.hf_dynamic.DynamicRouter`, whose code dynamic exports ship).

    Per-token widths (``per_token=True``) cannot be sliced in a batch, so they run as masks: they save
    no wall-clock, which the benchmark reports, and they do not export.
    """

    @override
    def forward(self, hidden_states: Tensor, budget: float | Tensor, attention_mask: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        _check_range(self.budgets, budget)
        return super().forward(hidden_states, budget, attention_mask)


def sample_choices(logits: Tensor, tau: float, training: bool) -> Tensor:
    """Straight-through Gumbel-softmax one-hot (training) or argmax one-hot (inference)."""
    if training:
        return F.gumbel_softmax(logits.float(), tau=tau, hard=True, dim=-1)
    return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()


def widths_to_masks(probs: Tensor, unit_masks: Tensor) -> Tensor:
    """``[..., L, K]`` choice probabilities x ``[K, U]`` nested masks -> ``[..., L, U]`` unit masks.

    With a one-hot the result is the 0/1 prefix mask of the chosen width; with soft probabilities,
    unit i keeps ``P(width > i)``.
    """
    return probs @ unit_masks.to(probs)


class TemperatureSchedule:
    """Exponential Gumbel temperature decay from ``start`` to ``end`` over ``steps``."""

    def __init__(self, start: float = 1.0, end: float = 0.1, steps: int = 1000) -> None:
        if not (start > 0 and end > 0 and steps > 0):
            raise ValueError("temperature start/end and steps must be positive")
        self.start, self.end, self.steps = start, end, steps

    def __call__(self, step: int) -> float:
        frac = min(1.0, max(0, step) / self.steps)
        return self.start * math.exp(frac * math.log(self.end / self.start))


def budget_loss(cost: Tensor, budget: float | Tensor, full: float, tolerance: float = 0.02) -> Tensor:
    """``max(0, |cost / (budget * full) - 1| - tolerance)``: zero inside the tolerance band."""
    ratio = cost / (torch.as_tensor(budget, dtype=cost.dtype, device=cost.device) * full)
    return F.relu((ratio - 1).abs() - tolerance)


def expected_cost_tempered(table, mlp_logits: Tensor, attn_logits: Tensor, tau: float) -> Tensor:
    """Expected cost under ``softmax(logits / tau)``.

    The budget loss uses this deterministic expectation rather than the cost of the Gumbel sample:
    it has low variance, and as ``tau`` falls it converges to the cost of the argmax sub-network
    that inference deploys (with the sample's cost, the argmax drifted up to 10% off budget here).
    ``table`` is a :class:`~lightning_modules.flextron.budgets.CostTable`.
    """
    return table.expected((mlp_logits.float() / tau).softmax(-1), (attn_logits.float() / tau).softmax(-1))


class LossSurrogate(nn.Module):
    """Predicts the loss of a sub-network from its (flattened) width choices (paper, section 3.2).

    Every routed step adds one observation (choice, loss) to a memory of the last ``memory``
    observations, and the surrogate regresses all of them at once, so a few dozen steps suffice.
    It regresses the *standardized* loss (minus the memory's mean, over its standard deviation), so a
    distillation loss near 0.002 trains it as well as an LM loss near 3; :meth:`forward` maps back to
    the loss's own unit.

    Readiness is ``rel_error``: the running mean absolute error of the prediction for each new
    observation, made before the surrogate trained on it, divided by the standard deviation of the
    remembered losses. Dividing by the spread rather than by the loss makes the criterion scale-free,
    and it asks what the routers need: that the surrogate tells choices apart better than their
    losses vary. Predicting the mean scores about 0.8; an error of half the spread explains roughly
    three quarters of the variance. Divided by the loss (the earlier criterion), a KD surrogate's error
    stayed near 1 however well it ranked choices, and the routers never moved. Where choices barely
    change the loss (batch noise dominates) the surrogate cannot get ready, which is right: it would
    steer the routers by noise.

    Args:
        in_dim: ``L * (K_mlp + K_attn)``.
        hidden: hidden units.
        ema: smoothing of the tracked error (``rel_error`` stays infinite for the first
            ``1 / (1 - ema)`` observations).
        memory: observations kept for the regression.
    """

    def __init__(self, in_dim: int, hidden: int = 256, ema: float = 0.9, memory: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, 1))
        self.ema = ema
        self.register_buffer("rel_error", torch.tensor(float("inf")))
        self.register_buffer("updates", torch.tensor(0))
        self.register_buffer("abs_error", torch.tensor(0.0))
        self.register_buffer("memory_features", torch.zeros(memory, in_dim))
        self.register_buffer("memory_losses", torch.zeros(memory))

    def features(self, mlp_probs: Tensor, attn_probs: Tensor) -> Tensor:
        return torch.cat([mlp_probs.flatten(-2), attn_probs.flatten(-2)], dim=-1)

    def _stored(self) -> int:
        return int(min(int(self.updates), self.memory_losses.shape[0]))

    def loss_stats(self) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation of the remembered losses (0 and 1 before there are two)."""
        n = self._stored()
        if n < 2:
            return self.memory_losses.new_tensor(0.0), self.memory_losses.new_tensor(1.0)
        losses = self.memory_losses[:n]
        return losses.mean(), losses.std().clamp_min(1e-12)

    def standardized(self, mlp_probs: Tensor, attn_probs: Tensor) -> Tensor:
        """The network's output: the loss in units of the remembered spread around the remembered mean."""
        return self._net(self.features(mlp_probs, attn_probs))

    def _net(self, features: Tensor) -> Tensor:
        """The network in its weights' dtype (bf16 under DeepSpeed's bf16 mode), its output in float32."""
        return self.net(features.to(self.net[0].weight.dtype)).squeeze(-1).float()

    def forward(self, mlp_probs: Tensor, attn_probs: Tensor) -> Tensor:
        """Predicted loss in the loss's own unit."""
        mean, spread = self.loss_stats()
        return mean + spread * self.standardized(mlp_probs, attn_probs)

    def predict_frozen(self, mlp_probs: Tensor, attn_probs: Tensor) -> Tensor:
        """Prediction whose gradient reaches the inputs (the router) but not the surrogate."""
        params = {k: v.detach() for k, v in self.named_parameters()}
        return torch.func.functional_call(self, params, (mlp_probs, attn_probs))

    def fit_loss(self, mlp_probs: Tensor, attn_probs: Tensor, observed: Tensor) -> Tensor:
        """Remember the observation(s), update ``rel_error``, and return the regression loss over the memory.

        Args:
            mlp_probs, attn_probs: ``[N, L, K]`` choices (one-hot) of ``N`` observations.
            observed: ``[N]`` their losses.
        """
        feats = self.features(mlp_probs.detach(), attn_probs.detach()).float()
        target = observed.detach().float().reshape(-1)
        with torch.no_grad():
            if self._stored() >= 2:  # error of the prediction for data the surrogate has not seen yet
                abs_err = (self(mlp_probs.detach(), attn_probs.detach()).reshape(-1) - target).abs().mean()
                first = bool(self.abs_error == 0)
                self.abs_error.copy_(abs_err if first else self.ema * self.abs_error + (1 - self.ema) * abs_err)
            for row, loss in zip(feats, target, strict=True):
                slot = int(self.updates) % self.memory_losses.shape[0]
                self.memory_features[slot] = row
                self.memory_losses[slot] = loss
                self.updates += 1
            _, spread = self.loss_stats()
            warm = int(self.updates) >= max(2, round(1 / (1 - self.ema)))
            self.rel_error.fill_(float(self.abs_error / spread) if warm else float("inf"))
        n = self._stored()
        mean, spread = self.loss_stats()
        score = self._net(self.memory_features[:n])
        return F.mse_loss(score, (self.memory_losses[:n] - mean) / spread)
