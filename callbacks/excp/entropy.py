"""rANS coding of ExCP code streams with a per-stream categorical model (constriction; no Lightning).

A code stream (k-means indices, 0 meaning "pruned") is i.i.d. enough that its order-0 entropy is
the bound worth reaching: zstd's layouts land within ~1% of it on dense streams but 10-25% above it
on sparse ones (a 90%-pruned weight mask, the momentum streams). An asymmetric-numeral-systems
coder with the stream's own symbol frequencies reaches it within a few bytes plus the table.

Blob layout (little endian)::

    u8 alphabet_size - 1 | alphabet_size LEB128 frequencies summing to 2**PRECISION
    | u32 words of constriction's AnsCoder

The frequencies are the model: the decoder rebuilds the very same float array the encoder gave
constriction (``freq / 2**PRECISION``), so both sides quantize it identically and decoding is exact.
constriction's model quantization is part of the format, which is why the dependency is pinned.

Every field is checked before it is used: the table must sum exactly, give each symbol < 2**PRECISION,
and the payload must be long enough to hold ``count`` symbols at the model's most probable symbol
(so a few bytes cannot claim millions of symbols beyond what the caller already bounds), and the
coder must be empty once ``count`` symbols are decoded.
"""

from __future__ import annotations

import math

import constriction
import numpy as np
import torch

__all__ = ["PRECISION", "decode_rans", "encode_rans", "entropy_bits", "quantized_frequencies", "symbol_counts"]

PRECISION = 14
"""Frequencies sum to ``2**PRECISION``: the KL cost of this quantization is far below 0.1% of a stream,
and every frequency fits two LEB128 bytes."""
_TOTAL = 1 << PRECISION
_CODER_TOTAL = 1 << 24
"""constriction's stack coder quantizes model probabilities to 24 bits."""
_RARE = 64
"""Table frequencies (of 2**PRECISION) below this count as rare for the payload-size bound."""
_STATE_BITS = 64
"""An ANS coder's state absorbs up to this many bits, so a stream may be that much shorter than its information."""
_DECODE_SLICE = 1 << 16
"""Symbols decoded per call (about a millisecond): decoding a stream slice by slice gives the same symbols."""


def entropy_bits(counts: np.ndarray) -> float:
    """Order-0 (empirical) entropy in bits of a stream with these symbol counts: ``sum(-c log2(c/n))``."""
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    if c.size <= 1:
        return 0.0
    return float(-(c * np.log2(c / c.sum())).sum())


def quantized_frequencies(counts: np.ndarray) -> np.ndarray:
    """Integer frequencies proportional to ``counts`` that sum to ``2**PRECISION``, >= 1 where count > 0."""
    c = np.asarray(counts, dtype=np.float64)
    freq = np.where(c > 0, np.maximum(1, np.rint(c * _TOTAL / c.sum())), 0).astype(np.int64)
    top = int(np.argmax(freq))
    excess = int(freq.sum()) - _TOTAL
    if freq[top] - excess >= 1:
        freq[top] -= excess  # the largest absorbs the rounding
        return freq
    # many near-equal symbols all rounded up (e.g. 242 symbols seen once: 68 each, 72 too many):
    # the largest give one unit each, never going below 1, until the table sums exactly
    while excess > 0:
        order = np.argsort(-freq, kind="stable")[: min(excess, int(np.count_nonzero(freq > 1)))]
        freq[order] -= 1
        excess -= order.size
    return freq


def _model(freq: np.ndarray) -> constriction.stream.model.Categorical:
    return constriction.stream.model.Categorical(freq.astype(np.float64) / _TOTAL, perfect=False)


def _varints(values: np.ndarray) -> bytes:
    out = bytearray()
    for value in values.tolist():
        while value >= 0x80:
            out.append((value & 0x7F) | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out)


def symbol_counts(symbols: np.ndarray) -> np.ndarray:
    """How often each value 0..max occurs in a uint8 stream (int64; ``[0]`` for an empty one).

    ``torch.bincount`` counts uint8 directly, about twice as fast as ``np.bincount``, which first
    widens the stream to int64 (28M codes: ~45 against ~95 ms).
    """
    symbols = np.ascontiguousarray(symbols, dtype=np.uint8).reshape(-1)
    if symbols.size == 0:
        return np.zeros(1, dtype=np.int64)
    return torch.bincount(torch.from_numpy(symbols)).numpy()


def encode_rans(symbols: np.ndarray, counts: np.ndarray | None = None) -> bytes | None:
    """rANS-code a uint8 symbol stream with its own frequencies; None when it has < 2 distinct symbols.

    Args:
        symbols: the stream.
        counts: its :func:`symbol_counts`, when the caller has them already (one pass fewer).
    """
    symbols = np.ascontiguousarray(symbols, dtype=np.uint8).reshape(-1)
    if counts is None:
        counts = symbol_counts(symbols)
    if np.count_nonzero(counts) < 2:
        return None  # constant streams have a cheaper layout
    freq = quantized_frequencies(counts)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(symbols.astype(np.int32), _model(freq))
    words = coder.get_compressed().astype("<u4")
    return bytes([freq.size - 1]) + _varints(freq) + words.tobytes()


def _read_table(view: memoryview) -> tuple[np.ndarray, int]:
    """Frequencies and the payload offset; every varint bounded to PRECISION bits."""
    if len(view) < 1:
        raise ValueError("rANS stream has no frequency table")
    size = view[0] + 1
    freq = np.zeros(size, dtype=np.int64)
    pos = 1
    for i in range(size):
        value = shift = 0
        while True:
            if pos >= len(view):
                raise ValueError("rANS frequency table is truncated")
            byte = view[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
            if shift > PRECISION:
                raise ValueError("rANS frequency table has an oversized entry")
        freq[i] = value
    if int(freq.sum()) != _TOTAL or int(freq.max()) >= _TOTAL:
        raise ValueError("rANS frequency table does not describe a distribution over >= 2 symbols")
    return freq, pos


def _coder_max_probability(freq: np.ndarray) -> float:
    """An upper bound of the most probable symbol's probability in the model constriction really codes with.

    constriction requantizes the table to 2**24 and may shrink rare symbols (table frequency below
    ``_RARE``) to its minimum, handing their mass to the others: measured, a 15-in-884,736 stream took
    256 bits where the 14-bit table implies 1,169. So the bound gives the top symbol that mass too.
    """
    probabilities = freq / _TOTAL
    rare = float(probabilities[(freq > 0) & (freq < _RARE)].sum())
    return min(1 - (len(freq) - 1) / _CODER_TOTAL, float(probabilities.max()) + rare)


def decode_rans(payload: bytes | memoryview, count: int) -> np.ndarray:
    """Inverse of :func:`encode_rans`: ``count`` uint8 symbols (the caller has bounded ``count``)."""
    view = memoryview(payload)
    freq, pos = _read_table(view)
    body = view[pos:]
    if len(body) % 4:
        raise ValueError("rANS payload is not a whole number of 32-bit words")
    min_bits = count * -math.log2(_coder_max_probability(freq))
    if 8 * len(body) + _STATE_BITS < 0.99 * min_bits:
        raise ValueError(f"a {len(body)}-byte rANS payload cannot hold {count} symbols of its model")
    words = np.frombuffer(body, dtype="<u4").astype(np.uint32)
    symbols = np.empty(count, dtype=np.uint8)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        model = _model(freq)
        # in slices: constriction holds the GIL while it decodes, so one call per stream would stall
        # the program's other threads for a whole large tensor
        for start in range(0, count, _DECODE_SLICE):
            stop = min(count, start + _DECODE_SLICE)
            symbols[start:stop] = coder.decode(model, stop - start)
        empty = coder.is_empty()
    except Exception as error:  # constriction reports malformed data as ValueError; keep it one type
        raise ValueError(f"rANS payload is malformed ({error})") from None
    if not empty:
        raise ValueError("rANS payload holds more data than its symbol count")
    return symbols
