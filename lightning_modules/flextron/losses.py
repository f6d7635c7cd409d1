"""Task losses for elastic training: distillation from the frozen full model, or plain LM loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LOSSES = ("kd", "lm", "kd+lm")


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, temperature: float = 1.0
            ) -> Tensor:
    """Forward KL(teacher || student) per token, averaged over the tokens that have a label.

    Args:
        student_logits, teacher_logits: ``[B, T, V]``.
        labels: ``[B, T]``; positions equal to -100 are ignored (None: all positions count).
        temperature: softens both distributions; the loss is scaled by ``temperature**2`` so its
            gradient magnitude does not depend on it.
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    if labels is not None:
        keep = (labels != -100).to(kl)
        return (kl * keep).sum() / keep.sum().clamp_min(1) * temperature**2
    return kl.mean() * temperature**2


def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy (labels are shifted here, as Hugging Face does)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def task_loss(kind: str, logits: Tensor, labels: Tensor, teacher_logits: Tensor | None, temperature: float = 1.0
              ) -> Tensor:
    """The configured training loss: ``kd``, ``lm`` or their sum ``kd+lm``."""
    if kind not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")
    total = torch.zeros((), device=logits.device)
    if "kd" in kind:
        if teacher_logits is None:
            raise ValueError("distillation needs teacher logits")
        # the logit at position t predicts token t+1: mask with the label of t+1
        shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        total = total + kd_loss(logits, teacher_logits, shifted, temperature)
    if "lm" in kind:
        total = total + lm_loss(logits, labels)
    return total
