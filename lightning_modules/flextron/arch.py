"""Architecture adapters: where the elastic dimensions of a Hugging Face causal LM live.

Flextron only needs to know, per decoder layer, which linear maps produce MLP neurons / attention
heads (their output rows) and which consume them (their input columns). Everything else (importance,
permutation, elastic slicing, export) is written against this small description, so a new family is
one adapter.

Attention is elastic in units of key/value *groups*: under grouped-query attention a KV head and the
query heads that read it are kept or dropped together, which keeps ``num_key_value_groups`` (query
heads per KV head) constant. Transformers reshapes projections with ``view(..., -1, head_dim)``, so a
sliced projection just yields fewer heads and the stock attention code keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel

from common.errors import UserFacingError


@dataclass
class LayerHandles:
    """The elastic pieces of one decoder layer.

    Attributes:
        layer: the decoder layer module.
        attn: the attention module (timed by the latency table).
        mlp: the MLP module.
        mlp_in: linears whose output rows are MLP neurons (gate and up for gated MLPs).
        mlp_out: the linear whose input columns are MLP neurons.
        attn_in: (linear, rows per KV group) for every linear producing heads.
        attn_out: the linear whose input columns are attention heads.
        attn_out_unit: input columns per KV group of ``attn_out``.
    """

    layer: nn.Module
    attn: nn.Module
    mlp: nn.Module
    mlp_in: list[nn.Linear]
    mlp_out: nn.Linear
    attn_in: list[tuple[nn.Linear, int]]
    attn_out: nn.Linear
    attn_out_unit: int


@dataclass(frozen=True)
class ArchSpec:
    """Shape facts of a supported model.

    Attributes:
        family: "llama" or "gpt_neox".
        num_layers: decoder layers.
        hidden_size: model width.
        intermediate_size: MLP neurons per layer (the MLP unit is one neuron).
        num_groups: KV groups per layer (the attention unit; equals heads without GQA).
        heads_per_group: query heads per KV group.
        head_dim: channels per head.
        output_bias: the MLP or attention output projection has a bias (then a sub-layer of width 0
            would still add that bias, so widths of 0 are not offered).
    """

    family: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_groups: int
    heads_per_group: int
    head_dim: int
    output_bias: bool = False


SUPPORTED = ("llama", "gpt_neox")


def _check_family(model: PreTrainedModel) -> str:
    family = getattr(model.config, "model_type", None)
    if family in ("llama", "flextron_llama"):
        return "llama"
    if family in ("gpt_neox", "flextron_gpt_neox"):
        return "gpt_neox"
    raise UserFacingError(
        f"Flextron supports model_type in {SUPPORTED} (Llama/SmolLM2, GPT-NeoX/Pythia), got {family!r}; "
        "GPT-2's fused Conv1D attention splits q/k/v by a fixed size and cannot be sliced by heads."
    )


def arch_spec(model: PreTrainedModel) -> ArchSpec:
    """Read the elastic shape of ``model`` from its config."""
    family = _check_family(model)
    cfg = model.config
    heads = cfg.num_attention_heads
    if family == "llama":
        kv = cfg.num_key_value_heads or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        bias = bool(getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False))
    else:
        kv = heads
        head_dim = cfg.hidden_size // heads
        bias = True
    return ArchSpec(family, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, kv, heads // kv, head_dim,
                    bias)


def layer_handles(model: PreTrainedModel) -> list[LayerHandles]:
    """Return the elastic handles of every decoder layer of ``model``."""
    spec = arch_spec(model)
    out: list[LayerHandles] = []
    if spec.family == "llama":
        for layer in model.model.layers:
            att, mlp = layer.self_attn, layer.mlp
            q_unit = spec.heads_per_group * spec.head_dim
            out.append(
                LayerHandles(
                    layer, att, mlp, [mlp.gate_proj, mlp.up_proj], mlp.down_proj,
                    [(att.q_proj, q_unit), (att.k_proj, spec.head_dim), (att.v_proj, spec.head_dim)],
                    att.o_proj, q_unit,
                )
            )
    else:
        for layer in model.gpt_neox.layers:
            att, mlp = layer.attention, layer.mlp
            out.append(
                LayerHandles(
                    layer, att, mlp, [mlp.dense_h_to_4h], mlp.dense_4h_to_h,
                    [(att.query_key_value, 3 * spec.head_dim)], att.dense, spec.head_dim,
                )
            )
    return out
