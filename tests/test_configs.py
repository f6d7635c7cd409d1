"""Every shipped YAML config parses and instantiates through train.py's own CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule

from tests.conftest import REPO_ROOT, parse_config
from tests.shrink import merge_configs, shrink, shrunk_config_file
from tests.test_strategy_configs import TRAINER_CONFIGS

# Strategy configs are parsed and composed with every component config by the strategy tests.
STRATEGY_TEST_CONFIGS = [f"configs/trainer/{name}.yaml" for name in TRAINER_CONFIGS]

TRAINER_CONFIGS_CPU = ["configs/trainer/cpu.yaml", "configs/trainer/csv_logger.yaml"]


def shipped_configs() -> list[str]:
    return sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "configs").rglob("*.yaml"))


COMPONENT_CONFIGS = [c for c in shipped_configs() if not c.startswith("configs/trainer/")]


def _parse_shrunk(*paths: str, root: Path, quiet: bool = True) -> Any:
    return parse_config(shrunk_config_file(*paths, root=root, quiet=quiet))


def test_quickstart_instantiates_the_real_model_on_the_meta_device() -> None:
    """The real architecture without reading weights: the config check costs no 135M load."""
    with torch.device("meta"):
        cli = parse_config("configs/quickstart.yaml")
    assert type(cli.model).__name__ == "CausalLMModule"
    assert next(cli.model.parameters()).device.type == "meta"
    assert cli.model.model.config.model_type == "llama"
    assert cli.model.model.config.hidden_size == 576 and cli.model.model.config.num_hidden_layers == 30
    assert type(cli.datamodule).__name__ == "TextDataModule"
    assert cli.trainer.max_steps == 40


@pytest.mark.parametrize("config", COMPONENT_CONFIGS)
def test_every_shipped_component_config_instantiates_shrunk(config: str, tmp_path: Path) -> None:
    """Each shipped config, at CPU-test size, builds the model, data and trainer it names."""
    declared = shrink(merge_configs(config), tmp_path)
    cli = _parse_shrunk(config, root=tmp_path)
    assert f"{type(cli.model).__module__}.{type(cli.model).__name__}" == declared["model"]["class_path"]
    assert f"{type(cli.datamodule).__module__}.{type(cli.datamodule).__name__}" == declared["data"]["class_path"]
    assert cli.trainer.default_root_dir == str(tmp_path)
    callbacks = {type(c).__name__ for c in cli.trainer.callbacks}
    for callback in declared.get("trainer", {}).get("callbacks") or []:
        assert callback["class_path"].rsplit(".", 1)[1] in callbacks


@pytest.mark.parametrize(
    ("config", "overrides"),
    [
        ("configs/quickstart.yaml", []),
        # SmolLM2 reaches 0.3 of its latency; the 2-layer toy's embeddings alone cost ~0.4 of its own
        ("configs/flextron/smollm2.yaml", ["--model.init_args.budgets=[0.9, 1.0]"]),
        ("configs/probes/icl_gd.yaml", []),
        ("configs/probes/honesty.yaml", []),
    ],
)
def test_shipped_main_configs_run_end_to_end_shrunk(config: str, overrides: list[str], tmp_path: Path) -> None:
    """The configs users run, shrunk: fit for trainable modules, test for the probes."""
    cli = parse_config(shrunk_config_file(config, root=tmp_path), overrides=overrides)
    if type(cli.model).training_step is LightningModule.training_step:
        cli.trainer.test(cli.model, datamodule=cli.datamodule)
        assert cli.trainer.state.finished and cli.trainer.callback_metrics
    else:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        assert cli.trainer.state.finished and cli.trainer.global_step == cli.trainer.max_steps
        assert all(torch.isfinite(v).all() for v in cli.trainer.callback_metrics.values())


def test_cpu_trainer_config_sets_what_it_says(tmp_path: Path) -> None:
    cli = _parse_shrunk("configs/quickstart.yaml", "configs/trainer/cpu.yaml", root=tmp_path)
    trainer = cli.trainer
    assert type(trainer.accelerator).__name__ == "CPUAccelerator"
    assert trainer.num_devices == 1 and trainer.precision == "32-true"
    assert type(trainer.strategy).__name__ == "SingleDeviceStrategy"


def test_csv_logger_config_replaces_wandb(tmp_path: Path) -> None:
    cli = _parse_shrunk("configs/quickstart.yaml", "configs/trainer/csv_logger.yaml", root=tmp_path, quiet=False)
    assert [type(logger).__name__ for logger in cli.trainer.loggers] == ["RunCSVLogger"]
    assert cli.trainer.loggers[0].save_dir == str(tmp_path)


def test_every_shipped_config_is_covered() -> None:
    """A new config file must join a parametrized test above (or the strategy tests) to ship."""
    covered = {*COMPONENT_CONFIGS, *TRAINER_CONFIGS_CPU, *STRATEGY_TEST_CONFIGS}
    assert set(shipped_configs()) <= covered, sorted(set(shipped_configs()) - covered)


def _run_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=300)


def test_print_config_is_complete() -> None:
    result = _run_train("fit", "--config", "configs/quickstart.yaml", "--print_config")
    assert result.returncode == 0, result.stderr[-2000:]
    for key in ("class_path: lightning_modules.causal_lm.CausalLMModule", "class_path: datamodules.text.TextDataModule",
                "max_steps:", "learning_rate:", "block_size:", "AutoWandbLogger"):
        assert key in result.stdout


def test_missing_model_file_is_one_line(tmp_path: Path) -> None:
    result = _run_train("fit", "--config", "configs/quickstart.yaml",
                        f"--model.init_args.model={tmp_path}/missing.gguf")
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    expected = f"error: GGUF file '{tmp_path}/missing.gguf' does not exist: check the path"
    assert lines == [expected], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_bf16_mixed_config_trains_in_bf16_keeps_fp32_state_and_resumes_from_excp(tmp_path: Path) -> None:
    """configs/trainer/bf16_mixed.yaml on CPU: autocast computes in bf16, weights and Adam moments stay
    fp32 (what ExCP compresses), and the run resumes from its ExCP last.ckpt."""
    from lightning.pytorch.callbacks import Callback

    from callbacks.excp import is_excp_file

    seen: dict[str, torch.dtype] = {}

    class LogitsDtype(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            with trainer.precision_plugin.forward_context():
                seen["compute"] = pl_module.model(input_ids=batch["input_ids"][:, :8]).logits.dtype

    shrunk = shrunk_config_file("configs/quickstart.yaml", "configs/trainer/bf16_mixed.yaml", root=tmp_path)
    cli = parse_config(shrunk, overrides=["--trainer.max_steps=4"])
    assert cli.trainer.precision == "bf16-mixed"
    cli.trainer.callbacks.append(LogitsDtype())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert seen["compute"] == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in cli.model.parameters())
    last = Path(cli.trainer.checkpoint_callback.last_model_path)
    assert is_excp_file(last)
    resumed = parse_config(shrunk, overrides=["--trainer.max_steps=6"])
    resumed.trainer.fit(resumed.model, datamodule=resumed.datamodule, ckpt_path=str(last))
    assert resumed.trainer.global_step == 6
    assert all(torch.isfinite(v).all() for v in resumed.trainer.callback_metrics.values())
