"""Elastic MLP and attention by slicing (hard widths) or masking (soft, differentiable widths).

``make_elastic`` swaps the class of the elastic ``nn.Linear`` modules (and of the decoder layers, for
layer skipping) to subclasses that read a per-layer :class:`LayerState`. Parameters and state-dict
keys stay exactly those of the Hugging Face model, so the model still saves, loads and generates as
usual; at full width the forward is the stock one.

* Hard widths (``LayerState.mlp_units`` / ``attn_units``) slice the weights: a narrower layer really
  does less work (FFN(x; d) = W2[:, :d] act(W1[:d] x)).
* Soft widths (``mlp_mask`` / ``attn_mask``, shape ``[..., units]``) multiply the unit activations
  just before the output projection, so a loss can be backpropagated into router probabilities.
  Masks may carry batch / token dimensions for input-adaptive (dynamic) routing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import PreTrainedModel

from common.errors import UserFacingError

from .arch import ArchSpec, arch_spec, layer_handles
from .hf_elastic import LayerState, wire_layer


@dataclass
class WidthSpace:
    """Discrete width choices per layer, in units (neurons for the MLP, KV groups for attention).

    Attributes:
        mlp: ascending MLP widths (neurons); the last one is the full width.
        attn: ascending attention widths (KV groups); the last one is the full width.
        num_layers: decoder layers.
    """

    mlp: list[int]
    attn: list[int]
    num_layers: int

    @classmethod
    def from_ratios(
        cls, spec: ArchSpec, mlp_ratios: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
        attn_ratios: Sequence[float] = (0.25, 0.5, 0.75, 1.0), mlp_multiple: int = 1,
    ) -> WidthSpace:
        """Turn width ratios into unit counts (MLP rounded to ``mlp_multiple``, attention to whole KV
        groups, at least one; duplicates removed, full width always included).

        A ratio of exactly 0 is the width 0: that sub-layer (MLP or attention) is skipped, which lets
        the router reach budgets below the narrowest non-empty widths. It needs output projections
        without bias (the Llama family, SmolLM2).
        """
        for r in [*mlp_ratios, *attn_ratios]:
            if not 0.0 <= r <= 1.0:
                raise UserFacingError(f"width ratios must lie in [0, 1] (0: skip the sub-layer), got {r}")
        if spec.output_bias and 0.0 in [*mlp_ratios, *attn_ratios]:
            raise UserFacingError(f"a width ratio of 0 (skipping a sub-layer) needs output projections without bias; "
                                  f"this {spec.family} model has them: use ratios above 0")
        mlp = sorted(
            {0 if r == 0 else max(mlp_multiple, int(round(r * spec.intermediate_size / mlp_multiple)) * mlp_multiple)
             for r in mlp_ratios}
            | {spec.intermediate_size}
        )
        mlp = [min(m, spec.intermediate_size) for m in mlp]
        attn = sorted({0 if r == 0 else max(1, int(round(r * spec.num_groups))) for r in attn_ratios}
                      | {spec.num_groups})
        return cls(sorted(set(mlp)), attn, spec.num_layers)

    def unit_masks(self, kind: str) -> Tensor:
        """``[K, units]`` 0/1 matrix: row j keeps the first ``choices[j]`` units."""
        ch = self.mlp if kind == "mlp" else self.attn
        full = ch[-1]
        return (torch.arange(full)[None, :] < torch.tensor(ch)[:, None]).float()


@dataclass
class SubnetConfig:
    """A concrete sub-network: per-layer widths in units and per-layer skip flags."""

    mlp: list[int]
    attn: list[int]
    skip: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.skip:
            self.skip = [False] * len(self.mlp)
        if not (len(self.mlp) == len(self.attn) == len(self.skip)):
            raise UserFacingError("SubnetConfig needs one mlp width, attn width and skip flag per layer")

    def to_dict(self) -> dict:
        return {"mlp": list(map(int, self.mlp)), "attn": list(map(int, self.attn)), "skip": list(map(bool, self.skip))}

    @classmethod
    def full(cls, spec: ArchSpec) -> SubnetConfig:
        return cls([spec.intermediate_size] * spec.num_layers, [spec.num_groups] * spec.num_layers)

    @classmethod
    def uniform(cls, spec: ArchSpec, mlp_ratio: float, attn_ratio: float | None = None) -> SubnetConfig:
        """Same ratio in every layer (the MatFormer-style nested choice)."""
        attn_ratio = mlp_ratio if attn_ratio is None else attn_ratio
        m = max(1, int(round(mlp_ratio * spec.intermediate_size)))
        a = max(1, int(round(attn_ratio * spec.num_groups)))
        return cls([m] * spec.num_layers, [a] * spec.num_layers)

    @classmethod
    def from_choices(cls, space: WidthSpace, mlp_idx: Sequence[int], attn_idx: Sequence[int]) -> SubnetConfig:
        return cls([space.mlp[int(i)] for i in mlp_idx], [space.attn[int(i)] for i in attn_idx])


class ElasticLM:
    """Controller of an elastic model: sets widths or masks for the next forward passes.

    Args:
        model: a supported HF causal LM; converted in place by :func:`make_elastic`.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.spec = arch_spec(model)
        self.states = make_elastic(model)

    def set_subnet(self, cfg: SubnetConfig | None) -> None:
        """Hard-slice every layer to ``cfg`` (None: full width). Clears masks."""
        if cfg is not None and len(cfg.mlp) != self.spec.num_layers:
            raise UserFacingError(f"SubnetConfig has {len(cfg.mlp)} layers, model has {self.spec.num_layers}")
        if cfg is not None and cfg.skip[0]:
            raise UserFacingError("layer 0 cannot be skipped: the KV cache reads the sequence length from it")
        for i, st in enumerate(self.states):
            st.mlp_mask = st.attn_mask = None
            if cfg is None:
                st.mlp_units = st.attn_units = None
                st.skip = False
                continue
            low = 0 if not self.spec.output_bias else 1
            if not (low <= cfg.mlp[i] <= self.spec.intermediate_size and low <= cfg.attn[i] <= self.spec.num_groups):
                raise UserFacingError(
                    f"layer {i}: widths mlp={cfg.mlp[i]} attn={cfg.attn[i]} outside "
                    f"[{low}, {self.spec.intermediate_size}] / [{low}, {self.spec.num_groups}]; "
                    "use skip to drop a layer"
                )
            st.mlp_units = None if cfg.mlp[i] == self.spec.intermediate_size else int(cfg.mlp[i])
            st.attn_units = None if cfg.attn[i] == self.spec.num_groups else int(cfg.attn[i])
            st.skip = bool(cfg.skip[i])

    def set_masks(self, mlp_masks: Tensor | None, attn_masks: Tensor | None) -> None:
        """Soft widths: ``mlp_masks`` ``[..., L, intermediate_size]``, ``attn_masks`` ``[..., L, groups]``.

        Leading dimensions broadcast against the activations ``[B, T, units]`` (e.g. ``[B, 1, L, U]``
        for per-sequence routing). Hard widths are reset to full so gradients reach every choice.
        """
        for i, st in enumerate(self.states):
            st.mlp_units = st.attn_units = None
            st.skip = False
            st.mlp_mask = None if mlp_masks is None else mlp_masks[..., i, :]
            st.attn_mask = None if attn_masks is None else attn_masks[..., i, :]

    @contextmanager
    def subnet(self, cfg: SubnetConfig | None) -> Iterator[None]:
        """Run the body with ``cfg`` sliced in, restoring full width afterwards."""
        self.set_subnet(cfg)
        try:
            yield
        finally:
            self.set_subnet(None)

    def current(self) -> SubnetConfig:
        """The hard configuration currently set."""
        return SubnetConfig(
            [s.mlp_units or self.spec.intermediate_size for s in self.states],
            [s.attn_units or self.spec.num_groups for s in self.states],
            [s.skip for s in self.states],
        )


def make_elastic(model: PreTrainedModel) -> list[LayerState]:
    """Make ``model`` elastic in place and return the per-layer states that steer it.

    Idempotent: an already elastic model gets fresh states wired in.
    """
    states: list[LayerState] = []
    for h in layer_handles(model):
        st = LayerState()
        states.append(st)
        linears = [(lin, "mlp", "rows", 1) for lin in h.mlp_in] + [(h.mlp_out, "mlp", "cols", 1)]
        linears += [(lin, "attn", "rows", u) for lin, u in h.attn_in] + [(h.attn_out, "attn", "cols", h.attn_out_unit)]
        try:
            wire_layer(st, h.layer, (h.attn, h.mlp), linears)
        except TypeError as error:
            raise UserFacingError(str(error)) from error
    return states
