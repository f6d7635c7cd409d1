"""Aggregate per-unit probe results and draw the plots (matplotlib, no Lightning)."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

from common.atomic import atomic_save_figure

SCALARS = {
    "acc_zero_shot": lambda m: m["acc_zero_shot"],
    "acc_icl": lambda m: m["acc_icl"],
    "acc_gd": lambda m: m["acc_gd"],
    "token_overlap": lambda m: m["token_overlap"],
    "gd_vs_zero_shot_agreement": lambda m: m.get("gd_vs_zero_shot_agreement"),
    "icl_vs_zero_shot_agreement": lambda m: m.get("icl_vs_zero_shot_agreement"),
    "icl_vs_gd_label_cosine": lambda m: m["icl_vs_gd"]["label_cosine"],
    "icl_vs_gd_label_js": lambda m: m["icl_vs_gd"]["label_js"],
    "icl_vs_gd_vocab_cosine": lambda m: m["icl_vs_gd"].get("vocab_cosine"),
    "icl_vs_gd_vocab_js": lambda m: m["icl_vs_gd"].get("vocab_js"),
    "icl_shift_label_js": lambda m: m["icl_shift_from_zero_shot"]["label_js"],
    "gd_shift_label_js": lambda m: m["gd_shift_from_zero_shot"]["label_js"],
    "icl_shift_vocab_js": lambda m: m["icl_shift_from_zero_shot"].get("vocab_js"),
    "gd_shift_vocab_js": lambda m: m["gd_shift_from_zero_shot"].get("vocab_js"),
    "rec2ftp": lambda m: m["rec2ftp"],
    "sim_aou_mean": lambda m: _mean(m["sim_aou"]["per_layer"]) if "sim_aou" in m else None,
    "sim_aou_random_mean": lambda m: _mean(m["sim_aou"]["random_baseline"]) if "sim_aou" in m else None,
    "sim_am_icl_vs_ft_mean": lambda m: _mean(m["sim_am"]["icl_vs_ft"]) if "sim_am" in m else None,
    "sim_am_icl_vs_zs_mean": lambda m: _mean(m["sim_am"]["icl_vs_zs"]) if "sim_am" in m else None,
}


def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.fmean(xs) if xs else None


def _std(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.pstdev(xs) if len(xs) > 1 else (0.0 if xs else None)


def merge_units(gathered: list[list[dict]]) -> list[dict]:
    """Flatten every rank's results, drop duplicates (the distributed sampler pads), sort by uid."""
    by_uid = {}
    for rank_results in gathered:
        for r in rank_results:
            by_uid.setdefault(r["uid"], r)
    return [by_uid[k] for k in sorted(by_uid)]


def aggregate(units: list[dict]) -> dict:
    """Mean and std over seeds of every scalar, per model variant, task and N; order results as they are.

    N=0 units are left out: with no demonstrations ICL and GD are zero-shot by definition, so their
    agreement of 1.0 is not a measurement (the per-unit records keep them).
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for u in units:
        if u["kind"] == "sweep" and u["n_demos"] > 0:
            groups[(u["model_variant"], u["task"], u["n_demos"])].append(u)
    sweep: dict = {}
    for (variant, task, n), us in sorted(groups.items()):
        ms = [u["metrics"] for u in us]
        chosen = [u["gd_selection"] for u in us if u.get("gd_selection")]
        row = {
            "n_seeds": len(ms),
            "gd_flags": sorted({f for m in ms for f in m.get("gd_flags", [])}),
            # the step size each seed's GD ran with, and whether its choice fell back or cost dev accuracy
            "gd_selected": [c["selected"] for c in chosen],
            "gd_selection_flags": sorted({f for c in chosen for f in ("fallback", "below_zero_shot") if c.get(f)}),
        }
        for name, get in SCALARS.items():
            vals = [get(m) for m in ms]
            row[name] = _mean(vals)
            row[name + "_std"] = _std(vals)
        sweep.setdefault(variant, {}).setdefault(task, {})[str(n)] = row
    order = {}
    for u in units:
        if u["kind"] == "order":
            order.setdefault(u["model_variant"], {})[u["task"]] = {
                "n_demos": u["n_demos"],
                "n_orders": len(u["records"][0]["orders"]),
                **u["metrics"],
            }
    selection: dict = {}
    per_unit: dict = {}
    for u in units:
        rec = u.get("gd_selection")
        if rec and rec.get("per_unit"):  # chosen on this unit's own demonstrations (gd_select_per_unit)
            key = f"n{u['n_demos']}/s{u['seed']}"
            per_unit.setdefault(u["model_variant"], {}).setdefault(u["task"], {}).setdefault(key, rec)
        elif rec:
            selection.setdefault(u["model_variant"], {}).setdefault(u["task"], rec)
    # Which GD each model variant got ("GD (QLoRA r=16, 4-bit base)", "GD (full)", ...): one per variant.
    variants: dict = {}
    for u in units:
        if u.get("gd_variant"):
            variants.setdefault(u["model_variant"], u["gd_variant"])
    return {
        "sweep": sweep,
        "order": order,
        "gd_selection": selection,
        "gd_selection_per_unit": per_unit,
        "gd_variant": variants,
    }


def plot_sweep(agg: dict, path: Path) -> Path | None:
    """One column per task: accuracy (ZS/ICL/GD), token overlap and ICL-GD cosine vs N; dashed = random init."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = agg["sweep"]
    tasks = sorted({t for v in sweep.values() for t in v})
    if not tasks:
        return None
    rows = [
        ("accuracy", ["acc_zero_shot", "acc_icl", "acc_gd"]),
        ("token overlap", ["token_overlap"]),
        ("ICL vs GD cosine", ["icl_vs_gd_label_cosine", "icl_vs_gd_vocab_cosine"]),
    ]
    fig, axes = plt.subplots(len(rows), len(tasks), figsize=(4 * len(tasks), 3 * len(rows)), squeeze=False)
    for c, task in enumerate(tasks):
        for r, (title, keys) in enumerate(rows):
            ax = axes[r][c]
            for variant, style in (("pretrained", "-o"), ("random_init", "--x")):
                data = sweep.get(variant, {}).get(task)
                if not data:
                    continue
                ns = sorted(data, key=int)
                for key in keys:
                    ys = [data[n][key] for n in ns]
                    if all(y is None for y in ys):
                        continue
                    ax.plot(
                        [int(n) for n in ns],
                        [math.nan if y is None else y for y in ys],
                        style,
                        label=f"{key} ({variant})",
                    )
            ax.set_title(f"{task}: {title}")
            ax.set_xlabel("demonstrations N")
            ax.legend(fontsize=6)
    return _save_figure(fig, path)


def plot_order(agg: dict, path: Path) -> Path | None:
    """Accuracy spread and pairwise disagreement across demo orders: ICL vs full-batch GD vs SGD."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [
        (variant, task, m) for variant, tasks in agg["order"].items() for task, m in sorted(tasks.items())
    ]
    if not entries:
        return None
    methods = ["icl", "gd_full_batch", "gd_sgd_in_order"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    width = 0.8 / len(methods)
    for a, metric in enumerate(["accuracy_spread", "pairwise_disagreement"]):
        ax = axes[a]
        for j, method in enumerate(methods):
            ax.bar(
                [i + j * width for i in range(len(entries))],
                [m[method][metric] or 0 for _, _, m in entries],
                width,
                label=method,
            )
        ax.set_xticks([i + width for i in range(len(entries))])
        ax.set_xticklabels([f"{t}\n{v}" for v, t, _ in entries], fontsize=7)
        ax.set_title(metric.replace("_", " "))
        ax.legend(fontsize=7)
    return _save_figure(fig, path)


def _save_figure(fig, path: Path) -> Path:
    """Lay out, write and close a figure (closing frees it: probes draw many in one process)."""
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=80)
    return path
