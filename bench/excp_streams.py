"""What bench/excp.py reports about ExCP's code streams and rate modes, read back from the files written.

* :func:`stream_report`: per stream kind (weight codes with their pruning mask, m codes with theirs,
  v codes) the bits each coded stream spends per symbol next to its empirical order-0 entropy, the
  entropy split into mask and kept-index parts, the codebooks' share, and which coder each stream took;
* :func:`gradient_scale_report`: bits per parameter of every delta under ``alpha`` and under
  ``target_bits_per_param`` when the run's gradients are scaled (Adam's moments scaled as loss scaling
  scales them: m by s, v by s^2; the weights move alike).
"""

from __future__ import annotations

import copy
import struct
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from callbacks.excp.codec import ExCPSettings  # noqa: E402
from callbacks.excp.encoder import ExCPEncoder  # noqa: E402
from callbacks.excp.entropy import entropy_bits  # noqa: E402
from callbacks.excp.fileformat import ExCPFile  # noqa: E402
from callbacks.excp.quantize import decode_indices  # noqa: E402
from common.atomic import atomic_write_bytes  # noqa: E402

_MODES = {0: "zstd bytes", 1: "zstd packed", 2: "zstd bitmap+packed", 3: "constant", 4: "rANS"}


def _binary_entropy(p: float) -> float:
    return 0.0 if p <= 0 or p >= 1 else float(-(p * np.log2(p) + (1 - p) * np.log2(1 - p)))


def stream_report(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """Achieved bits per symbol vs order-0 entropy of every delta stream of these files, per kind."""
    totals: dict[str, Counter] = {k: Counter() for k in ("w", "m", "v")}
    modes: dict[str, Counter] = {k: Counter() for k in ("w", "m", "v")}
    for path in paths:
        file = ExCPFile.open(path)
        if file.header["kind"] != "delta":
            continue
        for entry in file.header["entries"]:
            if entry["w_mode"] == "lossless":
                continue
            records = {"w": entry["rec_w"]}
            records.update({key: (entry.get(key) or {}).get("rec") for key in ("m", "v")})
            for kind, record in records.items():
                if record is None:
                    continue
                blob = file.record(record)
                (k,) = struct.unpack_from("<I", blob, 0)
                payload = blob[4 + 4 * k :]
                codes = decode_indices(payload)
                nonzero = int(np.count_nonzero(codes))
                t = totals[kind]
                t["symbols"] += codes.size
                t["coded_bits"] += 8 * len(payload)
                t["codebook_bits"] += 8 * (4 + 4 * k)
                t["entropy_bits"] += entropy_bits(np.bincount(codes)) if codes.size else 0.0
                t["mask_entropy_bits"] += codes.size * _binary_entropy(nonzero / codes.size) if codes.size else 0.0
                t["nonzero"] += nonzero
                modes[kind][_MODES.get(payload[0], "?")] += 1
    report = {}
    for kind, t in totals.items():
        n = max(t["symbols"], 1)
        report[kind] = {
            "symbols": int(t["symbols"]),
            "bits_per_symbol": t["coded_bits"] / n,
            "entropy_bits_per_symbol": t["entropy_bits"] / n,
            "excess_over_entropy": t["coded_bits"] / t["entropy_bits"] - 1 if t["entropy_bits"] else 0.0,
            "mask_entropy_bits_per_symbol": t["mask_entropy_bits"] / n,
            "kept_index_entropy_bits_per_kept": (t["entropy_bits"] - t["mask_entropy_bits"]) / max(t["nonzero"], 1),
            "kept_share": t["nonzero"] / n,
            "codebook_bits_per_symbol": t["codebook_bits"] / n,
            "streams_by_coder": dict(modes[kind]),
        }
    return report


def entropy_coding_report(
    series_paths: dict[str, list[Path]],
    ablations: list[dict[str, Any]],
    series_rows: dict[str, list[dict[str, Any]]],
    per_ckpt: list[dict[str, Any]],
    pairs: dict[str, tuple[str, str]],
) -> dict[str, Any]:
    """Streams and median delta ratios of each (rANS, zstd layouts only) pair of encoded variants."""
    by_variant = {a["variant"]: a for a in ablations}
    report: dict[str, Any] = {}
    for suffix, (auto, zstd) in pairs.items():
        after, before = by_variant[auto]["delta_ratio_median"], by_variant[zstd]["delta_ratio_median"]
        report[f"streams{suffix}"] = stream_report(series_paths[auto])
        report[f"streams{suffix}_zstd_layouts_only"] = stream_report(series_paths[zstd])
        report[f"delta_ratio_median{suffix}"] = after
        report[f"delta_ratio_median{suffix}_zstd_layouts_only"] = before
        report[f"ratio_change{suffix}"] = after / before - 1
        report[f"delta_speed_mb_s{suffix}"] = {name: delta_speed(series_rows[name], per_ckpt) for name in (auto, zstd)}
        for kind, r in report[f"streams{suffix}"].items():
            z = report[f"streams{suffix}_zstd_layouts_only"][kind]
            print(
                f"{auto}, stream {kind}: {r['bits_per_symbol']:.3f} bits/symbol (zstd layouts only "
                f"{z['bits_per_symbol']:.3f}), order-0 entropy {r['entropy_bits_per_symbol']:.3f} "
                f"({r['excess_over_entropy'] * 100:+.1f}%), coders {r['streams_by_coder']}"
            )
        print(f"{auto}: median delta ratio {after:.2f}x, {before:.2f}x with the zstd layouts only")
    return report


def delta_speed(rows: list[dict[str, Any]], per_ckpt: list[dict[str, Any]]) -> dict[str, float]:
    """Encode and decode MB/s of raw checkpoint tensors over the delta files of one encoded series."""
    ids = [i for i, r in enumerate(per_ckpt) if r["kind"] == "delta"]
    raw = sum(per_ckpt[i]["raw_tensor_bytes"] for i in ids) / 2**20
    return {f"{key}_mb_s": raw / sum(rows[i][f"{key}_s"] for i in ids) for key in ("encode", "decode")}


def _scaled(ckpt: dict[str, Any], scale: float) -> dict[str, Any]:
    ckpt = copy.deepcopy(ckpt)
    for state in ckpt["optimizer_states"][0]["state"].values():
        state["exp_avg"] *= scale
        state["exp_avg_sq"] *= scale * scale
    return ckpt


def _delta_bits(ckpts: list[dict[str, Any]], settings: ExCPSettings, names: list[str], folder: Path) -> list[float]:
    folder.mkdir(parents=True, exist_ok=True)
    encoder = ExCPEncoder(settings)
    bits = []
    for i, ckpt in enumerate(ckpts):
        path = folder / f"ckpt-{i}.excp"
        encoded = encoder.encode(ckpt, target=path, optimizer_param_names=[names])
        atomic_write_bytes(path, encoded.data)
        encoder.commit(encoded, path)
        s = encoded.stats
        if not s["keyframe"]:
            bits.append(s["bits_per_param_w"] + s["bits_per_param_m"] + s["bits_per_param_v"])
    return bits


def gradient_scale_report(
    ckpts: list[dict[str, Any]], names: list[str], default: ExCPSettings, target: float, folder: Path
) -> dict[str, Any]:
    """W+m+v bits per parameter of each delta, alpha vs a bit budget, at gradient scales 0.01, 1, 100."""
    budget = ExCPSettings(**{**default.to_dict(), "alpha": None, "target_bits_per_param": target})
    rows = {}
    for scale in (0.01, 1.0, 100.0):
        series = [_scaled(c, scale) for c in ckpts]
        alpha_bits = _delta_bits(series, default, names, folder / f"alpha-{scale}")
        target_bits = _delta_bits(series, budget, names, folder / f"target-{scale}")
        rows[f"{scale:g}"] = {
            "alpha_bits_per_param": alpha_bits,
            "target_bits_per_param": target_bits,
            "target_max_rel_error": max(abs(b - target) / target for b in target_bits),
        }
        print(
            f"gradient scale {scale:g}: alpha {min(alpha_bits):.2f}-{max(alpha_bits):.2f} bits/param, "
            f"target {target}: {min(target_bits):.3f}-{max(target_bits):.3f}"
        )
    return {"target": target, "by_gradient_scale": rows, "note": "m scaled by s, v by s^2 (what loss scaling does)"}
