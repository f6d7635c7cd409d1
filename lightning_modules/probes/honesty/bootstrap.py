"""Bootstrap confidence intervals for the speaker model's lambda and beta (numpy/scipy only).

``scipy.stats.bootstrap`` draws the resamples (items, not single choices: choices within an item are
not independent) and forms the interval; this module supplies the statistic. Refitting each resample
with L-BFGS-B costs tens of milliseconds, mostly optimiser overhead for two parameters, which makes
the 1000 resamples an interval needs slow. A resample of items is the data with integer item
weights, so every resample of a batch is refitted at once by a damped Newton iteration on
(lambda, log beta) with the exact gradient and Hessian, started at the full-data estimate. A resample
whose Newton iteration does not converge inside the bounds is refitted by ``fit_lambda`` instead, so
the answer is the same maximum either way (a test checks they agree).
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats
from scipy.special import log_softmax

from lightning_modules.probes.honesty.speaker_model import BETA_BOUNDS, ChoiceData, FitResult, fit_lambda

BOOTSTRAP_METHOD = "BCa"
"""How the interval is formed (``scipy.stats.bootstrap``'s ``method``). BCa corrects the percentile
interval for the estimator's bias and skew, which matter where lambda's bounds (0, 1) are near; its
jackknife is one more batch of refits (one per item) through the same vectorised Newton iteration.
``bench/honesty_recovery.py`` measures how often the interval covers a planted lambda."""

DEFAULT_N_BOOT = 1000
"""Resamples by default: the 2.5% and 97.5% quantiles of a few hundred resamples are noisy enough to
make a 95% interval cover visibly less often."""


def _item_terms(data: ChoiceData, lam: np.ndarray, beta: np.ndarray, fit_beta: bool):
    """Per resample b and item i: log-likelihood, gradient [2] and Hessian [2, 2] in (lambda, log beta)."""
    d = (data.relevance - data.truth)[None]  # [1, n, k]
    util = lam[:, None, None] * d + (data.truth - data.cost)[None]
    z = np.where(data.mask[None], beta[:, None, None] * util, -np.inf)
    logp = log_softmax(z, axis=-1)
    p = np.where(data.mask[None], np.exp(logp), 0.0)
    z = np.where(data.mask[None], z, 0.0)
    w = data.weights[None]
    total = w.sum(-1, keepdims=True)
    ll = np.sum(w * np.where(data.mask[None], logp, 0.0), axis=-1)  # [b, n]
    resid = w - total * p
    a = beta[:, None, None] * d  # dz/dlambda
    mean_a, mean_z = (p * a).sum(-1), (p * z).sum(-1)
    g_lam = (resid * a).sum(-1)
    g_rho = (resid * z).sum(-1) if fit_beta else np.zeros_like(g_lam)
    tot = total[..., 0]
    h_ll = -tot * ((p * a * a).sum(-1) - mean_a**2)
    h_lr = g_lam - tot * ((p * a * z).sum(-1) - mean_a * mean_z)
    h_rr = g_rho - tot * ((p * z * z).sum(-1) - mean_z**2)
    return ll, g_lam, g_rho, h_ll, h_lr, h_rr


def _newton(
    data: ChoiceData, counts: np.ndarray, start: tuple[float, float], fit_beta: bool, iters: int = 25
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximise sum_i counts[b, i] * ll_i over (lambda, log beta) for every row b; returns lam, beta, ok.

    Plain Newton steps, each capped (0.1 in lambda, 0.5 in log beta) so a far start cannot jump out of
    the basin; ``ok`` is False for a row that did not converge to an interior point where the
    log-likelihood is strictly concave, and the caller refits that row with the general optimiser.
    """
    n_b = counts.shape[0]
    lam = np.full(n_b, float(start[0]))
    rho = np.full(n_b, np.log(start[1]))
    lo_r, hi_r = np.log(BETA_BOUNDS[0]), np.log(BETA_BOUNDS[1])
    converged = concave = np.zeros(n_b, dtype=bool)
    for _ in range(iters):
        _, g_l, g_r, h_ll, h_lr, h_rr = (
            (counts * t).sum(-1)
            for t in _item_terms(data, lam, np.exp(rho), fit_beta)
        )
        if not fit_beta:
            h_lr, h_rr, g_r = np.zeros_like(h_lr), -np.ones_like(h_rr), np.zeros_like(g_r)
        det = h_ll * h_rr - h_lr**2
        concave = (h_ll < 0) & (det > 0)
        safe = np.where(concave, det, 1.0)
        step_l = np.clip(np.where(concave, -(h_rr * g_l - h_lr * g_r) / safe, 0.0), -0.1, 0.1)
        step_r = np.clip(np.where(concave, -(h_ll * g_r - h_lr * g_l) / safe, 0.0), -0.5, 0.5)
        new_l, new_r = np.clip(lam + step_l, 0.0, 1.0), np.clip(rho + step_r, lo_r, hi_r)
        converged = np.maximum(np.abs(new_l - lam), np.abs(new_r - rho)) < 1e-9
        lam, rho = new_l, new_r
        if (converged & concave).all():
            break
    inside = (lam > 0) & (lam < 1) & (rho > lo_r) & (rho < hi_r)
    return lam, np.exp(rho), converged & concave & inside


def refit_resamples(
    data: ChoiceData, index: np.ndarray, start: tuple[float, float], fit_beta: bool = True, beta: float = 1.0
) -> np.ndarray:
    """Maximum-likelihood (lambda, beta) of each resample; ``index`` is [B, n] item indices, returns [2, B]."""
    index = np.atleast_2d(index).astype(int)
    counts = np.stack([np.bincount(row, minlength=len(data)) for row in index]).astype(float)
    lam, betas, ok = _newton(data, counts, start if fit_beta else (start[0], beta), fit_beta)
    for b in np.flatnonzero(~ok):  # boundary or non-concave: the general optimiser decides
        sub = data.subset(index[b])
        if float(sub.weights.sum()) <= 0:
            lam[b], betas[b] = start
            continue
        r = fit_lambda(sub, fit_beta=fit_beta, beta=beta, init=start)
        lam[b], betas[b] = r.lambda_hat, r.beta_hat
    return np.stack([lam, betas])


def bootstrap_fit(
    data: ChoiceData,
    *,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    confidence: float = 0.95,
    fit_beta: bool = True,
    beta: float = 1.0,
    method: str = BOOTSTRAP_METHOD,
    batch: int = 100,
) -> FitResult:
    """Fit on all items, then ``scipy.stats.bootstrap`` over items for the confidence intervals.

    Args:
        data: Stacked items and choices.
        n_boot: Resamples (0: point estimate only).
        seed: Seeds the resampling.
        confidence: Interval level.
        fit_beta: Fit beta jointly (its interval is reported too) or hold it at ``beta``.
        beta: The fixed rationality when ``fit_beta`` is False.
        method: ``"BCa"`` (default), ``"percentile"`` or ``"basic"`` (``scipy.stats.bootstrap``'s names).
        batch: Resamples refitted together (memory: batch x items x options floats, a few times).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    result = fit_lambda(data, fit_beta=fit_beta, beta=beta)
    result.n_boot = n_boot
    result.extra["ci_method"] = f"{method} bootstrap over items, {n_boot} resamples (scipy.stats.bootstrap)"
    if n_boot <= 0 or len(data) < 2:
        return result
    start = (result.lambda_hat, result.beta_hat)

    def statistic(index: np.ndarray, axis: int = -1) -> np.ndarray:
        flat = np.moveaxis(index, axis, -1)
        out = refit_resamples(data, flat.reshape(-1, flat.shape[-1]), start, fit_beta, beta)
        return out.reshape((2, *flat.shape[:-1]))

    with warnings.catch_warnings():  # a degenerate BCa component is handled below, not warned about
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
        boot = stats.bootstrap(
            (np.arange(len(data)),),
            statistic,
            n_resamples=n_boot,
            batch=batch,
            confidence_level=confidence,
            method=method,
            vectorized=True,
            rng=np.random.default_rng(seed),
        )
    low, high = np.array(boot.confidence_interval.low, float), np.array(boot.confidence_interval.high, float)
    degenerate = ~(np.isfinite(low) & np.isfinite(high))
    if degenerate.any():
        # BCa's acceleration is undefined when every jackknife estimate is equal (an estimate on its
        # bound, e.g. lambda = 0): that parameter gets the percentile interval of the same resamples
        tail = (1 - confidence) / 2 * 100
        percentile = np.percentile(boot.bootstrap_distribution, [tail, 100 - tail], axis=-1)
        low, high = np.where(degenerate, percentile[0], low), np.where(degenerate, percentile[1], high)
        names = [name for name, bad in zip(("lambda", "beta"), degenerate, strict=True) if bad]
        result.extra["ci_method"] += f"; percentile for {', '.join(names)} (BCa undefined: degenerate jackknife)"
    result.lambda_ci = (float(low[0]), float(high[0]))
    result.beta_ci = (float(low[1]), float(high[1]))
    return result
