"""Reads the strategy-matrix job's per-cell JSON files into one report: what ``bench/gpu_check.sh`` writes.

Kept apart from the shell script so that the reading can be checked on a machine without a GPU: every cell
of :data:`tests.test_strategy_matrix.STRATEGIES` x the GPU components (plus each strategy's extra checks) becomes
pass / refused (the one-line refusal the CPU matrix expects) / fail, and a failed cell carries the end of
its traceback, since a GPU lease is too short to rerun for it.

    python bench/gpu_check_report.py <job_out_dir> <job_exit_code> <wall_seconds> <report.json>
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.atomic import atomic_write_json  # noqa: E402
from tests.strategy_matrix_job import EXTRA_COMPONENTS, GPU_COMPONENTS  # noqa: E402
from tests.test_strategy_matrix import REFUSED, STRATEGIES  # noqa: E402

TRACEBACK_TAIL_LINES = 12
# The QLoRA ICL probe is refused where the plain one is (ZeRO-3), with the same line.
GPU_REFUSED = {**REFUSED, **{(s, "icl_qlora_probe"): r for (s, c), r in REFUSED.items() if c == "icl_probe"}}


def read_cell(job_out: Path, strategy: str, component: str) -> dict[str, Any]:
    """One cell's verdict; a missing file means the job stopped before the cell ran."""
    path = job_out / strategy / f"{component}.json"
    if not path.is_file():
        return {
            "strategy": strategy,
            "component": component,
            "result": "fail",
            "seconds": None,
            "error": "no result (the job stopped before this cell; see the job's exit code)",
        }
    cell = json.loads(path.read_text())
    expected_refusal = GPU_REFUSED.get((strategy, component))
    if cell["ok"]:
        result = "pass"
    elif expected_refusal and cell["error"].startswith(f"ShardingError: {expected_refusal}"):
        result = "refused"
    else:
        result = "fail"
    row: dict[str, Any] = {
        "strategy": strategy,
        "component": component,
        "result": result,
        "seconds": cell["seconds"],
        "error": cell.get("error"),
    }
    if result == "fail" and cell.get("traceback"):
        row["traceback_tail"] = cell["traceback"].rstrip().splitlines()[-TRACEBACK_TAIL_LINES:]
    if cell["ok"]:
        row["details"] = {k: v for k, v in cell.items() if k not in ("ok", "seconds")}
    return row


def build_report(job_out: Path, exit_code: int, wall_seconds: int, device: str, torch_version: str) -> dict[str, Any]:
    cells = [
        read_cell(job_out, strategy, component)
        for strategy in STRATEGIES
        for component in (*GPU_COMPONENTS, *EXTRA_COMPONENTS.get(strategy, ()))
    ]
    counts = {verdict: sum(c["result"] == verdict for c in cells) for verdict in ("pass", "refused", "fail")}
    return {
        "device": device,
        "torch": torch_version,
        "job_exit_code": exit_code,
        "wall_seconds": wall_seconds,
        "counts": counts,
        "cells": cells,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description="the strategy-matrix job's cell files as one GPU-check report")
    parser.add_argument("job_out", type=Path, help="the job's output folder (<strategy>/<component>.json)")
    parser.add_argument("exit_code", type=int, help="the job's exit code")
    parser.add_argument("wall_seconds", type=int, help="how long the job ran")
    parser.add_argument("report", type=Path, help="where the report JSON goes (written atomically)")
    args = parser.parse_args()
    if not args.job_out.is_dir():
        parser.error(f"{args.job_out} is not a folder: pass the folder the strategy-matrix job wrote")
    job_out, exit_code, wall_seconds, report_path = args.job_out, args.exit_code, args.wall_seconds, args.report
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    report = build_report(job_out, exit_code, wall_seconds, device, torch.__version__)
    atomic_write_json(report_path, report)
    for c in report["cells"]:
        print(f"{c['component']:>14} x {c['strategy']:<17} {c['result']:<8} {c['seconds']}  {c['error'] or ''}"[:200])
    print(f"{report['counts']}; wrote {report_path} ({wall_seconds} s, job exit code {exit_code})")
    return 0 if report["counts"]["fail"] == 0 and exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
