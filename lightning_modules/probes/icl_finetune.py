"""The "GD" side of the probe: fine-tune a copy of the model on the demonstrations (no Lightning).

Each demonstration becomes one training example: the prompt is the rendered demo input (no other
demos, no query), the target is its label word, and the loss is the cross-entropy of the target
tokens only. Two schedules:

- ``full_batch``: every step uses the mean loss over all demonstrations, so the update is a symmetric
  function of the demo set and the result does not depend on their order (up to float summation
  order, ~1e-16 in float64);
- ``sgd``: batch size 1, demonstrations visited in the given order every epoch, which makes the
  result order-dependent, as ICL is (Dai et al. used this with one epoch).

Plain SGD without momentum or weight decay: the point is gradient descent, not a good fine-tuner.
The model is kept in eval mode so dropout does not add noise to an otherwise deterministic update.

What GD updates: every selected weight of a deep copy (``GDConfig.lora is None``, "full"), or fresh LoRA
adapters on a weight-sharing copy (``icl_lora``; the only way on a 4-/8-bit quantized base).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from common.errors import UserFacingError
from lightning_modules.probes.icl_lora import LoraSettings, adapter_copy, seeded
from lightning_modules.probes.icl_scoring import encode_pair

DAI_LEARNING_RATES: dict[str, float] = {
    "sst2": 5e-4,
    "sst5": 1.6e-4,
    "mr": 3e-3,
    "subj": 3e-3,
    "agnews": 0.2,
    "cb": 0.08,
}
"""Per-task SGD learning rates seen in a reproduction of Dai et al. (2023) (K/V only, batch 1, 1 epoch)."""

KV_PATTERN = r"(^|\.)(k_proj|v_proj|key|value|query_key_value|c_attn)\.(weight|bias)$"
"""Attention key/value projections of Llama/Mistral/Gemma (k_proj, v_proj), BERT-style (key, value).
GPT-NeoX and GPT-2 fuse Q, K and V (query_key_value, c_attn): for those the whole fused matrix trains."""


@dataclass(frozen=True)
class GDConfig:
    """How the demonstrations are turned into gradient descent.

    Args:
        mode: ``"full_batch"`` or ``"sgd"`` (batch size 1, demos in the given order).
        params: ``"all"`` layers or ``"kv"`` (attention key/value projections only, as Dai et al.).
        lr: SGD learning rate (ignored for a task in ``DAI_LEARNING_RATES`` when ``preset == "dai"``).
        epochs: Passes over the demonstrations (a full-batch epoch is one step).
        preset: ``"dai"`` fixes sgd / kv / 1 epoch and the per-task learning rate; None uses the fields.
        kv_pattern: Regex on parameter names selecting the K/V projections.
        lora: None: GD updates the weights themselves; else the LoRA adapters it trains instead (on the
            modules ``params`` selects when that is ``"kv"``).
    """

    mode: str = "full_batch"
    params: str = "all"
    lr: float = 1e-3
    epochs: int = 1
    preset: str | None = None
    kv_pattern: str = KV_PATTERN
    lora: LoraSettings | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("full_batch", "sgd"):
            raise UserFacingError(f"GD mode must be 'full_batch' or 'sgd', got {self.mode!r}")
        if self.params not in ("all", "kv"):
            raise UserFacingError(f"GD params must be 'all' or 'kv', got {self.params!r}")
        if self.preset not in (None, "dai"):
            raise UserFacingError(f"GD preset must be None or 'dai', got {self.preset!r}")
        if self.lr <= 0 or self.epochs < 1:
            raise UserFacingError(f"GD needs lr > 0 and epochs >= 1, got lr={self.lr}, epochs={self.epochs}")

    def resolved(self, task_name: str) -> GDConfig:
        """The configuration actually used for ``task_name`` (applies the preset)."""
        if self.preset != "dai":
            return self
        lr = DAI_LEARNING_RATES.get(task_name, self.lr)
        return replace(self, mode="sgd", params="kv", lr=lr, epochs=1, preset=None)

    def with_mode(self, mode: str) -> GDConfig:
        return replace(self, mode=mode)


def trainable_parameters(model: torch.nn.Module, params: str, kv_pattern: str = KV_PATTERN) -> list[str]:
    """Names of the parameters GD updates; raises if ``kv`` matches nothing in this architecture."""
    names = [n for n, _ in model.named_parameters()]
    if params == "all":
        return names
    chosen = [n for n in names if re.search(kv_pattern, n)]
    if not chosen:
        raise UserFacingError(
            f"GD params='kv' matched no parameter with pattern {kv_pattern!r}; set gd.kv_pattern for this "
            f"architecture (names look like {names[:3]})"
        )
    return chosen


def encode_demos(tokenizer, pairs: Sequence[tuple[str, str]], add_special_tokens: bool = True):
    """``(input_ids, labels)`` per demo: prompt tokens masked with -100, target tokens kept."""
    out = []
    for prompt, target in pairs:
        ctx, cont = encode_pair(tokenizer, prompt, target, add_special_tokens)
        out.append((ctx + cont, [-100] * len(ctx) + cont))
    return out


def _batch(examples, pad_id: int, device):
    width = max(len(i) for i, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    for b, (i, lab) in enumerate(examples):
        ids[b, : len(i)], labels[b, : len(lab)], mask[b, : len(i)] = torch.tensor(i), torch.tensor(lab), 1
    return ids.to(device), labels.to(device), mask.to(device)


def demo_loss(model, examples, pad_id: int = 0) -> torch.Tensor:
    """Mean over demos of each demo's mean target-token cross-entropy (each demo weighs the same)."""
    device = next(model.parameters()).device
    ids, labels, mask = _batch(examples, pad_id, device)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp_min(0), reduction="none")
    valid = (target != -100).to(nll.dtype)
    return ((nll * valid).sum(1) / valid.sum(1)).mean()


def finetune_copy(model, examples, cfg: GDConfig, pad_id: int = 0):
    """A fine-tuned copy of ``model`` (the original is untouched).

    Args:
        model: The model to copy.
        examples: From ``encode_demos``, in the order SGD visits them.
        cfg: Already resolved for the task (``cfg.resolved(task)``).
        pad_id: Any valid token id (masked).

    Returns:
        ``(model, losses)``: the tuned copy in eval mode and the loss before every step. With ``cfg.lora``
        the copy shares the original's weights and carries fresh, trained adapters.
    """
    # Lightning runs test steps under inference_mode, which enable_grad alone does not lift; the copy
    # must also be made outside it, or its parameters would be inference tensors autograd refuses.
    with torch.inference_mode(False), torch.enable_grad():
        if cfg.lora is not None:
            with seeded(cfg.lora.init_seed, model):  # the same adapters and dropout masks in every run
                tuned, adapters = adapter_copy(model, cfg.lora, cfg.params, cfg.kv_pattern)
                losses = _descend(tuned, adapters, examples, cfg, pad_id)
            return tuned.eval(), losses  # adapter dropout (if any) was on for the steps only
        tuned = copy.deepcopy(model).eval()
        if not examples:
            return tuned, []
        train = set(trainable_parameters(tuned, cfg.params, cfg.kv_pattern))
        frozen_ints = [n for n, p in tuned.named_parameters() if n in train and not p.dtype.is_floating_point]
        if frozen_ints:
            dtype = dict(tuned.named_parameters())[frozen_ints[0]].dtype
            raise UserFacingError(
                f"GD cannot update quantized weights ({frozen_ints[0]} is {dtype}); "
                "use gd_method: lora (adapters on the quantized base), or quantization: null"
            )
        for name, p in tuned.named_parameters():
            p.requires_grad_(name in train)
        losses = _descend(tuned, [p for p in tuned.parameters() if p.requires_grad], examples, cfg, pad_id)
    return tuned, losses


def _descend(tuned, params: list[torch.nn.Parameter], examples, cfg: GDConfig, pad_id: int) -> list[float]:
    """Plain SGD on ``params`` over the demonstrations as ``cfg.mode`` batches them; frozen afterwards."""
    if not examples:
        return []
    opt = torch.optim.SGD(params, lr=cfg.lr)
    batches = [list(examples)] if cfg.mode == "full_batch" else [[e] for e in examples]
    losses = []
    for _ in range(cfg.epochs):
        for batch in batches:
            loss = demo_loss(tuned, batch, pad_id)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    for p in tuned.parameters():
        p.requires_grad_(False)
    return losses
