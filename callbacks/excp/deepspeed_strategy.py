"""ExCP under Lightning's ``DeepSpeedStrategy`` (ZeRO stages 2 and 3): the strategy's save, load and remove, wrapped.

* **save** (every rank): the engine writes the checkpoint folder under a temporary name beside the target;
  each rank replaces the files it wrote by ExCP files (keyframe or delta against the same file of the
  previous checkpoint; :mod:`callbacks.excp.deepspeed_files`); after a barrier rank 0 fsyncs the folder and
  swaps it in at the target in one rename (an existing ``last.ckpt`` folder is exchanged atomically).
* **load** (every rank): a folder with ExCP files is decoded into a temporary folder beside it (each rank
  its share of the files), the engine loads that ordinary folder, and the temporary folder is deleted; the
  saved folder is never modified. The next save starts new chains with keyframes.
* **remove** (rank 0, ModelCheckpoint's rotation): the folder is renamed to a temporary name, then
  deleted; later folders hold hard links to every chain file they need.

A kill at any instant leaves every folder that existed before loadable; temporary folders a killed run
left are deleted before its first save into that parent folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import Strategy

from callbacks.excp.codec import ExCPSettings
from callbacks.excp.deepspeed_files import (
    DeepSpeedChains,
    has_excp_files,
    new_staging_dir,
    remove_folder,
    remove_stale_staging,
    restore_files,
    swap_in,
)

SaveListener = Callable[[Path, dict[str, float]], None]

_SUMMED = ("file_bytes", "raw_wmv_bytes", "raw_tensor_bytes", "params", "engine_file_bytes", "encode_s")


def route_deepspeed(strategy: Strategy, settings: ExCPSettings, on_save: SaveListener | None) -> None:
    """Wrap ``strategy``'s save/load/remove so its checkpoint folders hold ExCP files (idempotent)."""
    if getattr(strategy, "_excp_deepspeed_routed", False):
        return
    chains = DeepSpeedChains(settings)
    cleaned: set[str] = set()
    original_save, original_load, original_remove = (
        strategy.save_checkpoint,
        strategy.load_checkpoint,
        strategy.remove_checkpoint,
    )

    def staging_beside(target: Path) -> Path:
        folder = None
        if strategy.is_global_zero:
            if str(target.parent) not in cleaned:
                remove_stale_staging(target.parent)
                cleaned.add(str(target.parent))
            folder = str(new_staging_dir(target))
        return Path(strategy.broadcast(folder))

    def save_checkpoint(checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        target = Path(strategy.broadcast(str(filepath)))
        staging = staging_beside(target)
        try:
            original_save(checkpoint, staging, storage_options=storage_options)
            stats = chains.compress(staging, target, strategy.global_rank, checkpoint.get("global_step"),
                                    checkpoint.get("epoch"))
        except BaseException:
            chains.abandon()
            raise
        everyone = _gather(stats)
        strategy.barrier("excp_deepspeed_compressed")
        if strategy.is_global_zero:
            swap_in(staging, target)
        strategy.barrier("excp_deepspeed_swapped")
        chains.commit()
        if on_save is not None and strategy.is_global_zero:
            on_save(target, _combine(everyone))

    def load_checkpoint(checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        source = Path(strategy.broadcast(str(checkpoint_path)))
        if not has_excp_files(source):
            return original_load(checkpoint_path, weights_only=weights_only)
        chains.reset()  # a chain never continues across a resume
        restored = staging_beside(source)
        try:
            restore_files(source, restored, strategy.global_rank, strategy.world_size)
            strategy.barrier("excp_deepspeed_restored")
            return original_load(restored, weights_only=weights_only)
        finally:
            strategy.barrier("excp_deepspeed_loaded")
            if strategy.is_global_zero:
                remove_folder(restored)

    def remove_checkpoint(filepath: Any) -> None:
        path = Path(filepath)
        if strategy.is_global_zero and path.is_dir():
            remove_folder(path)
        else:
            original_remove(filepath)

    strategy.save_checkpoint = save_checkpoint
    strategy.load_checkpoint = load_checkpoint
    strategy.remove_checkpoint = remove_checkpoint
    strategy._excp_deepspeed_routed = True


def _gather(stats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return stats
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, stats)
    return [s for rank in gathered for s in rank]


def _combine(stats: list[dict[str, Any]]) -> dict[str, float]:
    """One row for the folder: sizes summed over ranks and files, ratios and sparsities weighted by size."""
    out = {k: float(sum(s[k] for s in stats)) for k in _SUMMED}
    weight = [s["params"] for s in stats]
    total = sum(weight) or 1.0
    for key in ("bits_per_param_w", "bits_per_param_m", "bits_per_param_v", "sparsity_w", "sparsity_m"):
        out[key] = sum(s[key] * w for s, w in zip(stats, weight, strict=True)) / total
    out["keyframe"] = float(any(s["keyframe"] for s in stats))
    out["twin"] = float(all(s["twin"] for s in stats))
    out["ratio"] = out["raw_wmv_bytes"] / out["file_bytes"] if out["file_bytes"] else 0.0
    out["ratio_vs_engine_files"] = out["engine_file_bytes"] / out["file_bytes"] if out["file_bytes"] else 0.0
    return out
