"""bench/gpu_check.sh's report, read from fake cell files: it runs on GPUs only, so its reading is checked here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "bench"))

from gpu_check_report import build_report  # noqa: E402


def _write(job_out: Path, strategy: str, component: str, cell: dict) -> None:
    (job_out / strategy).mkdir(parents=True, exist_ok=True)
    (job_out / strategy / f"{component}.json").write_text(json.dumps(cell))


def test_cells_are_pass_refused_fail_or_missing(tmp_path: Path) -> None:
    _write(tmp_path, "fsdp2", "causal_lm", {"ok": True, "seconds": 3.0, "excp": "compressed"})
    refusal = "ShardingError: ICLvsGDProbe under DeepSpeed ZeRO stage 3: ZeRO-3 partitions every parameter"
    _write(tmp_path, "deepspeed_stage3", "icl_qlora_probe", {"ok": False, "seconds": 0.1, "error": refusal})
    _write(tmp_path, "deepspeed_stage2", "icl_probe", {"ok": False, "seconds": 0.1, "error": refusal})
    _write(
        tmp_path,
        "fsdp",
        "flextron",
        {
            "ok": False,
            "seconds": 0.5,
            "error": "RuntimeError: dtype",
            "traceback": "Traceback\n  line\nRuntimeError: dtype\n",
        },
    )
    report = build_report(tmp_path, exit_code=0, wall_seconds=9, device="test", torch_version="x")
    cells = {(c["strategy"], c["component"]): c for c in report["cells"]}
    assert cells[("fsdp2", "causal_lm")]["result"] == "pass"
    assert cells[("fsdp2", "causal_lm")]["details"] == {"excp": "compressed"}
    assert cells[("deepspeed_stage3", "icl_qlora_probe")]["result"] == "refused"
    assert cells[("deepspeed_stage2", "icl_probe")]["result"] == "fail"  # refused where nothing should be
    assert cells[("fsdp", "flextron")]["traceback_tail"][-1] == "RuntimeError: dtype"
    assert cells[("deepspeed_stage2", "excp_deepspeed")]["result"] == "fail"  # the job never wrote it
    assert cells[("deepspeed_stage2", "excp_deepspeed")]["error"].startswith("no result")
    assert report["counts"] == {"pass": 1, "refused": 1, "fail": len(report["cells"]) - 2}
