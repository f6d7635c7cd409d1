"""What bench/excp.py reports about storage and speed: whole-run ratios, the keyframe-interval trade-off,
per-checkpoint sizes against lossless baselines, codec throughput.

* :func:`storage_summary`: every byte a run wrote (keyframes, deltas, reference records) against the
  raw fp32 W+m+v of every checkpoint it saved -- the headline ``overall_ratio``;
* :func:`keyframe_tradeoff`: total bytes and time to load the last checkpoint (chain replay) for several
  keyframe intervals, encoding the same series once per interval; :func:`keyframe_tradeoff_estimate`
  composes the same table from measured parts (one keyframe, a run's deltas) where re-encoding a
  1.6 GB-per-checkpoint series per interval would not fit the time budget;
* :func:`per_checkpoint_rows`: torch.save, zstd, byte-grouped zstd (= a lossless keyframe) and ExCP
  bytes of each checkpoint, with the validation loss of its reconstruction;
* :func:`large_tensor_speed`: codec MB/s without per-tensor overhead.
"""

from __future__ import annotations

import io
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import zstandard  # noqa: E402
from excp_workload import ChainWriter, Workload, evaluate, raw_tensor_bytes  # noqa: E402

from callbacks.excp.codec import ExCPSettings  # noqa: E402
from callbacks.excp.decoder import load_checkpoint  # noqa: E402

MB = 2**20


def encode_series(
    ckpts: list[dict[str, Any]],
    settings: ExCPSettings,
    names: list[str],
    workdir: Path,
    base: dict[str, torch.Tensor] | None = None,
) -> list[dict[str, Any]]:
    """Encode a series as one chain (from ``base`` if given) and decode each file back as it is written.

    Each row holds the file's ``stats``, ``encode_s``, ``decode_s``, ``raw_tensor_bytes`` and the
    ``decoded`` checkpoint (what a resume from that file gets).
    """
    writer = ChainWriter(settings, workdir, base, "series")
    rows = []
    for ckpt in ckpts:
        row, decoded = writer.write_and_decode(ckpt, names)
        row["decoded"] = decoded
        rows.append(row)
    return rows


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder`` (reference records and sidecars included)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def storage_summary(rows: list[dict[str, Any]], folder: Path) -> dict[str, Any]:
    """Whole-run storage of the chain in ``folder`` whose files are ``rows``; delta medians and speeds."""
    deltas = [r for r in rows if not r["stats"]["keyframe"]]
    raw = sum(r["stats"]["raw_wmv_bytes"] for r in rows)
    written = folder_bytes(folder)
    delta_raw = sum(r["raw_tensor_bytes"] for r in deltas) / MB
    return {
        "files": len(rows),
        "keyframes": len(rows) - len(deltas),
        "raw_wmv_fp32_bytes_all_checkpoints": raw,
        "written_bytes_all_files": written,
        "overall_ratio": raw / written,
        "delta_ratio_median": statistics.median(r["stats"]["ratio"] for r in deltas) if deltas else None,
        "keyframe_ratios": [r["stats"]["ratio"] for r in rows if r["stats"]["keyframe"]],
        "delta_encode_mb_s": delta_raw / sum(r["encode_s"] for r in deltas) if deltas else None,
        "delta_decode_mb_s": delta_raw / sum(r["decode_s"] for r in deltas) if deltas else None,
        "per_file": [
            {
                "step": r["step"],
                "kind": "keyframe" if r["stats"]["keyframe"] else "delta",
                "bytes": r["stats"]["file_bytes"],
                "ratio": r["stats"]["ratio"],
                "bits_per_param": {k: r["stats"][f"bits_per_param_{k}"] for k in ("w", "m", "v")},
                "encode_s": r["encode_s"],
                "decode_s": r["decode_s"],
            }
            for r in rows
        ],
    }


def keyframe_tradeoff(
    ckpts: list[dict[str, Any]], settings: ExCPSettings, names: list[str], intervals: list[int], workdir: Path
) -> dict[str, Any]:
    """Encode the series once per keyframe interval: bytes of all files, time to load the last one."""
    from dataclasses import replace

    rows = []
    raw = sum(raw_tensor_bytes(c) for c in ckpts)
    for interval in intervals:
        folder = workdir / f"interval-{interval}"
        series = encode_series(ckpts, replace(settings, keyframe_interval=interval), names, folder)
        last = Path(series[-1]["path"])
        started = time.perf_counter()
        load_checkpoint(last)
        load_s = time.perf_counter() - started
        written = folder_bytes(folder)
        rows.append(
            {
                "keyframe_interval": interval,
                "keyframes": sum(1 for r in series if r["stats"]["keyframe"]),
                "total_bytes": written,
                "overall_ratio": raw / written,
                "load_last_s": load_s,
                "encode_s_total": sum(r["encode_s"] for r in series),
            }
        )
        print(
            f"keyframe interval {interval:5d}: {rows[-1]['keyframes']} keyframes, {written / MB:8.2f} MB "
            f"({rows[-1]['overall_ratio']:.1f}x), load the last checkpoint in {load_s:.2f} s"
        )
    return {"measured": "each interval encoded and the last checkpoint loaded (chain replay)", "rows": rows}


def keyframe_tradeoff_estimate(
    files: list[dict[str, Any]], keyframe: dict[str, float], intervals: list[int], raw_per_ckpt: float
) -> dict[str, Any]:
    """The trade-off composed from measured parts: a keyframe's bytes and decode seconds (measured once)
    and each delta file's of a chain from the pretrained weights. File ``i`` (0-based) becomes a
    keyframe when ``(i + 1) % interval == 0`` (the pretrained reference counts as the chain's start).

    ``files`` are the run's ``per_file`` rows; one the run wrote as a keyframe has no delta size of its
    own, so where an interval makes it a delta it is costed at the median of the run's deltas (listed
    in the row's ``deltas_at_median``).

    Each row also projects a run much longer than the interval (every chain segment a keyframe and
    ``interval - 1`` median deltas): ``long_run_ratio`` and ``load_worst_s``, the time to load a
    segment's last file, which is what a resume after a crash may have to replay.
    """
    measured = [f for f in files if f["kind"] == "delta"]
    median_delta = {
        key: statistics.median(f[key] for f in measured) if measured else float("nan") for key in ("bytes", "decode_s")
    }
    as_delta = [f if f["kind"] == "delta" else median_delta for f in files]
    rows = []
    for interval in intervals:
        kinds = ["keyframe" if (i + 1) % interval == 0 else "delta" for i in range(len(files))]
        at_median = [f["step"] for k, f in zip(kinds, files, strict=True) if k == "delta" and f["kind"] != "delta"]
        sizes = [keyframe["bytes"] if k == "keyframe" else d["bytes"] for k, d in zip(kinds, as_delta, strict=True)]
        last_key = max((i for i, k in enumerate(kinds) if k == "keyframe"), default=-1)
        load_s = (keyframe["decode_s"] if last_key >= 0 else 0.0) + sum(d["decode_s"] for d in as_delta[last_key + 1 :])
        segment_bytes = keyframe["bytes"] + (interval - 1) * median_delta["bytes"]
        rows.append(
            {
                "keyframe_interval": interval,
                "keyframes": kinds.count("keyframe"),
                "total_bytes": sum(sizes),
                "overall_ratio": raw_per_ckpt * len(files) / sum(sizes),
                "load_last_s": load_s,
                "deltas_at_median": at_median,
                "long_run_ratio": raw_per_ckpt * interval / segment_bytes,
                "load_worst_s": keyframe["decode_s"] + (interval - 1) * median_delta["decode_s"],
            }
        )
        print(
            f"keyframe interval {interval:5d} (estimate): {rows[-1]['keyframes']} keyframes, "
            f"{sum(sizes) / MB:9.1f} MB ({rows[-1]['overall_ratio']:.1f}x), load the last in {load_s:.1f} s"
            + (f" (steps {at_median} costed at the median delta)" if at_median else "")
            + f"; a long run: {rows[-1]['long_run_ratio']:.1f}x, load <= {rows[-1]['load_worst_s']:.0f} s"
        )
    return {
        "measured": "estimated from measured parts: one keyframe's bytes and decode time (the run's last "
        "checkpoint), each delta's bytes and decode time from the run's chain (a file the run wrote as a "
        "keyframe, where the interval makes it a delta: the median delta's)",
        "keyframe": keyframe,
        "rows": rows,
    }


def measure_keyframe(ckpt: dict[str, Any], settings: ExCPSettings, names: list[str], workdir: Path) -> dict[str, float]:
    """Bytes, encode and decode seconds of ``ckpt`` written as a keyframe with ``settings``."""
    row = encode_series([ckpt], settings, names, workdir)[0]
    return {"bytes": row["stats"]["file_bytes"], "encode_s": row["encode_s"], "decode_s": row["decode_s"]}


def _torch_bytes(ckpt: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()


def per_checkpoint_rows(
    ckpts: list[dict[str, Any]],
    vals: list[dict[str, Any]],
    excp_rows: list[dict[str, Any]],
    key_rows: list[dict[str, Any]],
    wl: Workload,
    model: torch.nn.Module,
) -> list[dict[str, Any]]:
    """Each checkpoint's bytes under every format, coding times, and its reconstruction's val loss."""
    cctx = zstandard.ZstdCompressor(level=3)
    out = []
    for i, ck in enumerate(ckpts):
        raw = _torch_bytes(ck)
        t0 = time.perf_counter()
        z = cctx.compress(raw)
        zt = time.perf_counter() - t0
        t0 = time.perf_counter()
        zstandard.ZstdDecompressor().decompress(z)
        zdt = time.perf_counter() - t0
        s = excp_rows[i]["stats"]
        model.load_state_dict(excp_rows[i]["decoded"]["state_dict"])
        rec_val = evaluate(model, wl)
        true_val = vals[i]["val_loss"]
        key_bytes = key_rows[i]["stats"]["file_bytes"]
        out.append(
            {
                "step": ck["global_step"],
                "kind": "keyframe" if s["keyframe"] else "delta",
                "raw_wmv_fp32_bytes": s["raw_wmv_bytes"],
                "raw_tensor_bytes": excp_rows[i]["raw_tensor_bytes"],
                "torch_save_bytes": len(raw),
                "zstd_bytes": len(z),
                "bytegroup_zstd_bytes": key_bytes,
                "excp_bytes": s["file_bytes"],
                "ratio_vs_raw_wmv": s["raw_wmv_bytes"] / s["file_bytes"],
                "ratio_vs_torch_save": len(raw) / s["file_bytes"],
                "ratio_vs_zstd": len(z) / s["file_bytes"],
                "zstd_ratio": len(raw) / len(z),
                "bytegroup_zstd_ratio": len(raw) / key_bytes,
                "bits_per_param": {k: s[f"bits_per_param_{k}"] for k in ("w", "m", "v")},
                "sparsity": {k: s[f"sparsity_{k}"] for k in ("w", "m")},
                "excp_encode_s": excp_rows[i]["encode_s"],
                "excp_decode_s": excp_rows[i]["decode_s"],
                "keyframe_encode_s": key_rows[i]["encode_s"],
                "keyframe_decode_s": key_rows[i]["decode_s"],
                "zstd_encode_s": zt,
                "zstd_decode_s": zdt,
                "val_loss": true_val,
                "val_loss_reconstructed": rec_val,
                "val_loss_delta_rel": (rec_val - true_val) / true_val,
            }
        )
    return out


def large_tensor_speed(ckpts: list[dict[str, Any]], names: list[str], settings: ExCPSettings) -> dict[str, float]:
    """Codec throughput without per-tensor overhead: the last two checkpoints' W, m, v, each flattened
    into one vector, tiled to >= 4M elements (the size of a 135M model's larger tensors) and shuffled by
    one shared permutation, so that zstd cannot cheat on the repetition. One tensor at a time, with
    torch's intra-op threads (the codec's ``threads`` parallelise across tensors); ``keyframe_*`` is the
    lossless per-tensor keyframe coding (lossy keyframe moments are coded like a delta's)."""
    from callbacks.excp.codec import decode_param, encode_param_delta, encode_param_keyframe

    prev, last = ckpts[-2], ckpts[-1]
    state = last["optimizer_states"][0]["state"]
    perm: list[torch.Tensor] = []

    def flat(ts: list[torch.Tensor]) -> torch.Tensor:
        v = torch.cat([t.reshape(-1).float() for t in ts])
        v = v.repeat(max(1, -(-4_000_000 // v.numel())))
        if not perm:
            perm.append(torch.randperm(v.numel(), generator=torch.Generator().manual_seed(1)))
        return v[perm[0]].contiguous()

    w1 = flat([prev["state_dict"][n] for n in names])
    w2 = flat([last["state_dict"][n] for n in names])
    m = flat([state[i]["exp_avg"] for i in range(len(names))])
    v = flat([state[i]["exp_avg_sq"] for i in range(len(names))])
    n = w2.numel()
    mb = 12 * n / MB
    kw = dict(shape=(n,), dtype=torch.float32, m_dtype=torch.float32, v_dtype=torch.float32)
    t0 = time.perf_counter()
    code = encode_param_delta(w2, w1, m, v, settings, torch.Generator().manual_seed(0))
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    decode_param(kind="delta", w_mode=code.w_mode, w_blob=code.w, m_blob=code.m, v_blob=code.v, ref=w1, **kw)
    t_dec = time.perf_counter() - t0
    t0 = time.perf_counter()
    key = encode_param_keyframe(w2, m, v, settings)
    t_kenc = time.perf_counter() - t0
    t0 = time.perf_counter()
    decode_param(kind="keyframe", w_mode="lossless", w_blob=key.w, m_blob=key.m, v_blob=key.v, ref=None, **kw)
    t_kdec = time.perf_counter() - t0
    raw = torch.cat([w2, m, v]).numpy().tobytes()
    t0 = time.perf_counter()
    z = zstandard.ZstdCompressor(level=3).compress(raw)
    t_z = time.perf_counter() - t0
    t0 = time.perf_counter()
    zstandard.ZstdDecompressor().decompress(z)
    t_zd = time.perf_counter() - t0
    return {
        "elements": n,
        "excp_delta_encode_mb_s": mb / t_enc,
        "excp_delta_decode_mb_s": mb / t_dec,
        "keyframe_encode_mb_s": mb / t_kenc,
        "keyframe_decode_mb_s": mb / t_kdec,
        "zstd_encode_mb_s": mb / t_z,
        "zstd_decode_mb_s": mb / t_zd,
        "keyframe_bytes_per_element": (len(key.w) + len(key.m) + len(key.v)) / n,
        "zstd_bytes_per_element": len(z) / n,
    }
