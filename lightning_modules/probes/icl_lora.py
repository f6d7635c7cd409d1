"""GD through LoRA adapters (``peft``): how the probe fine-tunes a 4-/8-bit base, and 7B models on one GPU.

Full GD updates every weight, so it needs trainable (floating-point) weights and a second copy of the
model per GD run. With ``gd_method: lora`` GD instead trains low-rank adapters on a frozen base, the
QLoRA recipe (Dettmers et al., 2023) when that base is bitsandbytes-quantized:

- the base is prepared once with ``peft.prepare_model_for_kbit_training`` (frozen, non-quantized
  half-precision weights upcast to float32) before anything is scored, so zero-shot, ICL and GD all
  see the same base;
- every GD run gets *fresh* adapters on a structural copy of the model that shares every base tensor
  (the copy costs module objects and adapter weights, not a second model); adapters are initialised
  from a fixed seed (A random, B zero, so a fresh copy predicts exactly as the base) and kept in
  float32. Nothing carries over from one unit to the next and the base weights are never written.

GD stays plain SGD in eval mode (see ``icl_finetune``); ``dropout > 0`` switches only the adapters'
dropout to training mode, from the same seed in every run.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from common.errors import UserFacingError

DEFAULT_TARGET_MODULES = "all-linear"
"""peft's shorthand for every linear layer except the output head: on Llama-style models q/k/v/o_proj and
gate/up/down_proj, the QLoRA paper's choice."""


@dataclass(frozen=True)
class LoraSettings:
    """The adapters GD trains when ``gd_method`` is ``lora``.

    Args:
        r: Adapter rank.
        alpha: LoRA scaling numerator (the update is scaled by ``alpha / r``).
        dropout: Dropout on the adapters' input during GD steps (0: GD is deterministic).
        target_modules: peft ``target_modules``: ``"all-linear"``, a list of module-name suffixes, or a
            regex matched against full module names. With ``gd_params: kv`` the K/V projections are used.
        init_seed: Seed of the adapters' initialisation (the same in every GD run).
    """

    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = DEFAULT_TARGET_MODULES
    init_seed: int = 0

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise UserFacingError(
                f"LoRA needs lora_r >= 1, lora_alpha > 0 and 0 <= lora_dropout < 1, got r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout}"
            )
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
            if not self.target_modules:
                raise UserFacingError("lora_target_modules is empty: name modules or use 'all-linear'")


def base_quantization(model: torch.nn.Module) -> str | None:
    """``"4bit"``/``"8bit"`` when ``model`` holds bitsandbytes layers, else None (read from the layers
    themselves: a config copied from a quantized model, as the random-init control's is, says nothing)."""
    names = {type(m).__name__ for m in model.modules()}
    if "Linear4bit" in names or "Params4bit" in names:
        return "4bit"
    if "Linear8bitLt" in names:
        return "8bit"
    return None


def gd_variant(lora: LoraSettings | None, params: str, quantization: str | None) -> str:
    """The name results carry for the GD side, e.g. ``GD (QLoRA r=16, 4-bit base)`` or ``GD (full)``."""
    scope = ", K/V only" if params == "kv" else ""
    if lora is None:
        return f"GD (full{scope})"
    if quantization == "4bit":
        return f"GD (QLoRA r={lora.r}{scope}, 4-bit base)"
    if quantization == "8bit":
        return f"GD (LoRA r={lora.r}{scope}, 8-bit base)"
    return f"GD (LoRA r={lora.r}{scope})"


def prepare_quantized_base(model: torch.nn.Module) -> torch.nn.Module:
    """QLoRA's base preparation, once, before scoring: freeze, upcast non-quantized fp16/bf16 weights.

    Gradient checkpointing stays off: GD runs in eval mode (where Hugging Face models skip it) on a few
    short demonstrations, whose activations are small next to the base weights.
    """
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _shared_tensors(model: torch.nn.Module) -> dict[int, torch.Tensor]:
    """Every tensor a deep copy of ``model`` must share instead of copy: parameters, buffers, and tensors
    held in module attributes or in plain objects there (bitsandbytes' 8-bit ``state.CB``/``SCB``)."""
    shared: dict[int, torch.Tensor] = {}
    for t in (*model.parameters(), *model.buffers()):
        shared[id(t)] = t
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor):
                shared[id(value)] = value
            elif hasattr(value, "__dict__") and not isinstance(value, torch.nn.Module | type):
                for inner in vars(value).values():
                    if isinstance(inner, torch.Tensor):
                        shared[id(inner)] = inner
    return shared


@contextmanager
def seeded(seed: int, model: torch.nn.Module) -> Iterator[None]:
    """Run under ``torch.manual_seed(seed)`` and restore every random state afterwards (the model's GPU
    too), so each GD run draws the same adapters and dropout masks and the caller's RNG is untouched."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _target_modules(model: torch.nn.Module, settings: LoraSettings, params: str, kv_pattern: str | None):
    if params == "all":
        return list(settings.target_modules) if isinstance(settings.target_modules, tuple) else settings.target_modules
    if kv_pattern is None:
        raise ValueError("params='kv' needs the K/V parameter-name pattern (icl_finetune.KV_PATTERN)")
    names = [n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
             and re.search(kv_pattern, f"{n}.weight")]
    if not names:
        raise UserFacingError(
            f"GD params='kv' matched no module with pattern {kv_pattern!r}; set gd.kv_pattern for this architecture"
        )
    return names


def adapter_copy(
    model: torch.nn.Module, settings: LoraSettings, params: str = "all", kv_pattern: str | None = None
) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """A copy of ``model`` sharing all its weights, with fresh LoRA adapters: ``(copy, adapter parameters)``.

    Must be called with autograd available (outside ``inference_mode``). The copy is in eval mode except
    for the adapters' dropout when ``settings.dropout > 0``; only the adapter parameters require grad.
    ``params="kv"`` puts the adapters on the modules whose weight name matches ``kv_pattern`` instead of
    ``settings.target_modules``.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import cast_adapter_dtype

    base_ids = {id(p) for p in model.parameters()}
    shell = copy.deepcopy(model, memo=_shared_tensors(model))
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=_target_modules(model, settings, params, kv_pattern),
        bias="none",
    )
    with seeded(settings.init_seed, model):
        try:
            shell = inject_adapter_in_model(config, shell)
        except ValueError as error:  # peft: "Target modules ... not found in the base model"
            raise UserFacingError(f"LoRA adapters for GD: {str(error).splitlines()[0]}") from error
    cast_adapter_dtype(shell, "default")  # float32 adapters on a half-precision base, as peft models do
    shell.eval()
    adapters = [p for p in shell.parameters() if id(p) not in base_ids]
    for p in shell.parameters():
        p.requires_grad_(id(p) not in base_ids)
    if settings.dropout > 0:
        for name, module in shell.named_modules():
            if name.endswith("lora_dropout"):
                module.train()
    return shell, adapters

