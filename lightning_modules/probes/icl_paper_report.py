"""The probe's paper-facing summary: one short table and one PNG (matplotlib, no Lightning).

Per task and N (pretrained model, N > 0): ICL and GD accuracy, ICL-vs-GD top-1 agreement, GD-vs-zero-shot
agreement (how far GD moved the model), the chosen GD step size, the GD flags (and `fallback` where the
selection rule could not qualify one, `below_zero_shot` where the chosen one lost dev accuracy), and the
order experiment's pairwise disagreement for ICL and full-batch GD.
``python -m lightning_modules.probes.icl_paper_report <icl_gd_results.json>`` prints the table and writes
the PNG beside the results, so an existing run can be summarised again.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from common.atomic import atomic_save_figure

REPORT_PNG = "icl_gd_summary.png"
COLUMNS = (
    "task",
    "N",
    "lr",
    "epochs",
    "acc ZS",
    "acc ICL",
    "acc GD",
    "ICL~GD",
    "GD~ZS",
    "order ICL",
    "order GD",
    "flags",
)


def summary_rows(agg: dict, variant: str = "pretrained") -> list[dict]:
    """One row per (task, N) of ``variant``; order sensitivity is the task's (its N is in the order unit)."""
    rows = []
    selection = agg.get("gd_selection", {}).get(variant, {})
    for task, by_n in sorted(agg["sweep"].get(variant, {}).items()):
        order = agg.get("order", {}).get(variant, {}).get(task, {})
        for n in sorted(by_n, key=int):
            r = by_n[n]
            # the step size the unit(s) ran with (per unit with gd_select_per_unit, else the task's); a
            # step size the rule could not qualify, or one that cost dev accuracy (icl_gd_selection,
            # step 4), is flagged too
            if "gd_selected" in r:
                ran = {(c["lr"], c["epochs"]) for c in r["gd_selected"]}
                chosen = dict(zip(("lr", "epochs"), ran.pop(), strict=True)) if len(ran) == 1 else {}
                fallback = r["gd_selection_flags"]
            else:  # results written before per-unit selection
                chosen = selection.get(task, {}).get("selected", {})
                fallback = [f for f in ("fallback", "below_zero_shot") if selection.get(task, {}).get(f)]
            rows.append(
                {
                    "task": task,
                    "N": int(n),
                    "lr": chosen.get("lr"),
                    "acc ZS": r.get("acc_zero_shot"),
                    "acc ICL": r.get("acc_icl"),
                    "acc GD": r.get("acc_gd"),
                    "ICL~GD": r.get("token_overlap"),
                    "GD~ZS": r.get("gd_vs_zero_shot_agreement"),
                    "order ICL": order.get("icl", {}).get("pairwise_disagreement"),
                    "order GD": order.get("gd_full_batch", {}).get("pairwise_disagreement"),
                    "epochs": chosen.get("epochs"),
                    "flags": ",".join([*r.get("gd_flags", []), *fallback]) or "-",
                }
            )
    return rows


def gd_label(agg: dict, variant: str = "pretrained") -> str | None:
    """What "GD" means in this run's table, e.g. ``GD (QLoRA r=16, 4-bit base)``; None for older results."""
    return agg.get("gd_variant", {}).get(variant)


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if value < 0.01 else f"{value:.2f}"
    return str(value)


def format_table(rows: list[dict], gd: str | None = None) -> str:
    """A fixed-width text table (ICL~GD, GD~ZS: share of test examples with the same top-1 label).

    ``gd`` (see ``gd_label``) heads the table, so full GD and adapter GD cannot be mistaken for each other.
    """
    cells = [list(COLUMNS)] + [[_cell(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if gd:
        lines.insert(0, f"GD = {gd}")
    return "\n".join(lines)


def plot_summary(rows: list[dict], path: Path, gd: str | None = None) -> Path | None:
    """Per task: accuracy of zero-shot/ICL/GD and the two agreements against N, one panel per task;
    ``gd`` (the GD variant's name) titles the figure."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.2), squeeze=False, sharey=True)
    for ax, task in zip(axes[0], tasks, strict=True):
        mine = [r for r in rows if r["task"] == task]
        ns = [r["N"] for r in mine]
        for key, style in (
            ("acc ZS", ":k"),
            ("acc ICL", "-o"),
            ("acc GD", "-s"),
            ("ICL~GD", "--^"),
            ("GD~ZS", "--v"),
        ):
            ax.plot(ns, [math.nan if r[key] is None else r[key] for r in mine], style, label=key)
        lr = mine[0]["lr"]
        ax.set_title(f"{task}" + (f" (GD lr {lr:g})" if lr else ""), fontsize=9)
        ax.set_xlabel("demonstrations N")
        ax.set_xticks(ns)
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("accuracy / agreement")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    if gd:
        fig.suptitle(f"GD = {gd}", fontsize=9)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m lightning_modules.probes.icl_paper_report <icl_gd_results.json>", file=sys.stderr)
        return 2
    results_path = Path(args[0])
    results = json.loads(results_path.read_text())
    rows = summary_rows(results["aggregate"])
    gd = gd_label(results["aggregate"])
    print(format_table(rows, gd))
    png = plot_summary(rows, results_path.parent / REPORT_PNG, gd)
    if png:
        print(f"figure: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
