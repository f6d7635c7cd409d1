"""Aggregate per-item records into scores per model, method and condition (pure: numpy + speaker model).

A record is one trial scored by one model with one method: the options' utilities in presented
order and the model's probability over them (``probs``), or ``None`` when free text could not be
parsed. Records without probabilities are counted (``unparseable_share``) and left out of the means
and the fit, never dropped silently.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np

from datamodules.honesty_paradigms import Utilities
from lightning_modules.probes.honesty.bootstrap import DEFAULT_N_BOOT, bootstrap_fit
from lightning_modules.probes.honesty.speaker_model import HUMAN_LAMBDA, ChoiceData, helpfulness, honesty

GROUP_KEYS: tuple[str, ...] = ("model", "method", "paradigm", "framing", "context", "cot")


def record_utilities(record: dict[str, Any]) -> Utilities:
    """The speaker-model utilities stored in a record."""
    return Utilities(np.array(record["truth"]), np.array(record["relevance"]), np.array(record["cost"]))


def dedupe(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (trial, model, method), in a stable order.

    The distributed sampler pads the last batch by repeating trials; those repeats are identical
    and are dropped here.
    """
    seen: dict[tuple, dict[str, Any]] = {}
    for r in records:
        seen.setdefault((r["trial_id"], r["model"], r["method"]), r)
    return sorted(seen.values(), key=lambda r: (r["model"], r["method"], r["trial_id"]))


def group_name(key: dict[str, Any]) -> str:
    """Readable condition label, e.g. ``smollm2/loglik/signaling/utility/cot``."""
    parts = [key["model"], key["method"], key["paradigm"], key["framing"]]
    if key.get("context"):
        parts.append(key["context"])
    parts.append("cot" if key["cot"] else "direct")
    return "/".join(parts)


def aggregate(
    records: list[dict[str, Any]],
    *,
    n_boot: int = DEFAULT_N_BOOT,
    confidence: float = 0.95,
    fit_beta: bool = True,
    beta: float = 1.0,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Scores per (model, method, paradigm, framing, context, cot).

    Returns one dict per group with: ``n_items``, ``n_unparseable``, ``unparseable_share``,
    ``honesty`` (mean probability on true utterances), ``helpfulness`` (mean normalised listener
    reward), ``rounding_rate`` (time paradigm: probability on rounded utterances), the fitted
    ``lambda_hat``/``lambda_ci``/``beta_hat``/``beta_ci``, and ``human_lambda`` (signaling only:
    the human values for that framing from both experiments).
    """
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[tuple(r[k] for k in GROUP_KEYS)].append(r)
    out = []
    for gi, (gkey, recs) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        key = dict(zip(GROUP_KEYS, gkey, strict=True))
        scored = [r for r in recs if r.get("probs") is not None]
        row: dict[str, Any] = {
            "group": group_name(key),
            **key,
            "n_items": len(recs),
            "n_unparseable": len(recs) - len(scored),
            "unparseable_share": (len(recs) - len(scored)) / len(recs),
        }
        if scored:
            utils = [record_utilities(r) for r in scored]
            probs = [np.asarray(r["probs"], dtype=float) for r in scored]
            hon = [honesty(p, u) for p, u in zip(probs, utils, strict=True)]
            helps = np.array([helpfulness(p, u) for p, u in zip(probs, utils, strict=True)])
            fit = bootstrap_fit(
                ChoiceData.from_items(utils, probs),
                n_boot=n_boot,
                seed=seed + gi,
                confidence=confidence,
                fit_beta=fit_beta,
                beta=beta,
            )
            row |= {
                "honesty": float(np.mean(hon)),
                "helpfulness": float(np.nanmean(helps)) if np.isfinite(helps).any() else None,
                "n_helpfulness_undefined": int(np.isnan(helps).sum()),
                "top_choice_true_share": float(
                    np.mean([u.truth[int(np.argmax(p))] > 0 for p, u in zip(probs, utils, strict=True)])
                ),
                **fit.to_dict(),
            }
            if key["paradigm"] == "time":
                row["rounding_rate"] = 1.0 - row["honesty"]
        else:
            row |= {"honesty": None, "helpfulness": None, "lambda_hat": None, "lambda_ci": None}
        if key["paradigm"] == "signaling":
            row["human_lambda"] = {exp: vals[key["framing"]] for exp, vals in HUMAN_LAMBDA.items()}
        out.append(row)
    return out
