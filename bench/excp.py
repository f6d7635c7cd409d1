"""ExCP benchmark: size, speed and quality of compressed training checkpoints against lossless baselines.

Workloads (real training with AdamW state, the only way to get checkpoint series offline):
  --quick  a tiny Llama trained from scratch on the offline Shakespeare corpus (bytes as tokens);
  default  SmolLM2-135M-Instruct (shipped, offline) continued pretraining on the same corpus.

Measured in one run, all on this machine, single process (torch.set_num_threads(1) while timing):
  * per checkpoint: bytes of torch.save, zstd(torch.save), byte-grouped zstd (= ExCP keyframe),
    ExCP; ratios; bits/param per stream; sparsity;
  * quality: validation loss of every reconstructed checkpoint vs the uncompressed one; and runs that
    resume >= 5 times from reconstructed checkpoints vs an uninterrupted run, with Adam betas
    (0.9, 0.95) and (0.9, 0.999);
  * ablations on the same series: no residual, weight-only pruning, uniform quantization, 2/3/4/8 bits,
    zstd layouts only (the coding before rANS), bit budgets (``target_bits_per_param``);
  * per code stream (weight codes + mask, m codes + mask, v codes): bits per symbol spent vs the
    empirical order-0 entropy, with rANS and with the zstd layouts only (bench/excp_streams.py);
  * rate modes: bits per parameter of each delta under alpha and under a bit budget at gradient
    scales 0.01, 1 and 100;
  * speed: encode / decode MB/s of raw checkpoint tensors.
Writes bench/results/excp.json and bench/results/excp.png.
"""

from __future__ import annotations

import argparse
import io
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
import zstandard  # noqa: E402
from excp_streams import entropy_coding_report, gradient_scale_report  # noqa: E402
from excp_workload import Workload, evaluate, full_workload, quick_workload, train  # noqa: E402

from callbacks.excp.codec import ExCPSettings  # noqa: E402
from callbacks.excp.decoder import decode_sequence  # noqa: E402
from callbacks.excp.encoder import ExCPEncoder  # noqa: E402
from common.atomic import atomic_save_figure, atomic_write_bytes, atomic_write_json  # noqa: E402

ZSTD_ONLY = "zstd layouts only (before rANS)"
ZSTD_ONLY_SPARSE = "alpha 5e-3, zstd layouts only"
DEFAULT = "excp 4-bit (method)"

# ----------------------------------------------------------------------------------------------


def _torch_bytes(ckpt: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()


def _raw_tensor_bytes(ckpt: dict[str, Any]) -> int:
    total = 0
    for t in ckpt["state_dict"].values():
        total += t.numel() * t.element_size()
    for st in ckpt["optimizer_states"][0]["state"].values():
        total += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
    return total


def encode_series(
    ckpts: list[dict[str, Any]], settings: ExCPSettings, names: list[str], workdir: Path
) -> list[dict[str, Any]]:
    """Encode a series as one chain and decode it back, timing both (single thread)."""
    workdir.mkdir(parents=True, exist_ok=True)
    enc = ExCPEncoder(settings)
    rows, paths = [], []
    for i, ck in enumerate(ckpts):
        path = workdir / f"ckpt-{i}.excp"
        t0 = time.perf_counter()
        e = enc.encode(ck, target=path, optimizer_param_names=[names])
        dt = time.perf_counter() - t0
        atomic_write_bytes(path, e.data)
        enc.commit(e, path)
        rows.append({"stats": e.stats, "encode_s": dt, "recon": e.recon})
        paths.append(path)
    t0 = time.perf_counter()
    for i, (_, ck) in enumerate(decode_sequence(paths)):
        now = time.perf_counter()
        rows[i]["decode_s"] = now - t0
        rows[i]["decoded"] = ck
        for k, t in rows[i]["recon"].items():
            if not torch.equal(ck["state_dict"][k], t):
                raise AssertionError(f"decoded {k} differs from the encoder's reconstruction")
        t0 = time.perf_counter()
    return rows


def large_tensor_speed(ckpts: list[dict[str, Any]], names: list[str], settings: ExCPSettings) -> dict[str, float]:
    """Codec throughput without per-tensor overhead: the real last two checkpoints' W, m, v, each
    flattened into one vector, tiled to >= 4M elements (the size of a 135M model's larger tensors) and
    shuffled by one shared permutation, so that zstd cannot cheat on the repetition."""
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
    mb = 12 * n / 2**20
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    code = encode_param_delta(w2, w1, m, v, settings, gen)
    t_enc = time.perf_counter() - t0
    kw = dict(shape=(n,), dtype=torch.float32, m_dtype=torch.float32, v_dtype=torch.float32)
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


def _val_of(ckpt: dict[str, Any], wl: Workload, model: torch.nn.Module) -> float:
    model.load_state_dict(ckpt["state_dict"])
    return evaluate(model, wl)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny from-scratch model (well under a minute)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "excp.json")
    ap.add_argument("--png", type=Path, default=ROOT / "bench" / "results" / "excp.png")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    load_at_start = os.getloadavg()[0]  # speeds are only comparable at similar machine load
    wl = quick_workload() if args.quick else full_workload()
    print(f"workload: {wl.name}, {wl.steps} steps, checkpoint every {wl.interval}")
    tmp = Path(tempfile.mkdtemp(prefix="excp-bench-"))
    default = ExCPSettings(keyframe_interval=1000)

    runs: dict[str, dict[str, Any]] = {}
    for betas in ((0.9, 0.95), (0.9, 0.999)):
        key = f"{betas[0]},{betas[1]}"
        base = train(wl, betas, None, tmp)
        lossy = train(wl, betas, default, tmp / f"lossy-{key}")
        fa, fb = base["val"][-1]["val_loss"], lossy["val"][-1]["val_loss"]
        runs[key] = {"base": base, "lossy": lossy, "final_val_uninterrupted": fa, "final_val_lossy": fb}
        print(
            f"betas {betas}: final val loss uninterrupted {fa:.4f}, after {lossy['resumes']} lossy resumes {fb:.4f} "
            f"({(fb - fa) / fa * 100:+.2f}%)"
        )

    # ---- per-checkpoint sizes and speeds on the betas (0.9, 0.95) series
    base = runs["0.9,0.95"]["base"]
    ckpts, names = base["ckpts"], base["names"]
    model = wl.build()
    cctx = zstandard.ZstdCompressor(level=3)
    excp_rows = encode_series(ckpts, default, names, tmp / "excp")
    key_rows = encode_series(ckpts, replace(default, keyframe_interval=1), names, tmp / "keyframes")
    per_ckpt = []
    for i, ck in enumerate(ckpts):
        raw = _torch_bytes(ck)
        t0 = time.perf_counter()
        z = cctx.compress(raw)
        zt = time.perf_counter() - t0
        t0 = time.perf_counter()
        zstandard.ZstdDecompressor().decompress(z)
        zdt = time.perf_counter() - t0
        s = excp_rows[i]["stats"]
        rec_val = _val_of(excp_rows[i]["decoded"], wl, model)
        true_val = base["val"][i]["val_loss"]
        per_ckpt.append(
            {
                "step": ck["global_step"],
                "kind": "keyframe" if s["keyframe"] else "delta",
                "raw_wmv_fp32_bytes": s["raw_wmv_bytes"],
                "raw_tensor_bytes": _raw_tensor_bytes(ck),
                "torch_save_bytes": len(raw),
                "zstd_bytes": len(z),
                "bytegroup_zstd_bytes": key_rows[i]["stats"]["file_bytes"],
                "excp_bytes": s["file_bytes"],
                "ratio_vs_raw_wmv": s["raw_wmv_bytes"] / s["file_bytes"],
                "ratio_vs_torch_save": len(raw) / s["file_bytes"],
                "ratio_vs_zstd": len(z) / s["file_bytes"],
                "zstd_ratio": len(raw) / len(z),
                "bytegroup_zstd_ratio": len(raw) / key_rows[i]["stats"]["file_bytes"],
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
    deltas = [r for r in per_ckpt if r["kind"] == "delta"]
    mb = 2**20
    enc_mb_s = sum(r["raw_tensor_bytes"] for r in deltas) / mb / sum(r["excp_encode_s"] for r in deltas)
    dec_mb_s = sum(r["raw_tensor_bytes"] for r in deltas) / mb / sum(r["excp_decode_s"] for r in deltas)
    all_raw = sum(r["raw_tensor_bytes"] for r in per_ckpt) / mb
    speed = {
        "excp_delta_encode_mb_s": enc_mb_s,
        "excp_delta_decode_mb_s": dec_mb_s,
        "keyframe_encode_mb_s": all_raw / sum(r["keyframe_encode_s"] for r in per_ckpt),
        "keyframe_decode_mb_s": all_raw / sum(r["keyframe_decode_s"] for r in per_ckpt),
        "zstd_encode_mb_s": sum(r["torch_save_bytes"] for r in per_ckpt)
        / mb
        / sum(r["zstd_encode_s"] for r in per_ckpt),
        "zstd_decode_mb_s": sum(r["torch_save_bytes"] for r in per_ckpt)
        / mb
        / sum(r["zstd_decode_s"] for r in per_ckpt),
    }

    large = large_tensor_speed(ckpts, names, default)
    print(
        "large tensors ({elements} elements): ExCP delta encode {excp_delta_encode_mb_s:.0f} / decode "
        "{excp_delta_decode_mb_s:.0f} MB/s, keyframe {keyframe_encode_mb_s:.0f} / {keyframe_decode_mb_s:.0f} MB/s, "
        "zstd {zstd_encode_mb_s:.0f} / {zstd_decode_mb_s:.0f} MB/s".format(**large)
    )

    # ---- ablations on the same series
    variants = {
        DEFAULT: default,
        "2-bit": replace(default, bits_w=2, bits_m=2, bits_v=2),
        "3-bit": replace(default, bits_w=3, bits_m=3, bits_v=3),
        "8-bit": replace(default, bits_w=8, bits_m=8, bits_v=8),
        "no residual": replace(default, residual=False),
        "weight-only pruning": replace(default, momentum_criterion=False),
        "uniform 4-bit": replace(default, quantizer="uniform"),
        "linear-domain v (paper)": replace(default, v_log_domain=False),
        "alpha 5e-4": replace(default, alpha=5e-4),
        "alpha 5e-3": replace(default, alpha=5e-3),
        ZSTD_ONLY: replace(default, entropy_coder="zstd"),
        "target 2 bits/param": replace(default, target_bits_per_param=2.0),
        "target 1 bit/param": replace(default, target_bits_per_param=1.0),
        ZSTD_ONLY_SPARSE: replace(default, alpha=5e-3, entropy_coder="zstd"),
    }
    ablations = []
    folders = {DEFAULT: tmp / "excp"}
    series_rows: dict[str, list[dict[str, Any]]] = {}
    for name, st in variants.items():
        if st != default:
            folders[name] = tmp / f"abl-{len(ablations)}"
        rows = excp_rows if st == default else encode_series(ckpts, st, names, folders[name])
        series_rows[name] = rows
        d_rows = [(i, r) for i, r in enumerate(rows) if not r["stats"]["keyframe"]]
        deltas_rel = []
        for i, r in d_rows:
            v = _val_of(r["decoded"], wl, model)
            deltas_rel.append((v - base["val"][i]["val_loss"]) / base["val"][i]["val_loss"])
        ablations.append(
            {
                "variant": name,
                "delta_ratio_median": statistics.median(r["stats"]["ratio"] for _, r in d_rows),
                "bits_per_param_median": statistics.median(
                    8 * r["stats"]["file_bytes"] / r["stats"]["params"] for _, r in d_rows
                ),
                "val_loss_delta_rel_mean": sum(deltas_rel) / len(deltas_rel),
                "val_loss_delta_rel_max": max(deltas_rel),
            }
        )
        print(
            f"ablation {name:24s}: median delta ratio {ablations[-1]['delta_ratio_median']:7.1f}x, "
            f"reconstructed val loss {ablations[-1]['val_loss_delta_rel_mean'] * 100:+.2f}% (mean)"
        )

    series_paths = {name: [folder / f"ckpt-{i}.excp" for i in range(len(ckpts))] for name, folder in folders.items()}
    pairs = {"": (DEFAULT, ZSTD_ONLY), "_alpha_5e-3": ("alpha 5e-3", ZSTD_ONLY_SPARSE)}
    entropy_coding = entropy_coding_report(series_paths, ablations, series_rows, per_ckpt, pairs)
    rate_control = gradient_scale_report(ckpts, names, default, 2.0, tmp / "rate")

    lossy_resume = {
        k: {
            "resumes": v["lossy"]["resumes"],
            "final_val_uninterrupted": v["final_val_uninterrupted"],
            "final_val_lossy": v["final_val_lossy"],
            "final_loss_delta_rel": (v["final_val_lossy"] - v["final_val_uninterrupted"])
            / v["final_val_uninterrupted"],
            "val_uninterrupted": v["base"]["val"],
            "val_lossy": v["lossy"]["val"],
        }
        for k, v in runs.items()
    }
    result = {
        "mode": "quick" if args.quick else "full",
        "workload": wl.describe(),
        "settings": default.to_dict(),
        "delta_ratio_median": statistics.median(r["ratio_vs_raw_wmv"] for r in deltas),
        "final_loss_delta_rel": lossy_resume["0.9,0.95"]["final_loss_delta_rel"],
        "final_loss_delta_rel_beta2_0999": lossy_resume["0.9,0.999"]["final_loss_delta_rel"],
        "encode_mb_s": enc_mb_s,
        "decode_mb_s": dec_mb_s,
        "encode_mb_s_large_tensors": large["excp_delta_encode_mb_s"],
        "decode_mb_s_large_tensors": large["excp_delta_decode_mb_s"],
        "speed": speed,
        "speed_large_tensors": large,
        "baselines_median_ratio_vs_torch_save": {
            "zstd": statistics.median(r["zstd_ratio"] for r in per_ckpt),
            "bytegroup_zstd": statistics.median(r["bytegroup_zstd_ratio"] for r in per_ckpt),
            "excp_delta": statistics.median(r["ratio_vs_torch_save"] for r in deltas),
        },
        "bits_per_param_median": {
            k: statistics.median(r["bits_per_param"][k] for r in deltas) for k in ("w", "m", "v")
        },
        "sparsity_median": {k: statistics.median(r["sparsity"][k] for r in deltas) for k in ("w", "m")},
        "reconstructed_val_loss_delta_rel_max": max(r["val_loss_delta_rel"] for r in per_ckpt),
        "entropy_coding": entropy_coding,
        "rate_control": rate_control,
        "per_checkpoint": per_ckpt,
        "lossy_resume": lossy_resume,
        "ablations": ablations,
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu": platform.processor(),
            "load_average_1m_at_start_and_end": [load_at_start, os.getloadavg()[0]],
        },
        "threads": 1,
        "wall_s": time.perf_counter() - t_start,
    }
    atomic_write_json(args.out, result)
    _plot(result, runs, wl, args.png)
    print(
        f"delta_ratio_median {result['delta_ratio_median']:.1f}x (target >= 70x), "
        f"final_loss_delta_rel {result['final_loss_delta_rel'] * 100:+.2f}% / beta2=0.999 "
        f"{result['final_loss_delta_rel_beta2_0999'] * 100:+.2f}% (target within 1%), "
        f"encode {enc_mb_s:.0f} MB/s (target 100), decode {dec_mb_s:.0f} MB/s (target 500); "
        f"zstd {speed['zstd_encode_mb_s']:.0f}/{speed['zstd_decode_mb_s']:.0f} MB/s, keyframe "
        f"{speed['keyframe_encode_mb_s']:.0f}/{speed['keyframe_decode_mb_s']:.0f} MB/s; "
        f"lossless ratio zstd {result['baselines_median_ratio_vs_torch_save']['zstd']:.3f}x, byte-grouped "
        f"{result['baselines_median_ratio_vs_torch_save']['bytegroup_zstd']:.3f}x"
    )
    print(f"wrote {args.out} and {args.png} in {result['wall_s']:.0f} s")


def _plot(result: dict[str, Any], runs: dict[str, Any], wl: Workload, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax = axes[0]
    for (key, r), color in zip(runs.items(), ("tab:blue", "tab:red"), strict=True):
        for run, style, label in (
            (r["base"], "-", "uninterrupted"),
            (r["lossy"], "--", f"{r['lossy']['resumes']} lossy resumes"),
        ):
            steps = [v["step"] for v in run["val"]]
            ax.plot(
                steps,
                [v["val_loss"] for v in run["val"]],
                style,
                color=color,
                marker="o",
                ms=3,
                label=f"betas ({key}) {label}",
            )
    for v in runs["0.9,0.95"]["lossy"]["val"][:-1]:
        ax.axvline(v["step"], color="grey", lw=0.5, alpha=0.4)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("training through lossy resumes")
    ax.legend(fontsize=7)

    ax = axes[1]
    pc = result["per_checkpoint"]
    steps = [r["step"] for r in pc]
    for key, label in (
        ("torch_save_bytes", "torch.save"),
        ("zstd_bytes", "zstd(torch.save)"),
        ("bytegroup_zstd_bytes", "byte-grouped zstd"),
        ("excp_bytes", "ExCP (4-bit)"),
    ):
        ax.plot(steps, [r[key] / 2**20 for r in pc], marker="o", ms=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel("MB per checkpoint (log)")
    ax.set_title(f"size: median delta {result['delta_ratio_median']:.0f}x vs fp32 W+m+v")
    ax.legend(fontsize=7)

    ax = axes[2]
    for a in result["ablations"]:
        ax.scatter(a["delta_ratio_median"], a["val_loss_delta_rel_mean"] * 100)
        ax.annotate(a["variant"], (a["delta_ratio_median"], a["val_loss_delta_rel_mean"] * 100), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_xlabel("median delta compression ratio (log)")
    ax.set_ylabel("val loss of reconstructed ckpt, % vs uncompressed")
    ax.set_title("ablations: size vs loss (Pareto)")
    fig.suptitle(f"ExCP on {wl.name} ({result['mode']} mode)")
    fig.tight_layout()
    atomic_save_figure(fig, png, dpi=110)


if __name__ == "__main__":
    main()
