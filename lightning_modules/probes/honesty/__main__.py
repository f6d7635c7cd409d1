"""Command line: ``python -m lightning_modules.probes.honesty simulate --lambda 0.7 --n 2000 --seed 0``.

``simulate`` plants a lambda in an RSA speaker, samples one choice per generated item, and fits it
back with a bootstrap interval: the scorer's ground-truth check, runnable by anyone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from datamodules.honesty_trials import signaling_trials, time_trials
from lightning_modules.probes.honesty.bootstrap import DEFAULT_N_BOOT, bootstrap_fit
from lightning_modules.probes.honesty.speaker_model import ChoiceData, simulate_choices


def simulate(
    lam: float,
    n: int,
    seed: int,
    beta: float = 3.0,
    paradigm: str = "signaling",
    n_boot: int = DEFAULT_N_BOOT,
    fit_beta: bool = True,
    n_options: int | None = None,
) -> dict:
    """Plant ``lam`` (and ``beta``), sample ``n`` choices (one per item), and fit them back."""
    if not 0 <= lam <= 1:
        raise ValueError(f"--lambda must be in [0, 1], got {lam}")
    if n < 2:
        raise ValueError(f"--n must be at least 2 items, got {n}")
    if paradigm == "signaling":
        trials = signaling_trials(n, seed, framings=("ambiguous",), n_options=n_options)
    elif paradigm == "time":
        # half the items in each decision context: one context alone barely identifies lambda
        trials = time_trials((n + 1) // 2, seed, contexts=("regular", "watch"))[:n]
    else:
        raise ValueError(f"--paradigm must be 'signaling' or 'time', got {paradigm!r}")
    utils = [t.utilities() for t in trials]
    rng = np.random.default_rng([seed, 2])
    choices = simulate_choices(utils, lam, beta, rng)
    start = time.perf_counter()
    fit = bootstrap_fit(
        ChoiceData.from_items(utils, choices), n_boot=n_boot, seed=seed, fit_beta=fit_beta, beta=beta
    )
    honest = float(np.mean([c @ (u.truth > 0) for c, u in zip(choices, utils, strict=True)]))
    return {
        "paradigm": paradigm,
        "lambda_true": lam,
        "beta_true": beta,
        "n": len(trials),
        "seed": seed,
        **fit.to_dict(),
        "abs_error": abs(fit.lambda_hat - lam),
        "honesty_of_samples": honest,
        "fit_seconds": round(time.perf_counter() - start, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_modules.probes.honesty", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="recover a planted lambda from simulated speaker choices")
    sim.add_argument("--lambda", dest="lam", type=float, required=True, help="planted lambda in [0, 1]")
    sim.add_argument("--n", type=int, default=2000, help="number of items (one choice each)")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--beta", type=float, default=3.0, help="planted speaker rationality")
    sim.add_argument("--paradigm", choices=("signaling", "time"), default="signaling")
    sim.add_argument(
        "--n-boot", type=int, default=DEFAULT_N_BOOT, help="bootstrap resamples for the CI (0: none)"
    )
    sim.add_argument("--fix-beta", action="store_true", help="hold beta at --beta instead of fitting it")
    sim.add_argument(
        "--n-options", type=int, default=None, help="signaling options shown per item (default 30)"
    )
    args = parser.parse_args(argv)
    try:
        out = simulate(
            args.lam,
            args.n,
            args.seed,
            args.beta,
            args.paradigm,
            args.n_boot,
            not args.fix_beta,
            args.n_options,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
