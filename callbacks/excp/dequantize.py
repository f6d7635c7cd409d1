"""Rebuild one tensor's W, m and v from its code streams (the reader's hot path; no Lightning).

Decoding is split in two steps so that the reader can run the second on several threads:

1. :func:`read_param` checks a tensor's entry and decodes its rANS streams (and any stream whose
   code count they need). constriction holds the GIL while it decodes, so the reader runs this step
   for all tensors of a file on one thread: a thread waiting for the GIL behind it would stall.
2. :func:`rebuild` decodes the zstd layouts (zstd releases the GIL) and turns codes into tensors
   with numpy ops that release it too, block by block:
   a code becomes its value by one gather from a small table, a nested mask is expanded through the
   block's survivor positions, and every temporary stays cache-sized. Outputs are allocated by torch
   (small pages: on the machines measured, huge-page faults of numpy's large arrays cost twice as much).

:func:`reconstruct` is also the encoder's closed-loop expression, so both sides hold the same bits.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from callbacks.excp.quantize import decode_indices, decode_lossless, holds_gil

__all__ = ["CODEBOOK_HEAD", "ParamStreams", "compute_dtype", "decode_param", "read_param", "rebuild", "reconstruct"]

CODEBOOK_HEAD = struct.Struct("<I")
"""A quantized stream starts with its codebook size, then that many fp32 centroids, then its codes."""
_BLOCK = 1 << 16
"""Elements per block: the block's positions (int64) and values stay in the L2 cache."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype residuals are added in: float64 for float64 tensors, float32 for every other dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def read_stream(blob: bytes | memoryview, expected: int) -> tuple[np.ndarray, np.ndarray]:
    """Codebook (fp32) and codes (uint8) of one stream that must hold ``expected`` codes (checked before allocating)."""
    if len(blob) < CODEBOOK_HEAD.size:
        raise ValueError("quantized stream is shorter than its header")
    (k,) = CODEBOOK_HEAD.unpack_from(blob, 0)
    off = CODEBOOK_HEAD.size
    if k > 255 or off + 4 * k > len(blob):
        raise ValueError(f"quantized stream claims a codebook of {k} entries")
    cb = np.frombuffer(blob, dtype="<f4", count=k, offset=off).astype(np.float32)
    codes = decode_indices(memoryview(blob)[off + 4 * k :], expected)
    if codes.size and int(codes.max()) > k:
        raise ValueError("quantized stream uses a code outside its codebook")
    return cb, codes


def _table(first: float | np.floating, codebook: np.ndarray, dtype: type[np.floating] = np.float32) -> np.ndarray:
    """The value of every code: ``first`` for code 0, then the codebook, in ``dtype``."""
    table = np.empty(codebook.size + 1, dtype=dtype)
    table[0] = first
    table[1:] = codebook
    return table


def reconstruct(
    base: torch.Tensor | None, codebook: np.ndarray, codes: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    """``base + [0, *codebook][codes]`` added in :func:`compute_dtype`, then cast to ``dtype``.

    Args:
        base: the reference (any float dtype, as many elements as ``codes``), or None for an
            absolute (no-residual) stream, which is added to +0.0 as the residual one is to its base.
        codebook: the stream's fp32 centroids (code 0 means "pruned", a zero residual).
        codes: one uint8 code per element.
    """
    cd = compute_dtype(dtype)
    table = _table(0.0, codebook, np.float64 if cd == torch.float64 else np.float32)
    if base is None:
        table += 0.0  # 0.0 + x per table entry: what a zero base gives per element (-0.0 becomes +0.0)
    out = torch.empty(codes.size, dtype=cd)
    values = out.numpy()
    reference = None if base is None else base.detach().cpu().reshape(-1).to(cd).numpy()
    if reference is not None and reference.size != codes.size:
        raise ValueError("a reference and its residual codes differ in size")
    for start in range(0, codes.size, _BLOCK):
        block = slice(start, start + _BLOCK)
        np.take(table, codes[block], out=values[block], mode="clip")  # codes <= codebook size (checked)
        if reference is not None:
            np.add(reference[block], values[block], out=values[block])
    return out.to(dtype).reshape(shape)


@dataclass
class ParamStreams:
    """One tensor's decoded code streams (:func:`read_param`), ready for :func:`rebuild`."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    base: torch.Tensor | None  # what a "delta" W stream is added to
    lossless_w: bytes | None  # a losslessly stored W (its record; decoded by rebuild)
    # quantized streams, as records until decoded, then (codebook, codes): W's has a code per element,
    # m's one per W survivor (per element when W is lossless), v's one per m survivor
    w: bytes | tuple[np.ndarray, np.ndarray] | None
    m: bytes | tuple[np.ndarray, np.ndarray] | None
    v: bytes | tuple[np.ndarray, np.ndarray] | None
    lossless_moments: tuple[bytes, bytes | None] | None  # a keyframe's m and v records
    m_dtype: torch.dtype | None
    v_dtype: torch.dtype | None
    v_floor: float


def read_param(
    *,
    kind: str,
    w_mode: str,
    w_blob: bytes,
    m_blob: bytes | None,
    v_blob: bytes | None,
    ref: torch.Tensor | None,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    m_dtype: torch.dtype | None,
    v_dtype: torch.dtype | None,
    weights_only: bool = False,
    v_floor: float = 0.0,
) -> ParamStreams:
    """Entropy-decode and check one tensor's code streams (the first step of :func:`decode_param`).

    Args:
        kind: ``"keyframe"`` or ``"delta"`` (the file kind).
        w_mode: the entry's weight mode (``"delta"``, ``"absolute"`` or ``"lossless"``).
        ref: the reconstructed previous weights (required for ``w_mode == "delta"``).
        weights_only: skip the moments (chain replay only needs the weights of earlier files).
        v_floor: the value of pruned second-moment entries (0.0 in files written before it existed).
    """
    n = math.prod(shape)
    streams = ParamStreams(shape, dtype, None, None, None, None, None, None, m_dtype, v_dtype, v_floor)
    if w_mode == "lossless":
        streams.lossless_w = w_blob
    else:
        if w_mode not in ("delta", "absolute"):
            raise ValueError(f"unknown weight mode {w_mode!r}")
        if w_mode == "delta" and (ref is None or ref.numel() != n):
            raise ValueError("delta-coded weights need their reference, of the same size")
        streams.base = ref if w_mode == "delta" else None
        streams.w = w_blob
    if not (weights_only or m_blob is None):
        if kind == "keyframe":
            streams.lossless_moments = (m_blob, v_blob)
        else:
            streams.m, streams.v = m_blob, v_blob
    # only rANS streams (and the ones their counts depend on) now: zstd layouts decode in rebuild(),
    # which the reader runs on several threads
    _decode(streams, max((i for i, s in enumerate(_streams(streams)) if _holds_gil(s)), default=-1))
    return streams


def _streams(streams: ParamStreams) -> tuple[bytes | tuple[np.ndarray, np.ndarray] | None, ...]:
    return streams.w, streams.m, streams.v


def _holds_gil(stream: bytes | tuple[np.ndarray, np.ndarray] | None) -> bool:
    """Whether a still-coded stream is rANS-coded (malformed ones count too: they fail at once)."""
    if not isinstance(stream, bytes | memoryview):
        return False
    if len(stream) < CODEBOOK_HEAD.size:
        return True
    (k,) = CODEBOOK_HEAD.unpack_from(stream, 0)
    return holds_gil(memoryview(stream)[CODEBOOK_HEAD.size + 4 * min(k, len(stream)) :])


def _decode(streams: ParamStreams, last: int) -> None:
    """Decode the still-coded W, m and v streams (in that order) up to index ``last`` (2: all of them).

    Each holds one code per nonzero code of the stream before it (per element for W and after a
    lossless W), a count checked before anything is allocated.
    """
    kept = math.prod(streams.shape)
    for index, key in enumerate(("w", "m", "v")):
        stream = getattr(streams, key)
        if stream is None:
            continue
        if not isinstance(stream, tuple):
            if index > last:
                return
            stream = read_stream(stream, kept)
            setattr(streams, key, stream)
        kept = int(np.count_nonzero(stream[1]))


def _positions(codes: np.ndarray) -> np.ndarray:
    """Indices of the nonzero codes (numpy finds them ~6x faster in a bool array than in uint8)."""
    return (codes != 0).nonzero()[0]


def _moments(streams: ParamStreams, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """m and v (fp32, flat) from nested code streams: m has one code per W survivor, v one per m survivor."""
    assert isinstance(streams.m, tuple) and not isinstance(streams.w, bytes) and not isinstance(streams.v, bytes)
    m_table = _table(0.0, streams.m[0])
    v_table = None if streams.v is None else _table(streams.v_floor, streams.v[0])  # pruned v: the floor
    m_out = torch.empty(n, dtype=torch.float32)
    v_out = None if v_table is None else torch.empty(n, dtype=torch.float32)
    m_values = m_out.numpy()
    v_values = None if v_out is None else v_out.numpy()
    w_codes = None if streams.w is None else streams.w[1]
    m_codes = streams.m[1]
    v_codes = None if streams.v is None else streams.v[1]
    taken_m = taken_v = 0
    for start in range(0, n, _BLOCK):
        block = slice(start, min(n, start + _BLOCK))
        survivors = None if w_codes is None else _positions(w_codes[block])  # None: all (lossless W)
        count = block.stop - block.start if survivors is None else survivors.size
        codes = m_codes[taken_m : taken_m + count]
        taken_m += count
        if survivors is None:
            np.take(m_table, codes, out=m_values[block], mode="clip")
        else:
            m_values[block] = 0.0
            m_values[block][survivors] = np.take(m_table, codes, mode="clip")
        if v_values is not None and v_table is not None and v_codes is not None:
            inner = _positions(codes)
            v_values[block] = v_table[0]
            where = inner if survivors is None else survivors[inner]
            v_values[block][where] = np.take(v_table, v_codes[taken_v : taken_v + inner.size], mode="clip")
            taken_v += inner.size
    return m_out, v_out


def rebuild(streams: ParamStreams) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(W, m, v)`` of one tensor from its decoded streams (moments None when absent or not asked)."""
    shape, n = streams.shape, math.prod(streams.shape)
    _decode(streams, 2)
    if streams.w is None:
        assert streams.lossless_w is not None
        w = decode_lossless(streams.lossless_w, streams.dtype, shape)
    else:
        assert isinstance(streams.w, tuple)
        w = reconstruct(streams.base, *streams.w, streams.dtype, shape)
    if streams.lossless_moments is not None:
        m_blob, v_blob = streams.lossless_moments
        m = decode_lossless(m_blob, streams.m_dtype, shape)
        return w, m, None if v_blob is None else decode_lossless(v_blob, streams.v_dtype, shape)
    if streams.m is None:
        return w, None, None
    m, v = _moments(streams, n)
    return w, m.to(streams.m_dtype).reshape(shape), None if v is None else v.to(streams.v_dtype).reshape(shape)


def decode_param(**arguments: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Inverse of the two encoders: ``(W, m, v)`` of one tensor (moments None when absent or not asked).

    Takes :func:`read_param`'s keyword arguments; the reader calls the two steps itself, to run the
    second on several threads.
    """
    return rebuild(read_param(**arguments))
