"""A run's loggers get the whole resolved config, and every logger writes under default_root_dir."""

from __future__ import annotations

from pathlib import Path

import yaml

import train
from tests.shrink import shrunk_config_file


def _fit(tmp_path: Path, *extra_configs: str, quiet: bool = False) -> None:
    shrunk = shrunk_config_file("configs/quickstart.yaml", *extra_configs, root=tmp_path, quiet=quiet)
    train.main(["fit", "--config", str(shrunk), "--trainer.enable_progress_bar=false",
                "--trainer.callbacks=[]", "--trainer.max_steps=2"])


def test_wandb_run_holds_the_full_resolved_config_and_the_file(tmp_path: Path, capsys) -> None:
    _fit(tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "the W&B logger must write under default_root_dir"
    files = runs[0] / "files"
    attached = yaml.safe_load((files / "lightning_config.yaml").read_text())
    assert attached["trainer"]["max_steps"] == 2 and attached["seed_everything"] == 0
    import wandb

    config = dict(wandb.run.config)["config"]  # offline runs write config.yaml only when they finish
    wandb.finish()
    assert config["model"]["class_path"] == "lightning_modules.causal_lm.CausalLMModule"
    assert config["model"]["init_args"]["model_config"]["hidden_size"] == 64
    assert config["data"]["init_args"]["max_tokens"] == 8000
    assert config["trainer"]["default_root_dir"] == str(tmp_path) and "seed_everything" in config
    out = capsys.readouterr().out
    assert f"wandb sync {runs[0]}" in out, out[-2000:]


def test_csv_logger_config_writes_under_default_root_dir(tmp_path: Path) -> None:
    _fit(tmp_path, "configs/trainer/csv_logger.yaml")
    metrics = list((tmp_path / "csv").glob("version_*/metrics.csv"))
    assert metrics, sorted(str(p) for p in tmp_path.rglob("*"))[:40]
    logged = yaml.safe_load((metrics[0].parent / "hparams.yaml").read_text())
    assert logged["config"]["trainer"]["max_steps"] == 2
