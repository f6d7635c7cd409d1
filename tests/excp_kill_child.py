"""A Lightning Trainer run with the ExCP callback that saves every step, to be SIGKILLed at any instant.

Used by tests/test_excp_kill.py and bench/excp_safety.py. A small MLP (AdamW) trains on seeded
synthetic batches; ``ModelCheckpoint`` saves ``step=N.ckpt`` every step (``save_top_k=2`` on the
step, so the older one is removed) and ``last.ckpt``, all through ExCP's CheckpointIO (top-k files
are keyframes and deltas; ``last.ckpt`` is a same-step twin). A rerun resumes from ``last.ckpt``
with ``trainer.fit(ckpt_path=...)``. It prints ``READY <step>`` once training starts (after the
resume), ``SAVING <path>`` before and ``SAVED <path>`` after each save, ``REMOVING``/``REMOVED
<path>`` around each removal, and ``DONE <step>`` at the end.

    python tests/excp_kill_child.py FOLDER --max-steps 500
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from typing_extensions import override  # noqa: E402

from callbacks.excp import ExCP, ExCPSettings  # noqa: E402


def say(*words: object) -> None:
    """One line in one write: ``print`` writes each word separately when PYTHONUNBUFFERED is set, and a
    kill between two of those writes left the driver a bare "SAVED" line."""
    sys.stdout.write(" ".join(map(str, words)) + "\n")
    sys.stdout.flush()


class Regression(pl.LightningModule):
    """An MLP learning a fixed map of seeded random inputs (about 86k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        layers = [torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 256), torch.nn.GELU()]
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(256, 64))

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    @override
    def train_dataloader(self) -> DataLoader:
        x = torch.randn(32 * 64, 64, generator=torch.Generator().manual_seed(1000))
        return DataLoader(TensorDataset(x, torch.tanh(x.flip(1))), batch_size=32)


class AnnouncedCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that prints every save and removal, so the killer knows what was on disk."""

    @override
    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        say("SAVING", filepath)
        super()._save_checkpoint(trainer, filepath)
        say("SAVED", filepath)

    @override
    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        say("REMOVING", filepath)
        super()._remove_checkpoint(trainer, filepath)
        say("REMOVED", filepath)


class Announce(Callback):
    """Prints the step training starts from (after a resume) and the step it ends at."""

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        say("READY", trainer.global_step)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        say("DONE", trainer.global_step)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--keyframe-interval", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    checkpoints = AnnouncedCheckpoint(
        dirpath=args.folder,
        filename="{step}",
        every_n_train_steps=1,
        save_top_k=2,
        monitor="step",
        mode="max",
        save_last=True,
        enable_version_counter=False,
    )
    excp = ExCP(ExCPSettings(keyframe_interval=args.keyframe_interval, kmeans_sample=4096), print_summary=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.max_steps,
        max_epochs=-1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[excp, checkpoints, Announce()],
        default_root_dir=args.folder,
    )
    last = args.folder / "last.ckpt"
    trainer.fit(Regression(), ckpt_path=last if last.exists() else None)


if __name__ == "__main__":
    main()
