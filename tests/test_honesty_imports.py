"""The honesty simulator runs without Lightning, transformers or torch (it is numpy and scipy only)."""

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import io, json, sys
from contextlib import redirect_stdout
from lightning_modules.probes.honesty.__main__ import main
buf = io.StringIO()
with redirect_stdout(buf):
    rc = main(["simulate", "--lambda", "0.6", "--n", "60", "--seed", "1", "--n-boot", "0", "--n-options", "6"])
heavy = sorted(m for m in ("lightning", "pytorch_lightning", "transformers", "torch") if m in sys.modules)
print(json.dumps({"rc": rc, "heavy": heavy, "result": json.loads(buf.getvalue())}))
"""


def test_simulate_imports_neither_lightning_nor_transformers():
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["rc"] == 0
    assert report["heavy"] == []
    assert 0.0 <= report["result"]["lambda_hat"] <= 1.0
