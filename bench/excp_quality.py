"""What bench/excp.py reports about training quality after lossy resumes, and the ablations' effect on it.

* :func:`resume_quality`: per seed, the final validation loss of a run resumed from every ExCP file it
  wrote against the uninterrupted run of the same seed (same data order), |delta| relative, beside
  the seed-to-seed spread of the uninterrupted runs (the noise a user's run would see anyway);
* :func:`ablation_resumes`: each codec variant encodes the same series and training *resumes* from its
  reconstruction of a mid-run checkpoint (weights and Adam moments) for ``interval`` steps, so a
  variant that degrades the moments (weight-only pruning, linear-domain v) shows it in the loss.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from excp_storage import encode_series  # noqa: E402
from excp_workload import Run, Workload, evaluate, train  # noqa: E402

from callbacks.excp.codec import ExCPSettings  # noqa: E402

SPREAD_DEFINITION = "(max - min) / mean of the uninterrupted runs' final validation losses over the seeds"


def resume_quality(pairs: dict[int, tuple[Run, Run]]) -> dict[str, Any]:
    """``pairs``: seed -> (uninterrupted run, lossy-resumed run)."""
    per_seed = []
    for seed, (base, lossy) in pairs.items():
        fa, fb = base.final_val, lossy.final_val
        per_seed.append(
            {
                "seed": seed,
                "resumes": lossy.resumes,
                "final_val_uninterrupted": fa,
                "final_val_lossy": fb,
                "final_loss_delta_rel": (fb - fa) / fa,
                "val_uninterrupted": base.val,
                "val_lossy": lossy.val,
            }
        )
        print(
            f"seed {seed}: final val loss uninterrupted {fa:.4f}, after {lossy.resumes} lossy resumes {fb:.4f} "
            f"({(fb - fa) / fa * 100:+.3f}%)"
        )
    finals = [r["final_val_uninterrupted"] for r in per_seed]
    mean = statistics.fmean(finals)
    abs_rel = statistics.fmean(abs(r["final_loss_delta_rel"]) for r in per_seed)
    spread = (max(finals) - min(finals)) / mean if len(finals) > 1 else None
    return {
        "final_loss_delta_abs_rel": abs_rel,
        "final_loss_delta_rel_per_seed": [r["final_loss_delta_rel"] for r in per_seed],
        "seed_spread_rel": spread,
        "seed_spread_definition": SPREAD_DEFINITION,
        "seed_std_rel": statistics.stdev(finals) / mean if len(finals) > 1 else None,
        "within_seed_spread": spread is not None and abs_rel <= spread,
        "resumes_per_run": min(r["resumes"] for r in per_seed),
        "seeds": per_seed,
    }


def ablation_resumes(
    wl: Workload,
    base: Run,
    variants: dict[str, ExCPSettings],
    workdir: Path,
    model: torch.nn.Module,
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]], dict[str, Path]]:
    """Encode seed 0's series with every variant and resume training from its mid-run checkpoint.

    Returns the ablation rows, each variant's encoded series rows and its folder.
    """
    mid = len(base.ckpts) // 2 - 1
    resume_step = base.ckpts[mid]["global_step"]
    stop = resume_step + wl.interval
    reference_val = next(v["val_loss"] for v in base.val if v["step"] == stop)
    ablations, series_rows, folders = [], {}, {}
    for index, (name, settings) in enumerate(variants.items()):
        folders[name] = workdir / f"variant-{index}"
        rows = encode_series(base.ckpts, settings, base.names, folders[name])
        series_rows[name] = rows
        deltas = [(i, r) for i, r in enumerate(rows) if not r["stats"]["keyframe"]]
        reconstructed = []
        for i, r in deltas:
            model.load_state_dict(r["decoded"]["state_dict"])
            true = base.val[i]["val_loss"]
            reconstructed.append((evaluate(model, wl) - true) / true)
        resumed = train(wl, seed=0, start=rows[mid]["decoded"], stop=stop)
        resumed_rel = (resumed.final_val - reference_val) / reference_val
        ablations.append(
            {
                "variant": name,
                "delta_ratio_median": statistics.median(r["stats"]["ratio"] for _, r in deltas),
                "bits_per_param_median": statistics.median(
                    8 * r["stats"]["file_bytes"] / r["stats"]["params"] for _, r in deltas
                ),
                "resumed_from_step": resume_step,
                "resumed_steps": stop - resume_step,
                "val_loss_after_resume_delta_rel": resumed_rel,
                "reconstructed_val_loss_delta_rel_mean": statistics.fmean(reconstructed),
                "reconstructed_val_loss_delta_rel_max": max(reconstructed),
            }
        )
        print(
            f"ablation {name:30s}: median delta ratio {ablations[-1]['delta_ratio_median']:7.1f}x, val loss "
            f"{wl.interval} steps after resuming at step {resume_step}: {resumed_rel * 100:+.3f}% vs uninterrupted "
            f"(reconstructed checkpoints {ablations[-1]['reconstructed_val_loss_delta_rel_mean'] * 100:+.3f}%)"
        )
    return ablations, series_rows, folders
