"""SIGKILL a training process at random instants, half of them inside a save: every checkpoint it had
saved still loads, last.ckpt exists, and the next run resumes from it (4 trials, about a minute: each
trial starts a process; the >= 20-trial campaign is bench/excp_safety.py)."""

from __future__ import annotations

import random

from tests.excp_kill_driver import finish, run_trial


def test_kill_at_random_instants_loses_nothing(tmp_path):
    rng = random.Random(0)
    saved: set[str] = set()
    trials = [run_trial(tmp_path, rng, inside_save=i % 2 == 0, saved=saved) for i in range(4)]
    for trial in trials:
        assert not trial.lost, trial.lost
        assert trial.loadable == trial.expected
        assert trial.last_step is not None
    # each run resumed exactly where the previous kill left last.ckpt
    for before, after in zip(trials, trials[1:], strict=False):
        assert after.resumed_from == before.last_step
    resumed_from, final = finish(tmp_path)
    assert resumed_from == trials[-1].last_step and final == resumed_from + 3
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # cleaned at the next start
