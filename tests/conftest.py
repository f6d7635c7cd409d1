"""Shared fixtures: tiny models and CPU trainer settings so the suite runs on a 2-core laptop."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from common.hf_loading import TINY_LLAMA_CONFIG

REPO_ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# One thread: tiny models gain nothing from more, and oversubscribed cores slow small steps badly.
torch.set_num_threads(1)


@pytest.fixture
def tiny_model_config() -> dict[str, Any]:
    """A 2-layer Llama with GQA that pairs with the offline ``byt5`` tokenizer."""
    return copy.deepcopy(TINY_LLAMA_CONFIG)


def quiet_cpu_trainer_kwargs(root: str | Path) -> dict[str, Any]:
    """Trainer arguments for fast, quiet CPU runs that write only under ``root``."""
    return {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": str(root),
    }


@pytest.fixture
def cpu_trainer_kwargs(tmp_path: Path) -> dict[str, Any]:
    """:func:`quiet_cpu_trainer_kwargs` under the test's own ``tmp_path``."""
    return quiet_cpu_trainer_kwargs(tmp_path)


@pytest.fixture
def tmp_cache() -> Path:
    """The real model cache, so the converted SmolLM2 is converted at most once per machine."""
    from common.paths import cache_root

    return cache_root()


def parse_config(*paths: str | Path, subcommand: str = "fit", overrides: list[str] | None = None) -> Any:
    """Parse and instantiate shipped configs through train.py's own CLI, without running anything."""
    import train

    args: list[str] = []  # run=False builds a CLI without subcommands; `subcommand` only documents intent
    for path in paths:
        args += ["--config", str(REPO_ROOT / path)]
    return train.build_cli(args + list(overrides or []), run=False)
