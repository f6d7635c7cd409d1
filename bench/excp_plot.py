"""The figure of bench/excp.py: resume quality per seed, bytes per file, ablations (quick) or the
default against the alternative settings (full), keyframe-interval trade-off."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.atomic import atomic_save_figure


def plot(result: dict[str, Any], pairs: dict[int, tuple[Any, Any]], wl: Any, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(22, 4.8))
    ax = axes[0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (seed, (base, lossy)), color in zip(pairs.items(), colors, strict=False):
        for run, style, label in ((base, "-", "uninterrupted"), (lossy, "--", f"{lossy.resumes} lossy resumes")):
            ax.plot(
                [v["step"] for v in run.val],
                [v["val_loss"] for v in run.val],
                style,
                color=color,
                marker="o",
                ms=3,
                label=f"seed {seed} {label}",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title(
        f"|final delta| {result['final_loss_delta_abs_rel'] * 100:.2f}% vs seed spread "
        f"{(result['seed_spread_rel'] or 0) * 100:.2f}%"
    )
    ax.legend(fontsize=6)

    ax = axes[1]
    files = result["storage"]["per_file"]
    ax.plot([f["step"] for f in files], [f["bytes"] / 2**20 for f in files], marker="o", ms=3, label="ExCP file")
    for key, label in (
        ("torch_save_bytes", "torch.save"),
        ("zstd_bytes", "zstd(torch.save)"),
        ("bytegroup_zstd_bytes", "byte-grouped zstd"),
    ):
        rows = result.get("per_checkpoint")
        if rows:
            ax.plot([r["step"] for r in rows], [r[key] / 2**20 for r in rows], marker="o", ms=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel("MB per checkpoint (log)")
    ax.set_title(
        f"seed-0 run: overall {result['overall_ratio']:.1f}x, median delta "
        f"{result['delta_ratio_median']:.0f}x vs fp32 W+m+v"
    )
    ax.legend(fontsize=7)

    ax = axes[2]
    if result.get("ablations"):
        for a in result["ablations"]:
            y = a["val_loss_after_resume_delta_rel"] * 100
            ax.scatter(a["delta_ratio_median"], y)
            ax.annotate(a["variant"], (a["delta_ratio_median"], y), fontsize=6)
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_xlabel("median delta compression ratio (log)")
        ax.set_ylabel(f"val loss {wl.interval} steps after resuming, % vs uninterrupted")
        ax.set_title("ablations, each resumed from its reconstruction")
    else:
        _settings_panel(ax, result)

    ax = axes[3]
    rows = result["keyframe_interval_tradeoff"]["rows"]
    ax.plot([r["total_bytes"] / 2**20 for r in rows], [r["load_last_s"] for r in rows], marker="o")
    for r in rows:
        ax.annotate(f"every {r['keyframe_interval']}", (r["total_bytes"] / 2**20, r["load_last_s"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("MB of all files of the run (log)")
    ax.set_ylabel("seconds to load the last checkpoint")
    estimate = "estimated from parts" if result["keyframe_interval_tradeoff"]["measured"].startswith("est") else ""
    ax.set_title(f"keyframe interval trade-off {estimate}")
    fig.suptitle(f"ExCP on {wl.name} ({result['mode']} mode, {result['threads']} threads)")
    fig.tight_layout()
    atomic_save_figure(fig, png, dpi=110)


def plot_settings(result: dict[str, Any], png: Path) -> None:
    """The figure of an ``--extra-settings`` record: ratio against quality, and speed, per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    _settings_panel(axes[0], result)
    settings = result["alternative_settings"]
    labels = list(settings)
    x = range(len(labels))
    for offset, key, name in ((-0.2, "encode_mb_s", "encode"), (0.2, "decode_mb_s", "decode")):
        axes[1].bar([i + offset for i in x], [settings[label][key] for label in labels], width=0.4, label=name)
    axes[1].set_xticks(list(x), labels, fontsize=7, rotation=10)
    axes[1].set_ylabel(f"MB/s of raw W+m+v, {result['threads']} threads")
    axes[1].set_title("speed over the seed-0 run's deltas")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"ExCP on {result['workload_details']['name']}: {result['mode']}")
    fig.tight_layout()
    atomic_save_figure(fig, png, dpi=110)


def _settings_panel(ax: Any, result: dict[str, Any]) -> None:
    """Median delta ratio against |final loss delta| after the lossy resumes, the default (where the
    record has it) beside the alternative settings; the bar spans the seeds' signed deltas."""
    points = {}
    if "lossy_resume" in result:
        default = {**result["lossy_resume"], "delta_ratio_median": result["delta_ratio_median"]}
        points["default (k-means 4-bit)"] = default
    points.update(result.get("alternative_settings", {}))
    for label, p in points.items():
        per_seed = [d * 100 for d in p["final_loss_delta_rel_per_seed"]]
        y = p["final_loss_delta_abs_rel"] * 100
        ax.errorbar(p["delta_ratio_median"], y, yerr=[[y - min(per_seed)], [max(per_seed) - y]], fmt="o", capsize=3)
        ax.annotate(label, (p["delta_ratio_median"], y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("median delta compression ratio")
    ax.set_ylabel("|final val loss delta| % (bar: seeds' signed deltas)")
    ax.set_title("codec settings, each over every seed's lossy resumes")
