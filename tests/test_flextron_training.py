"""FlextronModule: shipped configs parse, a tiny fit logs per-budget results and exports; DDP agrees."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from transformers import AutoModelForCausalLM

from common.hf_loading import tiny_llama_config
from lightning_modules.flextron.module import FlextronModule
from tests.conftest import parse_config

TINY = "configs/flextron/tiny.yaml"


def test_tiny_config_parses_and_instantiates():
    cli = parse_config(TINY)
    assert isinstance(cli.model, FlextronModule)
    assert cli.model.space.attn == [0, 1, 2]
    assert cli.trainer.max_steps == 8


def test_smollm2_config_parses_and_instantiates(tmp_cache):
    """On the meta device: the real architecture is checked without loading 135M weights."""
    with torch.device("meta"):
        cli = parse_config("configs/flextron/smollm2.yaml", overrides=["--trainer.logger=false"])
    module = cli.model
    assert isinstance(module, FlextronModule)
    assert module.elastic.spec.num_layers == 30 and module.elastic.spec.num_groups == 3
    assert module.space.attn == [0, 1, 2, 3] and module.space.mlp[:2] == [0, 192]
    assert module.hparams.budget_metric == "latency_prefill"


def test_tiny_fit_dynamic_router_logs_budgets(tmp_path):
    cli = parse_config(TINY, overrides=[f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
                                        "--trainer.enable_checkpointing=false", "--model.init_args.router=dynamic",
                                        "--model.init_args.per_token=true", "--trainer.enable_progress_bar=false"])
    cli.trainer.fit(cli.model, cli.datamodule)
    metrics = cli.trainer.callback_metrics
    for b in ("0.6", "0.8", "1"):
        assert f"val/ppl_b{b}" in metrics and f"val/realized_b{b}" in metrics
    assert "train/budget_loss" in metrics


@pytest.mark.parametrize("update", ["direct", "surrogate"])
def test_tiny_fit_logs_budgets_and_exports(tmp_path, update):
    cli = parse_config(TINY, overrides=[f"--trainer.default_root_dir={tmp_path}",
                                        f"--trainer.logger.init_args.save_dir={tmp_path}",
                                        f"--model.init_args.router_update={update}",
                                        "--trainer.enable_progress_bar=false"])
    cli.trainer.fit(cli.model, cli.datamodule)
    metrics = cli.trainer.callback_metrics
    for b in ("0.6", "0.8", "0.9"):
        assert f"val/ppl_b{b}" in metrics and f"val/realized_b{b}" in metrics
    assert "val/ppl" in metrics
    # the routed stages ran (stage index 2 = joint at the last step)
    assert float(metrics["train/stage"]) == 2.0
    log_dir = Path(cli.trainer.logger.log_dir)
    widths = (log_dir / "flextron_widths.csv").read_text().splitlines()
    assert widths[0] == "budget,layer,mlp_neurons,attn_kv_groups,realized" and len(widths) == 1 + 5 * 2
    assert list(log_dir.glob("flextron_widths_step*.png"))
    if update == "surrogate":
        assert "train/surrogate_rel_error" in metrics
    # export through the command line from the last checkpoint and reload the result
    from lightning_modules.flextron.__main__ import main

    ckpt = next(Path(tmp_path).rglob("*.ckpt"))
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(ckpt), "--budget", "0.8", "--out", str(out)]) == 0
    report = json.loads((out / "flextron_export.json").read_text())
    assert report["max_abs_logit_diff_vs_masked_elastic"] < 1e-5
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == report["parameters"] <= report["parent_parameters"]
    assert main(["export", "--checkpoint", str(ckpt), "--budget", "0.1", "--out", str(tmp_path / "x")]) == 2
    # a fixed routing given by hand (what a dynamic router's choice exports as)
    fixed = tmp_path / "fixed"
    assert main(["export", "--checkpoint", str(ckpt), "--subnet", '{"mlp": [32, 128], "attn": [1, 2]}',
                 "--out", str(fixed)]) == 0
    assert json.loads((fixed / "flextron_export.json").read_text())["subnet"]["mlp"] == [32, 128]
    assert main(["export", "--checkpoint", str(ckpt), "--subnet", '{"mlp": [999, 128], "attn": [1, 2]}',
                 "--out", str(tmp_path / "y")]) == 2


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="budget_metric must be one of"):
        FlextronModule(model=None, model_config=tiny_llama_config(num_hidden_layers=1), budget_metric="watts")


class _RanksAgree(Callback):
    """Fails the run unless every rank ends with the same weights, router and permutation."""

    def on_train_end(self, trainer, pl_module):
        from common.run_outputs import gather_objects

        digest = [float(p.detach().double().sum()) for p in pl_module.parameters()]
        widths = pl_module.subnet_for_budget(0.7).to_dict()
        everyone = gather_objects(trainer, (digest, widths))
        assert len(everyone) == 2
        assert everyone[0] == everyone[1], "ranks diverged"


def test_ddp_two_process_fit(tmp_path, cpu_trainer_kwargs):
    cli = parse_config(TINY, overrides=["--trainer.logger=false", "--trainer.enable_checkpointing=false"])
    kwargs = {**cpu_trainer_kwargs, "devices": 2, "strategy": "ddp_spawn_find_unused_parameters_true"}
    trainer = L.Trainer(**kwargs, max_steps=6, limit_val_batches=1, val_check_interval=3, callbacks=[_RanksAgree()])
    trainer.fit(cli.model, cli.datamodule)
    assert trainer.state.finished


@pytest.mark.parametrize(("update", "threshold", "moves"), [("surrogate", 0.0, False), ("direct", 0.05, True)])
def test_router_learns_only_when_allowed(tmp_path, update, threshold, moves):
    """Surrogate mode leaves the router untouched until the surrogate is accurate (threshold 0: never);
    direct mode updates it from the first routed step."""
    cli = parse_config(TINY, overrides=[f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
                                        "--trainer.enable_checkpointing=false", "--trainer.max_steps=4",
                                        "--trainer.limit_val_batches=0", "--model.init_args.elastic_steps=0",
                                        f"--model.init_args.router_update={update}",
                                        f"--model.init_args.surrogate_threshold={threshold}",
                                        "--trainer.enable_progress_bar=false"])
    before = [p.detach().clone() for p in cli.model.router.parameters()]
    cli.trainer.fit(cli.model, cli.datamodule)
    changed = any(not torch.equal(a, b) for a, b in zip(before, cli.model.router.parameters(), strict=True))
    assert changed is moves
