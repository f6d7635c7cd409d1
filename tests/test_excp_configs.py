"""Shipped ExCP configs parse and instantiate through train.py's CLI; the tiny one runs end to end."""

from __future__ import annotations

import pytest

from callbacks.excp import ExCP, is_excp_file, load_checkpoint, read_excp_checkpoints
from common.hf_loading import TINY_LLAMA_CONFIG
from tests.conftest import parse_config
from tests.shrink import TINY_MODEL_OVERRIDES, shrunk_config_file

TINY_MODEL = TINY_MODEL_OVERRIDES


def _excp(cli) -> ExCP:
    found = [c for c in cli.trainer.callbacks if isinstance(c, ExCP)]
    assert len(found) == 1
    return found[0]


@pytest.mark.parametrize(
    "config",
    [
        "configs/excp/tiny_from_scratch.yaml",
        "configs/excp/smollm2_continued_pretraining.yaml",
        "configs/quickstart.yaml",
    ],
)
def test_excp_configs_instantiate(config):
    cli = parse_config(config, overrides=TINY_MODEL)
    excp = _excp(cli)
    assert excp.settings.bits_w == 4 and excp.settings.keyframe_interval == 20
    assert cli.trainer.checkpoint_callback is not None


def test_tiny_config_runs_and_reports_the_ratio(tmp_path, capsys):
    """The shipped config, shrunk to CPU-test size, trains, writes ExCP files and reports the ratio."""
    import train

    path = shrunk_config_file("configs/excp/tiny_from_scratch.yaml", root=tmp_path)
    train.build_cli(["fit", "--config", str(path)])
    out = capsys.readouterr().out
    assert "ExCP: " in out and "x overall" in out and f"{tmp_path}/checkpoints" in out
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert is_excp_file(last)

    # the documented resume, `train.py fit --ckpt_path <compressed checkpoint>`, through train.py's own CLI
    # (LightningCLI torch.loads the path for hyperparameters before building the model)
    args = ["fit", "--config", str(path), "--ckpt_path", str(last), "--trainer.max_steps=6"]
    cli = train.build_cli(args)
    assert cli.trainer.global_step == 6
    assert load_checkpoint(last)["global_step"] == 6
    # and load_from_checkpoint reads ExCP files the same way
    from lightning_modules.causal_lm import CausalLMModule

    with read_excp_checkpoints():
        module = CausalLMModule.load_from_checkpoint(last)
    assert module.hparams.model_config["hidden_size"] == TINY_LLAMA_CONFIG["hidden_size"]
