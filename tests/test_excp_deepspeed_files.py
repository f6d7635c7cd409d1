"""DeepSpeed checkpoint folders as ExCP files, without DeepSpeed: fake ZeRO-2/3 folders through save, rotation, restore.

The 2-process run under the real engine is the ``excp_deepspeed`` part of the strategy matrix job
(tests/excp_deepspeed_checks.py); these tests pin the file-level guarantees on one process in a second.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from callbacks.excp import ExCPSettings, is_excp_file
from callbacks.excp.deepspeed_files import (
    DeepSpeedChains,
    folder_hyperparameters,
    has_excp_files,
    read_engine_file,
    remove_folder,
    remove_stale_staging,
    restore_files,
    swap_in,
)
from callbacks.excp.fileformat import read_header

OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL = "mp_rank_00_model_states.pt"


def _engine_files(step: int, generator: torch.Generator) -> dict[str, dict]:
    """What the engine writes on rank 0 of a 1-rank ZeRO-2 run (plain types in place of DeepSpeed's objects)."""
    base = torch.Generator().manual_seed(123)  # the same initial weights at every step, then a small update
    w = [torch.randn(n, generator=base) + 1e-3 * step * torch.randn(n, generator=generator) for n in (4096, 64)]
    optim = {
        "optimizer_state_dict": {
            "loss_scaler": {"cur_scale": 1.0},
            "base_optimizer_state": {
                "state": {g: {"step": torch.tensor(float(step)), "exp_avg": 0.01 * torch.randn_like(t),
                              "exp_avg_sq": 1e-4 * torch.rand_like(t)} for g, t in enumerate(w)},
                "param_groups": [{"lr": 1e-3, "params": [0]}, {"lr": 1e-3, "params": [1]}],
            },
            "single_partition_of_fp32_groups": w,
            "partition_count": [1, 1],
        },
        "ds_version": "0.19.8",
    }
    model = {
        "module": {"layer.weight": w[0].reshape(64, 64).clone(), "norm.weight": w[1].clone()},
        "global_steps": step,
        "global_step": step,
        "epoch": 0,
        "hyper_parameters": {"learning_rate": 1e-3},
        "loops": {"fit_loop": {"step": step}},
    }
    return {OPTIM: optim, MODEL: model}


def _save(chains: DeepSpeedChains, target: Path, step: int, files: dict[str, dict]) -> Path:
    staging = target.parent / f".{target.name}.stage.tmp"
    (staging / "checkpoint").mkdir(parents=True)
    (staging / "latest").write_text("checkpoint")
    for name, obj in files.items():
        torch.save(obj, staging / "checkpoint" / name)
    chains.compress(staging, target, rank=0, step=step, epoch=0)
    swap_in(staging, target)
    chains.commit()
    return target


def _restore(folder: Path, into: Path) -> dict[str, dict]:
    into.mkdir()
    restore_files(folder, into, rank=0, world_size=1)
    assert (into / "latest").read_text() == "checkpoint"
    return {name: torch.load(into / "checkpoint" / name, weights_only=False) for name in (OPTIM, MODEL)}


def test_folders_are_compressed_chained_and_survive_deleting_older_folders(tmp_path):
    generator = torch.Generator().manual_seed(0)
    chains = DeepSpeedChains(ExCPSettings())
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    saved = {}
    for step in (2, 4):
        saved[step] = _engine_files(step, generator)
        _save(chains, ckpt / f"step={step}.ckpt", step, saved[step])
        _save(chains, ckpt / "last.ckpt", step, saved[step])  # same step: a twin, then an atomic exchange
    last = ckpt / "last.ckpt" / "checkpoint"
    assert has_excp_files(ckpt / "last.ckpt")
    assert read_header(last / OPTIM)["kind"] == "twin"
    delta = ckpt / "step=4.ckpt" / "checkpoint" / OPTIM
    assert read_header(delta)["kind"] == "delta"
    plain = tmp_path / "plain.pt"
    torch.save(saved[4][OPTIM], plain)
    assert delta.stat().st_size < plain.stat().st_size / 3
    remove_folder(ckpt / "step=2.ckpt")  # ModelCheckpoint's rotation
    shutil.rmtree(ckpt / "step=4.ckpt")  # and a user deleting the folder the chain's delta lives in
    restored = _restore(ckpt / "last.ckpt", tmp_path / "restored")
    optim, model = restored[OPTIM]["optimizer_state_dict"], restored[MODEL]
    original = saved[4][OPTIM]["optimizer_state_dict"]
    for group, weight in enumerate(original["single_partition_of_fp32_groups"]):
        got = optim["single_partition_of_fp32_groups"][group]
        assert float((got - weight).norm() / weight.norm()) < 0.05
        state = optim["base_optimizer_state"]["state"][group]
        assert torch.equal(state["step"], torch.tensor(4.0))  # not a W/m/v tensor: exact
        assert state["exp_avg"].shape == weight.shape and state["exp_avg_sq"].min() >= 0
    # everything that is not W, m or v round-trips exactly
    assert optim["loss_scaler"] == {"cur_scale": 1.0} and optim["partition_count"] == [1, 1]
    assert optim["base_optimizer_state"]["param_groups"] == original["base_optimizer_state"]["param_groups"]
    assert model["loops"] == {"fit_loop": {"step": 4}} and model["global_steps"] == 4
    assert set(model["module"]) == {"layer.weight", "norm.weight"}
    assert folder_hyperparameters(ckpt / "last.ckpt") == {"learning_rate": 1e-3}
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.ckpt"]  # no temporary folder left


def test_bf16_engines_partition_files_are_compressed_and_restored(tmp_path):
    """With bf16 on, the engine names its partitions ``bf16_zero_pp_rank_*``: the same fp32 state, coded too."""
    plain = _engine_files(2, torch.Generator().manual_seed(0))
    bf16_optim = f"bf16_{OPTIM}"
    files = {bf16_optim: plain[OPTIM], MODEL: plain[MODEL]}
    target = _save(DeepSpeedChains(ExCPSettings()), tmp_path / "last.ckpt", 2, files)
    assert is_excp_file(target / "checkpoint" / bf16_optim) and is_excp_file(target / "checkpoint" / MODEL)
    into = tmp_path / "restored"
    into.mkdir()
    restore_files(target, into, rank=0, world_size=1)
    restored = torch.load(into / "checkpoint" / bf16_optim, weights_only=False)["optimizer_state_dict"]
    original = plain[OPTIM]["optimizer_state_dict"]["single_partition_of_fp32_groups"]
    for got, weight in zip(restored["single_partition_of_fp32_groups"], original, strict=True):
        assert float((got - weight).norm() / weight.norm()) < 0.05


MODEL_STAGE3 = "zero_pp_rank_0_mp_rank_00_model_states.pt"


def _stage3_engine_files(step: int, generator: torch.Generator) -> dict[str, dict]:
    """What ZeRO-3 writes on rank 0: flat fp32 sub-groups, the base optimizer's state dict, empty placeholders."""
    base = torch.Generator().manual_seed(321)
    w = [torch.randn(n, generator=base) + 1e-3 * step * torch.randn(n, generator=generator) for n in (4096, 64)]
    optim = {
        "optimizer_state_dict": {
            "zero_stage": 3,
            "loss_scaler": {"cur_scale": 1.0},
            "partition_count": 1,
            "optimizer_state_dict": {
                "state": {g: {"step": torch.tensor(float(step)), "exp_avg": 0.01 * torch.randn_like(t),
                              "exp_avg_sq": 1e-4 * torch.rand_like(t)} for g, t in enumerate(w)},
                "param_groups": [{"lr": 1e-3, "params": [0]}, {"lr": 1e-3, "params": [1]}],
            },
            "fp32_flat_groups": w,
        },
        "ds_version": "0.19.8",
    }
    model = {  # every rank writes one; the module entries are empty: the partitions hold the weights
        "module": {"layer.weight": torch.empty(0), "norm.weight": torch.empty(0)},
        "param_shapes": [{"layer.weight": (64, 64)}, {"norm.weight": (64,)}],
        "global_steps": step,
        "global_step": step,
        "hyper_parameters": {"learning_rate": 1e-3},
    }
    return {OPTIM: optim, MODEL_STAGE3: model}


def test_zero3_partitions_and_their_moments_are_coded_and_restored(tmp_path):
    generator = torch.Generator().manual_seed(7)
    chains = DeepSpeedChains(ExCPSettings())
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    saved = {step: _stage3_engine_files(step, generator) for step in (2, 4)}
    for step in (2, 4):
        _save(chains, ckpt / f"step={step}.ckpt", step, saved[step])
    delta = ckpt / "step=4.ckpt" / "checkpoint" / OPTIM
    assert read_header(delta)["kind"] == "delta"
    plain = tmp_path / "plain.pt"
    torch.save(saved[4][OPTIM], plain)
    assert delta.stat().st_size < plain.stat().st_size / 3  # the partitions and moments were coded, not kept
    remove_folder(ckpt / "step=2.ckpt")
    restored_dir = tmp_path / "restored"
    restored_dir.mkdir()
    restore_files(ckpt / "step=4.ckpt", restored_dir, rank=0, world_size=1)
    optim = torch.load(restored_dir / "checkpoint" / OPTIM, weights_only=False)["optimizer_state_dict"]
    model = torch.load(restored_dir / "checkpoint" / MODEL_STAGE3, weights_only=False)
    original = saved[4][OPTIM]["optimizer_state_dict"]
    for group, weight in enumerate(original["fp32_flat_groups"]):
        assert float((optim["fp32_flat_groups"][group] - weight).norm() / weight.norm()) < 0.05
        state, before = optim["optimizer_state_dict"]["state"][group], original["optimizer_state_dict"]["state"][group]
        assert torch.equal(state["step"], torch.tensor(4.0))
        m_error = float((state["exp_avg"] - before["exp_avg"]).norm() / before["exp_avg"].norm())
        assert m_error < 0.9 and state["exp_avg_sq"].shape == weight.shape and state["exp_avg_sq"].min() >= 0
    assert optim["optimizer_state_dict"]["param_groups"] == original["optimizer_state_dict"]["param_groups"]
    assert optim["zero_stage"] == 3 and optim["partition_count"] == 1
    assert {k: tuple(v.shape) for k, v in model["module"].items()} == {"layer.weight": (0,), "norm.weight": (0,)}
    assert model["param_shapes"] == saved[4][MODEL_STAGE3]["param_shapes"] and model["global_steps"] == 4
    assert folder_hyperparameters(ckpt / "step=4.ckpt") == {"learning_rate": 1e-3}


def test_a_kill_before_the_swap_leaves_the_previous_folder_loadable(tmp_path, monkeypatch):
    generator = torch.Generator().manual_seed(1)
    chains = DeepSpeedChains(ExCPSettings())
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _save(chains, ckpt / "last.ckpt", 2, _engine_files(2, generator))
    import callbacks.excp.deepspeed_files as module

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for SIGKILL between writing the new folder and swapping it in

    monkeypatch.setattr(module, "_exchange", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(chains, ckpt / "last.ckpt", 4, _engine_files(4, generator))
    chains.abandon()
    assert _restore(ckpt / "last.ckpt", tmp_path / "restored")[MODEL]["global_steps"] == 2
    assert remove_stale_staging(ckpt)  # the next run's first save deletes the half-made folder
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.ckpt"]


def test_plain_engine_folders_pass_through(tmp_path):
    folder = tmp_path / "plain.ckpt"
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "latest").write_text("checkpoint")
    torch.save({"module": {}, "hyper_parameters": {"seed": 3}}, folder / "checkpoint" / MODEL)
    assert not has_excp_files(folder) and not is_excp_file(folder / "checkpoint" / MODEL)
    assert folder_hyperparameters(folder) == {"seed": 3}
    assert read_engine_file(folder / "checkpoint" / MODEL)["hyper_parameters"] == {"seed": 3}


def test_train_py_refuses_an_excp_deepspeed_folder_without_the_callback_in_one_line(tmp_path, capsys):
    import train
    from tests.conftest import REPO_ROOT

    chains = DeepSpeedChains(ExCPSettings())
    folder = _save(chains, tmp_path / "last.ckpt", 2, _engine_files(2, torch.Generator().manual_seed(2)))
    with pytest.raises(SystemExit):
        train.main(["fit", "--config", str(REPO_ROOT / "configs/quickstart.yaml"), "--trainer.callbacks=[]",
                    "--ckpt_path", str(folder)])
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "ExCP-coded DeepSpeed files" in errors[0] and "Traceback" not in stderr, stderr


def test_cli_decompresses_a_folder_into_what_the_engine_wrote(tmp_path):
    from callbacks.excp.cli import main

    chains = DeepSpeedChains(ExCPSettings())
    folder = _save(chains, tmp_path / "ckpt" / "last.ckpt", 2, _engine_files(2, torch.Generator().manual_seed(3)))
    (folder / "zero_to_fp32.py").write_text("# the engine's script\n")
    assert main(["decompress", str(folder), "-o", str(tmp_path / "out")]) == 0
    out = tmp_path / "out" / "last.ckpt"
    assert not has_excp_files(out) and (out / "zero_to_fp32.py").is_file() and (out / "latest").is_file()
    assert torch.load(out / "checkpoint" / MODEL, weights_only=False)["global_steps"] == 2
    assert main(["decompress", str(folder), "-o", str(tmp_path / "out")]) == 1  # never replaced without --force


def test_cli_inspects_every_coded_file_of_a_folder(tmp_path, capsys):
    from callbacks.excp.cli import main

    chains = DeepSpeedChains(ExCPSettings())
    folder = _save(chains, tmp_path / "last.ckpt", 2, _engine_files(2, torch.Generator().manual_seed(6)))
    assert main(["inspect", str(folder)]) == 0
    printed = capsys.readouterr().out
    assert f"{OPTIM}: keyframe #0 (deepspeed)" in printed and f"{MODEL}: keyframe #0 (deepspeed)" in printed
    plain = tmp_path / "plain.ckpt"
    (plain / "checkpoint").mkdir(parents=True)
    torch.save({"module": {}}, plain / "checkpoint" / MODEL)
    assert main(["inspect", str(plain)]) == 1
    assert "without ExCP-coded DeepSpeed files" in capsys.readouterr().err


def test_the_wandb_artifact_takes_deepspeed_folders_whole(tmp_path):
    from callbacks.excp.callback import artifact_entries

    chains = DeepSpeedChains(ExCPSettings())
    folder = _save(chains, tmp_path / "last.ckpt", 2, _engine_files(2, torch.Generator().manual_seed(4)))
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert artifact_entries([str(tmp_path)]) == [(folder, "last.ckpt")]


@pytest.mark.slow
def test_cli_imports_deepspeed_only_for_files_that_hold_its_types(tmp_path, monkeypatch):
    """A real DeepSpeed LossScaler in the skeleton: a fresh CLI process must import deepspeed to allow it (~30 s)."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    monkeypatch.setenv("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", "cpu"))
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    files = _engine_files(2, torch.Generator().manual_seed(5))
    files[OPTIM]["optimizer_state_dict"]["loss_scaler"] = LossScaler(scale=4.0)
    folder = _save(DeepSpeedChains(ExCPSettings()), tmp_path / "last.ckpt", 2, files)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-m", "callbacks.excp", "decompress", str(folder), "-o",
                           str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    restored = torch.load(tmp_path / "out" / "last.ckpt" / "checkpoint" / OPTIM, weights_only=False)
    assert restored["optimizer_state_dict"]["loss_scaler"].cur_scale == 4.0


def test_zero_partitions_carry_adams_step_and_betas_for_the_weight_rule():
    from callbacks.excp.deepspeed_files import _wrap
    from callbacks.excp.split import split_checkpoint

    optim = _engine_files(4, torch.Generator().manual_seed(1))[OPTIM]
    for group in optim["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]:
        group["betas"] = (0.9, 0.95)
    wrapped, names = _wrap(optim, 4, 0)
    entries = split_checkpoint(wrapped, None, names).entries
    assert [e.second_moment_bias for e in entries] == pytest.approx([1 - 0.95**4] * 2)
    optim["optimizer_state_dict"]["base_optimizer_state"]["param_groups"][1]["betas"] = (0.9, 0.999)
    wrapped, names = _wrap(optim, 4, 0)  # groups that disagree: no correction rather than a wrong one
    assert [e.second_moment_bias for e in split_checkpoint(wrapped, None, names).entries] == [1.0, 1.0]
