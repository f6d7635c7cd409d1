"""Honesty/helpfulness stimuli: scenarios and trials of both paradigms, generated from their rules.

Plain functions of a seed (numpy only: no Lightning, torch or transformers), so the simulator, the
benchmark and the tests build stimuli without a Trainer. A *scenario* is one random decision problem
(a world of feature values and three objects, or a true time); a *trial* is a scenario under one
condition (framing, decision context, chain-of-thought or not) with its options in a recorded random
order. Every random choice flows from one seed, so a trial list is reproducible bit for bit.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from common.errors import UserFacingError
from datamodules.honesty_paradigms import (
    ALL_UTTERANCES,
    COLOURS,
    DECISION_CONTEXTS,
    FEATURES,
    TEXTURES,
    VALUES,
    Utilities,
    Utterance,
    object_name,
    object_rewards,
    signaling_utilities,
    time_options,
    time_utilities,
)

PARADIGMS: tuple[str, ...] = ("signaling", "time")
FRAMINGS: tuple[str, ...] = ("belief", "ambiguous", "utility")


# --------------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignalingScenario:
    """A world (one value per feature, in ``FEATURES`` order) and three distinct objects."""

    world: tuple[int, ...]
    objects: tuple[tuple[int, int], ...]

    def utterances(self) -> tuple[Utterance, ...]:
        """All 30 utterances, in canonical order."""
        return ALL_UTTERANCES


@dataclass(frozen=True)
class TimeScenario:
    """A true time, as minutes since 0:00 on a 12-hour clock face (never on a five-minute mark)."""

    minutes: int

    def said_minutes(self) -> list[int]:
        """Candidate utterances: exact time, the mark below, the mark above."""
        return time_options(self.minutes)


def sample_signaling_scenario(rng: np.random.Generator) -> SignalingScenario:
    """Uniform feature values; three distinct objects among the nine colour-texture combinations.

    Worlds where every object has the same reward are redrawn: the listener's choice would not
    matter and relevance could not be told apart from truth.
    """
    pairs = list(itertools.product(range(len(COLOURS)), range(len(TEXTURES))))
    while True:
        world = tuple(int(v) for v in rng.choice(VALUES, size=len(FEATURES)))
        picks = rng.choice(len(pairs), size=3, replace=False)
        objects = tuple(pairs[int(i)] for i in picks)
        if len(set(object_rewards(world, objects).tolist())) > 1:
            return SignalingScenario(world, objects)


def sample_time_scenario(rng: np.random.Generator) -> TimeScenario:
    """Hour 1..12 and 1..4 minutes past a random five-minute mark."""
    hour = int(rng.integers(1, 13))
    mark = 5 * int(rng.integers(0, 12))
    return TimeScenario(hour * 60 + mark + int(rng.integers(1, 5)))


def clock_text(minutes: int) -> str:
    """``h:mm`` on a 12-hour face (13:00 shows as 1:00)."""
    hour, minute = divmod(minutes, 60)
    hour = (hour - 1) % 12 + 1
    return f"{hour}:{minute:02d}"


# --------------------------------------------------------------------------------------------------
# Trials
# --------------------------------------------------------------------------------------------------


@dataclass
class Trial:
    """One scenario under one condition, with the options in the order they are presented.

    ``order[i]`` is the canonical index (into ``ALL_UTTERANCES`` or the time options) of the option
    shown at position ``i``; ``truth``/``relevance``/``cost`` follow the presented order.
    """

    trial_id: str
    paradigm: str
    scenario_index: int
    framing: str
    context: str | None
    cot: bool
    options: list[str]
    order: list[int]
    truth: list[float]
    relevance: list[float]
    cost: list[float]
    scenario: dict[str, Any] = field(default_factory=dict)

    @property
    def condition(self) -> str:
        """Condition key, e.g. ``"signaling/utility/direct"`` or ``"time/ambiguous/watch/cot"``."""
        parts = [self.paradigm, self.framing] + ([self.context] if self.context else [])
        return "/".join(parts + ["cot" if self.cot else "direct"])

    def utilities(self) -> Utilities:
        """The speaker model's utilities in presented order."""
        return Utilities(np.array(self.truth), np.array(self.relevance), np.array(self.cost))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly record."""
        return asdict(self) | {"condition": self.condition}


def _trial_id(*parts: Any) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:12]


def _subset(truth: np.ndarray, n_options: int | None, rng: np.random.Generator) -> np.ndarray:
    """Canonical indices of the options to present: all, or a random subset with at least one true
    and one false utterance (so there is always a conflict to resolve)."""
    idx = np.arange(len(truth))
    if n_options is None or n_options >= len(truth):
        return idx
    if n_options < 2:
        raise UserFacingError(f"n_options must be at least 2 (one true, one false), got {n_options}")
    true_idx, false_idx = idx[truth > 0], idx[truth <= 0]
    first = [int(rng.choice(true_idx)), int(rng.choice(false_idx))]
    rest = rng.choice(np.setdiff1d(idx, first), size=n_options - 2, replace=False)
    return np.array(sorted(first + [int(i) for i in rest]))


def signaling_trials(
    n_scenarios: int,
    seed: int,
    framings: Sequence[str] = FRAMINGS,
    cot: Sequence[bool] = (False,),
    n_options: int | None = None,
    beta_listener: float = 1.0,
) -> list[Trial]:
    """Signaling trials: each scenario under each framing x cot, options shuffled per trial.

    Args:
        n_scenarios: number of random worlds/contexts.
        seed: everything (worlds, objects, option subsets and orders) derives from it.
        framings: subset of ``FRAMINGS``.
        cot: which of direct (False) / chain-of-thought (True) to include.
        n_options: present this many of the 30 utterances (at least one true and one false); None
            for all 30. Small models do better with fewer, and the speaker model is fitted over the
            presented set, so the estimate stays valid.
        beta_listener: rationality of the literal listener in U_R.
    """
    _check_choices("framing", framings, FRAMINGS)
    rng = np.random.default_rng([seed, 0])
    trials = []
    for s in range(n_scenarios):
        sc = sample_signaling_scenario(rng)
        util = signaling_utilities(sc.world, sc.objects, ALL_UTTERANCES, beta_listener)
        shown = _subset(util.truth, n_options, rng)
        for framing, c in itertools.product(framings, cot):
            order = [int(i) for i in rng.permutation(shown)]
            trials.append(
                Trial(
                    trial_id=_trial_id("signaling", seed, s, framing, c),
                    paradigm="signaling",
                    scenario_index=s,
                    framing=framing,
                    context=None,
                    cot=bool(c),
                    options=[ALL_UTTERANCES[i].text for i in order],
                    order=order,
                    truth=util.truth[order].tolist(),
                    relevance=util.relevance[order].tolist(),
                    cost=util.cost[order].tolist(),
                    scenario={
                        "world": dict(zip(FEATURES, sc.world, strict=True)),
                        "objects": [object_name(o) for o in sc.objects],
                        "object_rewards": object_rewards(sc.world, sc.objects).tolist(),
                    },
                )
            )
    return trials


def time_trials(
    n_scenarios: int,
    seed: int,
    framings: Sequence[str] = ("ambiguous",),
    contexts: Sequence[str] = DECISION_CONTEXTS,
    cot: Sequence[bool] = (False,),
) -> list[Trial]:
    """Telling-the-time trials: each true time under each framing x decision context x cot."""
    _check_choices("framing", framings, FRAMINGS)
    _check_choices("decision context", contexts, DECISION_CONTEXTS)
    rng = np.random.default_rng([seed, 1])
    trials = []
    for s in range(n_scenarios):
        sc = sample_time_scenario(rng)
        said = sc.said_minutes()
        for framing, context, c in itertools.product(framings, contexts, cot):
            util = time_utilities(sc.minutes, said, context)
            order = [int(i) for i in rng.permutation(len(said))]
            trials.append(
                Trial(
                    trial_id=_trial_id("time", seed, s, framing, context, c),
                    paradigm="time",
                    scenario_index=s,
                    framing=framing,
                    context=context,
                    cot=bool(c),
                    options=[f"It's {clock_text(said[i])}." for i in order],
                    order=order,
                    truth=util.truth[order].tolist(),
                    relevance=util.relevance[order].tolist(),
                    cost=util.cost[order].tolist(),
                    scenario={
                        "true_time": clock_text(sc.minutes),
                        "minutes": sc.minutes,
                        "said_minutes": [said[i] for i in order],
                    },
                )
            )
    return trials


def _check_choices(what: str, given: Sequence[str], allowed: Sequence[str]) -> None:
    bad = [g for g in given if g not in allowed]
    if bad or not given:
        raise UserFacingError(f"unknown or empty {what} {list(given)}: choose from {list(allowed)}")
