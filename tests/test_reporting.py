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
