"""Checks that need CUDA: FSDP, DeepSpeed, bitsandbytes kernels. Deselected by default.

Run them on a GPU machine with ``pytest -m gpu`` (DeepSpeed is the ``deepspeed`` extra). Each
test fails, rather than skips, when CUDA is missing: a GPU run that silently tested nothing would lie.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from tests.conftest import REPO_ROOT, parse_config
from tests.shrink import TINY_MODEL_OVERRIDES

pytestmark = pytest.mark.gpu

TINY = [
    *TINY_MODEL_OVERRIDES,
    "--data.init_args.max_tokens=20000",
    "--trainer.max_steps=4",
    "--trainer.val_check_interval=2",
    "--trainer.limit_val_batches=1",
    "--trainer.devices=1",
]


@pytest.fixture(autouse=True)
def _needs_cuda() -> None:
    assert torch.cuda.is_available(), "these checks need a CUDA GPU: run them with `pytest -m gpu` on one"


def _fit(tmp_path: Path, *configs: str, extra: list[str] | None = None, ckpt_path: str | None = None) -> L.Trainer:
    overrides = [*TINY, f"--trainer.default_root_dir={tmp_path}",
                 "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
                 f"--trainer.callbacks.dirpath={tmp_path}/ckpt", *(extra or [])]
    cli = parse_config("configs/quickstart.yaml", *configs, overrides=overrides)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    return cli.trainer


def test_fsdp_fit_bf16(tmp_path: Path) -> None:
    import yaml

    config = yaml.safe_load((REPO_ROOT / "configs/quickstart.yaml").read_text())
    config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"] if "excp" not in c["class_path"]]
    path = tmp_path / "no_excp.yaml"
    path.write_text(yaml.safe_dump(config))
    trainer = _fit(tmp_path, str(path), "configs/trainer/fsdp.yaml")  # ExCP under FSDP1: the CPU strategy matrix
    assert trainer.global_step == 4
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["val/loss"])))


def test_deepspeed_stage2_fit_writes_excp_folders_and_resumes(tmp_path: Path) -> None:
    from callbacks.excp.deepspeed_files import has_excp_files

    trainer = _fit(tmp_path, "configs/trainer/deepspeed_stage2.yaml")
    last = tmp_path / "ckpt" / "last.ckpt"
    assert trainer.global_step == 4 and last.is_dir() and has_excp_files(last)
    resumed = _fit(tmp_path, "configs/trainer/deepspeed_stage2.yaml", extra=["--trainer.max_steps=6"],
                   ckpt_path=str(last))
    assert resumed.global_step == 6


def test_adamw8bit_trains_on_cuda(tmp_path: Path) -> None:
    trainer = _fit(tmp_path, extra=["--trainer.accelerator=gpu", "--model.init_args.optimizer=adamw8bit"])
    assert trainer.global_step == 4
    assert type(trainer.optimizers[0]).__name__ == "AdamW8bit"


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_smollm2_still_knows_paris(quantization: str) -> None:
    from common.hf_loading import load_causal_lm, load_tokenizer

    model = load_causal_lm("smollm2-135m-instruct", quantization=quantization, dtype="bfloat16")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids.to(model.device)
    with torch.no_grad():
        next_token = model(input_ids=ids).logits[0, -1].argmax().item()
    assert tokenizer.decode([next_token]).strip() == "Paris"
