"""ExCP benchmark: storage of a whole training run, resume quality over seeds, ablations that resume, speed.

Workloads (real training with AdamW state, the only way to get checkpoint series offline):
  --quick  a tiny Llama trained from scratch on the offline Shakespeare corpus (bytes as tokens);
  default  SmolLM2-135M-Instruct (shipped, offline) continued pretraining on the same corpus, its
           chain starting from the pretrained weights (referenced by hash): 100 steps with a
           checkpoint every 10; what is smaller than a real run, the JSON's ``workload.shrunk`` says.

Measured in one run, with 2 threads (``ExCPSettings.threads=2``, ``torch.set_num_threads(2)``):
  * resume quality: per seed (data order and, from scratch, init) a run resumed from every ExCP file
    it wrote (>= 5 lossy resumes, weights and Adam moments decoded) against the uninterrupted run;
    |final val loss delta| beside the seed-to-seed spread; quick mode also with Adam betas (0.9, 0.999);
  * storage of the whole run: every byte of every file the lossy run of seed 0 wrote against the raw
    fp32 W+m+v of every checkpoint (``overall_ratio``), and the keyframe-interval trade-off (total
    bytes vs time to load the last checkpoint);
  * speed: encode / decode MB/s of raw checkpoint tensors over that run's deltas, and on large tensors;
  * alternative settings (uniform levels instead of k-means codebooks; a 70x bit budget with weights
    ranked by ``|dW| * sqrt(v / mean(v))``, split evenly or by the Fisher weight across tensors):
    every seed's lossy-resume run again, with its ratios and |final val loss delta|
    (``alternative_settings``). Quick mode measures all of them; full mode only the one at the paper's
    ratio (the 70x budget split by the Fisher weight), so that it finishes within an hour on 2 cores;
    ``--extra-settings`` measures the others against fresh uninterrupted runs in a record of their own;
  * quick mode only: per-checkpoint bytes against torch.save / zstd / byte-grouped zstd; ablations
    (no residual, weight-only pruning, uniform quantization, linear-domain v, raw v in the weight rule,
    2/3/8 bits, zstd layouts only, bit budgets) each resumed from its reconstruction; bits per symbol of
    every code stream against its entropy (bench/excp_streams.py); bits per parameter under alpha vs a bit budget at
    gradient scales 0.01, 1 and 100.
Writes bench/results/excp.json (quick), excp_smollm2.json (full) or excp_smollm2_extra_settings.json
(``--extra-settings``), and a PNG beside each.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from excp_plot import plot, plot_settings  # noqa: E402
from excp_quality import ablation_resumes, resume_quality  # noqa: E402
from excp_storage import (  # noqa: E402
    encode_series,
    keyframe_tradeoff,
    keyframe_tradeoff_estimate,
    large_tensor_speed,
    measure_keyframe,
    per_checkpoint_rows,
    storage_summary,
)
from excp_streams import entropy_coding_report, gradient_scale_report, stream_report  # noqa: E402
from excp_workload import Workload, full_workload, quick_workload, train  # noqa: E402
from records import read_record  # noqa: E402

from callbacks.excp.codec import ExCPSettings  # noqa: E402
from common.atomic import atomic_write_json  # noqa: E402

THREADS = 2
INTERVALS = [1, 2, 5, 10, 20, 50, 1000]
ZSTD_ONLY = "zstd layouts only (before rANS)"
ZSTD_ONLY_SPARSE = "alpha 5e-3, zstd layouts only"
DEFAULT = "excp 4-bit (method)"
TARGETS = {  # the targets; quick mode has only the delta-ratio one
    "full": {
        "delta_ratio_median": 70,
        "overall_ratio": 25,
        "final_loss_delta_abs_rel": 0.01,
        "encode_mb_s": 100,
        "decode_mb_s": 500,
    },
    "quick": {"delta_ratio_median": 30},
}


#: Bits per parameter (W+m+v together) of a 70x delta against fp32 W+m+v: 3 x 32 / 70.
BITS_AT_70X = 1.37
#: The label of the 70x alternative in the record (its ``alternative_settings`` key).
SETTING_AT_70X = "fisher k-means 4-bit, 70x budget"
#: The same budget split across tensors by the Fisher weight (``budget_allocation="fisher"``).
SETTING_AT_70X_FISHER_SPLIT = "fisher k-means 4-bit, 70x budget, Fisher split across tensors"


def _alternatives(default: ExCPSettings) -> dict[str, ExCPSettings]:
    """Settings measured over every seed like the default: entropy-coded uniform levels instead of
    k-means codebooks at the default's 4 bits, and a 70x bit budget with weights ranked by the Fisher
    saliency and k-means codebooks (one resume, bench/excp_resume_damage.py: +0.37% after 20 steps
    against uniform levels' +0.61%; uniform 3-bit, 60x at 1.5% over 9 resumes, did worse), with the
    budget split evenly across tensors and by the Fisher weight."""
    uniform = replace(default, quantizer="uniform")
    at_70x = replace(default, alpha=None, target_bits_per_param=BITS_AT_70X, weight_saliency="fisher")
    return {
        "uniform 4-bit": uniform,
        SETTING_AT_70X: at_70x,
        SETTING_AT_70X_FISHER_SPLIT: replace(at_70x, budget_allocation="fisher"),
    }


#: The alternatives full mode measures beside the default; ``--extra-settings`` measures the rest. Each costs
#: every seed's lossy run again (~17 min on 2 cores): all of them in one run would take ~80 min.
FULL_MODE_ALTERNATIVES = (SETTING_AT_70X_FISHER_SPLIT,)
#: The ``mode`` of an ``--extra-settings`` record (no default runs, so it has its own figure).
EXTRA_SETTINGS_MODE = "full, extra settings"


def _alternatives_for(mode: str, default: ExCPSettings) -> dict[str, ExCPSettings]:
    """The alternative settings a run of ``mode`` ("quick", "full" or "extra") measures."""
    every = _alternatives(default)
    if mode == "quick":
        return every
    in_full = {label: every[label] for label in FULL_MODE_ALTERNATIVES}
    if mode == "full":
        return in_full
    return {label: settings for label, settings in every.items() if label not in in_full}


def _variants(default: ExCPSettings) -> dict[str, ExCPSettings]:
    return {
        DEFAULT: default,
        "2-bit": replace(default, bits_w=2, bits_m=2, bits_v=2),
        "3-bit": replace(default, bits_w=3, bits_m=3, bits_v=3),
        "8-bit": replace(default, bits_w=8, bits_m=8, bits_v=8),
        "no residual": replace(default, residual=False),
        "weight-only pruning": replace(default, momentum_criterion=False),
        **_alternatives(default),
        "linear-domain v (paper)": replace(default, v_log_domain=False),
        "raw v in the weight rule (paper)": replace(default, v_bias_correction=False),
        "alpha 5e-4": replace(default, alpha=5e-4),
        "alpha 5e-3": replace(default, alpha=5e-3),
        ZSTD_ONLY: replace(default, entropy_coder="zstd"),
        "target 2 bits/param": replace(default, target_bits_per_param=2.0),
        "target 1 bit/param": replace(default, target_bits_per_param=1.0),
        ZSTD_ONLY_SPARSE: replace(default, alpha=5e-3, entropy_coder="zstd"),
    }


def _quick_extras(wl: Workload, base0: Any, default: ExCPSettings, tmp: Path) -> dict[str, Any]:
    """Per-checkpoint baselines, resumed ablations, stream entropy, rate control, interval trade-off."""
    ckpts, names = base0.ckpts, base0.names
    model = wl.build(0)
    variants = _variants(default)
    ablations, series_rows, folders = ablation_resumes(wl, base0, variants, tmp / "ablations", model)
    key_rows = encode_series(
        ckpts, replace(default, keyframe_interval=1, keyframe_moments="lossless"), names, tmp / "keyframes"
    )
    per_ckpt = per_checkpoint_rows(ckpts, base0.val, series_rows[DEFAULT], key_rows, wl, model)
    series_paths = {name: [Path(r["path"]) for r in rows] for name, rows in series_rows.items()}
    pairs = {"": (DEFAULT, ZSTD_ONLY), "_alpha_5e-3": ("alpha 5e-3", ZSTD_ONLY_SPARSE)}
    deltas = [r for r in per_ckpt if r["kind"] == "delta"]
    lossless_moments = replace(default, keyframe_moments="lossless")
    lossless_rows = encode_series(ckpts, lossless_moments, names, tmp / "lossless-keyframe-moments")
    return {
        "per_checkpoint": per_ckpt,
        "ablations": ablations,
        "entropy_coding": entropy_coding_report(series_paths, ablations, series_rows, per_ckpt, pairs),
        "rate_control": gradient_scale_report(ckpts, names, default, 2.0, tmp / "rate"),
        "keyframe_interval_tradeoff": keyframe_tradeoff(ckpts, default, names, INTERVALS, tmp / "intervals"),
        "overall_ratio_uninterrupted_series": {
            "keyframe_moments_lossy": storage_summary(series_rows[DEFAULT], folders[DEFAULT])["overall_ratio"],
            "keyframe_moments_lossless": storage_summary(lossless_rows, tmp / "lossless-keyframe-moments")[
                "overall_ratio"
            ],
        },
        "baselines_median_ratio_vs_torch_save": {
            "zstd": statistics.median(r["zstd_ratio"] for r in per_ckpt),
            "bytegroup_zstd": statistics.median(r["bytegroup_zstd_ratio"] for r in per_ckpt),
            "excp_delta": statistics.median(r["ratio_vs_torch_save"] for r in deltas),
        },
        "reconstructed_val_loss_delta_rel_max": max(r["val_loss_delta_rel"] for r in per_ckpt),
        "speed_large_tensors": large_tensor_speed(ckpts, names, default),
    }


def _full_extras(
    last: dict[str, Any], names: list[str], storage: dict[str, Any], default: ExCPSettings, tmp: Path
) -> dict[str, Any]:
    """Keyframe-interval trade-off from measured parts, and keyframe sizes with both moment codings."""
    keyframes = {
        mode: measure_keyframe(last, replace(default, keyframe_moments=mode), names, tmp / f"keyframe-{mode}")
        for mode in ("lossy", "lossless")
    }
    for mode, k in keyframes.items():
        k["ratio"] = _raw_per_checkpoint(storage) / k["bytes"]
        print(
            f"keyframe with {mode} moments: {k['bytes'] / 2**20:.0f} MB ({k['ratio']:.2f}x), "
            f"encode {k['encode_s']:.1f} s, decode {k['decode_s']:.1f} s"
        )
    return {"keyframe_interval_tradeoff": _tradeoff_estimate(storage, keyframes["lossy"]), "keyframes": keyframes}


def _raw_per_checkpoint(storage: dict[str, Any]) -> float:
    return storage["raw_wmv_fp32_bytes_all_checkpoints"] / storage["files"]


def _tradeoff_estimate(storage: dict[str, Any], keyframe: dict[str, float]) -> dict[str, Any]:
    """The keyframe-interval trade-off of a full run, from its files and one measured keyframe."""
    return keyframe_tradeoff_estimate(storage["per_file"], keyframe, INTERVALS, _raw_per_checkpoint(storage))


def _resumes_with(
    wl: Workload, pairs: dict[int, tuple[Any, Any]], settings: ExCPSettings, label: str, tmp: Path
) -> dict[str, Any]:
    """Every seed's lossy-resume run again with other codec ``settings``, against the same
    uninterrupted runs: storage of seed 0's run and resume quality over the seeds, as for the default."""
    print(f"{label}:")
    folder = tmp / label.replace(" ", "-").replace("/", "-")
    runs = {s: (base, train(wl, seed=s, lossy=settings, workdir=folder / f"seed{s}")) for s, (base, _) in pairs.items()}
    quality = resume_quality(runs)
    storage = storage_summary(runs[0][1].files, folder / "seed0")
    keys = ("final_loss_delta_abs_rel", "final_loss_delta_rel_per_seed", "seed_spread_rel", "within_seed_spread")
    out = {"settings": settings.to_dict(), **{k: storage[k] for k in ("delta_ratio_median", "overall_ratio")}}
    out.update({k: quality[k] for k in keys})
    out.update(encode_mb_s=storage["delta_encode_mb_s"], decode_mb_s=storage["delta_decode_mb_s"])
    spread = quality["seed_spread_rel"]
    print(
        f"{label}: median delta {out['delta_ratio_median']:.1f}x, overall {out['overall_ratio']:.1f}x, "
        f"|final loss delta| {out['final_loss_delta_abs_rel']:.2%}"
        + (f" (seed spread {spread:.2%})" if spread is not None else "")
    )
    return out


def _extra_settings(wl: Workload, settings: dict[str, ExCPSettings], seeds: int, out: Path, tmp: Path) -> None:
    """Full mode's other alternative ``settings``, each over every seed's lossy-resume run, against
    uninterrupted runs trained afresh here (the same seeds and data orders as the main record's)."""
    torch.set_num_threads(THREADS)
    t_start = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    print(f"workload: {wl.name}, {wl.steps} steps, checkpoint every {wl.interval}; settings: {', '.join(settings)}")
    timings: dict[str, float] = {}
    pairs: dict[int, tuple[Any, Any]] = {}
    for seed in range(seeds):
        started = time.perf_counter()
        pairs[seed] = (train(wl, seed=seed), None)
        timings[f"uninterrupted_run_seed{seed}_s"] = time.perf_counter() - started
    started = time.perf_counter()
    alternatives = {label: _resumes_with(wl, pairs, s, label, tmp) for label, s in settings.items()}
    timings["alternative_settings_s"] = time.perf_counter() - started
    finals = [base.final_val for base, _ in pairs.values()]
    result: dict[str, Any] = {
        "mode": EXTRA_SETTINGS_MODE,
        "workload": _workload_line(wl, seeds),
        "workload_details": wl.describe(),
        "threads": THREADS,
        "main_record": "bench/results/excp_smollm2.json: the default and the setting at the paper's ratio, "
        "on the same workload and seeds",
        "final_val_uninterrupted_per_seed": finals,
        "alternative_settings": alternatives,
        "machine": _machine(load_at_start),
        "timings_s": timings,
        "wall_s": time.perf_counter() - t_start,
    }
    atomic_write_json(out, result)
    plot_settings(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} in {result['wall_s']:.0f} s")


def _workload_line(wl: Workload, seeds: int) -> str:
    """The record's one-line workload: what was trained, how often it was saved, and what was shrunk."""
    return (
        f"{wl.name}; {wl.steps} steps, a checkpoint every {wl.interval}, {seeds} seeds; the chain starts from "
        f"{wl.describe()['chain_start']}; shrunk: {wl.shrunk or 'nothing'}"
    )


def _machine(load_at_start: float) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor(),
        "load_average_1m_at_start_and_end": [load_at_start, os.getloadavg()[0]],
    }


def _recompute_tradeoff(path: Path) -> None:
    """Rewrite a full record's keyframe-interval estimate from the files and keyframe it measured."""
    from datetime import UTC, datetime

    result = read_record(path, "recompute", "bench/excp.py")
    if result.get("mode") != "full":
        raise SystemExit(f"{path}: --recompute-tradeoff needs a full-mode record (its keyframe is measured there)")
    try:
        tradeoff = _tradeoff_estimate(result["storage"], result["keyframes"]["lossy"])
    except (KeyError, TypeError) as err:
        raise SystemExit(f"{path}: the record lacks {err} to recompute; run `python bench/excp.py` again") from None
    tradeoff["recomputed"] = f"from this record's measured parts on {datetime.now(UTC):%Y-%m-%d}, no training"
    result["keyframe_interval_tradeoff"] = tradeoff
    atomic_write_json(path, result)


def _replot(path: Path) -> None:
    """Redraw a record's figure from the record alone (per-seed validation curves included)."""
    from types import SimpleNamespace

    from excp_workload import Run

    result = read_record(path, "replot", "bench/excp.py")
    if result.get("mode") == EXTRA_SETTINGS_MODE:
        plot_settings(result, path.with_suffix(".png"))
        return
    try:
        pairs = {
            r["seed"]: (Run([], val=r["val_uninterrupted"]), Run([], val=r["val_lossy"], resumes=r["resumes"]))
            for r in result["lossy_resume"]["seeds"]
        }
        details = result["workload_details"]
        wl = SimpleNamespace(name=details["name"], interval=details["checkpoint_every"])
    except (KeyError, TypeError) as err:
        raise SystemExit(f"{path}: the record lacks {err} to replot; run `python bench/excp.py` again") from None
    plot(result, pairs, wl, path.with_suffix(".png"))


def _report_targets(result: dict[str, Any]) -> dict[str, Any]:
    """Each target beside its figure, met or missed."""
    out = {}
    for key, target in TARGETS[result["mode"]].items():
        value = result[key]
        met = value <= target if key == "final_loss_delta_abs_rel" else value >= target
        out[key] = {"value": value, "target": target, "met": met}
        sign = "<=" if key == "final_loss_delta_abs_rel" else ">="
        print(f"{key:26s} {value:10.4g}  target {sign} {target:<6g} {'met' if met else 'MISSED'}")
    spread = result["seed_spread_rel"]
    within = spread is not None and result["final_loss_delta_abs_rel"] <= spread
    out["final_loss_delta_within_seed_spread"] = {"value": within, "seed_spread_rel": spread, "met": within}
    print(f"final_loss_delta_abs_rel within the seed spread ({spread:.4g}): {'met' if within else 'MISSED'}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny from-scratch model (5-20 minutes on 2 shared cores)")
    ap.add_argument("--seeds", type=int, default=3, help="runs (uninterrupted + lossy-resumed) per seed")
    ap.add_argument(
        "--compare-keyframe-moments",
        action="store_true",
        help="quick mode: also run every seed's lossy resumes with lossless keyframe moments (~+30%% time)",
    )
    ap.add_argument("--out", type=Path, help="JSON path (default bench/results/excp[_smollm2].json)")
    ap.add_argument(
        "--recompute-tradeoff",
        action="store_true",
        help="full mode: recompose the keyframe-interval estimate of an existing record from its measured "
        "parts (no training), e.g. after a fix to that estimate",
    )
    ap.add_argument(
        "--extra-settings",
        action="store_true",
        help="full mode: measure the alternative settings the main record leaves out (uniform 4-bit, the 70x "
        "budget split evenly) against fresh uninterrupted runs (~45 min on 2 cores)",
    )
    ap.add_argument("--replot", action="store_true", help="redraw the PNG of an existing record (no training)")
    args = ap.parse_args()
    if args.extra_settings and (args.quick or args.recompute_tradeoff):
        ap.error("--extra-settings is a full-mode run of its own: drop --quick and --recompute-tradeoff")
    if args.extra_settings:
        out = args.out or ROOT / "bench" / "results" / "excp_smollm2_extra_settings.json"
        if args.replot:
            _replot(out)
            return
        with tempfile.TemporaryDirectory(prefix="excp-bench-extra-") as tmp:  # GBs of ExCP files
            default = ExCPSettings(threads=THREADS, keyframe_moments="lossy")
            _extra_settings(full_workload(), _alternatives_for("extra", default), args.seeds, out, Path(tmp))
        return
    out = args.out or ROOT / "bench" / "results" / ("excp.json" if args.quick else "excp_smollm2.json")
    if args.recompute_tradeoff:
        _recompute_tradeoff(out)
        return
    if args.replot:
        _replot(out)
        return
    with tempfile.TemporaryDirectory(prefix="excp-bench-") as tmp:  # GBs of ExCP files
        _measure(args, out, Path(tmp))


def _measure(args: argparse.Namespace, out: Path, tmp: Path) -> None:
    """The default's runs over the seeds, storage, speed, the alternative settings and the mode's extras."""
    torch.set_num_threads(THREADS)
    t_start = time.perf_counter()
    load_at_start = os.getloadavg()[0]  # speeds are only comparable at similar machine load
    wl = quick_workload() if args.quick else full_workload()
    print(f"workload: {wl.name}, {wl.steps} steps, checkpoint every {wl.interval}")
    default = ExCPSettings(threads=THREADS, keyframe_moments="lossy")

    pairs, timings = {}, {}
    for seed in range(args.seeds):
        started = time.perf_counter()
        keep = "none" if seed else ("all" if args.quick else "last")
        base = train(wl, seed=seed, keep=keep)
        timings[f"uninterrupted_run_seed{seed}_s"] = time.perf_counter() - started
        started = time.perf_counter()
        pairs[seed] = (base, train(wl, seed=seed, lossy=default, workdir=tmp / f"lossy-seed{seed}"))
        timings[f"lossy_run_seed{seed}_s"] = time.perf_counter() - started
        print(
            f"seed {seed}: uninterrupted run {timings[f'uninterrupted_run_seed{seed}_s']:.0f} s, run with "
            f"{pairs[seed][1].resumes} lossy resumes {timings[f'lossy_run_seed{seed}_s']:.0f} s",
            flush=True,
        )
        if seed == 0 and not args.quick:  # measure the last checkpoint as a keyframe, then free its 1.6 GB
            started = time.perf_counter()
            storage = storage_summary(pairs[0][1].files, tmp / "lossy-seed0")
            full_extras = _full_extras(base.ckpts.pop(), base.names, storage, default, tmp)
            timings["full_keyframes_s"] = time.perf_counter() - started
    quality = resume_quality(pairs)
    base0, lossy0 = pairs[0]
    storage = storage_summary(lossy0.files, tmp / "lossy-seed0")
    print(
        f"run of seed 0: {storage['files']} files ({storage['keyframes']} keyframes), overall ratio "
        f"{storage['overall_ratio']:.1f}x, median delta {storage['delta_ratio_median']:.1f}x"
    )

    result: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "workload": _workload_line(wl, args.seeds),
        "workload_details": wl.describe(),
        "settings": default.to_dict(),
        "threads": THREADS,
        "delta_ratio_median": storage["delta_ratio_median"],
        "overall_ratio": storage["overall_ratio"],
        "final_loss_delta_abs_rel": quality["final_loss_delta_abs_rel"],
        "seed_spread_rel": quality["seed_spread_rel"],
        "seed_spread_definition": quality["seed_spread_definition"],
        "encode_mb_s": storage["delta_encode_mb_s"],
        "decode_mb_s": storage["delta_decode_mb_s"],
        "speed_note": "raw W+m+v (+ other tensors) MB of the deltas the seed-0 run wrote, per second of encode() "
        "and of decoding each file as the resume did; threads = ExCPSettings.threads and torch threads",
        "storage": storage,
        "lossy_resume": quality,
    }
    started = time.perf_counter()
    result["alternative_settings"] = {
        label: _resumes_with(wl, pairs, settings, label, tmp)
        for label, settings in _alternatives_for(result["mode"], default).items()
    }
    timings["alternative_settings_s"] = time.perf_counter() - started
    if args.quick:
        started = time.perf_counter()
        slow = {"0.9,0.999": (0.9, 0.999)}
        for key, betas in slow.items():
            base = train(wl, seed=0, betas=betas)
            lossy = train(wl, seed=0, betas=betas, lossy=default, workdir=tmp / f"lossy-betas-{key}")
            result["final_loss_delta_rel_beta2_0999"] = (lossy.final_val - base.final_val) / base.final_val
            result["beta2_0999_note"] = "one seed (0); Adam betas (0.9, 0.999) instead of (0.9, 0.95)"
            print(
                f"betas {betas}: final val loss {base.final_val:.4f} -> {lossy.final_val:.4f} after "
                f"{lossy.resumes} lossy resumes ({result['final_loss_delta_rel_beta2_0999'] * 100:+.3f}%)"
            )
        if args.compare_keyframe_moments:
            lossless = replace(default, keyframe_moments="lossless")
            result["lossy_resume_keyframe_moments_lossless"] = _resumes_with(
                wl, pairs, lossless, "with lossless keyframe moments", tmp
            )
        result.update(_quick_extras(wl, base0, default, tmp))
        timings["quick_extras_s"] = time.perf_counter() - started
    else:
        started = time.perf_counter()
        result.update(full_extras)
        result["entropy_coding"] = {"streams": stream_report([Path(r["path"]) for r in lossy0.files])}
        timings["full_extras_s"] = time.perf_counter() - started
    result["targets"] = _report_targets(result)
    result["machine"] = _machine(load_at_start)
    result["timings_s"] = timings
    result["wall_s"] = time.perf_counter() - t_start
    atomic_write_json(out, result)
    plot(result, pairs, wl, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
