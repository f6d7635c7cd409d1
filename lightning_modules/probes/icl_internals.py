"""Read attention outputs and attention maps out of a Hugging Face causal LM (for SimAOU / SimAM).

Forward hooks on every self-attention module (``*.self_attn``, ``*.attention``, ``*.attn``) collect,
at the last position of the prompt, the attention block's output (before the residual add) and the
attention weights of that position over the query's tokens. Attention weights need the eager
implementation; the model is switched to it for the capture and switched back afterwards.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch

_ATTN_NAME = re.compile(r"(^|\.)(self_attn|attention|attn)$")


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The per-layer self-attention modules, in layer order."""
    mods = [m for n, m in model.named_modules() if _ATTN_NAME.search(n)]
    if not mods:
        raise ValueError(
            f"no self-attention modules found in {type(model).__name__} (names *.self_attn/attn)"
        )
    return mods


@contextmanager
def _eager(model):
    previous = getattr(model.config, "_attn_implementation", None)
    if previous != "eager" and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if previous not in (None, "eager") and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(previous)


@torch.no_grad()
def capture(model, ids: list[int], query_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention outputs and maps at the last token of ``ids``.

    Args:
        model: A Hugging Face causal LM.
        ids: Prompt token ids (the query is its last ``query_len`` tokens).
        query_len: Number of trailing tokens that form the query.

    Returns:
        ``[layers, hidden]`` attention outputs and ``[layers, heads, query_len]`` attention weights
        (float64, on CPU).
    """
    outputs: list[torch.Tensor] = []
    maps: list[torch.Tensor] = []

    def hook(_module, _inputs, out):
        attn_out, weights = (out[0], out[1]) if isinstance(out, tuple) and len(out) > 1 else (out, None)
        if weights is None:
            raise RuntimeError("attention weights unavailable: the model ignored the eager attention switch")
        outputs.append(attn_out[0, -1].double().cpu())
        maps.append(weights[0, :, -1, -query_len:].double().cpu())

    handles = [m.register_forward_hook(hook) for m in attention_modules(model)]
    try:
        with _eager(model):
            model(
                input_ids=torch.tensor([ids], device=next(model.parameters()).device), output_attentions=True
            )
    finally:
        for h in handles:
            h.remove()
    return torch.stack(outputs), torch.stack(maps)
