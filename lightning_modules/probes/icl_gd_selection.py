"""Choose GD's step size per model and task on held-out data, by a stated rule (no Lightning).

A step size that barely moves the model makes "ICL agrees with GD" mean "ICL agrees with zero-shot";
one that is too large collapses every prediction onto one label word. Neither measures GD learning
the task, and the right value differs between models and tasks by orders of magnitude. So for each
(model variant, task) the probe tries a small grid of learning rates x epochs and picks one on a dev
set that is disjoint from the test set (``datamodules.icl_tasks.GDSelectionData``):

1. For every candidate and every N of the sweep, fine-tune on each of that N's selection
   demonstration sets (``n_selection_sets`` draws) and predict the dev set; accuracy and the share of
   zero-shot dev predictions changed are averaged over the draws. Only N >= ``MIN_MOVE_N`` count (with
   one or two demonstrations GD may rightly move little, or rightly copy the one label it saw); when
   the sweep has no such N, every N counts.
2. A candidate *moves* the model when, at every counted N, it changes at least ``MIN_CHANGED`` (20%)
   of the zero-shot dev predictions, and *collapses* when for some counted N and draw all dev
   predictions are one label.
3. Among candidates that move and never collapse, keep those whose dev accuracy (averaged over the
   counted N) is within one standard error of the best one's (``sqrt(p (1 - p) / n)``, n = dev
   examples x counted N): on a few dozen dev examples they are equally accurate. Of those, pick the
   one that moves the model most (the largest smallest-changed share; ties: the smaller learning
   rate, then fewer epochs). Among equally accurate step sizes the stronger update is the one that
   learned most from the demonstrations, which is what ICL is compared with; taking the weakest would
   pull "GD" back towards zero-shot. If none qualifies, pick the highest dev accuracy among all
   candidates and mark the choice ``fallback`` (the report flags it).

The random-init control model uses the step size chosen for the pretrained model on the same task, so
the control differs from the measurement in its weights only (and its chance-level dev accuracy would
make a choice of its own noise).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from datamodules.icl_tasks import Example, GDSelectionData
from lightning_modules.probes.icl_finetune import GDConfig

MIN_CHANGED = 0.20
"""A step size qualifies only if GD changes at least this share of zero-shot dev predictions: an update
that leaves (nearly) all of them as they were makes ICL-vs-GD a comparison of ICL with zero-shot."""

MIN_MOVE_N = 4
"""Smallest N whose dev results the rule counts: with 1-2 demos GD may rightly move little, or rightly
predict the one label it was shown."""


@dataclass(frozen=True)
class Candidate:
    """One grid point's dev results per N (accuracy and changed share averaged over the draws)."""

    lr: float
    epochs: int
    dev_accuracy: dict[int, float]
    dev_changed: dict[int, float]
    dev_collapsed: dict[int, bool]

    def _counted(self) -> list[int]:
        return [n for n in self.dev_accuracy if n >= MIN_MOVE_N] or list(self.dev_accuracy)

    @property
    def mean_accuracy(self) -> float:
        counted = self._counted()
        return sum(self.dev_accuracy[n] for n in counted) / len(counted)

    @property
    def min_changed(self) -> float:
        return min(self.dev_changed[n] for n in self._counted())

    @property
    def collapsed(self) -> bool:
        return any(self.dev_collapsed[n] for n in self._counted())

    def as_dict(self) -> dict:
        return {
            "lr": self.lr,
            "epochs": self.epochs,
            "dev_accuracy": {str(n): v for n, v in self.dev_accuracy.items()},
            "dev_changed_vs_zero_shot": {str(n): v for n, v in self.dev_changed.items()},
            "dev_collapsed": {str(n): v for n, v in self.dev_collapsed.items()},
            "counted_n": self._counted(),
            "mean_dev_accuracy": self.mean_accuracy,
            "min_dev_changed": self.min_changed,
        }


def choose(candidates: Sequence[Candidate], n_dev: int) -> tuple[Candidate, bool]:
    """The rule in the module docstring: ``(chosen, fallback)``."""
    if not candidates:
        raise ValueError("GD step-size selection needs at least one candidate")
    qualified = [c for c in candidates if c.min_changed >= MIN_CHANGED and not c.collapsed]
    if not qualified:
        return max(candidates, key=lambda c: (round(c.mean_accuracy, 12), -c.lr, -c.epochs)), True
    best = max(c.mean_accuracy for c in qualified)
    n = max(1, n_dev * len(qualified[0].as_dict()["counted_n"]))
    tolerance = math.sqrt(best * (1 - best) / n)
    equal = [c for c in qualified if c.mean_accuracy >= best - tolerance - 1e-12]
    return max(equal, key=lambda c: (round(c.min_changed, 12), -c.lr, -c.epochs)), False


def collapsed(preds: torch.Tensor) -> bool:
    """All predictions are the same label (more than one example)."""
    return len(preds) > 1 and bool((preds == preds[0]).all())


def select_gd(
    base: GDConfig,
    lr_grid: Sequence[float],
    epochs_grid: Sequence[int],
    data: GDSelectionData,
    predict_zero_shot: Callable[[list[Example]], torch.Tensor],
    predict_after_gd: Callable[[GDConfig, list[Example], list[Example]], torch.Tensor],
) -> dict:
    """Run the grid and return the selection record (its ``config`` is the GDConfig to use).

    Args:
        base: Mode, parameters and K/V pattern to keep; only ``lr`` and ``epochs`` are searched.
        lr_grid: Learning rates to try.
        epochs_grid: Epoch counts to try.
        data: The task's dev set and per-N selection demonstrations.
        predict_zero_shot: ``dev -> predictions`` of the untouched model.
        predict_after_gd: ``(config, demos, dev) -> predictions`` after GD on ``demos``.
    """
    if not data.demos:
        raise ValueError("GD step-size selection needs at least one N > 0 in the sweep")
    labels = torch.tensor([e.label for e in data.dev])
    n_sets = max(len(draws) for draws in data.demos.values())
    zs = predict_zero_shot(data.dev)
    candidates = []
    for lr in lr_grid:
        for epochs in epochs_grid:
            cfg = replace(base, lr=float(lr), epochs=int(epochs), preset=None)
            acc, changed, coll = {}, {}, {}
            for n, draws in sorted(data.demos.items()):
                runs = [predict_after_gd(cfg, demos, data.dev) for demos in draws]
                acc[n] = sum(float((p == labels).double().mean()) for p in runs) / len(runs)
                changed[n] = sum(float((p != zs).double().mean()) for p in runs) / len(runs)
                coll[n] = any(collapsed(p) for p in runs)
            candidates.append(Candidate(float(lr), int(epochs), acc, changed, coll))
    best, fallback = choose(candidates, len(data.dev))
    return {
        "rule": (
            f"among candidates changing >= {MIN_CHANGED:.0%} of zero-shot dev predictions at every N >= "
            f"{MIN_MOVE_N} without collapsing to one label (averaged over {n_sets} demonstration set(s) per N), "
            f"the one that changes most among those within one standard error of the best dev accuracy"
        ),
        "n_dev": len(data.dev),
        "n_selection_sets": n_sets,
        "dev_indices": [e.index for e in data.dev],
        "dev_accuracy_zero_shot": float((zs == labels).double().mean()),
        "grid": [c.as_dict() for c in candidates],
        "selected": {"lr": best.lr, "epochs": best.epochs},
        "fallback": fallback,
        "config": replace(base, lr=best.lr, epochs=best.epochs, preset=None),
    }
