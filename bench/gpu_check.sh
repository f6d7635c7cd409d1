#!/usr/bin/env bash
# The strategy matrix of tests/test_strategy_matrix.py on one CUDA GPU, with the real strategy classes
# (no CPU shims) and the shipped configs' mixed precision (bf16-mixed for fsdp/deepspeed):
# {CausalLM fit + ExCP + resume, Flextron fit, ICL probe test, honesty probe test} x
# {fsdp2, fsdp, deepspeed_stage2, deepspeed_stage3}. Writes bench/results/gpu_check.json
# (component x strategy: pass / refused / fail, seconds, the error line; device name). About 3-5 minutes
# on one GPU; the whole job is cut at 8 minutes.
#   bash bench/gpu_check.sh            (needs CUDA torch and the deepspeed extra: make install)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check needs a CUDA GPU')"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
START=$(date +%s)
set +e
LUMENLM_MATRIX_ACCELERATOR=gpu LUMENLM_MATRIX_DEVICES=1 MPLBACKEND=Agg WANDB_MODE=offline PYTHONPATH=. \
  timeout 480 "$PYTHON" tests/strategy_matrix_job.py fsdp2,fsdp,deepspeed_stage2,deepspeed_stage3 "$OUT" \
  > "$OUT/job.log" 2>&1
RC=$?
set -e
"$PYTHON" - "$OUT" "$RC" "$(( $(date +%s) - START ))" <<'PY'
import json, sys
from pathlib import Path

import torch

from common.atomic import atomic_write_json
from tests.test_strategy_matrix import COMPONENTS, REFUSED, STRATEGIES

out, rc, seconds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
cells = []
for strategy in STRATEGIES:
    for component in COMPONENTS:
        path = out / strategy / f"{component}.json"
        if not path.is_file():
            cells.append({"strategy": strategy, "component": component, "result": "fail", "seconds": None,
                          "error": "no result (the job stopped before this cell; see the job's exit code)"})
            continue
        cell = json.loads(path.read_text())
        expected_refusal = REFUSED.get((strategy, component))
        if cell["ok"]:
            result = "pass"
        elif expected_refusal and cell["error"].startswith(f"ShardingError: {expected_refusal}"):
            result = "refused"
        else:
            result = "fail"
        row = {"strategy": strategy, "component": component, "result": result, "seconds": cell["seconds"],
               "error": cell.get("error")}
        if component == "causal_lm" and cell["ok"]:
            row["excp"] = cell["excp"]
        cells.append(row)
report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "job_exit_code": rc,
          "wall_seconds": seconds, "cells": cells}
atomic_write_json(Path("bench/results/gpu_check.json"), report)
for c in cells:
    print(f"{c['component']:>14} x {c['strategy']:<17} {c['result']:<8} {c['seconds']}")
print(f"wrote bench/results/gpu_check.json ({seconds} s, job exit code {rc})")
PY
