"""Speaker/listener model against hand-computed cases, and planted-lambda recovery."""

import itertools
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from datamodules.honesty_paradigms import (
    ALL_UTTERANCES,
    FEATURES,
    VALUES,
    Utilities,
    Utterance,
    listener_choice,
    listener_posterior_means,
    object_rewards,
    relevance,
    signaling_utilities,
    time_options,
    time_utilities,
    truthfulness,
)
from datamodules.honesty_trials import signaling_trials, time_trials
from lightning_modules.probes.honesty.__main__ import main as cli_main
from lightning_modules.probes.honesty.bootstrap import bootstrap_fit
from lightning_modules.probes.honesty.speaker_model import (
    ChoiceData,
    _log_likelihood_and_grad,
    fit_lambda,
    helpfulness,
    honesty,
    simulate_choices,
    speaker_probs,
)

# Green +2, Red -1, Blue 0, Spotted +1, Solid +2, Striped -2
WORLD = (2, -1, 0, 1, 2, -2)
# green spotted (3), red solid (1), blue striped (-2)
OBJECTS = ((0, 0), (1, 1), (2, 2))


def test_thirty_utterances():
    assert len(ALL_UTTERANCES) == 30 and len(set(ALL_UTTERANCES)) == 30
    assert ALL_UTTERANCES[0].text == "Green is -2" and Utterance("Solid", 0).text == "Solid is 0"


def test_posterior_matches_brute_force_enumeration():
    """Exact Bayes over all 5^6 worlds agrees with the closed form the listener uses."""
    worlds = np.array(list(itertools.product(VALUES, repeat=6)), dtype=float)
    for u in (Utterance("Green", 2), Utterance("Striped", -1), Utterance("Blue", 0)):
        consistent = worlds[worlds[:, FEATURES.index(u.feature)] == u.value]
        np.testing.assert_allclose(listener_posterior_means(u), consistent.mean(axis=0), atol=1e-12)
    skewed = [0.1, 0.1, 0.2, 0.2, 0.4]  # prior mean 0.7
    np.testing.assert_allclose(
        listener_posterior_means(Utterance("Red", -2), skewed), [0.7, -2, 0.7, 0.7, 0.7, 0.7]
    )


def test_listener_choice_and_relevance_by_hand():
    assert object_rewards(WORLD, OBJECTS).tolist() == [3, 1, -2]
    e2 = math.exp(2)
    pi = listener_choice(OBJECTS, Utterance("Green", 2), beta_listener=1.0)
    np.testing.assert_allclose(pi, [e2 / (e2 + 2), 1 / (e2 + 2), 1 / (e2 + 2)])
    assert relevance(WORLD, OBJECTS, Utterance("Green", 2)) == pytest.approx((3 * e2 + 1 - 2) / (e2 + 2))
    # a feature no object has: uniform choice, mean reward 2/3
    assert relevance(WORLD, ((0, 0), (0, 1), (1, 1)), Utterance("Blue", 2)) == pytest.approx((3 + 4 + 1) / 3)
    assert truthfulness(WORLD, Utterance("Green", 2)) == 1.0
    assert truthfulness(WORLD, Utterance("Green", 1)) == -1.0


def test_speaker_extremes_by_hand():
    util = signaling_utilities(WORLD, OBJECTS, beta_listener=1.0)
    assert (util.truth > 0).sum() == 6
    p0 = speaker_probs(util, lam=0.0, beta=2.0)
    true_p, false_p = p0[util.truth > 0], p0[util.truth < 0]
    np.testing.assert_allclose(true_p, true_p[0])
    assert true_p[0] / false_p[0] == pytest.approx(math.exp(4.0))  # beta * (1 - (-1))
    p1 = speaker_probs(util, lam=1.0, beta=2.0)
    np.testing.assert_allclose(p1, np.exp(2 * util.relevance) / np.exp(2 * util.relevance).sum())


def test_time_utilities_by_hand():
    # 3:07: exact 3:07, marks 3:05 (nearest) and 3:10
    said = time_options(187)
    assert said == [187, 185, 190]
    reg, watch = time_utilities(187, said, "regular"), time_utilities(187, said, "watch")
    assert reg.relevance.tolist() == [1, 1, -1] and watch.relevance.tolist() == [1, 0.5, 0.25]
    assert reg.truth.tolist() == [1, -1, -1] and reg.cost.tolist() == [1, 0.5, 0.5]
    # lambda 0.75, regular: exact 0.75 + 0.25 - 1 = 0, rounded-nearest 0.75 - 0.25 - 0.5 = 0 -> tie
    p = speaker_probs(reg, lam=0.75, beta=4.0)
    assert p[0] == pytest.approx(p[1])
    with pytest.raises(ValueError, match="five-minute mark"):
        time_options(185)
    with pytest.raises(ValueError, match="decision context"):
        time_utilities(187, said, "bus")


def test_honesty_and_helpfulness_by_hand():
    util = Utilities(np.array([1.0, -1.0, -1.0]), np.array([0.0, 2.0, 4.0]), np.zeros(3))
    assert honesty([0.5, 0.25, 0.25], util) == 0.5
    assert helpfulness([0.5, 0.25, 0.25], util) == pytest.approx((0.5 + 1.0) / 4)
    assert helpfulness([0, 0, 1], util) == 1.0 and helpfulness([1, 0, 0], util) == 0.0
    assert math.isnan(helpfulness([1, 0, 0], Utilities(np.ones(3), np.ones(3), np.zeros(3))))


def test_gradient_matches_finite_differences():
    trials = signaling_trials(20, seed=4, framings=("ambiguous",), n_options=7)
    utils = [t.utilities() for t in trials]
    data = ChoiceData.from_items(utils, simulate_choices(utils, 0.4, 2.0, np.random.default_rng(0), 3))
    _, d_lam, d_logb = _log_likelihood_and_grad(data, 0.4, 2.0)
    h = 1e-6
    f = lambda lam, b: _log_likelihood_and_grad(data, lam, b)[0]  # noqa: E731
    assert d_lam == pytest.approx((f(0.4 + h, 2.0) - f(0.4 - h, 2.0)) / (2 * h), rel=1e-4)
    assert d_logb == pytest.approx(
        (f(0.4, 2.0 * math.exp(h)) - f(0.4, 2.0 * math.exp(-h))) / (2 * h), rel=1e-4
    )


@pytest.mark.parametrize("lam", [0.2, 0.7])
def test_planted_lambda_recovered_from_2000_signaling_choices(lam):
    trials = signaling_trials(2000, seed=11, framings=("ambiguous",))
    utils = [t.utilities() for t in trials]
    choices = simulate_choices(utils, lam, 3.0, np.random.default_rng(5))
    fit = fit_lambda(ChoiceData.from_items(utils, choices))
    assert abs(fit.lambda_hat - lam) < 0.05
    assert abs(fit.beta_hat - 3.0) < 0.5


def test_planted_lambda_recovered_from_2000_time_choices():
    trials = time_trials(1000, seed=3)
    utils = [t.utilities() for t in trials]
    choices = simulate_choices(utils, 0.8, 3.0, np.random.default_rng(1))
    assert abs(fit_lambda(ChoiceData.from_items(utils, choices)).lambda_hat - 0.8) < 0.05


def test_fit_from_probabilities_is_exact_and_fixed_beta_works():
    """Choice probabilities produced by the model itself are fitted back to the planted values."""
    utils = [t.utilities() for t in signaling_trials(50, seed=2, framings=("belief",), n_options=8)]
    probs = [speaker_probs(u, 0.35, 1.5) for u in utils]
    data = ChoiceData.from_items(utils, probs)
    fit = fit_lambda(data)
    assert fit.lambda_hat == pytest.approx(0.35, abs=1e-3) and fit.beta_hat == pytest.approx(1.5, rel=1e-2)
    assert fit_lambda(data, fit_beta=False, beta=1.5).lambda_hat == pytest.approx(0.35, abs=1e-3)


def test_bootstrap_ci_brackets_estimate_and_shrinks_with_data():
    trials = signaling_trials(400, seed=9, framings=("ambiguous",))
    utils = [t.utilities() for t in trials]
    choices = simulate_choices(utils, 0.5, 3.0, np.random.default_rng(2))
    small = bootstrap_fit(ChoiceData.from_items(utils[:100], choices[:100]), n_boot=30, seed=0)
    large = bootstrap_fit(ChoiceData.from_items(utils, choices), n_boot=30, seed=0)
    for r in (small, large):
        assert r.lambda_ci[0] <= r.lambda_hat <= r.lambda_ci[1]
    assert large.lambda_ci[1] - large.lambda_ci[0] < small.lambda_ci[1] - small.lambda_ci[0]


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="one value per feature"):
        truthfulness((1, 2), Utterance("Green", 1))
    with pytest.raises(ValueError, match="weights of shape"):
        ChoiceData.from_items([Utilities(np.ones(2), np.ones(2), np.zeros(2))], [[1.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="nothing to fit"):
        fit_lambda(ChoiceData.from_items([Utilities(np.ones(2), np.ones(2), np.zeros(2))], [[0.0, 0.0]]))


def test_simulate_cli_prints_json(capsys):
    assert cli_main(["simulate", "--lambda", "0.6", "--n", "300", "--seed", "1", "--n-boot", "10"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 300 and out["lambda_true"] == 0.6
    assert out["lambda_ci"][0] <= out["lambda_hat"] <= out["lambda_ci"][1]
    assert abs(out["lambda_hat"] - 0.6) < 0.1
    assert cli_main(["simulate", "--lambda", "1.5", "--n", "10"]) == 2
    assert "must be in [0, 1]" in capsys.readouterr().err


def test_simulate_cli_as_module():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_modules.probes.honesty",
            "simulate",
            "--lambda",
            "0.3",
            "--n",
            "200",
            "--seed",
            "0",
            "--n-boot",
            "5",
            "--paradigm",
            "time",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    out = json.loads(proc.stdout)
    assert {"lambda_hat", "lambda_ci", "beta_hat"} <= out.keys() and out["paradigm"] == "time"
