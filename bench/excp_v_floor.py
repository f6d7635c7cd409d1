"""Adam step sizes after resuming from an ExCP delta: pruned second-moment (v) entries decoded as zero
(the paper's) vs as the per-tensor mean of the pruned entries (``ExCPSettings.v_floor``, the default).

A small MLP is trained with AdamW (betas 0.9/0.999 and 0.9/0.95) on seeded synthetic batches; at
step ``resume_at`` its checkpoint is coded as a delta of a chain and decoded both ways; each decoded
state then takes the same next steps as the uninterrupted run. Reported per variant: the size of the
first update relative to the uninterrupted run's (1.0 = same step size), the largest per-tensor ratio,
and the relative loss difference after ``horizon`` more steps. Three seeds.

    python bench/excp_v_floor.py [--quick]    # writes bench/results/excp_v_floor.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from callbacks.excp import ExCPSettings  # noqa: E402
from callbacks.excp.store import ChainStore  # noqa: E402
from common.atomic import atomic_write_json  # noqa: E402


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)
    )


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(64, 64, generator=generator)
    return x, torch.tanh(x.flip(1) * 1.5)


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> float:
    x, y = _batch(step)
    loss = torch.nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss)


def _checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    return {
        "global_step": step,
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer_states": [copy.deepcopy(optimizer.state_dict())],
    }


def _restore(seed: int, betas: tuple[float, float], ckpt: dict[str, Any]):
    model = _model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=betas)
    model.load_state_dict(ckpt["state_dict"])
    optimizer.load_state_dict(ckpt["optimizer_states"][0])
    return model, optimizer


def run(seed: int, betas: tuple[float, float], resume_at: int, horizon: int) -> dict[str, Any]:
    model = _model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=betas)
    saved = {}
    for step in range(resume_at):
        _step(model, optimizer, step)
        if step + 1 in (resume_at - 10, resume_at):
            saved[step + 1] = _checkpoint(model, optimizer, step + 1)
    exact = _restore(seed, betas, saved[resume_at])
    losses_exact = [_step(*exact, resume_at + i) for i in range(horizon)]
    result: dict[str, Any] = {}
    for variant, floor in (("zeros", False), ("pruned_mean", True)):
        with tempfile.TemporaryDirectory() as tmp:
            store = ChainStore(ExCPSettings(v_floor=floor, keyframe_interval=10))
            store.save(saved[resume_at - 10], Path(tmp) / "a.ckpt")
            store.save(saved[resume_at], Path(tmp) / "b.ckpt")
            decoded = store.load(Path(tmp) / "b.ckpt")
        restored = _restore(seed, betas, decoded)
        start = {k: v.clone() for k, v in restored[0].state_dict().items()}
        _step(*restored, resume_at)
        ratios = []
        for name in start:
            if name.endswith("weight"):
                mine = (restored[0].state_dict()[name] - start[name]).norm()
                # the uninterrupted run's first update, recomputed on its own state
                reference = _first_update(seed, betas, saved[resume_at], resume_at)[name]
                ratios.append(float(mine / reference))
        losses = [_step(*restored, resume_at + i) for i in range(1, horizon)]
        result[variant] = {
            "first_update_ratio_mean": statistics.mean(ratios),
            "first_update_ratio_max": max(ratios),
            "loss_delta_rel_after_horizon": (losses[-1] - losses_exact[-1]) / losses_exact[-1],
        }
    return result


_FIRST: dict[tuple, dict[str, torch.Tensor]] = {}


def _first_update(seed: int, betas: tuple[float, float], ckpt: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
    key = (seed, betas, step)
    if key not in _FIRST:
        model, optimizer = _restore(seed, betas, ckpt)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        _step(model, optimizer, step)
        _FIRST[key] = {k: (model.state_dict()[k] - start[k]).norm() for k in start}
    return _FIRST[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "excp_v_floor.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    resume_at, horizon = (60, 20) if args.quick else (200, 50)
    rows = []
    for betas in ((0.9, 0.999), (0.9, 0.95)):
        for seed in (0, 1, 2):
            row = run(seed, betas, resume_at, horizon)
            rows.append({"betas": list(betas), "seed": seed, **row})
            print(rows[-1], flush=True)
    summary = {
        f"{variant}_beta2_{betas[1]}": {
            "first_update_ratio_mean": statistics.mean(
                r[variant]["first_update_ratio_mean"] for r in rows if tuple(r["betas"]) == betas
            ),
            "first_update_ratio_max": max(
                r[variant]["first_update_ratio_max"] for r in rows if tuple(r["betas"]) == betas
            ),
            "loss_delta_rel_abs_mean": statistics.mean(
                abs(r[variant]["loss_delta_rel_after_horizon"]) for r in rows if tuple(r["betas"]) == betas
            ),
        }
        for variant in ("zeros", "pruned_mean")
        for betas in ((0.9, 0.999), (0.9, 0.95))
    }
    out = args.out
    atomic_write_json(
        out,
        {
            "mode": "quick" if args.quick else "full",
            "resume_at": resume_at,
            "horizon": horizon,
            "summary": summary,
            "rows": rows,
            "command": "python bench/excp_v_floor.py" + (" --quick" if args.quick else ""),
        },
    )
    print(summary)


if __name__ == "__main__":
    main()
