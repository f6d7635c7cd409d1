"""Checks that need CUDA: FSDP, DeepSpeed, bitsandbytes kernels. Deselected by default.

Run them on a GPU machine with ``pytest -m gpu`` (DeepSpeed is the ``deepspeed`` extra). Each
test fails, rather than skips, when CUDA is missing: a GPU run that silently tested nothing would lie.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from tests.conftest import parse_config
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


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp2", "deepspeed_stage2", "deepspeed_stage3"])
def test_sharded_bf16_fit_writes_excp_checkpoints_and_resumes(tmp_path: Path, strategy: str) -> None:
    """The quickstart (ExCP attached) under each shipped sharded config in its bf16-mixed precision, then resumed."""
    from callbacks.excp import is_excp_file
    from callbacks.excp.deepspeed_files import has_excp_files

    config = f"configs/trainer/{strategy}.yaml"
    one_gpu = ["--trainer.strategy.init_args.data_parallel_size=1"] if strategy == "fsdp2" else []
    trainer = _fit(tmp_path, config, extra=one_gpu)
    last = tmp_path / "ckpt" / "last.ckpt"
    assert trainer.global_step == 4
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["val/loss"])))
    assert has_excp_files(last) if strategy.startswith("deepspeed") else is_excp_file(last)
    resumed = _fit(tmp_path, config, extra=[*one_gpu, "--trainer.max_steps=6"], ckpt_path=str(last))
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
