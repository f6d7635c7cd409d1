"""Shrink any shipped config to CPU-test size, in one place (as lightning-hydra-template's fixtures do).

Tests run the configs users run, not toy copies that drift from them: every setting is kept except
the ones that make a run big (the model becomes :data:`common.hf_loading.TINY_LLAMA_CONFIG`, data and
step counts are capped, logging and progress bars are off, outputs go under the test's folder).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
from pathlib import Path
from typing import Any

import yaml

from common.hf_loading import BYTE_TOKENIZER, TINY_LLAMA_CONFIG

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Upper bounds applied to whichever of these a config sets (a smaller value is kept).
SIZE_CAPS: dict[str, int] = {
    # trainer
    "max_steps": 4,
    "limit_val_batches": 1,
    "limit_test_batches": 2,
    "val_check_interval": 2,
    "log_every_n_steps": 1,
    # data
    "max_tokens": 8000,
    "block_size": 32,
    "batch_size": 2,
    "n_test": 4,
    "n_signaling": 1,
    "n_time": 1,
    "n_permutations": 2,
    # model
    "calibration_batches": 1,
    "latency_reps": 1,
    "latency_seq_len": 16,
    "elastic_steps": 1,
    "router_steps": 1,
    "von_oswald_steps": 5,
    "analysis_examples": 1,
    "n_boot": 10,
    "cot_max_new_tokens": 2,
    "answer_max_new_tokens": 2,
    "every_n_train_steps": 2,
}
#: Lists kept to their first few entries (fewer tasks, N values and seeds).
LIST_CAPS: dict[str, int] = {"tasks": 1, "n_demos": 2, "seeds": 1}
#: Command-line overrides that swap a config's model for the tiny one (for tests that parse configs as given).
TINY_MODEL_OVERRIDES: list[str] = [
    "--model.init_args.model=null",
    f"--model.init_args.model_config={json.dumps(TINY_LLAMA_CONFIG)}",
]
QUIET_TRAINER: dict[str, Any] = {"enable_progress_bar": False, "enable_model_summary": False}


def merge_configs(*paths: str | Path) -> dict[str, Any]:
    """Deep-merge YAML configs the way ``--config a --config b`` composes them (dicts merge, lists replace)."""

    def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
        for key, value in update.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict) and "class_path" not in value:
                merge(base[key], value)
            else:
                base[key] = copy.deepcopy(value)
        return base

    merged: dict[str, Any] = {}
    for path in paths:
        merge(merged, yaml.safe_load((REPO_ROOT / path).read_text()) or {})
    return merged


def _accepts(class_path: str, name: str) -> bool:
    module, _, cls = class_path.rpartition(".")
    return name in inspect.signature(getattr(importlib.import_module(module), cls).__init__).parameters


def _cap(section: dict[str, Any]) -> None:
    for key, cap in SIZE_CAPS.items():
        value = section.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > cap:
            section[key] = cap
    for key, keep in LIST_CAPS.items():
        if isinstance(section.get(key), list):
            section[key] = section[key][:keep]


def _tiny_model(model: dict[str, Any]) -> None:
    init_args = model.setdefault("init_args", {})
    if _accepts(model["class_path"], "model_config"):
        init_args.update(model=None, model_config=dict(TINY_LLAMA_CONFIG))
        if _accepts(model["class_path"], "tokenizer"):
            init_args["tokenizer"] = None  # a config-built model defaults to the byte tokenizer
    for entry in init_args.get("models") or []:  # probes that compare several models
        entry.pop("model", None)
        entry.update(model_config=dict(TINY_LLAMA_CONFIG), tokenizer=BYTE_TOKENIZER, chat=False)


def shrink(config: dict[str, Any], root: Path, quiet: bool = True) -> dict[str, Any]:
    """A copy of ``config`` at CPU-test size whose outputs all land under ``root``.

    Args:
        config: a merged config (see :func:`merge_configs`).
        root: folder for every output (``default_root_dir``, checkpoint folders, logger folders).
        quiet: also switch progress bar and model summary off, and log to CSV files under ``root``
            instead of W&B.
    """
    config = copy.deepcopy(config)
    if isinstance(config.get("model"), dict):
        _tiny_model(config["model"])
        _cap(config["model"].get("init_args", {}))
    if isinstance(config.get("data"), dict):
        _cap(config["data"].setdefault("init_args", {}))
    trainer = config.setdefault("trainer", {})
    _cap(trainer)
    trainer.update(accelerator="cpu", devices=1, default_root_dir=str(root))
    if quiet:
        trainer.update(QUIET_TRAINER)
        if trainer.get("logger"):  # a local CSV logger instead of W&B: callbacks that need a logger still work
            trainer["logger"] = {"class_path": "lightning_modules.loggers.RunCSVLogger",
                                 "init_args": {"save_dir": str(root / "logs")}}
        callbacks = trainer.get("callbacks") or []
        trainer["callbacks"] = [c for c in callbacks if not c["class_path"].endswith("ProgressBar")]
    for callback in trainer.get("callbacks") or []:
        init_args = callback.get("init_args") or {}
        _cap(init_args)
        if "dirpath" in init_args:
            init_args["dirpath"] = str(root / "checkpoints")
    return config


def shrunk_config_file(*paths: str | Path, root: Path, quiet: bool = True) -> Path:
    """Merge and shrink shipped configs into one YAML file under ``root``; returns its path."""
    root.mkdir(parents=True, exist_ok=True)
    target = root / "shrunk.yaml"
    target.write_text(yaml.safe_dump(shrink(merge_configs(*paths), root, quiet=quiet), sort_keys=False))
    return target
