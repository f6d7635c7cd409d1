"""The export command line: every mistake a user can make is one line on stderr and a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

from datamodules.text import TextDataModule
from lightning_modules.flextron.__main__ import main
from lightning_modules.flextron.module import FlextronModule
from tests.conftest import parse_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A one-step tiny Flextron run saved as a Lightning checkpoint."""
    folder = tmp_path_factory.mktemp("flextron_cli")
    cli = parse_config("configs/flextron/tiny.yaml", overrides=["--trainer.logger=false",
                                                               "--trainer.enable_checkpointing=false"])
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(cli.model, cli.datamodule)
    path = folder / "tiny.ckpt"
    trainer.save_checkpoint(path)
    assert isinstance(cli.model, FlextronModule) and isinstance(cli.datamodule, TextDataModule)
    return path


def _one_line_error(capsys, argv: list[str], expected: str) -> None:
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


def test_missing_checkpoint_is_one_line(capsys, tmp_path):
    _one_line_error(capsys, ["export", "--checkpoint", str(tmp_path / "none.ckpt"), "--budget", "0.8",
                             "--out", str(tmp_path / "o")], "not found")


def test_corrupt_checkpoint_is_one_line_from_the_shell(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"this is not a checkpoint")
    run = subprocess.run([sys.executable, "-m", "lightning_modules.flextron", "export", "--checkpoint", str(bad),
                          "--budget", "0.8", "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot load") and "Traceback" not in run.stderr, run.stderr
    assert not (tmp_path / "o").exists()


def test_unreachable_and_out_of_range_budgets_are_one_line(capsys, checkpoint, tmp_path):
    _one_line_error(capsys, ["export", "--checkpoint", str(checkpoint), "--budget", "0.1", "--out",
                             str(tmp_path / "o")], "below the narrowest sub-network (floor 0.4")
    _one_line_error(capsys, ["export", "--checkpoint", str(checkpoint), "--budget", "1.5", "--out",
                             str(tmp_path / "o")], "outside the trained range")
    _one_line_error(capsys, ["export", "--checkpoint", str(checkpoint), "--subnet", '{"mlp": [999, 128], '
                             '"attn": [1, 2]}', "--out", str(tmp_path / "o")], "--subnet")
    _one_line_error(capsys, ["export", "--checkpoint", str(checkpoint), "--subnet", "{not json", "--out",
                             str(tmp_path / "o")], "--subnet")
    assert not (tmp_path / "o").exists()


def test_unwritable_out_is_one_line(capsys, checkpoint, tmp_path):
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    # root ignores folder permissions; sysfs refuses new folders to everyone
    out = Path("/sys/flextron_export_test") if os.geteuid() == 0 else read_only / "export"
    try:
        _one_line_error(capsys, ["export", "--checkpoint", str(checkpoint), "--budget", "0.8", "--out", str(out)],
                        "cannot write the export")
    finally:
        read_only.chmod(0o755)
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    _one_line_error(capsys, ["export", "--checkpoint", str(checkpoint), "--budget", "0.8", "--out", str(a_file)],
                    "cannot write the export")
    assert a_file.read_text() == "keep"


def test_reexport_replaces_the_folder_whole(capsys, checkpoint, tmp_path):
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(checkpoint), "--budget", "0.8", "--out", str(out)]) == 0
    (out / "stale.txt").write_text("from an earlier export")
    assert main(["export", "--checkpoint", str(checkpoint), "--budget", "0.9", "--out", str(out)]) == 0
    assert not (out / "stale.txt").exists() and (out / "flextron_export.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]


def test_tiny_config_exports_half_and_clamp_works_end_to_end(capsys, checkpoint, tmp_path):
    import json

    half = tmp_path / "half"
    assert main(["export", "--checkpoint", str(checkpoint), "--budget", "0.5", "--out", str(half)]) == 0
    report = json.loads((half / "flextron_export.json").read_text())
    assert 0.5 * 0.95 <= report["budget_realized"] <= 0.5 and report["max_abs_logit_diff_vs_masked_elastic"] < 1e-5
    # below the trained range but reachable: routed under the requested cost
    low = tmp_path / "low"
    assert main(["export", "--checkpoint", str(checkpoint), "--budget", "0.45", "--clamp", "--out", str(low)]) == 0
    assert "below the trained range" in capsys.readouterr().err
    assert json.loads((low / "flextron_export.json").read_text())["budget_realized"] <= 0.45
    # below every sub-network: the narrowest one, said so on stderr
    floor = tmp_path / "floor"
    assert main(["export", "--checkpoint", str(checkpoint), "--budget", "0.1", "--clamp", "--out", str(floor)]) == 0
    assert "below the narrowest sub-network" in capsys.readouterr().err
    narrowest = json.loads((floor / "flextron_export.json").read_text())
    assert narrowest["subnet"]["mlp"] == [0, 0] and narrowest["subnet"]["attn"] == [0, 0]
    assert narrowest["max_abs_logit_diff_vs_masked_elastic"] < 1e-5
