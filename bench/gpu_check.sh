#!/usr/bin/env bash
# The strategy matrix of tests/test_strategy_matrix.py on one CUDA GPU, with the real strategy classes
# (no CPU shims) and the shipped configs' mixed precision (bf16-mixed for fsdp/deepspeed):
# {CausalLM fit + ExCP + resume, Flextron fit, ICL probe test (plain and QLoRA), honesty probe test} x
# {fsdp2, fsdp, deepspeed_stage2, deepspeed_stage3}, plus the ExCP DeepSpeed folder checks. Writes
# bench/results/gpu_check.json (component x strategy: pass / refused / fail, seconds, the error line and,
# for a failure, the end of its traceback; device name) and exits non-zero if any cell failed.
# About a minute on one H200 (54 s for the committed result); the job is cut at GPU_CHECK_TIMEOUT_S seconds
# (default 480).
#   bash bench/gpu_check.sh            (needs CUDA torch and the deepspeed extra: make install)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check needs a CUDA GPU')"
JOB_DIR="$(mktemp -d)"
trap 'rm -rf "$JOB_DIR"' EXIT
START=$(date +%s)
set +e
LUMENLM_MATRIX_ACCELERATOR=gpu LUMENLM_MATRIX_DEVICES=1 MPLBACKEND=Agg WANDB_MODE=offline \
  PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" timeout "${GPU_CHECK_TIMEOUT_S:-480}" \
  "$PYTHON" tests/strategy_matrix_job.py fsdp2,fsdp,deepspeed_stage2,deepspeed_stage3 "$JOB_DIR" \
  > "$JOB_DIR/job.log" 2>&1
RC=$?
"$PYTHON" bench/gpu_check_report.py "$JOB_DIR" "$RC" "$(( $(date +%s) - START ))" bench/results/gpu_check.json
VERDICT=$?
set -e
if [ "$VERDICT" -ne 0 ]; then
  echo "--- the job's output ends:" >&2
  tail -n 40 "$JOB_DIR/job.log" >&2
fi
exit "$VERDICT"
