"""The types real Lightning checkpoints of this project hold are on the safe-load allow-list, so
ExCP and plain checkpoints load with weights_only=True (FlextronModule through LightningCLI here;
CausalLMModule through train.py in test_excp_configs.py)."""

from __future__ import annotations

import torch

from callbacks.excp import ExCPEncoder
from callbacks.excp.decoder import load_checkpoint
from callbacks.excp.safe_pickle import SAFE_GLOBAL_NAMES
from callbacks.excp.store import load_any_checkpoint
from common.atomic import atomic_write_bytes
from tests.conftest import parse_config


def test_flextron_cli_checkpoint_loads_safely(tmp_path):
    cli = parse_config(
        "configs/flextron/tiny.yaml",
        overrides=[
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false",
        ],
    )
    cli.trainer.fit(cli.model, cli.datamodule)
    path = tmp_path / "flextron.ckpt"
    cli.trainer.save_checkpoint(path)
    unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    assert unsafe <= set(SAFE_GLOBAL_NAMES), unsafe - set(SAFE_GLOBAL_NAMES)
    plain = load_any_checkpoint(path)
    assert plain["global_step"] == 2 and plain["hyper_parameters"]
    encoded = ExCPEncoder().encode(plain, target=tmp_path / "flextron.excp")
    atomic_write_bytes(tmp_path / "flextron.excp", encoded.data)
    again = load_checkpoint(tmp_path / "flextron.excp")
    assert again["hyper_parameters"] == plain["hyper_parameters"]
