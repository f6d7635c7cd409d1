"""Choose GD's step size per model and task on held-out data, by a stated rule (no Lightning).

A step size that barely moves the model makes "ICL agrees with GD" mean "ICL agrees with zero-shot";
one that is too large collapses every prediction onto one label word. Neither measures GD learning
the task, and the right value differs between models and tasks by orders of magnitude. So for each
(model variant, task) the probe tries a small grid of learning rates x epochs and picks one on a dev
set that is disjoint from the test set (``datamodules.icl_tasks.GDSelectionData``):

1. For every candidate and every N >= ``MIN_MOVE_N`` of the sweep, fine-tune on each of that N's
   selection demonstration sets (``n_selection_sets`` draws) and predict the dev set; accuracy and the
   share of zero-shot dev predictions changed are averaged over the draws. Smaller N are not run (with
   one or two demonstrations GD may rightly move little, or rightly copy the one label it saw); when
   the sweep has no N >= ``MIN_MOVE_N``, every N counts.
2. A candidate *moves* the model when, at every counted N, it changes at least
   ``required_dev_changed(n_test)`` of the zero-shot dev predictions. The goal is that GD changes at
   least ``MIN_CHANGED`` (20%) of the zero-shot predictions in every *test* unit; a test unit has only
   ``n_test`` queries, so a step size whose true share is just over 20% lands under it about half the
   time. The dev requirement is therefore the share at which a unit of ``n_test`` queries still
   changes >= 20% with probability 0.9 (binomial; 30.6% for 32 queries, 24.8% for 128, 21.6% for
   1000). This margin covers the test unit's query sample only, not the difference between its
   demonstrations and the selection draws. A candidate *collapses* when for some counted N and draw
   all dev predictions are one label; a collapsed candidate is never chosen. It is *below zero-shot*
   (``harmful``) when its dev accuracy is more than ``max_accuracy_loss_se`` (default 2) standard
   errors below zero-shot's.
3. Among candidates that move and are neither collapsed nor below zero-shot, keep those whose dev
   accuracy (averaged over the counted N) is within one standard error of the best one's (``sqrt(p (1
   - p) / n)``, n = dev examples x counted N): on a few dozen dev examples they are equally accurate. Of
   those, pick the one that moves the model most (the largest smallest-changed share; ties: the
   smaller learning rate, then fewer epochs). Among equally accurate step sizes the stronger update is
   the one that learned most from the demonstrations, which is what ICL is compared with; taking the
   weakest would pull "GD" back towards zero-shot.
4. If none qualifies, step 3 runs again with the below-zero-shot candidates admitted (never a collapsed
   one); then both again with the bare ``MIN_CHANGED`` instead of the margin; if nothing qualifies at
   all, the candidate with the highest dev accuracy is taken. Moving comes before the accuracy floor
   because moving is what the comparison needs: a GD that changes almost no prediction turns "ICL
   agrees with GD" into "ICL agrees with zero-shot", whereas a GD that moves the model and costs
   accuracy is still what gradient descent on these demonstrations does, and that is what ICL is
   compared with. (On SmolLM2-135M-Instruct every step size that changes MR's predictions lowers its
   accuracy: a few steps on 4-8 demonstrations mostly shift the prior between the label words.) The
   cost is reported, not hidden: ``met`` names the move requirement that held (``margin``,
   ``min_changed`` or None; anything but ``margin`` is marked ``fallback``), and ``below_zero_shot``
   says that the chosen step size lost accuracy on dev; the summary table flags both.

The probe may also run the rule for one unit alone, with that unit's own demonstrations as the only
draw (``ICLvsGDProbe(gd_select_per_unit=True)``): how far GD moves depends on the demonstration set about
as much as on the step size, so a choice made on other draws can collapse the unit it is used for.

The random-init control model uses the step size chosen for the pretrained model on the same task, so
the control differs from the measurement in its weights only (and its chance-level dev accuracy would
make a choice of its own noise).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from scipy.stats import beta

from datamodules.icl_tasks import Example, GDSelectionData
from lightning_modules.probes.icl_finetune import GDConfig

MIN_CHANGED = 0.20
"""GD should change at least this share of the zero-shot predictions in every test unit with N >=
``MIN_MOVE_N``: an update that leaves (nearly) all of them as they were makes ICL-vs-GD a comparison of
ICL with zero-shot."""

MIN_MOVE_N = 4
"""Smallest N whose dev results the rule counts: with 1-2 demos GD may rightly move little, or rightly
predict the one label it was shown."""

TEST_CONFIDENCE = 0.9
"""Probability with which a test unit should reach ``MIN_CHANGED`` if its true changed share is the one
required on dev (see ``required_dev_changed``)."""


MAX_ACCURACY_LOSS_SE = 2.0
"""Default of ``select_gd``'s ``max_accuracy_loss_se``: a candidate whose dev accuracy is more than this
many standard errors below zero-shot's is *below zero-shot*: chosen only when no other candidate moves
the model (module docstring, step 4), and then flagged. A GD that makes the model clearly worse than no
GD has not learned the task from the demonstrations (on SmolLM2, the step sizes that move MR's
predictions push them towards one label)."""


def required_dev_changed(n_test: int | None) -> float:
    """The changed share a step size needs on dev so that a test unit of ``n_test`` queries changes at
    least ``MIN_CHANGED`` of them with probability ``TEST_CONFIDENCE``.

    The unit's count of changed predictions is modelled as Binomial(n_test, p); it reaches ``MIN_CHANGED``
    when it is at least ``k = ceil(MIN_CHANGED * n_test)``, and ``P(X >= k) = 0.9`` solves in closed
    form through the beta distribution (``P(X <= k - 1) = 1 - I_p(k, n - k + 1)``). ``None``: no margin.
    """
    if not n_test:
        return MIN_CHANGED
    k = max(1, math.ceil(MIN_CHANGED * n_test - 1e-9))
    return max(MIN_CHANGED, float(beta.ppf(TEST_CONFIDENCE, k, n_test - k + 1)))


def counted_n(ns: Sequence[int]) -> list[int]:
    """The N the rule counts (and runs): those >= ``MIN_MOVE_N``, or all when there are none."""
    return sorted(n for n in ns if n >= MIN_MOVE_N) or sorted(ns)


@dataclass(frozen=True)
class Candidate:
    """One grid point's dev results per counted N (accuracy and changed share averaged over the draws)."""

    lr: float
    epochs: int
    dev_accuracy: dict[int, float]
    dev_changed: dict[int, float]
    dev_collapsed: dict[int, bool]

    @property
    def counted(self) -> list[int]:
        return counted_n(list(self.dev_accuracy))

    @property
    def mean_accuracy(self) -> float:
        counted = self.counted
        return sum(self.dev_accuracy[n] for n in counted) / len(counted)

    @property
    def min_changed(self) -> float:
        return min(self.dev_changed[n] for n in self.counted)

    @property
    def collapsed(self) -> bool:
        return any(self.dev_collapsed[n] for n in self.counted)

    def as_dict(self) -> dict:
        return {
            "lr": self.lr,
            "epochs": self.epochs,
            "dev_accuracy": {str(n): v for n, v in self.dev_accuracy.items()},
            "dev_changed_vs_zero_shot": {str(n): v for n, v in self.dev_changed.items()},
            "dev_collapsed": {str(n): v for n, v in self.dev_collapsed.items()},
            "counted_n": self.counted,
            "mean_dev_accuracy": self.mean_accuracy,
            "min_dev_changed": self.min_changed,
        }


def standard_error(accuracy: float, n_dev: int, candidate: Candidate) -> float:
    """``sqrt(p (1 - p) / n)`` of a dev accuracy, n = dev examples x the N the rule counts."""
    n = max(1, n_dev * len(candidate.counted))
    return math.sqrt(accuracy * (1 - accuracy) / n)


def _most_moving_of_the_accurate(qualified: list[Candidate], n_dev: int) -> Candidate:
    """Step 3 of the rule: the largest move among those within one standard error of the best accuracy."""
    best = max(qualified, key=lambda c: c.mean_accuracy)
    tolerance = standard_error(best.mean_accuracy, n_dev, best)
    equal = [c for c in qualified if c.mean_accuracy >= best.mean_accuracy - tolerance - 1e-12]
    return max(equal, key=lambda c: (round(c.min_changed, 12), -c.lr, -c.epochs))


def harmful(
    candidate: Candidate, n_dev: int, zero_shot_accuracy: float | None, max_loss_se: float | None = MAX_ACCURACY_LOSS_SE
) -> bool:
    """GD made the model clearly less accurate on dev than no GD at all: more than ``max_loss_se``
    standard errors (of the zero-shot accuracy, as in step 3) below it. None on either side: never."""
    if zero_shot_accuracy is None or max_loss_se is None:
        return False
    floor = zero_shot_accuracy - max_loss_se * standard_error(zero_shot_accuracy, n_dev, candidate)
    return candidate.mean_accuracy < floor - 1e-12


def choose(
    candidates: Sequence[Candidate],
    n_dev: int,
    required: float = MIN_CHANGED,
    zero_shot_accuracy: float | None = None,
    max_accuracy_loss_se: float | None = MAX_ACCURACY_LOSS_SE,
) -> tuple[Candidate, str | None]:
    """The rule in the module docstring: ``(chosen, met)``.

    ``met`` is ``"margin"`` when the chosen step size changes ``required`` of the dev predictions at
    every counted N, ``"min_changed"`` when only ``MIN_CHANGED`` held for any non-collapsed candidate,
    None when none moved enough without collapsing (the most accurate one is returned). Within each
    requirement, candidates above the accuracy floor (``zero_shot_accuracy`` on dev and
    ``max_accuracy_loss_se``; None: no floor) come first; whether the chosen one is below it is
    ``harmful(chosen, ...)``.
    """
    if not candidates:
        raise ValueError("GD step-size selection needs at least one candidate")
    intact = [c for c in candidates if not c.collapsed]
    above_floor = [c for c in intact if not harmful(c, n_dev, zero_shot_accuracy, max_accuracy_loss_se)]
    tiers = [("margin", required)] + ([("min_changed", MIN_CHANGED)] if required > MIN_CHANGED else [])
    for met, threshold in tiers:
        for admitted in (above_floor, intact):
            qualified = [c for c in admitted if c.min_changed >= threshold - 1e-12]
            if qualified:
                return _most_moving_of_the_accurate(qualified, n_dev), met
    return max(candidates, key=lambda c: (round(c.mean_accuracy, 12), -c.lr, -c.epochs)), None


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
    n_test: int | None = None,
    max_accuracy_loss_se: float | None = MAX_ACCURACY_LOSS_SE,
) -> dict:
    """Run the grid and return the selection record (its ``config`` is the GDConfig to use).

    Args:
        base: Mode, parameters and K/V pattern to keep; only ``lr`` and ``epochs`` are searched.
        lr_grid: Learning rates to try.
        epochs_grid: Epoch counts to try.
        data: The task's dev set and per-N selection demonstrations.
        predict_zero_shot: ``dev -> predictions`` of the untouched model.
        predict_after_gd: ``(config, demos, dev) -> predictions`` after GD on ``demos``.
        n_test: Queries per test unit; sets the dev margin (``required_dev_changed``). None: no margin.
        max_accuracy_loss_se: The accuracy floor of step 2 in standard errors below zero-shot; None: off.
    """
    if not data.demos:
        raise ValueError("GD step-size selection needs at least one N > 0 in the sweep")
    labels = torch.tensor([e.label for e in data.dev])
    ns = counted_n(list(data.demos))
    n_sets = max(len(data.demos[n]) for n in ns)
    required = required_dev_changed(n_test)
    zs = predict_zero_shot(data.dev)
    candidates = []
    for lr in lr_grid:
        for epochs in epochs_grid:
            cfg = replace(base, lr=float(lr), epochs=int(epochs), preset=None)
            acc, changed, coll = {}, {}, {}
            for n in ns:
                runs = [predict_after_gd(cfg, demos, data.dev) for demos in data.demos[n]]
                acc[n] = sum(float((p == labels).double().mean()) for p in runs) / len(runs)
                changed[n] = sum(float((p != zs).double().mean()) for p in runs) / len(runs)
                coll[n] = any(collapsed(p) for p in runs)
            candidates.append(Candidate(float(lr), int(epochs), acc, changed, coll))
    zs_accuracy = float((zs == labels).double().mean())
    best, met = choose(candidates, len(data.dev), required, zs_accuracy, max_accuracy_loss_se)
    return {
        "rule": (
            f"among candidates changing >= {required:.1%} of zero-shot dev predictions at every N in {ns} "
            f"(so a {n_test}-query test unit changes >= {MIN_CHANGED:.0%} with probability {TEST_CONFIDENCE:g}) "
            f"without collapsing to one label"
            + (f", preferring those within {max_accuracy_loss_se:g} standard errors of zero-shot dev "
               "accuracy" if max_accuracy_loss_se is not None else "")
            + f" (averaged over {n_sets} demonstration set(s) per N), the one that changes "
            f"most among those within one standard error of the best dev accuracy; else the same with >= "
            f"{MIN_CHANGED:.0%}; else the most accurate (fallback)"
        ),
        "n_dev": len(data.dev),
        "n_selection_sets": n_sets,
        "n_test": n_test,
        "required_dev_changed": required,
        "max_accuracy_loss_se": max_accuracy_loss_se,
        "dev_indices": [e.index for e in data.dev],
        "dev_accuracy_zero_shot": zs_accuracy,
        "grid": [
            c.as_dict() | {"harmful": harmful(c, len(data.dev), zs_accuracy, max_accuracy_loss_se)} for c in candidates
        ],
        "selected": {"lr": best.lr, "epochs": best.epochs},
        "met": met,
        "fallback": met != "margin",
        "below_zero_shot": harmful(best, len(data.dev), zs_accuracy, max_accuracy_loss_se),
        "config": replace(base, lr=best.lr, epochs=best.epochs, preset=None),
    }
