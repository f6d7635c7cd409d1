"""Atomic writes and logger-independent tables."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from common.atomic import atomic_write_bytes, atomic_write_json
from common.run_outputs import gather_objects, log_table


def test_atomic_json_handles_tensors_and_gets_a_normal_file_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "r.json"
    atomic_write_json(path, {"t": torch.tensor([1.0, 2.0]), "n": np.float32(0.5), "p": tmp_path})
    assert json.loads(path.read_text()) == {"t": [1.0, 2.0], "n": 0.5, "p": str(tmp_path)}
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    atomic_write_bytes(path, b"old")
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_log_table_writes_csv_on_rank_zero_only(tmp_path: Path) -> None:
    trainer = SimpleNamespace(is_global_zero=True, loggers=[], logger=None, default_root_dir=str(tmp_path))
    path = log_table(trainer, "probe/records", ["a", "b"], [[1, "x"], [2, "y"]])
    assert path == tmp_path / "probe_records.csv"
    assert path.read_text().splitlines() == ["a,b", "1,x", "2,y"]
    other_rank = SimpleNamespace(**{**vars(trainer), "is_global_zero": False})
    assert log_table(other_rank, "other", ["a"], [[1]]) is None
    assert not (tmp_path / "other.csv").exists()


def test_gather_objects_without_distributed_is_a_singleton() -> None:
    assert gather_objects(SimpleNamespace(world_size=1), {"x": 1}) == [{"x": 1}]


def test_reports_land_under_default_root_dir_beside_checkpoints_and_reach_wandb(tmp_path: Path, monkeypatch) -> None:
    """A W&B run's reports go to ``<root>/<project>/<run id>`` (where Lightning puts its checkpoints),
    not W&B's own ``wandb/run-*/files`` folder, and are uploaded to the run's files as well."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from common.run_outputs import publish_file, run_directory

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb_logger = WandbLogger(project="proj", save_dir=str(tmp_path), offline=True)
    trainer = pl.Trainer(default_root_dir=str(tmp_path), logger=wandb_logger, accelerator="cpu",
                         enable_progress_bar=False, enable_model_summary=False)
    out = run_directory(trainer)
    assert out == tmp_path / "proj" / wandb_logger.experiment.id
    assert "wandb" not in out.parts
    report = out / "r.json"
    atomic_write_json(report, {"x": 1})
    publish_file(trainer, report)
    uploaded = Path(wandb_logger.experiment.dir) / "r.json"
    assert json.loads(uploaded.read_text()) == {"x": 1}
    wandb_logger.experiment.finish()

    csv_trainer = pl.Trainer(default_root_dir=str(tmp_path), logger=CSVLogger(str(tmp_path / "logs"), name="csv"),
                             accelerator="cpu", enable_progress_bar=False, enable_model_summary=False)
    assert run_directory(csv_trainer) == tmp_path / "logs" / "csv" / "version_0"
    no_logger = pl.Trainer(default_root_dir=str(tmp_path / "bare"), logger=False, accelerator="cpu",
                           enable_progress_bar=False, enable_model_summary=False)
    assert run_directory(no_logger) == tmp_path / "bare"
