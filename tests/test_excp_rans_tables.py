"""rANS frequency tables stay valid for streams of many near-equal symbols (8-bit codebooks, short streams)."""

from __future__ import annotations

import numpy as np
import pytest

from callbacks.excp.entropy import PRECISION, decode_rans, encode_rans, quantized_frequencies
from callbacks.excp.quantize import decode_indices, encode_indices


@pytest.mark.parametrize("distinct", [242, 254, 255])
def test_many_symbols_seen_once_give_a_valid_table_and_round_trip(distinct):
    # each symbol rounds up to 68 of 2**14 (242 x 68 = 16,456): the largest alone cannot absorb the excess
    symbols = np.arange(1, distinct + 1, dtype=np.uint8)
    freq = quantized_frequencies(np.bincount(symbols))
    assert freq.sum() == 1 << PRECISION and freq[1:].min() >= 1 and freq[0] == 0
    blob = encode_rans(symbols)
    assert blob is not None and np.array_equal(decode_rans(blob, symbols.size), symbols)
    assert np.array_equal(decode_indices(encode_indices(symbols), symbols.size), symbols)


def test_skewed_tables_are_unchanged():
    counts = np.array([900, 50, 30, 15, 5])
    freq = quantized_frequencies(counts)
    expected = np.rint(counts * (1 << PRECISION) / counts.sum()).astype(np.int64)
    expected[0] += (1 << PRECISION) - expected.sum()
    assert np.array_equal(freq, expected)
