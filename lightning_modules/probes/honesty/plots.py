"""Plots of the honesty probe's aggregates (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.atomic import atomic_save_figure  # noqa: E402
from datamodules.honesty_paradigms import DECISION_CONTEXTS  # noqa: E402
from lightning_modules.probes.honesty.speaker_model import HUMAN_LAMBDA  # noqa: E402

FRAMING_ORDER = ("belief", "ambiguous", "utility")


def _series(row: dict[str, Any]) -> str:
    return f"{row['model']} {row['method']} {'cot' if row['cot'] else 'direct'}"


def _save(fig: plt.Figure, path: Path) -> Path:
    atomic_save_figure(fig, path)
    return path


def plot_lambda_by_framing(rows: list[dict[str, Any]], path: Path) -> Path:
    """Fitted lambda (with CI) per framing for every model/method/cot series, human values beside."""
    sig = [r for r in rows if r["paradigm"] == "signaling" and r.get("lambda_hat") is not None]
    series = sorted({_series(r) for r in sig})
    framings = [f for f in FRAMING_ORDER if any(r["framing"] == f for r in sig)] or list(FRAMING_ORDER)
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / (len(series) + len(HUMAN_LAMBDA))
    labelled: set[str] = set()
    for si, name in enumerate(series):
        for fi, framing in enumerate(framings):
            r = next((r for r in sig if _series(r) == name and r["framing"] == framing), None)
            if r is None:
                continue
            x = fi + (si - (len(series) + len(HUMAN_LAMBDA) - 1) / 2) * width
            err = None
            if r.get("lambda_ci"):
                lo, hi = r["lambda_ci"]
                err = [[max(0.0, r["lambda_hat"] - lo)], [max(0.0, hi - r["lambda_hat"])]]
            # points, not bars: a lambda of exactly 0 (a pure truth-teller) must stay visible
            ax.errorbar(
                x,
                r["lambda_hat"],
                yerr=err,
                fmt="o",
                capsize=3,
                color=f"C{si}",
                label=None if name in labelled else name,
            )
            labelled.add(name)
    for hi_, (exp, vals) in enumerate(HUMAN_LAMBDA.items()):
        xs = [
            fi + (len(series) + hi_ - (len(series) + len(HUMAN_LAMBDA) - 1) / 2) * width
            for fi in range(len(framings))
        ]
        ax.bar(
            xs,
            [vals[f] for f in framings],
            width,
            color="none",
            edgecolor="k",
            hatch="//" if hi_ else "..",
            label=f"human ({exp.replace('_', ' ')})",
        )
    ax.set_xticks(range(len(framings)), framings)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fitted lambda (0 honest, 1 helpful)")
    ax.set_title("Honesty/helpfulness trade-off by framing (signaling)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def plot_honesty_vs_helpfulness(rows: list[dict[str, Any]], path: Path) -> Path:
    """One point per condition: honesty (x) against normalised helpfulness (y)."""
    pts = [r for r in rows if r.get("honesty") is not None and r.get("helpfulness") is not None]
    fig, ax = plt.subplots(figsize=(6, 5))
    series = sorted({_series(r) for r in pts})
    markers = {"signaling": "o", "time": "s"}
    for si, name in enumerate(series):
        for r in (r for r in pts if _series(r) == name):
            ax.scatter(r["honesty"], r["helpfulness"], color=f"C{si}", marker=markers[r["paradigm"]])
            label = r["framing"] + (f"/{r['context']}" if r.get("context") else "")
            ax.annotate(
                label, (r["honesty"], r["helpfulness"]), fontsize=6, xytext=(3, 3), textcoords="offset points"
            )
        ax.scatter([], [], color=f"C{si}", label=name)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("honesty (probability on true utterances)")
    ax.set_ylabel("helpfulness (normalised listener reward)")
    ax.set_title("Honesty vs helpfulness by condition (o signaling, s time)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def plot_rounding_by_context(rows: list[dict[str, Any]], path: Path) -> Path:
    """Time paradigm: probability of a rounded (literally false) time per decision context."""
    tm = [r for r in rows if r["paradigm"] == "time" and r.get("rounding_rate") is not None]
    series = sorted({_series(r) + f" {r['framing']}" for r in tm})
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(1, len(series))
    labelled: set[str] = set()
    for si, name in enumerate(series):
        for ci, ctx in enumerate(DECISION_CONTEXTS):
            vals = [
                r["rounding_rate"]
                for r in tm
                if _series(r) + f" {r['framing']}" == name and r["context"] == ctx
            ]
            if vals:
                ax.bar(
                    ci + (si - (len(series) - 1) / 2) * width,
                    vals[0],
                    width,
                    color=f"C{si}",
                    label=None if name in labelled else name,
                )
                labelled.add(name)
    # two of the three options are rounded: a speaker with no preference rounds 2/3 of the time
    ax.axhline(2 / 3, color="gray", lw=0.8, ls=":", label="uniform over the options")
    ax.set_xticks(range(len(DECISION_CONTEXTS)), ["regular (meeting)", "watch-setting"])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("rounding rate")
    ax.set_title("Telling the time: rounding by listener decision context")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)
