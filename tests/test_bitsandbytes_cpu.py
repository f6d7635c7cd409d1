"""bitsandbytes on CPU (0.50 has CPU kernels): 8-bit AdamW trains and resumes; 4-/8-bit loading works."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from common.hf_loading import load_causal_lm, tiny_llama_config
from datamodules.text import TextDataModule
from lightning_modules.causal_lm import CausalLMModule
from tests.conftest import quiet_cpu_trainer_kwargs


def _fit(root: Path, steps: int, ckpt_path: str | None = None) -> L.Trainer:
    kwargs = quiet_cpu_trainer_kwargs(root) | {"enable_checkpointing": False}
    trainer = L.Trainer(max_steps=steps, limit_val_batches=0, **kwargs)
    module = CausalLMModule(model=None, model_config=tiny_llama_config(), optimizer="adamw8bit", warmup_steps=0,
                            learning_rate=1e-2)
    data = TextDataModule(source="shakespeare", tokenizer="byt5", block_size=32, batch_size=2, max_tokens=20000)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def test_adamw8bit_trains_and_resumes_on_cpu(tmp_path: Path) -> None:
    trainer = _fit(tmp_path, 3)
    optimizer = trainer.optimizers[0]
    assert type(optimizer).__name__ == "AdamW8bit"
    states = [s for s in optimizer.state.values() if "state1" in s]
    assert states and any(s["state1"].dtype == torch.uint8 for s in states)  # 8-bit moments, not fp32
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    resumed = _fit(tmp_path, 5, ckpt_path=str(tmp_path / "a.ckpt"))
    assert resumed.global_step == 5
    assert torch.isfinite(torch.tensor(float(resumed.callback_metrics["train/loss"])))


@pytest.mark.parametrize(("quantization", "layer_type"), [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_model_config_quantization_is_applied_not_ignored(quantization: str, layer_type: str) -> None:
    model = load_causal_lm(model_config=tiny_llama_config(), quantization=quantization, seed=0)
    kinds = {type(m).__name__ for m in model.modules()}
    assert layer_type in kinds
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_smollm2_still_knows_paris_on_cpu(quantization: str) -> None:
    from common.hf_loading import load_tokenizer

    model = load_causal_lm("smollm2-135m-instruct", quantization=quantization, dtype="bfloat16")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_token = model(input_ids=ids).logits[0, -1].argmax().item()
    assert tokenizer.decode([next_token]).strip() == "Paris"


@pytest.mark.parametrize(("environment", "expected"), [(None, False), ("1", True), ("no", False)])
def test_hub_kernels_are_opt_in_when_loading(monkeypatch: pytest.MonkeyPatch, environment: str | None,
                                             expected: bool) -> None:
    """transformers kernelizes from_pretrained models by default, which on CUDA downloads Hub kernels at load
    time and fails offline: every pretrained load here asks for them only when USE_HUB_KERNELS says so."""
    import transformers

    if environment is None:
        monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    else:
        monkeypatch.setenv("USE_HUB_KERNELS", environment)
    seen: list[bool] = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(kwargs["use_kernels"])
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_causal_lm(None, model_config=tiny_llama_config(), quantization="8bit")
    assert seen == [expected]
