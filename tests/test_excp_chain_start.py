"""Where a chain starts: the pretrained weights a run began with (by hash), or the chain a resume loaded."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.excp import ExCP, ExCPSettings, chain_paths, load_checkpoint
from callbacks.excp.cli import main as excp_cli
from callbacks.excp.encoder import ExCPEncoder
from callbacks.excp.fileformat import ExCPFormatError, read_header
from callbacks.excp.references import REFS_DIR
from common.atomic import atomic_write_bytes
from common.hf_loading import load_causal_lm
from datamodules.text import TextDataModule
from lightning_modules.causal_lm import BYTE_TOKENIZER, CausalLMModule


@pytest.fixture
def pretrained_folder(tiny_model_config, tmp_path) -> Path:
    """A tiny Llama saved as safetensors, standing in for a downloaded pretrained model."""
    folder = tmp_path / "pretrained"
    load_causal_lm(None, model_config=tiny_model_config, seed=3).save_pretrained(folder)
    return folder


def _module(model: str) -> CausalLMModule:
    return CausalLMModule(model=model, tokenizer=BYTE_TOKENIZER, learning_rate=1e-2, warmup_steps=0, min_lr_ratio=1.0)


def _fit(kw, folder: Path, model: str, max_steps: int, ckpt_path: str | None = None, **excp) -> ExCP:
    callback = ExCP(**excp)
    mc = ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=2, save_top_k=-1)
    trainer = pl.Trainer(
        callbacks=[callback, mc], **dict(kw, enable_checkpointing=True, limit_val_batches=0, max_steps=max_steps)
    )
    data = TextDataModule(block_size=32, batch_size=4, max_tokens=20_000, val_fraction=0.05)
    trainer.fit(_module(model), datamodule=data, ckpt_path=ckpt_path)
    return callback


def test_fine_tuning_stores_no_keyframe_and_resumes_from_the_pretrained_weights(
    pretrained_folder, cpu_trainer_kwargs, tmp_path
):
    run = tmp_path / "run"
    excp = _fit(cpu_trainer_kwargs, run, str(pretrained_folder), 4)
    assert [h["keyframe"] for h in excp.history] == [0.0, 0.0]  # every file a delta: no lossless keyframe
    header = read_header(run / "step=2.ckpt")
    assert header["ref"] is None and header["base"]["source"]["path"] == str(pretrained_folder)
    assert header["base"]["source"]["prefix"] == "model."
    summary = excp.summary()
    assert summary["overall_ratio"] > 5  # a keyframe alone would hold it near 1.2x
    assert summary["live_checkpoints"] == 2 and summary["bytes_on_disk"] == sum(
        p.stat().st_size for p in run.iterdir() if p.is_file()
    )
    assert "on disk now" in excp.run_summary()[0]

    # a reader finds the base where the file says it is, and checks its hash
    assert load_checkpoint(run / "step=4.ckpt")["global_step"] == 4

    # the pretrained folder moved: one clear error naming the fix, then --base / base= find it
    moved = tmp_path / "moved"
    shutil.move(pretrained_folder, moved)
    with pytest.raises(ExCPFormatError, match="starts from base weights sha256.*--base FOLDER"):
        load_checkpoint(run / "step=4.ckpt")
    assert load_checkpoint(run / "step=4.ckpt", base=moved)["global_step"] == 4
    assert excp_cli(["decompress", str(run / "step=4.ckpt"), "-o", str(tmp_path / "out"), "--base", str(moved)]) == 0
    plain = torch.load(tmp_path / "out" / "step=4.ckpt", weights_only=True)
    assert plain["global_step"] == 4

    # a resume builds the same model (from where it now lives): its weights are the base; the chain goes on
    resumed = _fit(cpu_trainer_kwargs, run, str(moved), 6, ckpt_path=str(run / "step=4.ckpt"))
    assert [h["keyframe"] for h in resumed.history] == [0.0]
    assert read_header(run / "step=6.ckpt")["chain_index"] == 3
    assert [p.name for p in chain_paths(run / "step=6.ckpt")] == ["step=2.ckpt", "step=4.ckpt", "step=6.ckpt"]


def test_base_must_match_by_hash_not_by_name(pretrained_folder, cpu_trainer_kwargs, tmp_path):
    run = tmp_path / "run"
    _fit(cpu_trainer_kwargs, run, str(pretrained_folder), 2)
    other = tmp_path / "other"
    model = load_causal_lm(str(pretrained_folder))
    with torch.no_grad():
        model.model.norm.weight.add_(1e-3)  # one tensor differs slightly: same names, same shapes
    model.save_pretrained(other)
    shutil.rmtree(pretrained_folder)  # else the recorded source, tried after what is offered, would serve
    with pytest.raises(ExCPFormatError, match="none of base .*other.* has that hash"):
        load_checkpoint(run / "step=2.ckpt", base=other)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ExCPFormatError, match="its base .*broken cannot be read as safetensors"):
        load_checkpoint(run / "step=2.ckpt", base=broken)


def test_keyframe_start_and_from_scratch_models_write_self_contained_chains(
    pretrained_folder, tiny_model_config, cpu_trainer_kwargs, tmp_path
):
    forced = _fit(cpu_trainer_kwargs, tmp_path / "a", str(pretrained_folder), 2, start_from="keyframe")
    assert [h["keyframe"] for h in forced.history] == [1.0]
    callback = ExCP()
    trainer = pl.Trainer(
        callbacks=[callback, ModelCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=2, save_top_k=-1)],
        **dict(cpu_trainer_kwargs, enable_checkpointing=True, limit_val_batches=0, max_steps=2),
    )
    scratch = CausalLMModule(model=None, model_config=tiny_model_config, learning_rate=1e-2, warmup_steps=0)
    trainer.fit(scratch, datamodule=TextDataModule(block_size=32, batch_size=4, max_tokens=20_000))
    assert [h["keyframe"] for h in callback.history] == [1.0]  # random init: nobody could rebuild a base
    with pytest.raises(Exception, match="start_from='sometimes' is invalid"):
        ExCP(start_from="sometimes")


def test_lossy_keyframe_moments_keep_weights_exact(tiny_model_config, tmp_path):
    model = load_causal_lm(None, model_config=tiny_model_config, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        ids = torch.randint(0, 200, (2, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    checkpoint = {"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()]}
    sizes = {}
    for mode in ("lossless", "lossy"):
        encoder = ExCPEncoder(ExCPSettings(keyframe_moments=mode))
        path = tmp_path / f"{mode}.excp"
        encoded = encoder.encode(checkpoint, target=path)
        atomic_write_bytes(path, encoded.data)
        sizes[mode] = encoded.stats["ratio"]
        decoded = load_checkpoint(path)
        assert encoded.header["kind"] == "keyframe"
        for name, tensor in model.state_dict().items():
            assert torch.equal(decoded["state_dict"][name], tensor), name
        for slot, state in optimizer.state_dict()["state"].items():
            m, v = (decoded["optimizer_states"][0]["state"][slot][k] for k in ("exp_avg", "exp_avg_sq"))
            if mode == "lossless":
                assert torch.equal(m, state["exp_avg"]) and torch.equal(v, state["exp_avg_sq"])
            else:  # 4-bit codebooks: a small relative error, and nothing pruned but exact zeros
                m_error = (m - state["exp_avg"]).norm() / state["exp_avg"].norm()
                assert m_error < 0.2, (slot, float(m_error))
                # v sets Adam's step size 1/sqrt(v): its log-domain codebook keeps that within ~20% per entry
                kept = state["exp_avg_sq"] > 0
                step_error = (v[kept].sqrt() / state["exp_avg_sq"][kept].sqrt() - 1).abs().median()
                assert step_error < 0.2, (slot, float(step_error))
                assert torch.equal(m != 0, state["exp_avg"] != 0)
    assert sizes["lossy"] > 2 * sizes["lossless"]


def test_resume_into_another_folder_continues_the_chain_and_survives_the_old_one(
    tiny_model_config, cpu_trainer_kwargs, tmp_path
):
    first, second = tmp_path / "first", tmp_path / "second"

    def fit(folder: Path, steps: int, ckpt_path: str | None = None) -> ExCP:
        callback = ExCP(codec=ExCPSettings(keyframe_interval=10))
        mc = ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=2, save_top_k=-1)
        trainer = pl.Trainer(
            callbacks=[callback, mc],
            **dict(cpu_trainer_kwargs, enable_checkpointing=True, limit_val_batches=0, max_steps=steps),
        )
        module = CausalLMModule(model=None, model_config=tiny_model_config, learning_rate=1e-2, warmup_steps=0, seed=0)
        trainer.fit(
            module, datamodule=TextDataModule(block_size=32, batch_size=4, max_tokens=20_000), ckpt_path=ckpt_path
        )
        return callback

    fit(first, 4)
    resumed = fit(second, 8, ckpt_path=str(first / "step=4.ckpt"))
    assert [h["keyframe"] for h in resumed.history] == [0.0, 0.0]  # no new keyframe after the resume
    assert read_header(second / "step=6.ckpt")["chain_index"] == 2
    expected = load_checkpoint(second / "step=8.ckpt")
    shutil.rmtree(first)  # the old run's folder is gone: the new one keeps what its chain needs
    assert (second / REFS_DIR).is_dir()
    again = load_checkpoint(second / "step=8.ckpt")
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(again["state_dict"][name], tensor)


def test_a_same_step_twin_adds_no_raw_bytes_to_the_overall_ratio(tmp_path):
    callback = ExCP()
    state = {"keyframe": 0.0, "twin": 0.0, "ratio": 50.0, "raw_wmv_bytes": 1000.0, "file_bytes": 20.0}
    twin = {"keyframe": 0.0, "twin": 1.0, "ratio": 250.0, "raw_wmv_bytes": 1000.0, "file_bytes": 4.0}
    callback.history = [
        {"path": str(tmp_path / "step=2.ckpt"), **state},
        {"path": str(tmp_path / "last.ckpt"), **twin},  # last.ckpt right after step=2.ckpt: the same state
    ]
    summary = callback.summary()
    assert summary["raw_wmv_bytes"] == 1000.0 and summary["overall_ratio"] == pytest.approx(1000 / 24)
    assert "for 1 training state(s)" in callback.run_summary()[0]
