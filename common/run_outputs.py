"""Sending results to whatever logger the run has, into the run's own folder.

Probes and callbacks share these so that every report is written atomically, lands in the run's own
folder, and shows up in W&B when the run logs there, without each component special-casing loggers.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import torch

from common.atomic import atomic_write_bytes


def _wandb_logger(trainer: Any) -> Any:
    from lightning.pytorch.loggers import WandbLogger

    for logger in getattr(trainer, "loggers", []) or []:
        if isinstance(logger, WandbLogger):
            return logger
    return None


def run_directory(trainer: Any) -> Path:
    """The folder that belongs to this run, under ``default_root_dir`` (or the logger's ``save_dir``).

    Lightning's own rule for where a run's checkpoints go (``save_dir/name/version``, e.g.
    ``runs/x/lumenlm/<wandb id>`` or ``runs/x/csv/version_0``), so a run's reports sit beside its
    ``checkpoints/`` and a reader finds them where the config's ``default_root_dir`` says, not inside
    W&B's bookkeeping folder (``wandb/run-*/files``); ``publish_file`` copies them to W&B as well.
    Without a logger: ``default_root_dir`` itself.
    """
    logger = getattr(trainer, "logger", None)
    if logger is None:
        return Path(trainer.default_root_dir)
    wandb_logger = _wandb_logger(trainer)
    if wandb_logger is not None:
        _ = wandb_logger.experiment  # the run id (the folder's name) exists once the run has started
    save_dir = getattr(logger, "save_dir", None) or trainer.default_root_dir
    name = getattr(logger, "name", None)
    version = getattr(logger, "version", None)
    version = version if isinstance(version, str) else f"version_{version}" if version is not None else None
    parts = [str(p) for p in (name, version) if p]
    return Path(save_dir, *parts)


def publish_file(trainer: Any, path: str | os.PathLike[str]) -> None:
    """Upload a report file to the run's W&B files (rank zero; a no-op without a W&B logger)."""
    if not trainer.is_global_zero:
        return
    wandb_logger = _wandb_logger(trainer)
    if wandb_logger is not None:
        path = Path(path)
        wandb_logger.experiment.save(str(path), base_path=str(path.parent), policy="now")


def wandb_sync_folder(trainer: Any) -> Path | None:
    """The folder ``wandb sync`` takes for this run (the parent of the run's ``files`` folder), if any."""
    wandb_logger = _wandb_logger(trainer)
    if wandb_logger is None:
        return None
    directory = getattr(wandb_logger.experiment, "dir", None)
    return Path(directory).parent if isinstance(directory, str) and directory else None


def log_table(trainer: Any, key: str, columns: list[str], rows: list[list[Any]]) -> Path | None:
    """Keep a table of per-example records: a CSV in the run folder, and a W&B table when logging there.

    Returns the CSV path on rank zero, None on the other ranks (which write nothing).
    """
    if not trainer.is_global_zero:
        return None
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    writer.writerows(rows)
    path = run_directory(trainer) / f"{key.replace('/', '_')}.csv"
    atomic_write_bytes(path, buffer.getvalue().encode())
    wandb_logger = _wandb_logger(trainer)
    if wandb_logger is not None:
        wandb_logger.log_table(key=key, columns=columns, data=rows)
    return path


def log_image(trainer: Any, key: str, png_path: str | os.PathLike[str]) -> None:
    """Show a saved plot in W&B when the run logs there (the PNG itself stays on disk either way)."""
    if not trainer.is_global_zero:
        return
    wandb_logger = _wandb_logger(trainer)
    if wandb_logger is not None:
        wandb_logger.log_image(key=key, images=[str(png_path)])


def gather_objects(trainer: Any, obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order, on every rank; ``[obj]`` when not distributed."""
    if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered
