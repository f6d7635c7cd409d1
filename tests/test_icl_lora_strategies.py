"""The ICL probe with QLoRA GD under DDP, FSDP, FSDP2 and DeepSpeed on 2 CPU processes: as one process.

Slow (about 5 minutes on 2 shared cores: bitsandbytes' 4-bit CPU kernels and adapter GD make each cell
10-60 s, ZeRO-2 up to ~3 minutes), so it is not a cell of the default strategy matrix; it runs the same
job (``tests/strategy_matrix_job.py``) with the ``icl_qlora_probe`` component.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

from tests.conftest import REPO_ROOT

STRATEGIES = ("ddp", "fsdp2", "fsdp", "deepspeed_stage2", "deepspeed_stage3")
REFUSED = {"deepspeed_stage3": "ShardingError: ICLvsGDProbe under DeepSpeed ZeRO stage 3"}


@pytest.mark.slow
def test_qlora_icl_probe_under_every_strategy_equals_one_process(tmp_path: Path) -> None:
    from tests.strategy_probes import icl_data, icl_qlora_probe, icl_results

    L.seed_everything(0, verbose=False)
    probe = icl_qlora_probe()
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, default_root_dir=str(tmp_path / "one")).test(probe, datamodule=icl_data())
    reference = icl_results(probe)
    assert probe.results["gd_variant"]["pretrained"] == "GD (QLoRA r=16, 4-bit base)"

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DS_ACCELERATOR": "cpu", "MPLBACKEND": "Agg"}
    env.pop("LOCAL_RANK", None)
    job = [sys.executable, str(REPO_ROOT / "tests" / "strategy_matrix_job.py"), ",".join(STRATEGIES),
           str(tmp_path / "out"), "icl_qlora_probe"]
    result = subprocess.run(job, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    for strategy in STRATEGIES:
        cell = json.loads((tmp_path / "out" / strategy / "icl_qlora_probe.json").read_text())
        if strategy in REFUSED:
            assert not cell["ok"] and cell["error"].startswith(REFUSED[strategy]), cell.get("error")
            continue
        assert cell["ok"], cell.get("traceback", cell)
        assert cell["results"]["ranks"] == [0, 1], f"{strategy}: the work was not split across the 2 ranks"
        assert cell["results"]["units"] == reference["units"], strategy
