"""What one lossy ExCP resume costs, and which part of the delta causes it, at the default and at a 70x budget.

``bench/excp.py`` measures the whole run (9 resumes); this isolates one. Per seed, a run is trained to
the chain's reference (the pretrained weights in full mode, step ``interval`` from scratch in quick
mode), then ``interval`` more steps; that checkpoint is coded as one delta under each setting, decoded,
and trained ``horizon`` more steps on the same batches as the uninterrupted run. Reported per setting:
the delta's ratio against fp32 W+m+v, and the relative validation-loss change at the resume and after
the horizon, per seed, with their mean and the seed-to-seed standard deviation.

For the 70x-budget setting the decoded checkpoint is also split: decoded weights with the exact
moments, exact weights with decoded ``exp_avg`` (m) only, and with decoded ``exp_avg_sq`` (v) only, so
the report says which stream's loss limits the ratio.

    python bench/excp_resume_damage.py [--quick] [--seeds 3]
    # writes bench/results/excp_resume_damage[_quick].json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from excp import BITS_AT_70X, THREADS  # noqa: E402
from excp_workload import ChainWriter, Run, Workload, evaluate, full_workload, quick_workload, train  # noqa: E402

from callbacks.excp.codec import ExCPSettings  # noqa: E402
from common.atomic import atomic_write_json  # noqa: E402

AT_70X = "fisher uniform 4-bit, 70x budget"
"""The 70x-budget setting whose decoded parts are split (Fisher-ranked weights, uniform 4-bit levels)."""


def _settings() -> dict[str, ExCPSettings]:
    default = ExCPSettings(threads=THREADS, keyframe_moments="lossy")
    at_70x = replace(
        default, quantizer="uniform", alpha=None, target_bits_per_param=BITS_AT_70X, weight_saliency="fisher"
    )
    return {
        "default (k-means 4-bit, alpha rule)": default,
        AT_70X: at_70x,
        "70x budget, k-means 4-bit": replace(at_70x, quantizer="kmeans"),
        "70x budget, uniform 3-bit W": replace(at_70x, bits_w=3),
        "70x budget, 2-bit v": replace(at_70x, bits_v=2),
    }


def _with_decoded(exact: dict[str, Any], decoded: dict[str, Any], part: str) -> dict[str, Any]:
    """The exact checkpoint with one decoded part: ``weights``, or one Adam moment key of every tensor."""
    mixed = copy.deepcopy(exact)
    if part == "weights":
        mixed["state_dict"] = decoded["state_dict"]
        return mixed
    decoded_state = decoded["optimizer_states"][0]["state"]
    for key, state in mixed["optimizer_states"][0]["state"].items():
        state[part] = decoded_state[key][part].clone()
    return mixed


def _loss_after(wl: Workload, seed: int, start: dict[str, Any], stop: int) -> float:
    return train(wl, seed=seed, start=start, stop=stop).final_val


def coded_run(
    wl: Workload, seed: int, reference_step: int, model: torch.nn.Module | None = None
) -> tuple[dict[str, torch.Tensor], Run]:
    """The chain's reference weights and the run whose last checkpoint, ``interval`` steps on, is coded.

    The reference is step ``reference_step`` of run ``seed``, or at 0 the built model's weights
    (``model``, when the caller already built it for ``seed``).
    """
    coded_step = reference_step + wl.interval
    if reference_step:
        reference = train(wl, seed=seed, stop=reference_step, keep="last").ckpts[-1]
        return reference["state_dict"], train(wl, seed=seed, start=reference, stop=coded_step, keep="last")
    model = model or wl.build(seed)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return base, train(wl, seed=seed, stop=coded_step, keep="last")


def _seed(
    wl: Workload, seed: int, settings: dict[str, ExCPSettings], reference_step: int, horizon: int, tmp: Path
) -> dict[str, Any]:
    """One seed: every setting's ratio and loss changes, and the 70x setting's parts."""
    stop = reference_step + wl.interval + horizon
    model = wl.build(seed)  # also the evaluation model, and in full mode the pretrained reference
    base, run = coded_run(wl, seed, reference_step, model)
    exact = run.ckpts[-1]
    model.load_state_dict(exact["state_dict"])
    exact_at_resume = evaluate(model, wl)
    exact_after = _loss_after(wl, seed, exact, stop)
    rows: dict[str, Any] = {}
    for label, s in settings.items():
        writer = ChainWriter(s, tmp / f"seed{seed}-{len(rows)}", base, wl.model_desc)
        row, decoded = writer.write_and_decode(exact, run.names)
        model.load_state_dict(decoded["state_dict"])
        rows[label] = {
            "ratio": row["raw_tensor_bytes"] / Path(row["path"]).stat().st_size,
            "val_loss_delta_rel_at_resume": evaluate(model, wl) / exact_at_resume - 1,
            "val_loss_delta_rel_after_horizon": _loss_after(wl, seed, decoded, stop) / exact_after - 1,
            "bits_per_param": {k: row["stats"][f"bits_per_param_{k}"] for k in "wmv"},
        }
        if label == AT_70X:
            rows[label]["parts_after_horizon"] = {
                name: _loss_after(wl, seed, _with_decoded(exact, decoded, part), stop) / exact_after - 1
                for name, part in (("weights only", "weights"), ("m only", "exp_avg"), ("v only", "exp_avg_sq"))
            }
        print(f"seed {seed} {label}: {rows[label]}", flush=True)
        del decoded
    return {
        "seed": seed,
        "exact_val_at_resume": exact_at_resume,
        "exact_val_after_horizon": exact_after,
        "settings": rows,
    }


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _summary(seeds: list[dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label in labels:
        rows = [s["settings"][label] for s in seeds]
        out[label] = {
            "ratio": _spread([r["ratio"] for r in rows]),
            "val_loss_delta_rel_at_resume": _spread([r["val_loss_delta_rel_at_resume"] for r in rows]),
            "val_loss_delta_rel_after_horizon": _spread([r["val_loss_delta_rel_after_horizon"] for r in rows]),
        }
        if "parts_after_horizon" in rows[0]:
            out[label]["parts_after_horizon"] = {
                part: _spread([r["parts_after_horizon"][part] for r in rows]) for part in rows[0]["parts_after_horizon"]
            }
    return out


@dataclass
class OneResumeRun:
    """What a one-resume bench was asked for: its arguments, where it writes, and the workload's steps."""

    args: argparse.Namespace
    out: Path
    workload: Workload
    reference_step: int
    horizon: int

    def describe(self, setting: str = "", resumed: str = "resumed") -> str:
        """The record's ``workload`` words: which delta, how it was resumed and evaluated, how many seeds."""
        wl, step = self.workload, self.reference_step
        reference = "the pretrained weights" if wl.from_pretrained else "a reference from scratch"
        return (
            f"{wl.name}; the delta of step {step + wl.interval} against step {step} ({reference}){setting}, "
            f"{resumed} and trained {self.horizon} more steps on the uninterrupted run's batches; "
            f"{wl.val_batches} validation batches of {wl.batch} x {wl.block} tokens; {self.args.seeds} seeds "
            "(data order)"
        )


def one_resume_run(name: str, description: str) -> OneResumeRun:
    """Parse a one-resume bench's command line (``--quick``, ``--seeds``, ``--out``) and set its workload.

    The delta is taken against the pretrained weights in full mode and against step ``interval`` from
    scratch in quick mode, and trained twice its interval after the resume, on 3x the main bench's
    validation tokens: one resume moves the loss far less than nine.
    """
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="tiny from-scratch model (about a minute)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, help=f"JSON path (default bench/results/{name}[_quick].json)")
    args = ap.parse_args()
    if args.seeds < 1:
        ap.error(f"--seeds {args.seeds}: use 1 or more (3 for a seed-to-seed spread)")
    out = args.out or ROOT / "bench" / "results" / f"{name}{'_quick' if args.quick else ''}.json"
    torch.set_num_threads(THREADS)
    wl = quick_workload() if args.quick else full_workload()
    wl = replace(wl, val_batches=3 * wl.val_batches)
    return OneResumeRun(args, out, wl, 0 if wl.from_pretrained else wl.interval, 2 * wl.interval)


def main() -> None:
    started = time.perf_counter()
    run = one_resume_run("excp_resume_damage", __doc__.splitlines()[0])
    args, out, wl, reference_step, horizon = run.args, run.out, run.workload, run.reference_step, run.horizon
    settings = _settings()
    with tempfile.TemporaryDirectory(prefix="excp-resume-damage-") as tmp:  # the encoded deltas, removed at the end
        seeds = [_seed(wl, seed, settings, reference_step, horizon, Path(tmp)) for seed in range(args.seeds)]
    result = {
        "mode": "quick" if args.quick else "full",
        "workload": run.describe(),
        "threads": THREADS,
        "settings": {label: s.to_dict() for label, s in settings.items()},
        "summary": _summary(seeds, list(settings)),
        "seeds": seeds,
        "wall_s": time.perf_counter() - started,
    }
    atomic_write_json(out, result)
    for label, row in result["summary"].items():
        at, after = row["val_loss_delta_rel_at_resume"], row["val_loss_delta_rel_after_horizon"]
        print(
            f"{label}: {row['ratio']['mean']:.1f}x, loss at resume {at['mean']:+.2%} (sd {at['std']:.2%}), "
            f"after {horizon} steps {after['mean']:+.2%} (sd {after['std']:.2%})"
        )
        for part, value in row.get("parts_after_horizon", {}).items():
            print(f"    {part}: {value['mean']:+.2%} (sd {value['std']:.2%})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
