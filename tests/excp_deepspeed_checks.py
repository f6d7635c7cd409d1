"""ExCP under DeepSpeed ZeRO-2/3 on 2 CPU processes: compressed folders, rotation, deletion, resume (a matrix job part).

Run by ``tests/strategy_matrix_job.py`` as the extra component ``excp_deepspeed`` of ``deepspeed_stage2`` and
``deepspeed_stage3``
(one process launch serves the whole matrix). Every rank runs this; rank 0's returned dict is the result.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from callbacks.excp import is_excp_file
from common.hf_loading import tiny_llama_config
from common.run_outputs import gather_objects


def _zero_state(trainer: L.Trainer) -> dict[str, list[torch.Tensor]]:
    """This rank's fp32 master partitions and their Adam moments, as the engine holds them (ZeRO-2 or ZeRO-3)."""
    zero = trainer.strategy.deepspeed_engine.optimizer
    flat = getattr(zero, "single_partition_of_fp32_groups", None) or zero.fp32_partitioned_groups_flat
    partitions = [p.detach().clone() for p in flat]
    states = [zero.optimizer.state[p] for p in flat]
    return {
        "w": partitions,
        "m": [s["exp_avg"].detach().clone() for s in states],
        "v": [s["exp_avg_sq"].detach().clone() for s in states],
    }


class _Snapshot(Callback):
    """Keeps the ZeRO state at the end of fit (what the last save wrote) or at the start (what a resume restored)."""

    def __init__(self, when: str) -> None:
        self.when = when
        self.state: dict[str, list[torch.Tensor]] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.when == "start":
            self.state = _zero_state(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.when == "end":
            self.state = _zero_state(trainer)


def _relative_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x - y).norm()) ** 2 for x, y in zip(a, b, strict=True)) ** 0.5
    den = sum(float(x.norm()) ** 2 for x in a) ** 0.5
    return num / max(den, 1e-30)


def _files(folder: Path) -> dict[str, Any]:
    """Kinds and sizes of a checkpoint folder's engine files, against the ordinary files they decode to."""
    from callbacks.excp.deepspeed_files import engine_files, read_engine_file
    from callbacks.excp.fileformat import read_header
    from callbacks.excp.references import chain_paths

    out = {}
    for path in engine_files(folder):
        plain = io.BytesIO()
        torch.save(read_engine_file(path), plain)
        out[path.name] = {
            "excp": is_excp_file(path),
            "kind": read_header(path)["kind"],
            "chain": [read_header(p)["kind"] for p in chain_paths(path)],
            "bytes": path.stat().st_size,
            "chain_bytes": sum(p.stat().st_size for p in chain_paths(path) if read_header(p)["kind"] == "delta"),
            "plain_bytes": plain.getbuffer().nbytes,
        }
    return out


def _decompress(folder: Path, output: Path) -> dict[str, Any]:
    """``python -m callbacks.excp decompress <folder>`` (in this process: a fresh one pays DeepSpeed's import)."""
    from callbacks.excp.cli import main

    returncode = main(["decompress", str(folder), "-o", str(output)])
    restored = output / folder.name
    module_files = sorted((restored / "checkpoint").glob("*model_states.pt"))  # ZeRO-3: one per rank
    states = module_files[0] if module_files else restored / "checkpoint" / "mp_rank_00_model_states.pt"
    return {
        "returncode": returncode,
        "plain": states.is_file() and not is_excp_file(states),
        "global_step": torch.load(states, weights_only=False)["global_step"] if states.is_file() else None,
        "files": sorted(str(p.relative_to(restored)) for p in restored.rglob("*") if p.is_file()),
    }


def run_excp_deepspeed(name: str, root: Path, trainer: Any, text_data: Any) -> dict[str, Any]:
    """Fit 4 steps (checkpoints every 2, top-1 + last), delete the step-4 folder, resume from last to 6."""
    from callbacks.excp import ExCP
    from lightning_modules.causal_lm import CausalLMModule

    def module() -> CausalLMModule:
        return CausalLMModule(model=None, model_config=tiny_llama_config(), learning_rate=1e-3, warmup_steps=1)

    ckpt = root / "ckpt"
    saved = _Snapshot("end")
    excp = ExCP(print_summary=False, log_stats=False)
    first = trainer(name, root, max_steps=4, limit_val_batches=0, callbacks=[
        excp, saved, ModelCheckpoint(dirpath=ckpt, every_n_train_steps=2, save_top_k=1, save_last=True)])
    first.fit(module(), datamodule=text_data())
    out: dict[str, Any] = {"folders_after_fit": sorted(p.name for p in ckpt.iterdir())}
    if first.is_global_zero:
        out["files"] = _files(ckpt / "last.ckpt")
        out["cli"] = _decompress(ckpt / "last.ckpt", root / "decompressed")
        out["history"] = [{k: h[k] for k in ("step", "keyframe", "twin", "file_bytes", "ratio")} for h in excp.history]
        shutil.rmtree(ckpt / "epoch=0-step=4.ckpt")  # the folder last.ckpt's chain started in
    first.strategy.barrier("deleted")
    restored = _Snapshot("start")
    second = trainer(name, root, max_steps=6, limit_val_batches=0, callbacks=[
        ExCP(print_summary=False, log_stats=False), restored,
        ModelCheckpoint(dirpath=root / "ckpt2", every_n_train_steps=2, save_top_k=-1)])
    second.fit(module(), datamodule=text_data(), ckpt_path=str(ckpt / "last.ckpt"))
    assert saved.state is not None and restored.state is not None
    errors = {k: _relative_error(saved.state[k], restored.state[k]) for k in ("w", "m", "v")}
    out["relative_error"] = gather_objects(second, errors)
    out["resumed_global_step"] = second.global_step
    out["train_loss"] = float(second.callback_metrics["train/loss"])
    out["folders_after_resume"] = sorted(p.name for p in (root / "ckpt2").iterdir())
    out["leftover_temporaries"] = sorted(p.name for p in root.rglob("*.tmp"))
    return out
