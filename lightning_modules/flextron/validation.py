"""Validation of a FlextronModule: perplexity per budget, realized budgets, width table and heat map.

:class:`FlextronValidation` holds the validation hooks; :class:`~.module.FlextronModule` mixes it in.
It reads the module's ``model``, ``elastic``, ``router``, ``cost``, ``budgets`` and ``val_losses`` and
its routing methods (``subnet_for_budget``, ``router_logits``, ``realized``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override

from common.atomic import atomic_save_figure

from .arch import ArchSpec
from .elastic import SubnetConfig
from .losses import lm_loss
from .routers import StaticRouter, sample_choices, widths_to_masks

WIDTH_COLUMNS = ["budget", "layer", "mlp_neurons", "attn_kv_groups", "realized"]


@dataclass
class WidthReport:
    """The chosen sub-network of every budget, as table rows and as width-ratio grids.

    Attributes:
        budgets: the budgets, in row order.
        rows: one ``WIDTH_COLUMNS`` row per budget and layer.
        mlp_ratios, attn_ratios: per budget, each layer's width as a fraction of the full width.
    """

    budgets: list[float] = field(default_factory=list)
    rows: list[list[float]] = field(default_factory=list)
    mlp_ratios: list[list[float]] = field(default_factory=list)
    attn_ratios: list[list[float]] = field(default_factory=list)

    def add(self, budget: float, subnet: SubnetConfig, realized: float, spec: ArchSpec) -> None:
        self.budgets.append(budget)
        self.mlp_ratios.append([m / spec.intermediate_size for m in subnet.mlp])
        self.attn_ratios.append([a / spec.num_groups for a in subnet.attn])
        self.rows += [[budget, i, subnet.mlp[i], subnet.attn[i], realized] for i in range(len(subnet.mlp))]


def plot_width_heatmap(budgets: Sequence[float], mlp: list[list[float]], attn: list[list[float]],
                       path: str | Path) -> None:
    """Two heat maps (MLP and attention width ratio per layer, one row per budget), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(budgets) + 1.8))
    for ax, grid, title in ((axes[0], mlp, "MLP width"), (axes[1], attn, "attention width")):
        image = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_yticks(range(len(budgets)), [f"{b:g}" for b in budgets])
        ax.set_xlabel("layer")
        ax.set_ylabel("budget")
        ax.set_title(title)
    fig.colorbar(image, ax=axes, fraction=0.03)
    atomic_save_figure(fig, path, dpi=100)


def budget_key(budget: float) -> str:
    """A budget as written in metric names: 0.5 -> ``"0.5"``, 1.0 -> ``"1"``."""
    return f"{budget:g}"


def metric_key(budget: float) -> str:
    """A budget as a ``ModuleDict`` key, which cannot hold ".": 0.5 -> ``"b0_5"``."""
    return "b" + budget_key(budget).replace(".", "_")


class FlextronValidation(L.LightningModule):
    """Validation hooks of :class:`~.module.FlextronModule` (see the module docstring for what they read)."""

    @override
    def on_validation_epoch_start(self) -> None:
        # the constrained decode takes up to ~1 s per budget at 30 layers: once per epoch, not per batch
        self._val_subnets = {}
        if isinstance(self.router, StaticRouter) and self.cost is not None:
            self._val_subnets = {b: self.subnet_for_budget(b, clamp=True) for b in self.budgets}

    def _dynamic_routed_loss(self, budget: float, input_ids: Tensor, labels: Tensor) -> Tensor:
        """LM loss of the dynamic router's per-input argmax widths (as masks); logs the realized cost."""
        mlp_logits, attn_logits = self.router_logits(budget, input_ids)
        mlp_choice, attn_choice = sample_choices(mlp_logits, 1.0, False), sample_choices(attn_logits, 1.0, False)
        self.elastic.set_masks(widths_to_masks(mlp_choice, self.mlp_unit_masks),
                               widths_to_masks(attn_choice, self.attn_unit_masks))
        try:
            loss = lm_loss(self.model(input_ids=input_ids, use_cache=False).logits, labels)
        finally:
            self.elastic.set_subnet(None)
        realized = self.cost.expected(mlp_choice, attn_choice).mean() / self.cost.full
        self.log(f"val/realized_b{budget_key(budget)}", realized, batch_size=input_ids.shape[0], sync_dist=True)
        return loss

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        input_ids, labels = batch["input_ids"], batch["labels"]
        tokens = (labels[:, 1:] != -100).sum()
        with self.elastic.subnet(None):
            full = lm_loss(self.model(input_ids=input_ids, use_cache=False).logits, labels)
        self.val_losses["full"].update(full, weight=tokens)
        for budget in self.budgets:
            if isinstance(self.router, StaticRouter):
                subnet = self._val_subnets.get(budget) or self.subnet_for_budget(budget, clamp=True)
                with self.elastic.subnet(subnet):
                    loss = lm_loss(self.model(input_ids=input_ids, use_cache=False).logits, labels)
            else:
                loss = self._dynamic_routed_loss(budget, input_ids, labels)
            self.val_losses[metric_key(budget)].update(loss, weight=tokens)

    @override
    def on_validation_epoch_end(self) -> None:
        for key, metric in self.val_losses.items():
            if not metric.update_called:
                continue
            loss = metric.compute()
            with torch.inference_mode(False):
                metric.reset()
            name = "val/loss" if key == "full" else f"val/loss_b{key[1:].replace('_', '.')}"
            self.log(name, loss, prog_bar=key == "full")
            self.log(name.replace("loss", "ppl"), torch.exp(loss))
        if isinstance(self.router, StaticRouter) and self.cost is not None:
            self._report_widths()
        self._val_subnets = {}  # the routers train on: never reuse these choices

    def _report_widths(self) -> None:
        """Log each budget's realized cost and error; on rank zero also a width table and heat map."""
        from common.run_outputs import log_image, log_table, run_directory

        report = WidthReport()
        for budget in self.budgets:
            subnet = self._val_subnets.get(budget) or self.subnet_for_budget(budget, clamp=True)
            realized = self.realized(subnet)
            self.log(f"val/realized_b{budget_key(budget)}", realized)
            self.log(f"val/budget_error_b{budget_key(budget)}", abs(realized / budget - 1))
            report.add(budget, subnet, realized, self.elastic.spec)
        if self._trainer is None or not self.trainer.is_global_zero or self.trainer.sanity_checking:
            return
        log_table(self.trainer, "flextron/widths", WIDTH_COLUMNS, report.rows)
        png = run_directory(self.trainer) / f"flextron_widths_step{self.global_step}.png"
        plot_width_heatmap(report.budgets, report.mlp_ratios, report.attn_ratios, png)
        log_image(self.trainer, "flextron/widths_heatmap", png)

