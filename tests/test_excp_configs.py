"""Shipped ExCP configs parse and instantiate through train.py's CLI; the tiny one runs end to end."""

from __future__ import annotations

import pytest

from callbacks.excp import ExCP, is_excp_file, load_checkpoint, read_excp_checkpoints
from common.hf_loading import TINY_LLAMA_CONFIG
from tests.conftest import REPO_ROOT, parse_config
from tests.shrink import TINY_MODEL_OVERRIDES

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
    assert excp.settings.bits_w == 4 and excp.settings.keyframe_interval == 10
    assert cli.trainer.checkpoint_callback is not None


def test_tiny_config_runs_and_reports_the_ratio(tmp_path, capsys):
    """The shipped config, shrunk to CPU-test size, trains, writes ExCP files and reports the ratio."""
    import yaml

    import train

    cfg = yaml.safe_load((REPO_ROOT / "configs/excp/tiny_from_scratch.yaml").read_text())
    cfg["model"]["init_args"]["model_config"].update(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1
    )
    cfg["data"]["init_args"].update(max_tokens=20000, block_size=32)
    cfg["trainer"].update(
        max_steps=4,
        val_check_interval=2,
        limit_val_batches=1,
        enable_progress_bar=False,
        default_root_dir=str(tmp_path),
    )
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    ckpt_cb = cfg["trainer"]["callbacks"][1]["init_args"]
    ckpt_cb.update(dirpath=str(tmp_path / "ckpts"), every_n_train_steps=2)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    train.build_cli(["fit", "--config", str(path)])
    out = capsys.readouterr().out
    assert "ExCP: " in out and "x overall" in out and f"{tmp_path}/ckpts" in out
    last = tmp_path / "ckpts" / "last.ckpt"
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
