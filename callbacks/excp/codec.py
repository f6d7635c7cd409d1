"""Per-tensor ExCP coding: weight-momentum joint shrinking + non-uniform quantization (no Lightning).

For one parameter tensor W with optional Adam moments m (``exp_avg``) and v (``exp_avg_sq``) the
delta coder follows the method's notes exactly:

1. residual against the *reconstructed* previous weights: ``dW = W_t - W^_{t-1}`` (closed loop);
2. weight mask: ``|dW| > median(|dW|) * min(cap, alpha / sqrt(mean(v)))`` (the method; ``v`` bias-corrected
   as Adam's own step is, ``v / (1 - beta2**step)``, unless ``v_bias_correction`` is off), or, with
   ``target_bits_per_param``, the ``|dW|`` threshold whose coded W, m, v fit that budget
   (:mod:`callbacks.excp.rate`); with ``weight_saliency="fisher"`` both rules rank
   ``|dW| * sqrt(v / mean(v))`` instead of ``|dW|``;
3. momentum mask: ``|m| > beta * mean(|m|)`` AND the weight mask; v uses m's mask;
4. per-stream 1-D k-means with ``2**bits - 1`` fp32 centroids, code 0 meaning "pruned";
5. the code streams are entropy-coded (zstd layouts or rANS, whichever is smaller) with the nested
   masks exploited: m's codes are stored only at the weight mask's survivors and v's only at m's.

Reconstruction is ``W^_t = W^_{t-1} + dequant(dW)`` computed with the same ops in the encoder and the
decoder, so the decoder reproduces the encoder's tracked reference bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from callbacks.excp.dequantize import CODEBOOK_HEAD, compute_dtype, decode_param, reconstruct
from callbacks.excp.quantize import (
    CODERS,
    assign,
    encode_indices,
    encode_lossless,
    kmeans_1d,
    uniform_levels,
)
from callbacks.excp.rate import fit_budget
from common.errors import UserFacingError

__all__ = [
    "ExCPSettings",
    "ParamCode",
    "decode_param",
    "encode_param_delta",
    "encode_param_keyframe",
    "momentum_candidates",
    "tensor_generator",
    "weight_residual",
]


DEFAULT_ALPHA = 5e-5
"""The paper's weight-mask scale."""

CHOICES: dict[str, tuple[str, ...]] = {
    "weight_saliency": ("magnitude", "fisher"),
    "budget_allocation": ("even", "fisher"),
    "quantizer": ("kmeans", "uniform"),
    "keyframe_moments": ("lossless", "lossy"),
    "entropy_coder": CODERS,
}
"""The settings that name one of a few options: checked in one place, offered as the CLI's choices."""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_TYPE_CHECKS: dict[str, tuple[Any, str]] = {
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (_is_number, "a number"),
    "float | None": (lambda v: v is None or _is_number(v), "a number or null"),
    "str": (lambda v: isinstance(v, str), "a string"),
}
"""Each field's annotation (a string under postponed evaluation) -> its check and the words for it."""


@dataclass(frozen=True)
class ExCPSettings:
    """Codec settings; stored in every file header so a reader never guesses them.

    Args:
        bits_w: bits per code of the weight residual stream (``2**bits - 1`` centroids + "pruned").
        bits_m: bits per code of the first-moment stream.
        bits_v: bits per code of the second-moment stream.
        alpha: weight-mask scale ``alpha / sqrt(mean(v))`` (the method's rate rule; None means the
            paper's 5e-5 unless ``target_bits_per_param`` is set). How much it prunes depends on the
            gradient scale (loss scaling, clipping, model size), so a file's size is not known in advance.
        target_bits_per_param: instead of ``alpha``, a budget in bits per parameter for the coded W,
            m and v of every delta tensor (e.g. 2.0 for ~48x vs fp32 W+m+v): each tensor's ``|dW|``
            threshold is chosen to meet it whatever the gradient scale. Set ``alpha`` to None with it.
        beta: momentum-mask threshold in units of ``mean(|m|)`` (paper default 2.0).
        cap: upper bound of the weight-mask factor (2.5 in the reference code).
        no_v_factor: weight-mask factor for tensors without a second moment (SGD, frozen weights):
            there is no ``mean(v)`` to scale by, so this fixed multiple of the median is used.
        keyframe_interval: a keyframe every this many checkpoints (bounds chain length, hence the
            time to load the last checkpoint and what one lost file takes with it). 20 is chosen from
            the trade-off ``bench/excp.py`` measures (SmolLM2-135M, a keyframe with lossy moments 2.9x,
            deltas ~29x, 2 threads): a long run averages 15x at 10, 20x at 20, 25x at 50, and the
            slowest load (a segment's last file) takes 31, 57 or 136 s; a run of up to 20 checkpoints
            from pretrained weights then stores no keyframe at all.
        keyframe_moments: ``"lossless"`` or ``"lossy"``: a keyframe's weights are always exact; lossy
            quantizes its Adam moments like a delta's (``bits_m``/``bits_v`` k-means codebooks, nothing
            pruned but exact zeros), which makes keyframes ~3x instead of ~1.2x smaller than fp32 W+m+v
            at the cost of the moments' quantization error at a resume from a keyframe.
        residual: code ``W_t - W^_{t-1}`` (True) or ``W_t`` itself (False; the "no residual" ablation).
        momentum_criterion: apply the ``beta`` momentum criterion (False: m keeps the weight mask,
            the "weight-only pruning" ablation).
        weight_saliency: what the weight mask ranks: ``"magnitude"`` (the paper: ``|dW|``) or
            ``"fisher"`` (``|dW| * sqrt(v / mean(v))``: Adam's ``v`` estimates the diagonal Fisher, so
            an entry's loss cost when its update is dropped grows with ``v * dW**2``; the tensor-wide
            normalisation leaves ``alpha`` and the budget rule their meaning). Measured on SmolLM2 (one
            10-step delta, updates pruned, nothing quantized): keeping 10% of the entries cost +1.07%
            validation loss by magnitude and +0.51% by this rank. Tensors without v fall back to magnitude.
        budget_allocation: how ``target_bits_per_param`` is split across a delta's tensors:
            ``"even"`` (every tensor the same bits per parameter) or ``"fisher"`` (one threshold on
            ``|dW| * sqrt(v)`` across all tensors, so bits go where dropping an update costs most loss;
            :mod:`callbacks.excp.allocation`). SmolLM2 continued pretraining at 1.37 bits per
            parameter with Fisher-ranked k-means 4-bit, 9 lossy resumes x 3 seeds: 70.2x median delta
            at 0.81% validation loss off the uninterrupted runs split by Fisher, 1.10% split evenly;
            encode 81 against 103 MB/s (``bench/results/excp_smollm2.json`` and its ``_extra_settings``
            twin, separate runs: this machine's speeds vary by up to 40% between runs). Only the budget mode
            splits a budget, so ``"fisher"`` needs ``target_bits_per_param``.
        quantizer: ``"kmeans"`` (the paper's k-means codebooks) or ``"uniform"`` (evenly spaced
            levels: centred on zero for the signed W and m streams, log-spaced for v). After entropy
            coding, uniform levels make smaller files at the same bits, since most survivors fall in
            the few levels nearest zero (SmolLM2, 4 bits, 9 lossy resumes x 3 seeds: 47.8x against
            29.2x median delta, loss 0.97% against 0.51% off the uninterrupted runs).
        v_log_domain: quantize v in the log domain, k-means centroids and uniform grids alike (v spans
            decades: a linear codebook crushes small v, and decoding a small v to a tiny level makes
            Adam's steps after a resume explode).
        v_floor: pruned v entries decode to the mean of the pruned entries (one float per tensor in
            the header) instead of zero, which keeps Adam's step sizes after a resume.
        v_bias_correction: the weight rule's ``mean(v)`` is divided by ``1 - beta2**step`` (Adam's own
            correction, read from the optimizer state; no-op where it records no step/betas). The paper
            uses raw ``v``, which early in a run is a fraction of the gradient's second moment, so the
            factor sits at ``cap`` and the first delta loses most of its update: SmolLM2 continued
            pretraining, 5 steps, betas (0.9, 0.95): the first delta's reconstruction lost 43% of the 5
            steps' loss gain with raw v (97.8x) and 10% with corrected v (35.5x); later deltas barely change.
        kmeans_sample: fit each codebook on at most this many values.
        kmeans_iters: maximum Lloyd iterations.
        zstd_level: zstd level of the quantized index streams.
        entropy_coder: ``"auto"`` (each code stream takes the smaller of the zstd layouts and rANS with
            its own frequencies, which reaches the order-0 entropy) or ``"zstd"`` (zstd layouts only:
            faster to decode, up to ~15% larger on sparse streams).
        lossless_level: zstd level of lossless (keyframe) byte planes; 1 is measured smaller and faster
            than higher levels on float byte planes.
        threads: tensors encoded in parallel (torch and zstd release the GIL); a reader rebuilds
            tensors on as many threads (at most its CPUs) unless told otherwise.
        seed: seed of the k-means sampling, so encodes are reproducible.
    """

    bits_w: int = 4
    bits_m: int = 4
    bits_v: int = 4
    alpha: float | None = None
    target_bits_per_param: float | None = None
    beta: float = 2.0
    cap: float = 2.5
    no_v_factor: float = 1.0
    keyframe_interval: int = 20
    keyframe_moments: str = "lossless"
    residual: bool = True
    momentum_criterion: bool = True
    weight_saliency: str = "magnitude"
    budget_allocation: str = "even"
    quantizer: str = "kmeans"
    v_log_domain: bool = True
    v_floor: bool = True
    v_bias_correction: bool = True
    kmeans_sample: int = 65536
    kmeans_iters: int = 25
    zstd_level: int = 3
    entropy_coder: str = "auto"
    lossless_level: int = 1
    threads: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for field in fields(self):  # a YAML "no" or a header's "4" must not pass as truthy or compare as text
            check, words = _TYPE_CHECKS[str(field.type)]
            value = getattr(self, field.name)
            if not check(value):
                raise UserFacingError(f"ExCP {field.name}={value!r} is invalid: use {words}")
        for name in ("bits_w", "bits_m", "bits_v"):
            bits = getattr(self, name)
            if not 1 <= bits <= 8:
                raise UserFacingError(f"ExCP {name}={bits!r} is invalid: use an integer from 1 to 8")
        for name, choices in CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                options = " or ".join(repr(c) for c in choices)
                raise UserFacingError(f"ExCP {name}={value!r} is invalid: use {options}")
        if self.keyframe_interval < 1:
            raise UserFacingError(f"ExCP keyframe_interval={self.keyframe_interval} is invalid: use >= 1")
        self._check_rate_mode()
        if self.beta < 0 or self.cap <= 0 or self.no_v_factor < 0:
            raise UserFacingError("ExCP cap must be > 0, beta and no_v_factor >= 0")
        if self.threads < 1 or self.kmeans_sample < 16 or self.kmeans_iters < 1:
            raise UserFacingError("ExCP threads >= 1, kmeans_sample >= 16 and kmeans_iters >= 1 are required")

    def _check_rate_mode(self) -> None:
        target, alpha = self.target_bits_per_param, self.alpha
        if target is not None and alpha is not None:
            raise UserFacingError(
                f"ExCP alpha={alpha} and target_bits_per_param={target} are two rate modes: set one of them "
                "(alpha: null to use the bit budget)"
            )
        if target is not None and not (0 < target <= 32 and math.isfinite(target)):
            raise UserFacingError(f"ExCP target_bits_per_param={target!r} is invalid: use a number in (0, 32]")
        if alpha is not None and not (alpha > 0 and math.isfinite(alpha)):
            raise UserFacingError(f"ExCP alpha={alpha!r} is invalid: use a number > 0 (or null with a bit budget)")
        if self.budget_allocation != "even" and target is None:
            raise UserFacingError(
                f"ExCP budget_allocation={self.budget_allocation!r} splits a bit budget: set target_bits_per_param "
                "(and alpha: null), or leave budget_allocation at 'even'"
            )

    @property
    def weight_alpha(self) -> float:
        """The ``alpha`` of the method's weight rule (the paper's 5e-5 when unset)."""
        return DEFAULT_ALPHA if self.alpha is None else float(self.alpha)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (for the file header)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExCPSettings:
        """Rebuild from a header dict, ignoring unknown keys written by newer versions."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class ParamCode:
    """One coded parameter: stream blobs, the reconstruction a reader will get, and statistics."""

    w: bytes
    m: bytes | None
    v: bytes | None
    w_mode: str  # "delta" (residual), "absolute" (no-residual ablation) or "lossless"
    recon_w: torch.Tensor
    numel: int
    kept_w: int
    kept_m: int
    v_floor: float = 0.0  # the value pruned second-moment entries decode to


def _stream_blob(codebook: torch.Tensor, codes: np.ndarray, s: ExCPSettings) -> bytes:
    cb = codebook.to(torch.float32).contiguous().numpy()
    return CODEBOOK_HEAD.pack(cb.size) + cb.tobytes() + encode_indices(codes, level=s.zstd_level, coder=s.entropy_coder)


def _quantize(
    values: torch.Tensor, bits: int, s: ExCPSettings, gen: torch.Generator, log_domain: bool
) -> tuple[torch.Tensor, np.ndarray]:
    """Codebook and 1-based codes (uint8) for the surviving ``values`` of one stream."""
    k = 2**bits - 1
    if values.numel() == 0:
        return torch.zeros(0, dtype=torch.float32), np.zeros(0, dtype=np.uint8)
    if s.quantizer == "kmeans":
        cb = kmeans_1d(values, k, iters=s.kmeans_iters, sample=s.kmeans_sample, generator=gen, log_domain=log_domain)
    else:
        cb = uniform_levels(values, k, log_domain=log_domain)
    codes = assign(values, cb, log_domain=log_domain) + 1
    return cb, codes.to(torch.uint8).numpy()


def _weight_factor(v: torch.Tensor | None, s: ExCPSettings, v_bias: float = 1.0) -> float:
    if v is None or v.numel() == 0:
        return s.no_v_factor
    mean_v = float(v.mean(dtype=torch.float64))
    if s.v_bias_correction and 0 < v_bias < 1:
        mean_v /= v_bias
    if not mean_v > 0 or not math.isfinite(mean_v):
        return s.cap
    return min(s.cap, s.weight_alpha / math.sqrt(mean_v))


def encode_param_keyframe(
    w: torch.Tensor, m: torch.Tensor | None, v: torch.Tensor | None, s: ExCPSettings
) -> ParamCode:
    """Store a parameter and its moments losslessly (keyframes, and parameters new to a chain)."""
    w = w.detach().cpu().contiguous()
    return ParamCode(
        w=encode_lossless(w, level=s.lossless_level),
        m=None if m is None else encode_lossless(m.detach().cpu(), level=s.lossless_level),
        v=None if v is None else encode_lossless(v.detach().cpu(), level=s.lossless_level),
        w_mode="lossless",
        recon_w=w.clone(),
        numel=w.numel(),
        kept_w=w.numel(),
        kept_m=0 if m is None else m.numel(),
    )


def encode_param_delta(
    w: torch.Tensor,
    ref: torch.Tensor | None,
    m: torch.Tensor | None,
    v: torch.Tensor | None,
    s: ExCPSettings,
    generator: torch.Generator,
    v_bias: float = 1.0,
) -> ParamCode:
    """Code one parameter against its reconstructed reference with weight-momentum joint shrinking.

    Args:
        w: current weights (any float dtype, any shape including 0-d and empty).
        ref: the reconstruction a reader holds for the previous checkpoint (same shape and dtype),
            or None for a parameter that is new to the chain (then the weights are stored losslessly
            and the momentum streams are shrunk with an all-ones weight mask).
        m: first moment (``exp_avg`` or SGD ``momentum_buffer``) or None.
        v: second moment (``exp_avg_sq``) or None.
        s: codec settings (``alpha`` or ``target_bits_per_param`` sets the weight mask).
        generator: RNG for the k-means samples.
        v_bias: Adam's ``1 - beta2**step`` for ``v`` (1.0: unknown or not Adam), see ``v_bias_correction``.
    """
    w = w.detach().cpu().contiguous()
    n = w.numel()
    m = None if m is None else m.detach().cpu().contiguous().reshape(-1)
    v = None if v is None else v.detach().cpu().contiguous().reshape(-1)
    if m is None and v is not None:
        raise ValueError("a second moment without a first moment cannot be coded jointly")
    candidates = momentum_candidates(m, s)  # the same in every round of a rate search: found once
    if ref is None:
        codes = _quantize_streams(None, torch.ones(n, dtype=torch.bool), m, v, candidates, s, generator)
        w_blob, recon, w_mode = encode_lossless(w, level=s.lossless_level), w.clone(), "lossless"
    else:
        base, dw = weight_residual(w, ref, s)
        saliency = _saliency(dw, v, s)
        if s.target_bits_per_param is not None:
            codes = _fit_budget(dw, saliency, m, v, candidates, s, generator)
        else:
            factor = _weight_factor(v, s, v_bias)
            wmask = saliency > saliency.median() * factor if n else torch.zeros(0, dtype=torch.bool)
            codes = _quantize_streams(dw, wmask, m, v, candidates, s, generator)
        assert codes.cb_w is not None and codes.idx_w is not None
        w_blob = _blobs(codes, s)["w"]
        # the decoder's exact expression, so both sides hold the same bits (closed loop)
        codebook = codes.cb_w.to(torch.float32).numpy()
        recon = reconstruct(base if s.residual else None, codebook, codes.idx_w, w.dtype, w.shape)
        w_mode = "delta" if s.residual else "absolute"
    blobs = _blobs(codes, s)
    m_blob, v_blob = blobs.get("m"), blobs.get("v")
    v_floor = _pruned_mean(v, codes.kept_v) if v is not None and s.v_floor else 0.0
    return ParamCode(w_blob, m_blob, v_blob, w_mode, recon, n, codes.kept_w, codes.kept_m, v_floor)


@dataclass
class _Codes:
    """Codebooks and code streams of one tensor before they are entropy-coded."""

    cb_w: torch.Tensor | None
    idx_w: np.ndarray | None  # n codes, 0 = pruned
    cb_m: torch.Tensor | None
    idx_m: np.ndarray  # one code per weight survivor
    cb_v: torch.Tensor | None
    idx_v: np.ndarray  # one code per m survivor
    kept_v: torch.Tensor  # where v is stored (m's survivors), over the whole tensor
    kept_w: int
    kept_m: int
    blobs: dict[str, bytes] | None = None  # the coded streams ("w", "m", "v"), once made


def _blobs(codes: _Codes, s: ExCPSettings) -> dict[str, bytes]:
    """The entropy-coded streams of ``codes`` (made once; the rate search makes them per round)."""
    if codes.blobs is None:
        codes.blobs = {key: _stream_blob(cb, idx, s) for key, cb, idx in _streams(codes)}
    return codes.blobs


def _streams(codes: _Codes) -> list[tuple[str, torch.Tensor, np.ndarray]]:
    """(key, codebook, codes) of the W, m, v streams present, in that order (W absent when lossless)."""
    streams = (("w", codes.cb_w, codes.idx_w), ("m", codes.cb_m, codes.idx_m), ("v", codes.cb_v, codes.idx_v))
    return [(key, cb, idx) for key, cb, idx in streams if cb is not None and idx is not None]


def weight_residual(w: torch.Tensor, ref: torch.Tensor, s: ExCPSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """What a delta codes a weight against (its reference, or zeros without ``residual``) and the
    difference, both 1-D in :func:`compute_dtype`: the rate rules and the budget split rank the same values."""
    cd = compute_dtype(w.dtype)
    flat = w.detach().cpu().reshape(-1).to(cd)
    base = ref.detach().cpu().reshape(-1).to(cd) if s.residual else torch.zeros(flat.numel(), dtype=cd)
    return base, flat - base


def tensor_generator(s: ExCPSettings, position: int) -> torch.Generator:
    """The RNG of one tensor's samples (k-means, rate ranking): seeded by ``s.seed`` and the tensor's
    position in the checkpoint, so an encode is reproducible whatever order threads take tensors in."""
    return torch.Generator().manual_seed(s.seed * 1_000_003 + position)


def momentum_candidates(m: torch.Tensor | None, s: ExCPSettings) -> torch.Tensor | None:
    """Where the momentum criterion alone keeps m (all True without it); None without m."""
    if m is None:
        return None
    if not s.momentum_criterion or m.numel() == 0:
        return torch.ones(m.numel(), dtype=torch.bool)
    return m.abs() > s.beta * float(m.abs().mean(dtype=torch.float64))


def _quantize_streams(
    dw: torch.Tensor | None,
    wmask: torch.Tensor,
    m: torch.Tensor | None,
    v: torch.Tensor | None,
    candidates: torch.Tensor | None,
    s: ExCPSettings,
    gen: torch.Generator,
) -> _Codes:
    """Quantize the weight residual (None: stored losslessly) at ``wmask`` and the nested moments.

    ``candidates`` is :func:`momentum_candidates` of ``m``. The survivors are gathered by position
    (``nonzero`` once, then index lookups) rather than by boolean masks: a mask scans the whole tensor
    at every use, and the rate search calls this a few times per tensor (SmolLM2's embedding, 3% kept:
    ~60 against ~215 ms a call).
    """
    n = wmask.numel()
    kept_w_at = torch.nonzero(wmask).squeeze(1)  # ascending, as a boolean mask selects
    cb_w = idx_w = None
    if dw is not None:
        cb_w, codes_w = _quantize(dw[kept_w_at], s.bits_w, s, gen, log_domain=False)
        scattered = torch.zeros(n, dtype=torch.uint8)
        scattered[kept_w_at] = torch.from_numpy(codes_w)
        idx_w = scattered.numpy()
    cb_m = cb_v = None
    idx_m = idx_v = np.zeros(0, dtype=np.uint8)
    kept_v = torch.zeros(n, dtype=torch.bool)
    kept_m = 0
    if m is not None and candidates is not None:
        mkeep = candidates[kept_w_at]
        kept_m_at = kept_w_at[mkeep]
        cb_m, codes_m = _quantize(m[kept_m_at].float(), s.bits_m, s, gen, log_domain=False)
        idx_m = torch.zeros(mkeep.numel(), dtype=torch.uint8).masked_scatter_(mkeep, torch.from_numpy(codes_m)).numpy()
        kept_m = kept_m_at.numel()
        kept_v[kept_m_at] = True
        if v is not None:
            cb_v, idx_v = _quantize(v[kept_m_at].float(), s.bits_v, s, gen, log_domain=s.v_log_domain)
    return _Codes(cb_w, idx_w, cb_m, idx_m, cb_v, idx_v, kept_v, kept_w_at.numel(), kept_m)


def _saliency(dw: torch.Tensor, v: torch.Tensor | None, s: ExCPSettings) -> torch.Tensor:
    """What the weight mask ranks: ``|dW|``, or ``|dW| * sqrt(v / mean(v))`` (see ``weight_saliency``).

    The ratio to the tensor's mean makes it scale-free (Adam's bias correction cancels) and equal to
    ``|dW|`` where v is flat, so ``alpha``'s median rule keeps about the paper's share of entries.
    """
    magnitude = dw.abs()
    if s.weight_saliency == "magnitude" or v is None or v.numel() != dw.numel() or dw.numel() == 0:
        return magnitude
    v64 = v.to(torch.float64, copy=True)  # a copy even of float64 v: it is scaled in place below
    mean_v = float(v64.mean())
    if not mean_v > 0 or not math.isfinite(mean_v):
        return magnitude
    # in place: the same values as ``magnitude * (v64 / mean_v).clamp_min(0).sqrt()`` without four
    # fresh tensor-sized buffers (allocating them cost more than the arithmetic)
    return magnitude.mul_(v64.div_(mean_v).clamp_min_(0).sqrt_().to(magnitude.dtype))


def _fit_budget(
    dw: torch.Tensor,
    saliency: torch.Tensor,
    m: torch.Tensor | None,
    v: torch.Tensor | None,
    candidates: torch.Tensor | None,
    s: ExCPSettings,
    gen: torch.Generator,
) -> _Codes:
    """Codes of ``dw`` whose coded size meets ``target_bits_per_param * numel`` (see :func:`fit_budget`)."""
    assert s.target_bits_per_param is not None

    def quantize(wmask: torch.Tensor) -> tuple[_Codes, int]:
        codes = _quantize_streams(dw, wmask, m, v, candidates, s, gen)
        return codes, 8 * sum(map(len, _blobs(codes, s).values()))

    bits = (s.bits_w, s.bits_m, s.bits_v)
    budget = s.target_bits_per_param * dw.numel()
    return fit_budget(saliency, candidates, v is not None, budget, bits, quantize, gen)


def _pruned_mean(v: torch.Tensor, kept: torch.Tensor) -> float:
    """Mean of the second moment over the entries the masks prune (0.0 when none or not finite).

    Pruned v entries decode to this per-tensor value instead of zero: with v = 0 the first Adam
    steps after a resume divide a fresh (1 - beta1) * g by sqrt((1 - beta2) * g^2), up to ~3x the
    step the run was taking (beta2 = 0.999); the mean keeps the step sizes close to the run's.
    """
    total, count = 0.0, 0
    # in slices: one boolean selection of a whole large tensor allocates an index and a copy of
    # nearly all of it (SmolLM2's embedding: ~350 against ~180 ms in slices, the same mean in float32)
    for start in range(0, v.numel(), _PRUNED_SLICE):
        pruned = v[start : start + _PRUNED_SLICE][~kept[start : start + _PRUNED_SLICE]]
        total += float(pruned.sum(dtype=torch.float64))
        count += pruned.numel()
    if count == 0:
        return 0.0
    value = total / count
    return value if math.isfinite(value) and value >= 0 else 0.0


_PRUNED_SLICE = 1 << 20
"""Entries of v summed per slice by :func:`_pruned_mean`."""
