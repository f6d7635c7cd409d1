"""A run resumed from a mid-epoch checkpoint trains on exactly the batches an uninterrupted run would,
and ends with the same weights (plain checkpoints to 1e-6; ExCP checkpoints with the same data order)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from callbacks.excp import ExCP, ExCPSettings
from datamodules.resumable import ResumableDataLoader, ResumableSampler
from datamodules.text import TextDataModule
from lightning_modules.causal_lm import CausalLMModule


class _Batches(Callback):
    """Records the first token of every training example, per global step."""

    def __init__(self) -> None:
        self.seen: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen[trainer.global_step] = batch["input_ids"][:, 0].tolist()


def _run(config, kwargs, root, max_steps, callbacks, ckpt_path=None):
    torch.manual_seed(0)
    module = CausalLMModule(model=None, model_config=config, learning_rate=1e-2, warmup_steps=0, min_lr_ratio=1.0)
    data = TextDataModule(block_size=32, batch_size=4, max_tokens=6_000, val_fraction=0.05)
    trainer = pl.Trainer(
        **dict(
            kwargs,
            default_root_dir=str(root),
            max_steps=max_steps,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=True,
        ),
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, trainer


def test_loader_state_round_trip_skips_consumed_batches():
    dataset = list(range(40))
    loader = ResumableDataLoader(dataset, sampler=ResumableSampler(dataset, seed=3), batch_size=4, drop_last=True)
    loader.sampler.set_epoch(1)
    full = [b.tolist() for b in loader]
    iterator = iter(loader)
    [next(iterator) for _ in range(3)]
    state = loader.state_dict()
    assert state == {"epoch": 1, "consumed": 12}
    resumed = ResumableDataLoader(dataset, sampler=ResumableSampler(dataset, seed=3), batch_size=4, drop_last=True)
    resumed.load_state_dict(state)
    assert [b.tolist() for b in resumed] == full[3:]
    assert [b.tolist() for b in resumed] == full  # the next pass over the same epoch is whole again


def test_resume_mid_epoch_matches_the_uninterrupted_run(tiny_model_config, cpu_trainer_kwargs, tmp_path):
    # 6_000 tokens / 32 / 4 = ~44 batches an epoch: step 10 is mid-epoch, and 50 steps cross an epoch boundary
    whole_batches = _Batches()
    whole, _ = _run(tiny_model_config, cpu_trainer_kwargs, tmp_path / "a", 50, [whole_batches])

    saver = ModelCheckpoint(dirpath=tmp_path / "plain", filename="{step}", every_n_train_steps=10, save_top_k=-1)
    _run(tiny_model_config, cpu_trainer_kwargs, tmp_path / "b", 10, [saver])
    resumed_batches = _Batches()
    resumed, _ = _run(
        tiny_model_config,
        cpu_trainer_kwargs,
        tmp_path / "b",
        50,
        [resumed_batches],
        tmp_path / "plain" / "step=10.ckpt",
    )
    assert resumed_batches.seen == {s: b for s, b in whole_batches.seen.items() if s >= 10}
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name

    # an ExCP resume continues the same batch sequence (its weights differ only by the lossy coding)
    excp_saver = ModelCheckpoint(dirpath=tmp_path / "excp", filename="{step}", every_n_train_steps=10, save_top_k=-1)
    _run(
        tiny_model_config,
        cpu_trainer_kwargs,
        tmp_path / "c",
        20,
        [ExCP(codec=ExCPSettings(), print_summary=False), excp_saver],
    )
    excp_batches = _Batches()
    _run(
        tiny_model_config,
        cpu_trainer_kwargs,
        tmp_path / "c",
        30,
        [ExCP(print_summary=False), excp_batches],
        tmp_path / "excp" / "step=20.ckpt",
    )
    assert excp_batches.seen == {s: b for s, b in whole_batches.seen.items() if 20 <= s < 30}
