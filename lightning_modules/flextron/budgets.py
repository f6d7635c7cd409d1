"""Budgets: what a sub-network costs in parameters, FLOPs per token and measured latency.

Every cost is additive over layers: ``cost = fixed + sum_l mlp[l, j_l] + attn[l, k_l]`` with one
entry per layer and width choice. That one form (:class:`CostTable`) serves all three metrics, gives
the realized cost of a hard choice, and the *expected* cost ``fixed + sum p * table``, which is
differentiable in router probabilities (Flextron's latency model, section 3.3).

The latency table is measured, not modelled: the network runs at each uniform width while forward
hooks time every attention and MLP module; what the hooks do not cover (embeddings, norms, residuals,
LM head) becomes the fixed term, so the table decomposes the measured end-to-end time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from .elastic import ElasticLM, SubnetConfig, WidthSpace

METRICS = ("params", "flops", "latency_prefill", "latency_decode")


@dataclass
class CostTable:
    """Additive cost model over per-layer width choices.

    Attributes:
        metric: one of ``METRICS``.
        fixed: cost outside the elastic units (embeddings, norms, LM head, or measured overhead).
        mlp: ``[L, K_mlp]`` cost of each MLP width choice per layer.
        attn: ``[L, K_attn]`` cost of each attention width choice per layer.
    """

    metric: str
    fixed: float
    mlp: Tensor
    attn: Tensor

    @property
    def full(self) -> float:
        return float(self.fixed + self.mlp[:, -1].sum() + self.attn[:, -1].sum())

    def expected(self, mlp_probs: Tensor, attn_probs: Tensor) -> Tensor:
        """Differentiable expected cost; probs are ``[..., L, K]`` (leading dims kept)."""
        mlp = (mlp_probs * self.mlp.to(mlp_probs)).sum((-1, -2))
        attn = (attn_probs * self.attn.to(attn_probs)).sum((-1, -2))
        return self.fixed + mlp + attn

    def of(self, space: WidthSpace, cfg: SubnetConfig) -> float:
        """Cost of a concrete sub-network whose widths are all in ``space`` (skipped layers cost 0)."""
        total = self.fixed
        for i in range(space.num_layers):
            if cfg.skip[i]:
                continue
            total += float(self.mlp[i, space.mlp.index(cfg.mlp[i])] + self.attn[i, space.attn.index(cfg.attn[i])])
        return float(total)

    def to_dict(self) -> dict:
        return {"metric": self.metric, "fixed": self.fixed, "mlp": self.mlp.tolist(), "attn": self.attn.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> CostTable:
        return cls(d["metric"], float(d["fixed"]), torch.tensor(d["mlp"]), torch.tensor(d["attn"]))


def _unit_params(elm: ElasticLM) -> tuple[int, int, int]:
    """Parameters per MLP neuron, per KV group, and outside the elastic units (whole model)."""
    from .arch import layer_handles

    h = layer_handles(elm.model)[0]
    s = elm.spec
    per_neuron = sum(lin.in_features + (lin.bias is not None) for lin in h.mlp_in) + h.mlp_out.out_features
    per_group = sum(unit * (lin.in_features + (lin.bias is not None)) for lin, unit in h.attn_in)
    per_group += h.attn_out_unit * h.attn_out.out_features
    total = sum(p.numel() for p in elm.model.parameters())
    elastic = s.num_layers * (per_neuron * s.intermediate_size + per_group * s.num_groups)
    return per_neuron, per_group, total - elastic


def param_table(elm: ElasticLM, space: WidthSpace) -> CostTable:
    """Exact parameter count (matches ``sum(p.numel())`` of the exported sub-network)."""
    per_neuron, per_group, fixed = _unit_params(elm)
    L = space.num_layers
    mlp = torch.tensor([[per_neuron * m for m in space.mlp]] * L, dtype=torch.float64)
    attn = torch.tensor([[per_group * a for a in space.attn]] * L, dtype=torch.float64)
    return CostTable("params", float(fixed), mlp, attn)


def flops_table(elm: ElasticLM, space: WidthSpace, context: int = 256) -> CostTable:
    """Forward FLOPs per token at ``context`` tokens of attention span: 2 per multiply-add of every
    weight, plus QK^T and AV (2 * 2 * context * head_dim per query head). Embedding lookups are free;
    the LM head counts."""
    per_neuron, per_group, _ = _unit_params(elm)
    s = elm.spec
    attn_matmul = 2 * 2 * context * s.head_dim * s.heads_per_group
    lm_head = elm.model.get_output_embeddings().weight.numel()
    L = space.num_layers
    mlp = torch.tensor([[2.0 * per_neuron * m for m in space.mlp]] * L, dtype=torch.float64)
    attn = torch.tensor([[(2.0 * per_group + attn_matmul) * a for a in space.attn]] * L, dtype=torch.float64)
    return CostTable("flops", 2.0 * lm_head, mlp, attn)


class _Timer:
    """Forward pre/post hooks that accumulate wall-clock per module (CPU ops are synchronous; on
    CUDA the hooks synchronise, which is what a latency table wants)."""

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        self.t = [0.0] * len(modules)
        self._start = [0.0] * len(modules)
        self._hooks = []
        for i, m in enumerate(modules):
            self._hooks.append(m.register_forward_pre_hook(lambda *_a, i=i: self._begin(i)))
            self._hooks.append(m.register_forward_hook(lambda *_a, i=i: self._end(i)))
        self.cuda = False

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _begin(self, i: int) -> None:
        self._sync()
        self._start[i] = time.perf_counter()

    def _end(self, i: int) -> None:
        self._sync()
        self.t[i] += time.perf_counter() - self._start[i]

    def reset(self) -> None:
        self.t = [0.0] * len(self.t)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def _run(elm: ElasticLM, mode: str, ids: Tensor, cache: DynamicCache | None, ctx: int) -> None:
    if mode == "prefill":
        elm.model(input_ids=ids, use_cache=False)
    else:
        extra = cache.get_seq_length() - ctx
        if extra > 0:
            cache.crop(-extra)  # transformers 5 crops by a negative count of tokens to drop
        elm.model(input_ids=ids[:, -1:], cache=cache, use_cache=True)


@contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Temporarily run torch CPU ops on ``n`` threads (None: leave as is). Single-threaded timing
    is far steadier on a shared CPU, where waiting for a descheduled worker thread dominates."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def measure_latency(elm: ElasticLM, cfg: SubnetConfig | None, mode: str = "prefill", seq_len: int = 256,
                    batch_size: int = 1, reps: int = 5, warmup: int = 1, num_threads: int | None = None) -> float:
    """Minimum over ``reps`` end-to-end seconds of one prefill of ``seq_len`` tokens, or of one decode step after a
    ``seq_len``-token context, for sub-network ``cfg``."""
    model = elm.model
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), device=device)
    ts = []
    with elm.subnet(cfg), cpu_threads(num_threads):
        cache = None
        if mode == "decode":
            cache = DynamicCache(config=model.config)
            model(input_ids=ids[:, :-1], cache=cache, use_cache=True)
        for r in range(warmup + reps):
            _sync(device)
            t = time.perf_counter()
            _run(elm, mode, ids, cache, seq_len - 1)
            _sync(device)
            if r >= warmup:
                ts.append(time.perf_counter() - t)
    return min(ts)


@torch.no_grad()
def latency_table(elm: ElasticLM, space: WidthSpace, mode: str = "prefill", seq_len: int = 256,
                  batch_size: int = 1, reps: int = 5, warmup: int = 1, num_threads: int | None = None
                  ) -> CostTable:
    """Measure per-layer latency of every width choice on the model's current device.

    The network runs at each uniform width (MLP choice j and attention choice j together; the shorter
    list repeats its full width), hooks time each layer's attention block and the rest of the layer (MLP,
    norms, residuals; the MLP entry), and the minimum
    over ``reps`` fills ``table[l, j]``. The minimum over repetitions is used throughout (here and in
    :func:`measure_latency`): on a shared machine interference only ever adds time. The fixed term is
    the end-to-end time minus all hooked
    time at full width.

    Args:
        elm: the elastic model (eval mode is set for the measurement and restored).
        space: width choices.
        mode: "prefill" (one forward of ``seq_len`` tokens) or "decode" (one token after a
            ``seq_len``-token context, with KV cache).
        seq_len, batch_size: the workload.
        reps, warmup: timed and untimed repetitions per width.
        num_threads: CPU threads during the measurement (None: unchanged).
    """
    if mode not in ("prefill", "decode"):
        raise ValueError(f"latency mode must be 'prefill' or 'decode', got {mode!r}")
    from .arch import layer_handles

    model = elm.model
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hs = layer_handles(model)
    L = len(hs)
    # hooks on each attention block and each whole decoder layer: the MLP entry is the layer's time
    # minus its attention's, so norms and residual adds count with the MLP and leave the fixed term,
    # and a layer whose sub-layers are both skipped (it returns at once) costs next to nothing
    timer = _Timer([h.attn for h in hs] + [h.layer for h in hs])
    timer.cuda = device.type == "cuda"
    K = max(len(space.mlp), len(space.attn))
    mlp = torch.zeros(L, len(space.mlp), dtype=torch.float64)
    attn = torch.zeros(L, len(space.attn), dtype=torch.float64)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), device=device)
    cfgs = []
    for j in range(K):
        jm, ja = min(j, len(space.mlp) - 1), min(j, len(space.attn) - 1)
        cfgs.append((jm, ja, SubnetConfig([space.mlp[jm]] * L, [space.attn[ja]] * L)))
    per_rep: list[list[list[float]]] = [[] for _ in cfgs]
    totals: list[list[float]] = [[] for _ in cfgs]
    threads = cpu_threads(num_threads)
    threads.__enter__()
    try:
        caches: list[DynamicCache | None] = []
        for _, _, cfg in cfgs:
            cache = None
            if mode == "decode":
                with elm.subnet(cfg):
                    cache = DynamicCache(config=model.config)
                    model(input_ids=ids[:, :-1], cache=cache, use_cache=True)
            caches.append(cache)
        for _ in range(2):  # allocator / kernel warm-up before anything is timed
            _run(elm, "prefill", ids, None, 0)
        # widths are interleaved within each repetition so load drift on a shared machine hits all alike
        for r in range(warmup + reps):
            for c, (_, _, cfg) in enumerate(cfgs):
                with elm.subnet(cfg):
                    timer.reset()
                    _sync(device)
                    t = time.perf_counter()
                    _run(elm, mode, ids, caches[c], seq_len - 1)
                    _sync(device)
                    if r >= warmup:
                        totals[c].append(time.perf_counter() - t)
                        attn_t, layer_t = timer.t[:L], timer.t[L:]
                        per_rep[c].append(attn_t + [max(0.0, lt - at) for lt, at in zip(layer_t, attn_t, strict=True)])
        for c, (jm, ja, _) in enumerate(cfgs):
            med = [min(col) for col in zip(*per_rep[c], strict=True)]
            if c < len(space.attn):
                attn[:, ja] = torch.tensor(med[:L])
            if c < len(space.mlp):
                mlp[:, jm] = torch.tensor(med[L:])
        fixed_samples = [tot - sum(t) for tot, t in zip(totals[-1], per_rep[-1], strict=True)]
    finally:
        timer.remove()
        model.train(was_training)
        threads.__exit__(None, None, None)
    return CostTable(f"latency_{mode}", max(0.0, min(fixed_samples)), mlp, attn)


def cost_table(elm: ElasticLM, space: WidthSpace, metric: str, seq_len: int = 256, reps: int = 5,
               num_threads: int | None = None) -> CostTable:
    """Build the table for ``metric`` (see ``METRICS``)."""
    if metric == "params":
        return param_table(elm, space)
    if metric == "flops":
        return flops_table(elm, space, context=seq_len)
    if metric in ("latency_prefill", "latency_decode"):
        return latency_table(elm, space, metric.split("_")[1], seq_len=seq_len, reps=reps,
                             num_threads=num_threads)
    raise ValueError(f"unknown budget metric {metric!r}; choose one of {METRICS}")
