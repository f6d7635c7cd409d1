"""What storing Adam's first moment where ExCP prunes the weight update would buy at the 70x budget.

The method nests m's mask in the weight mask, so an entry whose weight update is pruned restarts its
momentum from zero after a resume. ``bench/excp_resume_damage.py`` found decoded weights and decoded m
costing more together than apart; this bench bounds what changing that nesting could recover, before
anyone builds it. Per seed, SmolLM2's step-10 delta from its pretrained weights (quick mode: a tiny
model's step-20 delta from step 10) is coded at ``bench/excp.py``'s 70x setting, decoded, resumed and
trained ``horizon`` more steps on the uninterrupted run's batches, three ways:

* ``decoded``: the file as a resume reads it;
* ``own-mask m``: its decoded weights, with m and v coded by the codec under m's own mask
  (``|m| > beta * mean(|m|)``, not nested in the weights'; 4-bit k-means, entropy-coded) and decoded;
  the extra bits these streams cost over the file's m and v are reported, not taken from the weights;
* ``exact m where W is pruned``: the decoded file with the exact m at every entry whose decoded weight
  is its reference's: what any scheme restoring pruned momentum could reach at best (no bits charged).

    python bench/excp_momentum_oracle.py [--quick] [--seeds 3]
    # writes bench/results/excp_momentum_oracle[_quick].json
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from excp import SETTING_AT_70X, THREADS, _alternatives  # noqa: E402
from excp_resume_damage import _loss_after, _spread, coded_run, one_resume_run  # noqa: E402
from excp_workload import ChainWriter, Workload  # noqa: E402

from callbacks.excp.codec import ExCPSettings, decode_param, encode_param_delta, tensor_generator  # noqa: E402
from common.atomic import atomic_write_json  # noqa: E402

VARIANTS = ("decoded", "own-mask m", "exact m where W is pruned")


def own_mask_moments(
    exact: dict[str, Any], names: list[str], s: ExCPSettings
) -> tuple[dict[int, dict[str, torch.Tensor]], int]:
    """m and v of every tensor coded under m's own mask and decoded, and the bytes their streams take.

    The codec codes a tensor new to a chain this way: weights lossless, m kept where
    ``|m| > beta * mean(|m|)`` over the whole tensor, v where m is kept; only the moment streams count.
    """
    decoded: dict[int, dict[str, torch.Tensor]] = {}
    spent = 0
    for index, state in exact["optimizer_states"][0]["state"].items():
        m, v = state["exp_avg"], state["exp_avg_sq"]
        weight = exact["state_dict"][names[index]]
        code = encode_param_delta(weight, None, m, v, s, tensor_generator(s, index))
        assert code.m is not None and code.v is not None
        spent += len(code.m) + len(code.v)
        _, m_hat, v_hat = decode_param(
            kind="delta",
            w_mode=code.w_mode,
            w_blob=code.w,
            m_blob=code.m,
            v_blob=code.v,
            ref=None,
            shape=tuple(m.shape),
            dtype=weight.dtype,
            m_dtype=m.dtype,
            v_dtype=v.dtype,
            v_floor=code.v_floor,
        )
        assert m_hat is not None and v_hat is not None
        decoded[index] = {"exp_avg": m_hat, "exp_avg_sq": v_hat}
    return decoded, spent


def with_moments(ckpt: dict[str, Any], moments: dict[int, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """``ckpt`` with the given moment tensors replacing its own (a copy; ``ckpt`` is untouched)."""
    mixed = copy.deepcopy(ckpt)
    for index, state in moments.items():
        mixed["optimizer_states"][0]["state"][index].update({k: t.clone() for k, t in state.items()})
    return mixed


def exact_m_where_pruned(
    decoded: dict[str, Any], exact: dict[str, Any], base: dict[str, torch.Tensor], names: list[str]
) -> tuple[dict[str, Any], float]:
    """The decoded checkpoint with the exact m wherever its weight equals the reference's, and that share."""
    mixed = copy.deepcopy(decoded)
    pruned = total = 0
    for index, state in mixed["optimizer_states"][0]["state"].items():
        name = names[index]
        where = decoded["state_dict"][name] == base[name]
        state["exp_avg"][where] = exact["optimizer_states"][0]["state"][index]["exp_avg"][where]
        pruned += int(torch.count_nonzero(where))
        total += where.numel()
    return mixed, pruned / max(total, 1)


def _seed(wl: Workload, seed: int, s: ExCPSettings, reference_step: int, horizon: int, tmp: Path) -> dict[str, Any]:
    stop = reference_step + wl.interval + horizon
    base, run = coded_run(wl, seed, reference_step)
    exact = run.ckpts[-1]
    exact_after = _loss_after(wl, seed, exact, stop)
    writer = ChainWriter(s, tmp / f"seed{seed}", base, wl.model_desc)
    row, decoded = writer.write_and_decode(exact, run.names)
    file_bytes = Path(row["path"]).stat().st_size
    params = row["stats"]["params"]
    file_moment_bits = row["stats"]["bits_per_param_m"] + row["stats"]["bits_per_param_v"]
    own, own_bytes = own_mask_moments(exact, run.names, s)
    restored, pruned_share = exact_m_where_pruned(decoded, exact, base, run.names)
    starts = {"decoded": decoded, "own-mask m": with_moments(decoded, own), "exact m where W is pruned": restored}
    extra_bytes = own_bytes - file_moment_bits * params / 8
    result = {
        "seed": seed,
        "ratio": row["raw_tensor_bytes"] / file_bytes,
        "ratio_with_own_mask_m": row["raw_tensor_bytes"] / (file_bytes + extra_bytes),
        "bits_per_param_m_v_file": file_moment_bits,
        "bits_per_param_m_v_own_mask": 8 * own_bytes / params,
        "weight_pruned_share": pruned_share,
        "exact_val_after_horizon": exact_after,
        "val_loss_delta_rel_after_horizon": {
            label: _loss_after(wl, seed, start, stop) / exact_after - 1 for label, start in starts.items()
        },
    }
    print(f"seed {seed}: {result}", flush=True)
    return result


def main() -> None:
    started = time.perf_counter()
    run = one_resume_run("excp_momentum_oracle", __doc__.splitlines()[0])
    args, out, wl, reference_step, horizon = run.args, run.out, run.workload, run.reference_step, run.horizon
    s = _alternatives(ExCPSettings(threads=THREADS, keyframe_moments="lossy"))[SETTING_AT_70X]
    with tempfile.TemporaryDirectory(prefix="excp-momentum-oracle-") as tmp:  # the encoded deltas, removed at the end
        seeds = [_seed(wl, seed, s, reference_step, horizon, Path(tmp)) for seed in range(args.seeds)]
    summary: dict[str, Any] = {
        label: _spread([r["val_loss_delta_rel_after_horizon"][label] for r in seeds]) for label in VARIANTS
    }
    for key in ("ratio", "ratio_with_own_mask_m", "bits_per_param_m_v_file", "bits_per_param_m_v_own_mask"):
        summary[key] = _spread([r[key] for r in seeds])
    result = {
        "mode": "quick" if args.quick else "full",
        "workload": run.describe(f" at the setting {SETTING_AT_70X!r}", "resumed three ways"),
        "threads": THREADS,
        "settings": s.to_dict(),
        "summary_val_loss_delta_rel_after_horizon": summary,
        "seeds": seeds,
        "wall_s": time.perf_counter() - started,
    }
    atomic_write_json(out, result)
    for label in VARIANTS:
        print(f"{label}: {summary[label]['mean']:+.2%} (sd {summary[label]['std']:.2%}) after {horizon} steps")
    own, file = summary["bits_per_param_m_v_own_mask"]["mean"], summary["bits_per_param_m_v_file"]["mean"]
    print(
        f"ratio {summary['ratio']['mean']:.1f}x; own-mask m and v cost {own:.2f} bits/param against the file's "
        f"{file:.2f} ({summary['ratio_with_own_mask_m']['mean']:.1f}x if charged on top)"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
