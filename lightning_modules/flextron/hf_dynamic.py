"""A dynamic Flextron model as one Hugging Face model: nested weights, router, per-prompt sliced widths.

The exporter writes the full (importance-sorted, nested) weights and the dynamic router's weights into
one folder, copies this file and the three it imports (``hf_elastic.py``, ``hf_modeling.py``,
``knapsack.py``: torch, numpy and transformers only) next to them, and points ``auto_map`` here, so

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    model(input_ids).logits                 # each sequence through the widths its router chose
    model.generate(input_ids, budget=0.6)   # per-prompt widths, any budget in the trained range

At every call without a KV cache the router reads each sequence's token embeddings and the budget,
the budget-exact decode (:mod:`knapsack`, the same one training validates with) picks one width per
layer and sub-layer, the batch is grouped by choice, and each group runs with its weights sliced to
the chosen prefixes (:mod:`hf_elastic`): a narrower choice computes less, it is not masked. The
routers are also the training-side ones (``routers.py`` subclasses :class:`DynamicRouter`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from .hf_elastic import LayerState, wire_layer
from .knapsack import constrained_choices

#: one sub-network: per-layer MLP widths (neurons) and attention widths (KV groups)
Choice = tuple[tuple[int, ...], tuple[int, ...]]


def budget_range_error(budgets: Tensor, budget: float | Tensor) -> str | None:
    """Why ``budget`` cannot be encoded (outside the trained range), or None."""
    b = torch.as_tensor(budget, dtype=budgets.dtype, device=budgets.device)
    lo, hi = float(budgets[0]), float(budgets[-1])
    if bool(((b < lo - 1e-6) | (b > hi + 1e-6)).any()):
        return (f"budget {float(b.reshape(-1)[0]):g} outside the trained range [{lo:g}, {hi:g}]; train that budget "
                "or pick one inside")
    return None


def budget_encoding(budgets: Tensor, budget: float | Tensor) -> Tensor:
    """One-hot over sorted ``budgets``, linearly interpolated between neighbours.

    Args:
        budgets: ``[N]`` ascending trained budgets.
        budget: scalar or ``[B]`` requested budgets within ``[budgets[0], budgets[-1]]``.

    Returns:
        ``[N]`` or ``[B, N]`` encodings summing to 1.

    Raises:
        ValueError: a budget outside the trained range.
    """
    error = budget_range_error(budgets, budget)
    if error:
        raise ValueError(error)
    b = torch.as_tensor(budget, dtype=budgets.dtype, device=budgets.device)
    flat = b.reshape(-1).clamp(float(budgets[0]), float(budgets[-1]))
    idx = torch.searchsorted(budgets, flat, right=True).clamp(1, len(budgets) - 1)
    left, right = budgets[idx - 1], budgets[idx]
    w = ((flat - left) / (right - left).clamp_min(1e-12)).clamp(0, 1)
    enc = torch.zeros(flat.shape[0], len(budgets), dtype=budgets.dtype, device=budgets.device)
    enc.scatter_(1, (idx - 1)[:, None], (1 - w)[:, None])
    enc.scatter_add_(1, idx[:, None], w[:, None])
    return enc.reshape(*b.shape, len(budgets))


class WidthHead(nn.Module):
    """Features -> per-layer width logits (Linear, LeakyReLU(0.1), Linear), starting neutral."""

    def __init__(self, in_dim: int, hidden: int, num_layers: int, k_mlp: int, k_attn: int) -> None:
        super().__init__()
        self.shape = (num_layers, k_mlp, k_attn)
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden, bias=False), nn.LeakyReLU(0.1), nn.Linear(hidden, num_layers * (k_mlp + k_attn))
        )
        # start neutral: every width equally likely, so early training sees all of them
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits for features ``x``, which are cast to the weights' dtype.

        The budget encoding is float32 (the trained budgets must not round), while DeepSpeed's bf16 mode
        casts the weights to bfloat16 and, unlike autocast, leaves the inputs the module makes itself alone.
        """
        L, km, ka = self.shape
        out = self.net(x.to(self.net[0].weight.dtype)).reshape(*x.shape[:-1], L, km + ka)
        return out[..., :km], out[..., km:]


class DynamicRouter(nn.Module):
    """Input-adaptive router: reads hidden states and the budget, per sequence or per token.

    Args:
        hidden_size: width of the hidden states it reads (the token embeddings).
        budgets: the trained budgets (fractions of the full cost), any order.
        num_layers: decoder layers.
        k_mlp, k_attn: number of MLP / attention width choices.
        hidden: hidden units.
        per_token: route every token separately (outputs ``[B, T, L, K]``) instead of one choice per
            sequence (``[B, 1, L, K]``). Per-token widths cannot be sliced in a batch, so they run as
            masks during training only: they save no wall-clock and do not export.
    """

    def __init__(self, hidden_size: int, budgets: Sequence[float], num_layers: int, k_mlp: int, k_attn: int,
                 hidden: int = 128, per_token: bool = False) -> None:
        super().__init__()
        self.register_buffer("budgets", torch.tensor(sorted(budgets), dtype=torch.float32))
        self.per_token = per_token
        self.norm = nn.LayerNorm(hidden_size)
        self.proj = nn.Linear(hidden_size, hidden)
        self.head = WidthHead(hidden + len(budgets), hidden, num_layers, k_mlp, k_attn)

    def forward(self, hidden_states: Tensor, budget: float | Tensor, attention_mask: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        """Logits ``([B, 1 or T, L, K_mlp], [B, 1 or T, L, K_attn])``; padding (``attention_mask`` 0) is not pooled."""
        h = self.norm(hidden_states.to(self.norm.weight.dtype))
        if not self.per_token:
            if attention_mask is None:
                h = h.mean(1, keepdim=True)
            else:
                m = attention_mask[..., None].to(h)
                h = (h * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1)
        z = self.proj(h)
        enc = budget_encoding(self.budgets, budget).to(z.dtype)
        if enc.dim() == 1:
            enc = enc.expand(z.shape[0], -1)
        enc = enc[:, None, :].expand(-1, z.shape[1], -1)
        return self.head(torch.cat([z, enc], dim=-1))


class FlextronDynamicConfig(LlamaConfig):
    """Llama config plus ``flextron``: what routing needs besides weights.

    ``flextron`` keys: ``budgets`` (trained), ``budget`` (default for calls without one), ``mlp_widths`` /
    ``attn_widths`` (choices, ascending, in neurons / KV groups), ``cost`` (``metric``, ``fixed``,
    ``mlp`` and ``attn`` ``[L, K]`` lists, ``full``), ``router_hidden``, ``routing_slack``,
    ``routing_resolution``.
    """

    model_type = "flextron_dynamic_llama"

    def __init__(self, flextron: dict | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.flextron = dict(flextron or {})


class FlextronDynamicLlamaForCausalLM(LlamaForCausalLM):
    """Llama whose every sequence runs the sliced widths its router picks for the budget.

    Besides the stock arguments, :meth:`forward` and :meth:`generate` take ``budget`` (a fraction of
    the full cost within the trained range; default ``config.flextron["budget"]``). The widths of the
    last routed batch are in ``last_routing`` (one ``{"mlp": [...], "attn": [...]}`` per sequence).
    Continuing from a KV cache needs the prompt's widths: :meth:`generate` handles that; a hand-written
    decoding loop wraps its calls in ``with model.widths(model.route(prompt)[0]):``.
    """

    config_class = FlextronDynamicConfig

    def __init__(self, config: FlextronDynamicConfig) -> None:
        super().__init__(config)
        fx = config.flextron
        self.mlp_widths, self.attn_widths = list(fx["mlp_widths"]), list(fx["attn_widths"])
        self.router = DynamicRouter(config.hidden_size, fx["budgets"], config.num_hidden_layers,
                                    len(self.mlp_widths), len(self.attn_widths), fx["router_hidden"])
        self._states = [self._wire(layer) for layer in self.model.layers]
        self._fixed: Choice | None = None
        self.last_routing: list[dict[str, list[int]]] = []
        self.post_init()

    def _wire(self, layer: nn.Module) -> LayerState:
        """Make one decoder layer sliceable: rows of the producing and columns of the consuming projections."""
        cfg = self.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        q_unit = cfg.num_attention_heads // cfg.num_key_value_heads * head_dim
        att, mlp = layer.self_attn, layer.mlp
        state = LayerState()
        wire_layer(state, layer, (att, mlp), [
            (mlp.gate_proj, "mlp", "rows", 1), (mlp.up_proj, "mlp", "rows", 1), (mlp.down_proj, "mlp", "cols", 1),
            (att.q_proj, "attn", "rows", q_unit), (att.k_proj, "attn", "rows", head_dim),
            (att.v_proj, "attn", "rows", head_dim), (att.o_proj, "attn", "cols", q_unit)])
        return state

    @contextmanager
    def widths(self, choice: Choice | dict | None) -> Iterator[None]:
        """Run the body with every layer sliced to ``choice`` (a :meth:`route` entry; None: full width)."""
        if isinstance(choice, dict):
            choice = (tuple(choice["mlp"]), tuple(choice["attn"]))
        for i, state in enumerate(self._states):
            state.mlp_mask = state.attn_mask = None
            mlp, attn = (None, None) if choice is None else (choice[0][i], choice[1][i])
            state.mlp_units = None if mlp is None or mlp == self.mlp_widths[-1] else int(mlp)
            state.attn_units = None if attn is None or attn == self.attn_widths[-1] else int(attn)
        self._fixed = choice if choice is not None else (tuple(self.mlp_widths[-1:]) * len(self._states),
                                                         tuple(self.attn_widths[-1:]) * len(self._states))
        try:
            yield
        finally:
            for state in self._states:
                state.mlp_units = state.attn_units = None
            self._fixed = None

    @torch.no_grad()
    def route(self, input_ids: Tensor, attention_mask: Tensor | None = None, budget: float | None = None
              ) -> list[dict[str, list[int]]]:
        """Per-sequence widths for ``budget``: each sequence's cost stays within ``budget`` times the full cost."""
        fx = self.config.flextron
        budget = float(fx["budget"] if budget is None else budget)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # the unmasked mean, exactly as training computed it
        mlp_logits, attn_logits = self.router(self.get_input_embeddings()(input_ids), budget, attention_mask)
        cost = fx["cost"]  # read per call: tensors made in __init__ would live on from_pretrained's meta device
        fixed, full = float(cost["fixed"]), float(cost["full"])
        mlp_cost = torch.tensor(cost["mlp"], dtype=torch.float64)
        attn_cost = torch.tensor(cost["attn"], dtype=torch.float64)
        layers = len(self._states)
        out = []
        for mlp_row, attn_row in zip(mlp_logits.reshape(len(input_ids), layers, -1).float().cpu(),
                                     attn_logits.reshape(len(input_ids), layers, -1).float().cpu(), strict=True):
            decoded = constrained_choices(mlp_row, attn_row, fixed, mlp_cost, attn_cost, budget * full,
                                          slack=fx["routing_slack"], resolution=fx["routing_resolution"])
            out.append({"mlp": [self.mlp_widths[j] for j in decoded.mlp],
                        "attn": [self.attn_widths[j] for j in decoded.attn]})
        self.last_routing = out
        return out

    def _groups(self, input_ids: Tensor, attention_mask: Tensor | None, budget: float | None
                ) -> list[tuple[Choice, Tensor]]:
        """The batch's rows grouped by routed widths: ``(choice, row indices)`` per distinct choice."""
        groups: dict[Choice, list[int]] = {}
        for row, choice in enumerate(self.route(input_ids, attention_mask, budget)):
            groups.setdefault((tuple(choice["mlp"]), tuple(choice["attn"])), []).append(row)
        return [(choice, torch.tensor(rows, device=input_ids.device)) for choice, rows in groups.items()]

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                budget: float | None = None, **kwargs) -> CausalLMOutputWithPast:
        """The stock forward, each sequence through its routed widths (or the widths fixed by :meth:`widths`)."""
        if self._fixed is not None:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError("continuing from a KV cache needs the prompt's widths: use generate(), or wrap the "
                             "calls in `with model.widths(model.route(prompt)[0]):`")
        if input_ids is None:
            raise ValueError("the router reads input_ids: pass them instead of inputs_embeds")
        groups = self._groups(input_ids, attention_mask, budget)
        if len(groups) == 1:
            with self.widths(groups[0][0]):
                return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        labels = kwargs.pop("labels", None)
        for key in ("cache", "past_key_values"):
            kwargs.pop(key, None)
        kwargs["use_cache"] = False  # one cache per width group would not fit the caller's single cache
        logits = None
        for choice, rows in groups:
            with self.widths(choice):
                part = super().forward(input_ids=input_ids[rows],
                                       attention_mask=None if attention_mask is None else attention_mask[rows],
                                       **_rows(kwargs, rows, len(input_ids))).logits
            if logits is None:
                logits = part.new_empty((len(input_ids), *part.shape[1:]))
            logits[rows] = part
        loss = None if labels is None else self.loss_function(logits=logits, labels=labels,
                                                               vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(self, inputs: Tensor | None = None, budget: float | None = None, **kwargs):
        """The stock ``generate``, every prompt with its routed widths (one call per group of equal widths).

        Several groups return one tensor, each row right-padded with the pad (or EOS) token to the
        longest; richer outputs (``return_dict_in_generate``) need prompts that route alike.
        """
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if self._fixed is not None or input_ids is None:
            return super().generate(input_ids, **kwargs)
        groups = self._groups(input_ids, kwargs.get("attention_mask"), budget)
        if len(groups) == 1:
            with self.widths(groups[0][0]):
                return super().generate(input_ids, **kwargs)
        parts = []
        for choice, rows in groups:
            with self.widths(choice):
                out = super().generate(input_ids[rows], **_rows(kwargs, rows, len(input_ids)))
            if not isinstance(out, Tensor):
                raise ValueError("prompts routed to different widths: pass them one at a time for dict outputs")
            parts.append((rows, out))
        pad = kwargs.get("pad_token_id", self.generation_config.pad_token_id)
        pad = self.generation_config.eos_token_id if pad is None else pad
        pad = (pad[0] if isinstance(pad, (list, tuple)) else pad) or 0
        length = max(out.shape[1] for _, out in parts)
        result = input_ids.new_full((len(input_ids), length), int(pad))
        for rows, out in parts:
            result[rows, : out.shape[1]] = out
        return result


def _rows(kwargs: dict, rows: Tensor, batch: int) -> dict:
    """``kwargs`` with every per-sequence tensor (first dimension ``batch``) cut to ``rows``."""
    return {k: v[rows] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == batch and k != "logits_to_keep"
            else v for k, v in kwargs.items()}
