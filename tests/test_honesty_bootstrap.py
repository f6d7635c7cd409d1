"""The batched bootstrap refit finds the same maximum as the general optimiser, and intervals are stated."""

import numpy as np
import pytest

from datamodules.honesty_trials import signaling_trials
from lightning_modules.probes.honesty.bootstrap import DEFAULT_N_BOOT, bootstrap_fit, refit_resamples
from lightning_modules.probes.honesty.speaker_model import ChoiceData, fit_lambda, simulate_choices


@pytest.mark.parametrize("fit_beta", [True, False])
def test_batched_refit_matches_lbfgs(fit_beta):
    utils = [t.utilities() for t in signaling_trials(120, seed=3, framings=("ambiguous",), n_options=6)]
    data = ChoiceData.from_items(utils, simulate_choices(utils, 0.4, 3.0, np.random.default_rng(0)))
    full = fit_lambda(data, fit_beta=fit_beta, beta=3.0)
    start = (full.lambda_hat, full.beta_hat)
    index = np.random.default_rng(1).integers(0, len(data), (12, len(data)))
    batched = refit_resamples(data, index, start, fit_beta=fit_beta, beta=3.0)
    for b, row in enumerate(index):
        ref = fit_lambda(data.subset(row), fit_beta=fit_beta, beta=3.0, init=start)
        assert batched[0, b] == pytest.approx(ref.lambda_hat, abs=1e-4)
        assert batched[1, b] == pytest.approx(ref.beta_hat, rel=1e-3)


def test_interval_method_and_default_resamples_are_recorded():
    assert DEFAULT_N_BOOT >= 1000
    utils = [t.utilities() for t in signaling_trials(60, seed=4, framings=("ambiguous",), n_options=6)]
    data = ChoiceData.from_items(utils, simulate_choices(utils, 0.6, 3.0, np.random.default_rng(5)))
    fit = bootstrap_fit(data, n_boot=200, seed=0).to_dict()
    assert "BCa" in fit["ci_method"] and fit["n_boot"] == 200
    assert fit["lambda_ci"][0] <= fit["lambda_hat"] <= fit["lambda_ci"][1]


def test_an_estimate_on_its_bound_still_gets_a_finite_interval():
    """Always the most truthful cheap option: lambda_hat = 0 on every jackknife sample, where BCa is undefined."""
    utils = [t.utilities() for t in signaling_trials(40, seed=4, framings=("ambiguous",), n_options=6)]
    choices = [np.eye(len(u.truth))[int(np.argmax(u.truth - u.cost - 1e-3 * u.relevance))] for u in utils]
    fit = bootstrap_fit(ChoiceData.from_items(utils, choices), n_boot=200, seed=0).to_dict()
    assert fit["lambda_hat"] == 0.0
    assert all(np.isfinite(fit["lambda_ci"])) and all(np.isfinite(fit["beta_ci"]))
    assert fit["lambda_ci"][0] <= fit["lambda_hat"] <= fit["lambda_ci"][1]
    assert "percentile for lambda" in fit["ci_method"]
