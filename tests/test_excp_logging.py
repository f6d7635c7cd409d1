"""ExCP logs one row of statistics per training state: a same-step twin (last.ckpt written right
after the step's top-k file) is not logged, so excp/ratio has no 300x spikes."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from callbacks.excp import ExCP, ExCPSettings
from datamodules.text import TextDataModule
from lightning_modules.causal_lm import CausalLMModule


def test_twins_are_not_logged(tiny_model_config, cpu_trainer_kwargs, tmp_path):
    excp = ExCP(codec=ExCPSettings(keyframe_interval=10), print_summary=False)
    saver = ModelCheckpoint(
        dirpath=tmp_path / "c", filename="{step}", every_n_train_steps=2, save_top_k=-1, save_last=True
    )
    logger = CSVLogger(tmp_path, name="logs")
    kwargs = dict(cpu_trainer_kwargs, enable_checkpointing=True, logger=logger, limit_val_batches=0, max_steps=6)
    trainer = pl.Trainer(callbacks=[excp, saver], **kwargs)
    module = CausalLMModule(model=None, model_config=tiny_model_config, learning_rate=1e-2, warmup_steps=0)
    trainer.fit(module, datamodule=TextDataModule(block_size=32, batch_size=4, max_tokens=20_000))
    logger.save()
    assert sum(h["twin"] for h in excp.history) == 3  # last.ckpt at steps 2, 4 and 6
    rows = [r for r in csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")) if r.get("excp/ratio")]
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    deltas = [h["ratio"] for h in excp.history if not h["twin"] and not h["keyframe"]]
    assert max(float(r["excp/ratio"]) for r in rows) <= max(deltas)
