"""ExCP callback in real Trainers: resume through a chain, top-k deletion, logging, DDP, strategy errors."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from callbacks.excp import ExCP, ExCPCheckpointIO, ExCPSettings, chain_paths, is_excp_file, load_checkpoint
from callbacks.excp.references import REFS_DIR
from common.errors import UserFacingError
from datamodules.text import TextDataModule
from lightning_modules.causal_lm import CausalLMModule

ROOT = Path(__file__).resolve().parents[1]


def _module(cfg) -> CausalLMModule:
    return CausalLMModule(model=None, model_config=cfg, learning_rate=1e-2, warmup_steps=0, min_lr_ratio=1.0)


def _data() -> TextDataModule:
    return TextDataModule(block_size=32, batch_size=4, max_tokens=20_000, val_fraction=0.05)


class _Recorder(Callback):
    """Records the step and optimizer step counts a run starts from, and every training loss."""

    def __init__(self) -> None:
        self.start_step: int | None = None
        self.adam_steps: set[float] = set()
        self.losses: dict[int, float] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_step = trainer.global_step
        self.adam_steps = {float(s["step"]) for s in trainer.optimizers[0].state.values()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


def _trainer(kw, tmp_path, callbacks, max_steps, logger=False):
    kw = dict(kw, enable_checkpointing=True, logger=logger, limit_val_batches=0, max_steps=max_steps)
    return pl.Trainer(callbacks=callbacks, **kw)


def test_resume_through_compressed_chain(tiny_model_config, cpu_trainer_kwargs, tmp_path):
    ckdir = tmp_path / "ckpts"
    rec1 = _Recorder()
    excp = ExCP(codec=ExCPSettings(keyframe_interval=3))
    mc = ModelCheckpoint(dirpath=ckdir, filename="{step}", every_n_train_steps=2, save_top_k=-1)
    logger = CSVLogger(tmp_path, name="logs")
    t1 = _trainer(cpu_trainer_kwargs, tmp_path, [excp, mc, rec1], 8, logger=logger)
    t1.fit(_module(tiny_model_config), datamodule=_data())
    assert isinstance(t1.strategy.checkpoint_io, ExCPCheckpointIO)
    files = {s: ckdir / f"step={s}.ckpt" for s in (2, 4, 6, 8)}
    assert all(is_excp_file(f) for f in files.values())
    assert [p.name for p in chain_paths(files[6])] == ["step=2.ckpt", "step=4.ckpt", "step=6.ckpt"]
    assert [h["keyframe"] for h in excp.history] == [1.0, 0.0, 0.0, 1.0]
    ck = load_checkpoint(files[6])
    assert ck["global_step"] == 6 and ck["hyper_parameters"]["learning_rate"] == 1e-2
    # stats reached the logger
    logger.save()
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    ratios = [float(r["excp/ratio"]) for r in rows if r.get("excp/ratio")]
    assert len(ratios) == 4 and max(ratios) > 3
    assert any(r.get("excp/bits_per_param_v") for r in rows)

    # resume from the delta at step 4: the chain is replayed, counters are exact, training continues
    rec2 = _Recorder()
    excp2 = ExCP(codec=ExCPSettings(keyframe_interval=3))
    mc2 = ModelCheckpoint(dirpath=tmp_path / "resumed", filename="{step}", every_n_train_steps=2, save_top_k=-1)
    t2 = _trainer(cpu_trainer_kwargs, tmp_path, [excp2, mc2, rec2], 8)
    t2.fit(_module(tiny_model_config), datamodule=_data(), ckpt_path=str(files[4]))
    assert rec2.start_step == 4 and rec2.adam_steps == {4.0}
    assert t2.global_step == 8
    # the resume continues the loaded chain (step 6 is its third file), the interval still bounds it
    assert [h["keyframe"] for h in excp2.history] == [0.0, 1.0]
    # loss continues where it was, far from the untrained model's
    start = rec1.losses[1]
    before = (rec1.losses[7] + rec1.losses[8]) / 2
    after = (rec2.losses[7] + rec2.losses[8]) / 2
    assert start - before > 0.5
    assert abs(after - before) < 0.25 * (start - before)


def test_top_k_deletion_keeps_chains_readable(tiny_model_config, cpu_trainer_kwargs, tmp_path):
    ckdir = tmp_path / "ckpts"
    mc = ModelCheckpoint(
        dirpath=ckdir,
        filename="{step}",
        monitor="train/loss",
        mode="min",
        every_n_train_steps=1,
        save_top_k=2,
        save_last=True,
    )
    excp = ExCP(codec=ExCPSettings(keyframe_interval=100))
    t = _trainer(cpu_trainer_kwargs, tmp_path, [excp, mc], 5)
    t.fit(_module(tiny_model_config), datamodule=_data())
    live = sorted(p for p in ckdir.iterdir() if p.is_file())
    assert len(live) == 3  # two best + last
    assert any(h["twin"] for h in excp.history)  # last.ckpt after a top-k save at the same step
    refs = list((ckdir / REFS_DIR).iterdir())
    assert refs, "top-k deleted files that later deltas depend on; they must be kept"
    needed = {p.resolve() for f in live for p in chain_paths(f)}
    # every file kept is needed by a live checkpoint or is the encoder's current reference
    head = excp.checkpoint_io.encoder.head["file_id"]
    assert all(r.resolve() in needed or r.stem == head for r in refs)
    for f in live:
        ck = load_checkpoint(f)
        assert ck["global_step"] == int(f.stem.split("=")[1]) if "step=" in f.stem else ck["global_step"] == 5
    # removing the best ones later still leaves last.ckpt readable
    io = excp.checkpoint_io
    for f in live:
        if f.name != "last.ckpt":
            io.remove_checkpoint(f)
    assert load_checkpoint(ckdir / "last.ckpt")["global_step"] == 5


def test_strategies_that_bypass_checkpoint_io_fail_at_setup():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    with pytest.raises(UserFacingError, match="FSDPStrategy's sharded checkpoints .* set state_dict_type: full"):
        ExCP().setup(SimpleNamespace(strategy=FSDPStrategy(state_dict_type="sharded")), None, "fit")

    class DeepSpeedStrategy(DDPStrategy):  # stands in for the real one, which needs deepspeed installed
        def __init__(self, stage: int) -> None:
            super().__init__()
            self.config = {"zero_optimization": {"stage": stage}}

    with pytest.raises(UserFacingError, match="ZeRO stages 2 and 3, not stage 1: stage 1 is not tested"):
        ExCP().setup(SimpleNamespace(strategy=DeepSpeedStrategy(1)), None, "fit")
    with pytest.raises(UserFacingError, match="ZeRO stages 2 and 3, not stage 0: without ZeRO"):
        ExCP().setup(SimpleNamespace(strategy=DeepSpeedStrategy(0)), None, "fit")
    for stage in (2, 3):  # their folders are compressed: save, load and remove go through ExCP
        routed = DeepSpeedStrategy(stage)
        ExCP().setup(SimpleNamespace(strategy=routed), None, "fit")
        assert routed._excp_deepspeed_routed and routed.save_checkpoint.__qualname__.startswith("route_deepspeed")

    from lightning.pytorch.strategies import ModelParallelStrategy

    with pytest.raises(UserFacingError, match="set save_distributed_checkpoint: false"):
        ExCP().setup(SimpleNamespace(strategy=ModelParallelStrategy()), None, "fit")


def test_fsdp1_full_state_dicts_are_served(monkeypatch):
    """FSDP1 with state_dict_type="full" (the 2-process run is in tests/test_strategy_matrix.py): ExCP's
    CheckpointIO is installed, loading goes through the codec, and the optimizer slots are named as in the
    gathered state dict (without FSDP's wrapper prefix), so moments are coded against their weights."""
    from lightning.pytorch.strategies import FSDPStrategy

    import callbacks.excp.callback as callback_module

    strategy = FSDPStrategy(state_dict_type="full")
    excp = ExCP()
    excp.setup(SimpleNamespace(strategy=strategy), None, "fit")
    assert strategy.checkpoint_io is excp.checkpoint_io and strategy._excp_loader_installed

    layer = torch.nn.Module()
    layer._fsdp_wrapped_module = torch.nn.Linear(2, 2)  # what FSDP1's auto wrap leaves in the module tree
    module = torch.nn.Sequential(layer)
    excp._trainer = SimpleNamespace(lightning_module=module, optimizers=[torch.optim.AdamW(module.parameters())])
    assert excp._names() == ({"0.weight", "0.bias"}, [["0.weight", "0.bias"]])

    # a fresh fine-tuning run looks for its pretrained base on rank 0 only, but FSDP1's state_dict() is a
    # collective: under FSDP1 the chain starts with a keyframe instead
    monkeypatch.setattr(callback_module, "find_pretrained_base", lambda m: pytest.fail("rank-0 state_dict() call"))
    excp._start_from_pretrained(SimpleNamespace(strategy=strategy, ckpt_path=None), module)


def test_invalid_settings_fail_early():
    with pytest.raises(UserFacingError, match="bits_w=9 is invalid"):
        ExCP(codec=ExCPSettings(bits_w=9))
    with pytest.raises(UserFacingError, match="codec must be ExCPSettings"):
        ExCP(codec={"bits_w": 4})


def test_state_key_names_the_settings_and_two_different_callbacks_are_refused(tiny_model_config, cpu_trainer_kwargs):
    four, two = ExCP(), ExCP(codec=ExCPSettings(bits_w=2))
    assert four.state_key != two.state_key and "bits_w" in four.state_key
    assert ExCP().state_key == four.state_key
    trainer = _trainer(cpu_trainer_kwargs, None, [four, two], 1)
    with pytest.raises(UserFacingError, match="Two ExCP callbacks with different codec settings"):
        trainer.fit(_module(tiny_model_config), datamodule=_data())


_DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, {root!r})
    import torch
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from callbacks.excp import ExCP, ExCPSettings
    from datamodules.text import TextDataModule
    from lightning_modules.causal_lm import CausalLMModule
    from common.hf_loading import TINY_LLAMA_CONFIG

    torch.set_num_threads(1)
    out = {out!r}

    class Report(Callback):
        def on_train_start(self, trainer, pl_module):
            steps = sorted({{float(s["step"]) for s in trainer.optimizers[0].state.values()}})
            w = next(pl_module.parameters()).detach()
            with open(os.path.join(out, f"rank{{trainer.global_rank}}.json"), "w") as f:
                json.dump({{"step": trainer.global_step, "adam": steps, "w": float(w.double().sum())}}, f)

    def run(max_steps, ckpt_path=None, callbacks=()):
        trainer = pl.Trainer(
            accelerator="cpu", devices=2, strategy="ddp", max_steps=max_steps, logger=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
            callbacks=[ExCP(codec=ExCPSettings(keyframe_interval=4)),
                       ModelCheckpoint(dirpath=os.path.join(out, "ckpts"), filename="{{step}}", every_n_train_steps=2,
                                       save_top_k=-1), *callbacks],
        )
        model = CausalLMModule(model=None, model_config=dict(TINY_LLAMA_CONFIG), learning_rate=1e-2, warmup_steps=0)
        data = TextDataModule(block_size=32, batch_size=2, max_tokens=20000)
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)

    run(4)
    run(6, ckpt_path=os.path.join(out, "ckpts", "step=4.ckpt"), callbacks=[Report()])
    from common.process_group import release_process_group
    release_process_group()
    """
)


def test_ddp_two_processes_save_and_resume(tmp_path):
    """Real 2-process DDP on CPU: rank zero writes the chain, both ranks resume from it."""
    script = tmp_path / "ddp_excp.py"
    script.write_text(_DDP_SCRIPT.format(root=str(ROOT), out=str(tmp_path)))
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ck = tmp_path / "ckpts"
    names = sorted(p.name for p in ck.iterdir() if p.is_file())
    assert names == ["step=2.ckpt", "step=4.ckpt", "step=6.ckpt"]
    assert not list(tmp_path.glob("**/*.tmp"))  # no half-written files from a second writer
    import json

    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(rep["step"] == 4 and rep["adam"] == [4.0] for rep in reports)
    assert reports[0]["w"] == reports[1]["w"]  # both ranks loaded the same reconstruction
    w = load_checkpoint(ck / "step=4.ckpt")["state_dict"]
    first = next(k for k in w if k.startswith("model."))
    assert abs(float(w[first].double().sum()) - reports[0]["w"]) < 1e-6
    assert load_checkpoint(ck / "step=6.ckpt")["global_step"] == 6


def test_one_chain_per_folder(tmp_path):
    """Two ModelCheckpoints writing to two folders each keep their own chain (no keyframe ping-pong)."""
    from callbacks.excp.fileformat import read_header

    io = ExCPCheckpointIO()
    w = torch.randn(32, 16)
    for step in range(3):
        for d in ("a", "b"):
            ck = {"global_step": step, "state_dict": {"w": w + 0.01 * step}}
            io.save_checkpoint(ck, tmp_path / d / f"s{step}.ckpt")
    kinds = [read_header(tmp_path / d / f"s{s}.ckpt")["kind"] for d in ("a", "b") for s in range(3)]
    assert kinds == ["keyframe", "delta", "delta"] * 2
    assert io.load_checkpoint(tmp_path / "b" / "s2.ckpt")["global_step"] == 2


def test_wandb_artifact_holds_the_chain(tiny_model_config, cpu_trainer_kwargs, tmp_path, monkeypatch):
    """upload_artifacts: one W&B artifact with every live ExCP file and the chain files they need."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    logged = []
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(wandb.Run, "log_artifact", lambda run, artifact, *a, **k: logged.append(artifact))
    excp = ExCP(codec=ExCPSettings(keyframe_interval=10), upload_artifacts=True, print_summary=False)
    checkpoints = ModelCheckpoint(
        dirpath=tmp_path / "c", filename="{step}", every_n_train_steps=1, save_top_k=1, monitor="step", mode="max"
    )
    logger = WandbLogger(offline=True, save_dir=str(tmp_path))
    trainer = _trainer(cpu_trainer_kwargs, tmp_path, [excp, checkpoints], 3, logger=logger)
    trainer.fit(_module(tiny_model_config), datamodule=_data())
    wandb.finish()
    assert len(logged) == 1
    names = set(logged[0].manifest.entries)
    # top-1 kept only step=3; its chain back to the keyframe lives in .excp_refs and travels along
    assert "step=3.ckpt" in names and sum(n.startswith(REFS_DIR + "/") for n in names) == 2
    assert logged[0].metadata["checkpoints"] == 3
