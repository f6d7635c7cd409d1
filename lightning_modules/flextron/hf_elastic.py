"""Width-sliceable Hugging Face modules: the execution half of Flextron's elastic layers.

Training (``elastic.py``) and dynamic exports share this file, which imports only torch and
transformers: the exporter copies it next to the weights, so an exported dynamic model runs the very
slicing code the Lightning module trained and validated with.

* :class:`ElasticLinear` cuts its output rows or input columns to the layer's current width (hard
  widths: a narrower layer does less work) or multiplies unit activations by a mask (soft widths).
* The decoder-layer and sub-layer subclasses skip a whole layer, or an MLP / attention block of width
  0, recording the new tokens in the KV cache so positions stay right.
* :func:`wire_layer` swaps one decoder layer's modules to these classes, in place; parameters and
  state-dict keys stay those of the Hugging Face model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXLayer
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP

from .hf_modeling import skipped_attention_output


@dataclass
class LayerState:
    """Current width of one layer. ``None`` means full width / no mask."""

    mlp_units: int | None = None
    attn_units: int | None = None
    mlp_mask: Tensor | None = None
    attn_mask: Tensor | None = None
    skip: bool = False

    def units(self, kind: str) -> int | None:
        return self.mlp_units if kind == "mlp" else self.attn_units

    def mask(self, kind: str) -> Tensor | None:
        return self.mlp_mask if kind == "mlp" else self.attn_mask


class ElasticLinear(nn.Linear):
    """An ``nn.Linear`` whose output rows (``side="rows"``) or input columns (``side="cols"``) are
    grouped in units of ``unit`` and cut to the layer's current width."""

    fx_state: LayerState
    fx_kind: str
    fx_side: str
    fx_unit: int

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        st = self.fx_state
        n = st.units(self.fx_kind)
        mask = st.mask(self.fx_kind)
        if n is None and mask is None:
            return F.linear(x, self.weight, self.bias)
        if self.fx_side == "rows":
            if n is None:
                return F.linear(x, self.weight, self.bias)
            k = n * self.fx_unit
            return F.linear(x, self.weight[:k], None if self.bias is None else self.bias[:k])
        # columns: x holds the units (possibly already cut by the row-side slice)
        k = x.shape[-1] if n is None else n * self.fx_unit
        if mask is not None:
            m = mask[..., : k // self.fx_unit].repeat_interleave(self.fx_unit, dim=-1).to(x.dtype)
            x = x[..., :k] * m
        return F.linear(x[..., :k], self.weight[:, :k], self.bias)


class ElasticLlamaDecoderLayer(LlamaDecoderLayer):
    """Llama decoder layer that can be skipped (identity); with both sub-layers at width 0 it returns
    at once too (its norms would feed nothing), only recording the new tokens in the cache."""

    fx_state: LayerState

    def forward(self, hidden_states: Tensor, *args, **kwargs):  # noqa: D102
        if self.fx_state.skip:
            return hidden_states
        if self.fx_state.mlp_units == 0 and self.fx_state.attn_units == 0:
            attn = self.self_attn
            skipped_attention_output(hidden_states, attn.layer_idx, attn.head_dim, kwargs.get("cache"))
            return hidden_states
        return super().forward(hidden_states, *args, **kwargs)


class ElasticLlamaAttention(LlamaAttention):
    """Llama attention that adds nothing at width 0 (a skipped sub-layer, chosen like any width)."""

    fx_state: LayerState

    def forward(self, hidden_states: Tensor, *args, **kwargs):  # noqa: D102
        if self.fx_state.attn_units == 0:
            return skipped_attention_output(hidden_states, self.layer_idx, self.head_dim, kwargs.get("cache"))
        return super().forward(hidden_states, *args, **kwargs)


class ElasticLlamaMLP(LlamaMLP):
    """Llama MLP that adds nothing at width 0."""

    fx_state: LayerState

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        if self.fx_state.mlp_units == 0:
            return torch.zeros_like(x)
        return super().forward(x)


class ElasticGPTNeoXLayer(GPTNeoXLayer):
    """GPT-NeoX layer that can be skipped (identity)."""

    fx_state: LayerState

    def forward(self, hidden_states: Tensor, *args, **kwargs):  # noqa: D102
        if self.fx_state.skip:
            return hidden_states
        return super().forward(hidden_states, *args, **kwargs)


LAYER_CLASSES = {LlamaDecoderLayer: ElasticLlamaDecoderLayer, GPTNeoXLayer: ElasticGPTNeoXLayer}
# sub-layers that can be skipped by a width of 0 (families whose output projections have no bias)
SUBLAYER_CLASSES = {LlamaAttention: ElasticLlamaAttention, LlamaMLP: ElasticLlamaMLP}


def wire_layer(state: LayerState, layer: nn.Module, sublayers: tuple[nn.Module, nn.Module],
               linears: list[tuple[nn.Linear, str, str, int]]) -> None:
    """Make one decoder layer steerable by ``state``, in place.

    Args:
        state: the layer's widths (shared by all its modules).
        layer: the decoder layer.
        sublayers: its attention and MLP modules.
        linears: ``(linear, kind, side, unit)``: ``kind`` ``mlp``/``attn``, ``side`` ``rows`` (produces
            units) or ``cols`` (consumes them), ``unit`` rows or columns per unit.

    Raises:
        TypeError: a linear is not a plain ``nn.Linear`` (e.g. quantized) or the layer class is unsupported.
    """
    for lin, kind, side, unit in linears:
        if type(lin) not in (nn.Linear, ElasticLinear):
            raise TypeError(f"cannot make {type(lin).__name__} elastic: load the model unquantized")
        lin.__class__ = ElasticLinear
        lin.fx_state, lin.fx_kind, lin.fx_side, lin.fx_unit = state, kind, side, unit
    layer_cls = type(layer)
    if layer_cls in LAYER_CLASSES:
        layer.__class__ = LAYER_CLASSES[layer_cls]
    elif layer_cls not in LAYER_CLASSES.values():
        raise TypeError(f"unsupported decoder layer {layer_cls.__name__}")
    layer.fx_state = state
    for sublayer in sublayers:
        if type(sublayer) in SUBLAYER_CLASSES:
            sublayer.__class__ = SUBLAYER_CLASSES[type(sublayer)]
        if type(sublayer) in SUBLAYER_CLASSES.values():
            sublayer.fx_state = state
