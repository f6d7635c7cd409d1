"""Stand-alone Hugging Face classes for exported Flextron sub-networks with per-layer widths.

This file imports only torch and transformers: the exporter copies it next to the weights and points
``auto_map`` at it, so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads an
export anywhere. Importing ``lightning_modules.flextron`` also registers the classes, after which no
``trust_remote_code`` is needed.

The classes keep the parent's config (so head size and query-per-KV-head ratio are unchanged) plus
per-layer lists, build the stock model, and then shrink each layer's projections to its width: the
stock attention code reshapes with ``-1`` heads, so fewer rows mean fewer heads. A skipped layer
becomes an identity; a Llama MLP or attention block of width 0 becomes a skipped sub-layer.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM


def skipped_attention_output(hidden_states: torch.Tensor, layer_idx: int, head_dim: int, cache=None
                             ) -> tuple[torch.Tensor, None]:
    """What an attention block of width 0 returns: nothing to add to the residual stream.

    Transformers reads the sequence length (positions, masks) from the cache, so a skipped attention
    still records the new tokens there, as one head of zeros: a few bytes per token, no compute.
    """
    if cache is not None:
        shape = (hidden_states.shape[0], 1, hidden_states.shape[1], head_dim)
        empty = hidden_states.new_zeros(shape)
        cache.update(empty, empty, layer_idx)
    return torch.zeros_like(hidden_states), None


class SkippedAttention(nn.Module):
    """An attention block of width 0 (no KV group kept): adds nothing, records positions in the cache."""

    def __init__(self, layer_idx: int, head_dim: int) -> None:
        super().__init__()
        self.layer_idx, self.head_dim = layer_idx, head_dim

    def forward(self, hidden_states: torch.Tensor, *args, cache=None, layer_past=None, **kwargs):  # noqa: D102
        return skipped_attention_output(hidden_states, self.layer_idx, self.head_dim,
                                        cache if cache is not None else layer_past)


class SkippedMLP(nn.Module):
    """An MLP of width 0 (no neuron kept): adds nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.zeros_like(hidden_states)


class SkippedLayer(nn.Module):
    """A decoder layer whose MLP and attention both have width 0: the identity, recording positions in the cache.

    It keeps the layer's (unused) norm weights, so the state dict loads unchanged and the parameter
    count is the one the budget table predicts.
    """

    def __init__(self, layer: nn.Module, layer_idx: int, head_dim: int) -> None:
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = layer.input_layernorm, layer.post_attention_layernorm
        self.layer_idx, self.head_dim = layer_idx, head_dim

    def forward(self, hidden_states: torch.Tensor, *args, cache=None, **kwargs) -> torch.Tensor:  # noqa: D102
        skipped_attention_output(hidden_states, self.layer_idx, self.head_dim, cache)
        return hidden_states


class _Identity(nn.Module):
    """A skipped decoder layer: returns its input hidden states."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # noqa: D102
        return hidden_states


def _resize(lin: nn.Linear, out_features: int | None = None, in_features: int | None = None) -> nn.Linear:
    out_f = lin.out_features if out_features is None else out_features
    in_f = lin.in_features if in_features is None else in_features
    return nn.Linear(in_f, out_f, bias=lin.bias is not None, dtype=lin.weight.dtype, device=lin.weight.device)


def _check_lists(config) -> None:
    n = config.num_hidden_layers
    for name in ("layer_intermediate_sizes", "layer_kv_groups", "skip_layers"):
        if len(getattr(config, name)) != n:
            raise ValueError(f"{name} must have one entry per layer ({n}), got {len(getattr(config, name))}")


class FlextronLlamaConfig(LlamaConfig):
    """Llama config plus per-layer MLP widths, KV-group counts and skip flags."""

    model_type = "flextron_llama"

    def __init__(self, layer_intermediate_sizes: list[int] | None = None, layer_kv_groups: list[int] | None = None,
                 skip_layers: list[bool] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        n = self.num_hidden_layers
        self.layer_intermediate_sizes = list(layer_intermediate_sizes or [self.intermediate_size] * n)
        self.layer_kv_groups = list(layer_kv_groups or [self.num_key_value_heads] * n)
        self.skip_layers = list(skip_layers or [False] * n)


class FlextronLlamaForCausalLM(LlamaForCausalLM):
    """Llama causal LM whose layers have their own widths (see :class:`FlextronLlamaConfig`)."""

    config_class = FlextronLlamaConfig

    def __init__(self, config: FlextronLlamaConfig) -> None:
        super().__init__(config)
        _check_lists(config)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rep = config.num_attention_heads // config.num_key_value_heads
        for i, layer in enumerate(self.model.layers):
            if config.skip_layers[i]:
                self.model.layers[i] = _Identity()
                continue
            d, g = config.layer_intermediate_sizes[i], config.layer_kv_groups[i]
            mlp, att = layer.mlp, layer.self_attn
            if d == 0 and g == 0:
                self.model.layers[i] = SkippedLayer(layer, i, head_dim)
                continue
            if d == 0:  # width 0: the sub-layer is skipped (its output projection has no bias)
                layer.mlp = SkippedMLP()
            else:
                mlp.gate_proj, mlp.up_proj = _resize(mlp.gate_proj, d), _resize(mlp.up_proj, d)
                mlp.down_proj = _resize(mlp.down_proj, in_features=d)
            if g == 0:
                layer.self_attn = SkippedAttention(i, head_dim)
            else:
                att.q_proj = _resize(att.q_proj, g * rep * head_dim)
                att.k_proj, att.v_proj = _resize(att.k_proj, g * head_dim), _resize(att.v_proj, g * head_dim)
                att.o_proj = _resize(att.o_proj, in_features=g * rep * head_dim)
        self.post_init()


class FlextronGPTNeoXConfig(GPTNeoXConfig):
    """GPT-NeoX config plus per-layer MLP widths, head counts and skip flags."""

    model_type = "flextron_gpt_neox"

    def __init__(self, layer_intermediate_sizes: list[int] | None = None, layer_kv_groups: list[int] | None = None,
                 skip_layers: list[bool] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        n = self.num_hidden_layers
        self.layer_intermediate_sizes = list(layer_intermediate_sizes or [self.intermediate_size] * n)
        self.layer_kv_groups = list(layer_kv_groups or [self.num_attention_heads] * n)
        self.skip_layers = list(skip_layers or [False] * n)


class FlextronGPTNeoXForCausalLM(GPTNeoXForCausalLM):
    """GPT-NeoX causal LM whose layers have their own widths (see :class:`FlextronGPTNeoXConfig`)."""

    config_class = FlextronGPTNeoXConfig

    def __init__(self, config: FlextronGPTNeoXConfig) -> None:
        super().__init__(config)
        _check_lists(config)
        head = config.hidden_size // config.num_attention_heads
        for i, layer in enumerate(self.gpt_neox.layers):
            if config.skip_layers[i]:
                self.gpt_neox.layers[i] = _Identity()
                continue
            d, g = config.layer_intermediate_sizes[i], config.layer_kv_groups[i]
            mlp, att = layer.mlp, layer.attention
            mlp.dense_h_to_4h = _resize(mlp.dense_h_to_4h, d)
            mlp.dense_4h_to_h = _resize(mlp.dense_4h_to_h, in_features=d)
            att.query_key_value = _resize(att.query_key_value, 3 * g * head)
            att.dense = _resize(att.dense, in_features=g * head)
        self.post_init()


def register() -> None:
    """Register the classes with the Auto* factories (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    pairs = ((FlextronLlamaConfig, FlextronLlamaForCausalLM), (FlextronGPTNeoXConfig, FlextronGPTNeoXForCausalLM))
    for cfg, model in pairs:
        try:
            AutoConfig.register(cfg.model_type, cfg)
        except ValueError:
            pass  # already registered
        try:
            AutoModelForCausalLM.register(cfg, model)
        except ValueError:
            pass
