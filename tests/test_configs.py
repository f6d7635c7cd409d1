"""Every shipped YAML config parses and instantiates through train.py's own CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, parse_config

TRAINER_CONFIGS_CPU = ["configs/trainer/cpu.yaml", "configs/trainer/csv_logger.yaml"]
SHARDED_TRAINER_CONFIGS = ("fsdp", "fsdp2", "deepspeed_stage2", "deepspeed_stage3", "bf16_mixed")
# Shrunk so that instantiation is quick: a tiny model instead of the 135M one.
TINY_MODEL = [
    "--model.init_args.model=null",
    "--model.init_args.model_config={model_type: llama, vocab_size: 384, hidden_size: 32, intermediate_size: 64, "
    "num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1}",
]


def shipped_configs() -> list[str]:
    return sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "configs").rglob("*.yaml"))


def test_quickstart_instantiates_with_the_real_model() -> None:
    cli = parse_config("configs/quickstart.yaml")
    assert type(cli.model).__name__ == "CausalLMModule"
    assert cli.model.model.config.model_type == "llama"
    assert cli.model.model.config.hidden_size == 576
    assert type(cli.datamodule).__name__ == "TextDataModule"
    assert cli.trainer.max_steps > 0


@pytest.mark.parametrize("trainer_config", TRAINER_CONFIGS_CPU)
def test_trainer_configs_compose_with_quickstart(trainer_config: str) -> None:
    cli = parse_config("configs/quickstart.yaml", trainer_config, overrides=TINY_MODEL)
    assert cli.trainer is not None


def test_ddp_config_composes_and_runs_two_processes_on_cpu() -> None:
    cli = parse_config("configs/quickstart.yaml", "configs/trainer/ddp.yaml", overrides=TINY_MODEL)
    assert cli.trainer.num_devices == 2
    assert type(cli.trainer.strategy).__name__ == "DDPStrategy"


def test_every_shipped_config_is_known() -> None:
    """Configs outside this list are covered by their component's own tests (named in the list)."""
    covered_here = {"configs/quickstart.yaml", *TRAINER_CONFIGS_CPU, "configs/trainer/ddp.yaml"}
    covered_here |= {f"configs/trainer/{name}.yaml" for name in SHARDED_TRAINER_CONFIGS}  # test_strategy_configs.py
    component_tests = {p.stem for p in (REPO_ROOT / "tests").glob("test_*.py")}
    for config in shipped_configs():
        if config in covered_here:
            continue
        component = Path(config).parts[1]  # configs/<component>/...
        assert any(component.rstrip("s") in test or test.endswith(component) for test in component_tests) or any(
            Path(config).stem.split("_")[0] in test for test in component_tests
        ), f"{config} has no test that instantiates it"


def _run_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=300)


def test_print_config_is_complete() -> None:
    result = _run_train("fit", "--config", "configs/quickstart.yaml", "--print_config")
    assert result.returncode == 0, result.stderr[-2000:]
    for key in ("class_path: lightning_modules.causal_lm.CausalLMModule", "class_path: datamodules.text.TextDataModule",
                "max_steps:", "learning_rate:", "block_size:", "AutoWandbLogger"):
        assert key in result.stdout


def test_unknown_config_key_is_one_clear_error() -> None:
    result = _run_train("fit", "--config", "configs/quickstart.yaml", "--model.init_args.learning_rat=0.1")
    assert result.returncode != 0
    assert "learning_rat" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_model_file_is_one_line(tmp_path: Path) -> None:
    result = _run_train("fit", "--config", "configs/quickstart.yaml",
                        f"--model.init_args.model={tmp_path}/missing.gguf")
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    expected = f"error: GGUF file '{tmp_path}/missing.gguf' does not exist: check the path"
    assert lines == [expected], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
