"""How well does the honesty probe's scorer recover a planted lambda, and at what cost?

For planted speakers (lambdas off the 0.05 grid, so the grid gets no free exact hits; beta 3) it samples one choice per
generated signaling
item and fits lambda two ways in the same run:

* baseline: the grid search of the paradigm papers (lambda step 0.05 x a beta grid);
* ours: the same grid followed by L-BFGS-B with the analytic gradient.

It reports mean absolute error, fit time and their ratios per number of items. Separately it plants
a lambda in >= 100 independent runs (several lambdas x seeds, items with six options as the probe
shows them), forms the probe's 95% interval for each (BCa bootstrap over items,
``bootstrap_fit``'s default resamples) and reports the share that contains the planted value as
``ci95_coverage`` (a valid 95% interval covers about 95% of the time).

    python bench/honesty_recovery.py [--quick]
Writes bench/results/honesty_recovery.json and .png (``--quick``: honesty_recovery_quick.*).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.atomic import atomic_save_figure, atomic_write_json  # noqa: E402
from datamodules.honesty_trials import signaling_trials  # noqa: E402
from lightning_modules.probes.honesty.bootstrap import DEFAULT_N_BOOT, bootstrap_fit  # noqa: E402
from lightning_modules.probes.honesty.speaker_model import ChoiceData, fit_lambda, simulate_choices  # noqa: E402
from lightning_modules.probes.provenance import provenance  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"


def coverage(
    n_items: int, lambdas: list[float], seeds: int, n_boot: int, beta: float = 3.0, n_options: int = 6
) -> dict:
    """Share of planted runs whose 95% bootstrap interval contains the planted lambda."""
    rows, hits = [], []
    t0 = time.perf_counter()
    for lam in lambdas:
        covered = []
        for s in range(seeds):
            trials = signaling_trials(n_items, seed=10_000 + s, framings=("ambiguous",), n_options=n_options)
            utils = [t.utilities() for t in trials]
            choices = simulate_choices(utils, lam, beta, np.random.default_rng([s, int(lam * 100), 7]))
            fit = bootstrap_fit(ChoiceData.from_items(utils, choices), n_boot=n_boot, seed=s)
            covered.append(fit.lambda_ci[0] <= lam <= fit.lambda_ci[1])
        rows.append({"lambda": lam, "runs": seeds, "coverage": float(np.mean(covered))})
        hits += covered
        print(f"coverage lambda={lam:.2f}: {rows[-1]['coverage']:.2f} over {seeds} runs")
    share = stats.binomtest(int(np.sum(hits)), len(hits)).proportion_ci(confidence_level=0.95, method="wilson")
    return {
        "ci95_coverage": float(np.mean(hits)),
        "ci95_coverage_wilson95": [share.low, share.high],
        "runs": len(hits),
        "n_items": n_items,
        "n_options": n_options,
        "n_boot": n_boot,
        "ci_method": fit.to_dict()["ci_method"],
        "beta": beta,
        "by_lambda": rows,
        "seconds": time.perf_counter() - t0,
    }


def run(sizes: list[int], lambdas: list[float], seeds: int, beta: float = 3.0) -> dict:
    pool = signaling_trials(max(sizes), seed=1234, framings=("ambiguous",))
    utils_all = [t.utilities() for t in pool]
    rows = []
    for n in sizes:
        utils = utils_all[:n]
        for lam in lambdas:
            err = {"grid": [], "refined": []}
            secs = {"grid": 0.0, "refined": 0.0}
            for s in range(seeds):
                choices = simulate_choices(utils, lam, beta, np.random.default_rng([s, n, int(lam * 100)]))
                data = ChoiceData.from_items(utils, choices)
                for name, refine in (("grid", False), ("refined", True)):
                    t0 = time.perf_counter()
                    fit = fit_lambda(data, refine=refine)
                    secs[name] += time.perf_counter() - t0
                    err[name].append(abs(fit.lambda_hat - lam))
            row = {
                "n_items": n,
                "lambda": lam,
                "seeds": seeds,
                "mae_grid": float(np.mean(err["grid"])),
                "mae_refined": float(np.mean(err["refined"])),
                "max_err_refined": float(np.max(err["refined"])),
                "sec_per_fit_grid": secs["grid"] / seeds,
                "sec_per_fit_refined": secs["refined"] / seeds,
            }
            row["mae_ratio_refined_over_grid"] = row["mae_refined"] / max(row["mae_grid"], 1e-12)
            row["time_ratio_refined_over_grid"] = row["sec_per_fit_refined"] / row["sec_per_fit_grid"]
            rows.append(row)
            print(
                f"n={n:5d} lambda={lam:.2f}  MAE grid {row['mae_grid']:.4f}  refined {row['mae_refined']:.4f} "
                f"(x{row['mae_ratio_refined_over_grid']:.2f})  fit {row['sec_per_fit_grid'] * 1e3:.1f} ms vs "
                f"{row['sec_per_fit_refined'] * 1e3:.1f} ms (x{row['time_ratio_refined_over_grid']:.2f})"
            )
    return {"beta": beta, "rows": rows}


def plot(result: dict, path: Path) -> None:

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = sorted({r["n_items"] for r in result["rows"]})
    for key, style in (("mae_grid", "o--"), ("mae_refined", "s-")):
        ax.plot(
            sizes,
            [np.mean([r[key] for r in result["rows"] if r["n_items"] == n]) for n in sizes],
            style,
            label=key.replace("mae_", ""),
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("items (one simulated choice each)")
    ax.set_ylabel("mean |lambda_hat - lambda|")
    ax.axhline(0.05, color="gray", lw=0.8, ls=":")
    ax.set_title("Planted-lambda recovery: grid vs refined ML fit")
    ax.legend()
    atomic_save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few sizes and seeds (a minute or two)")
    args = parser.parse_args()
    started = provenance(seeds={"trials": "10000 + run", "choices": "[run, 100 * lambda, 7]"})  # the code that runs
    if args.quick:
        covered = coverage(250, [0.33, 0.71], seeds=5, n_boot=200)
        result = run([250, 1000], [0.33, 0.71], seeds=4)
    else:
        covered = coverage(250, [0.12, 0.33, 0.57, 0.71, 0.88], seeds=40, n_boot=DEFAULT_N_BOOT)
        result = run([250, 500, 1000, 2000], [0.12, 0.33, 0.57, 0.71, 0.88], seeds=10)
    result["coverage"] = covered
    result["ci95_coverage"] = result["coverage"]["ci95_coverage"]
    result["quick"] = args.quick
    result["provenance"] = started
    OUT.mkdir(parents=True, exist_ok=True)
    name = "honesty_recovery_quick" if args.quick else "honesty_recovery"
    atomic_write_json(OUT / f"{name}.json", result)
    plot(result, OUT / f"{name}.png")
    print(f"wrote {OUT / name}.json and .png (ci95_coverage {result['ci95_coverage']:.3f})")


if __name__ == "__main__":
    main()
