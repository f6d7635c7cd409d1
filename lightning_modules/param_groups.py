"""Which parameters get weight decay, decided so that sharding cannot change the answer."""

from __future__ import annotations

from torch import nn


def decay_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(decay, no_decay)``: the trainable parameters of ``model``, biases and norm-layer weights exempt.

    Decided by parameter name and layer type (a layer whose class name contains "norm": LayerNorm,
    LlamaRMSNorm, ...), not by ``ndim``: under FSDP1 (``use_orig_params``, Lightning's default) the
    optimizer is built after wrapping and sees every parameter as a 1-D view of this rank's shard, so an
    ``ndim >= 2`` rule exempts every weight. (Hugging Face's ``get_parameter_names`` does the same by name
    patterns, but importing ``transformers.trainer_pt_utils`` costs seconds.)
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))  # tied weights (embeddings = head) once
            (no_decay if is_norm or name == "bias" else decay).append(parameter)
    return decay, no_decay
