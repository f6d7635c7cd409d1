"""Each shipped trainer config composes with each component config: parsed and instantiated through train.py.

GPU-only configs (FSDP, DeepSpeed) are instantiated on CPU with their strategy class swapped for the
test shim of ``tests/strategy_shims.py`` (same init_args), so every field of the shipped YAML is still
checked against the strategy's signature. Nothing trains here: tests/test_strategy_matrix.py runs them.
"""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import REPO_ROOT, parse_config
from tests.shrink import TINY_MODEL_OVERRIDES

TRAINER_CONFIGS = ("ddp", "fsdp", "fsdp2", "deepspeed_stage2", "deepspeed_stage3", "bf16_mixed")
COMPONENT_CONFIGS = sorted(
    str(p.relative_to(REPO_ROOT))
    for pattern in ("quickstart.yaml", "excp/*.yaml", "flextron/*.yaml", "probes/*.yaml")
    for p in (REPO_ROOT / "configs").glob(pattern)
)
TINY_MODEL = TINY_MODEL_OVERRIDES
SHIMS = {
    "lightning.pytorch.strategies.FSDPStrategy": "tests.strategy_shims.CPUFSDPStrategy",
    "lightning.pytorch.strategies.DeepSpeedStrategy": "tests.strategy_shims.CPUDeepSpeedStrategy",
}


def _cpu_overrides(trainer_config: str) -> list[str]:
    trainer = yaml.safe_load((REPO_ROOT / trainer_config).read_text())["trainer"]
    strategy = trainer.get("strategy")
    overrides = []
    if trainer.get("accelerator") == "gpu":
        overrides += ["--trainer.accelerator=cpu", "--trainer.devices=2"]
    if isinstance(strategy, dict) and strategy["class_path"] in SHIMS:
        overrides.append(f"--trainer.strategy.class_path={SHIMS[strategy['class_path']]}")
    return overrides


@pytest.fixture(scope="module")
def parser():
    """train.py's own parser (built once: building it costs more than parsing with it)."""
    return parse_config("configs/quickstart.yaml", overrides=TINY_MODEL).parser


@pytest.mark.parametrize("trainer_name", TRAINER_CONFIGS)
def test_trainer_config_parses_with_every_component(parser, trainer_name: str) -> None:
    """Every (trainer config, component config) pair validates against the classes' signatures."""
    trainer_config = f"configs/trainer/{trainer_name}.yaml"
    shipped = yaml.safe_load((REPO_ROOT / trainer_config).read_text())["trainer"]
    for component in COMPONENT_CONFIGS:
        args = ["--config", str(REPO_ROOT / component), "--config", str(REPO_ROOT / trainer_config)]
        config = parser.parse_args(args)
        for key, value in shipped.items():
            if key != "strategy":
                assert config.trainer[key] == value, (component, key)
        if isinstance(shipped.get("strategy"), dict):
            assert config.trainer.strategy.class_path == shipped["strategy"]["class_path"], component


@pytest.mark.parametrize("trainer_name", TRAINER_CONFIGS)
def test_trainer_config_instantiates_on_cpu(trainer_name: str) -> None:
    """Instantiated with the quickstart (the shims stand in for GPU-only strategy classes, same init_args)."""
    trainer_config = f"configs/trainer/{trainer_name}.yaml"
    cli = parse_config("configs/quickstart.yaml", trainer_config, overrides=TINY_MODEL + _cpu_overrides(trainer_config))
    shipped = yaml.safe_load((REPO_ROOT / trainer_config).read_text())["trainer"]
    strategy = shipped.get("strategy")
    if isinstance(strategy, dict):
        expected = strategy["class_path"].rsplit(".", 1)[1]
        assert expected in [c.__name__ for c in type(cli.trainer.strategy).__mro__]
        stage = (strategy.get("init_args") or {}).get("stage")
        if stage is not None:
            assert cli.trainer.strategy.config["zero_optimization"]["stage"] == stage
    if "precision" in shipped:
        assert cli.trainer.precision == shipped["precision"]


def test_fsdp2_config_is_pure_data_parallel_on_two_cpu_processes() -> None:
    cli = parse_config("configs/quickstart.yaml", "configs/trainer/fsdp2.yaml", overrides=TINY_MODEL)
    assert cli.trainer.num_devices == 2 and type(cli.trainer.strategy).__name__ == "ModelParallelStrategy"
    assert cli.trainer.strategy._data_parallel_size == 2 and cli.trainer.strategy._tensor_parallel_size == 1
    assert cli.trainer.strategy._save_distributed_checkpoint is False  # the full file ExCP compresses
