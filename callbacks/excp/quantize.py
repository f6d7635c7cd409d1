"""Quantizers and entropy coders for ExCP streams (pure torch/numpy + zstandard).

Three building blocks, each with one job:

* :func:`kmeans_1d` / :func:`uniform_levels` fit the codebook of one stream of one tensor. 1-D k-means
  is solved on a *sorted* sample, so one Lloyd iteration is a handful of ``searchsorted`` calls on
  prefix sums (O(k log n)) instead of an n x k distance matrix: k-means never dominates encode time.
* :func:`encode_indices` / :func:`decode_indices` entropy-code a uint8 index stream: zstd on
  bit-packed codes when dense, an "occupancy bitmap + packed nonzero codes" layout when sparse
  (measured: the split layout wins below ~50-60% density, packing above), or rANS with the stream's
  own frequencies (:mod:`callbacks.excp.entropy`), whichever is smallest; a one-byte tag says which.
* :func:`encode_lossless` / :func:`decode_lossless` store a float tensor exactly: its bytes are
  regrouped by significance (all byte-0s, then all byte-1s, ...) before zstd, as ZipNN does, so the
  highly repetitive exponent bytes compress well and the noisy mantissa bytes do not spoil them.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch
import zstandard

from callbacks.excp.entropy import decode_rans, encode_rans, symbol_counts

__all__ = [
    "holds_gil",
    "assign",
    "decode_indices",
    "decode_lossless",
    "encode_indices",
    "encode_lossless",
    "kmeans_1d",
    "uniform_levels",
]


def kmeans_1d(
    values: torch.Tensor,
    k: int,
    *,
    iters: int = 25,
    sample: int = 65536,
    generator: torch.Generator | None = None,
    log_domain: bool = False,
) -> torch.Tensor:
    """Fit at most ``k`` sorted fp32 centroids to a 1-D set of values with Lloyd's algorithm.

    Args:
        values: 1-D floating tensor (the surviving, non-pruned entries of one stream).
        k: maximum number of centroids.
        iters: Lloyd iterations (it stops earlier once centroids no longer move).
        sample: fit on at most this many values drawn uniformly at random; the final assignment of
            every value is done by :func:`assign` on the full tensor.
        generator: RNG for the sample (seeded by the caller so encodes are reproducible).
        log_domain: cluster ``log(values)`` (for strictly positive streams such as Adam's ``v``, whose
            entries span many orders of magnitude); centroids are returned in the value domain.

    Returns:
        Sorted, unique fp32 centroids (fewer than ``k`` when there are fewer distinct values).
    """
    x = values.detach().reshape(-1)
    n = x.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.float32)
    if n > sample:
        x = x[torch.randint(0, n, (sample,), generator=generator)]
    x = x.to(torch.float64)
    if log_domain:
        x = torch.log(x.clamp_min(torch.finfo(torch.float32).tiny))
    # Lloyd on the sorted sample, in numpy: per-op overhead matters for the many small tensors
    s = np.sort(x.numpy())
    uniq = np.unique(s)
    if uniq.size <= k:
        c = uniq
    else:
        m = s.size
        prefix = np.concatenate([[0.0], np.cumsum(s)])
        q = np.minimum(((np.arange(k) + 0.5) / k * m).astype(np.int64), m - 1)
        c = np.unique(s[q])
        for _ in range(iters):
            bounds = np.searchsorted(s, (c[1:] + c[:-1]) / 2, side="right")
            lo = np.concatenate([[0], bounds])
            hi = np.concatenate([bounds, [m]])
            cnt = hi - lo
            keep = cnt > 0
            new_c = (prefix[hi[keep]] - prefix[lo[keep]]) / cnt[keep]
            # np.allclose(new_c, c, rtol=1e-6, atol=0) for finite centroids, without its overhead
            # (tens of microseconds, thousands of calls per checkpoint)
            if new_c.size == c.size and bool((np.abs(new_c - c) <= 1e-6 * np.abs(c)).all()):
                c = new_c
                break
            # means of consecutive clusters increase, so np.unique (a sort) is needed only when
            # rounding ties two of them
            c = new_c if bool((new_c[1:] > new_c[:-1]).all()) else np.unique(new_c)
    c = torch.from_numpy(np.ascontiguousarray(c))
    if log_domain:
        c = torch.exp(c)
    return torch.unique(c.to(torch.float32))


def uniform_levels(values: torch.Tensor, k: int, *, log_domain: bool = False) -> torch.Tensor:
    """Return at most ``k`` evenly spaced fp32 levels spanning ``values``.

    With ``log_domain`` the levels are evenly spaced in ``log(values)`` (strictly positive streams
    such as Adam's ``v``): a linear grid over a stream spanning decades decodes nearly every entry
    to its lowest level, far below the entry's value, and Adam's steps after a resume explode.
    """
    x = values.detach().reshape(-1).float()
    if x.numel() == 0:
        return torch.zeros(0, dtype=torch.float32)
    lo, hi = x.min(), x.max()
    if x.numel() <= k or lo == hi:
        return torch.unique(x)
    if lo < 0 < hi and not log_domain:
        # a signed stream (weight residuals, m): a grid centred on zero, as entropy-coded scalar
        # quantizers use; a min..max grid puts a level at (min + max) / 2, a bias that every small
        # entry of an asymmetric stream takes (with 3 levels, most of m: resumed Adam steps diverge)
        half = (k - 1) // 2
        if half == 0:  # one level: the mean, as one k-means centroid
            return x.mean(dtype=torch.float64).float().reshape(1)
        step = max(-float(lo), float(hi)) / half
        return torch.unique((torch.arange(-half, half + 1, dtype=torch.float64) * step).float())
    if log_domain:
        tiny = torch.finfo(torch.float32).tiny
        grid = torch.linspace(math.log(max(float(lo), tiny)), math.log(max(float(hi), tiny)), k, dtype=torch.float64)
        return torch.unique(torch.exp(grid).float())
    return torch.unique(torch.linspace(float(lo), float(hi), k, dtype=torch.float32))


def assign(values: torch.Tensor, codebook: torch.Tensor, *, log_domain: bool = False) -> torch.Tensor:
    """Index (0-based, int64) of the nearest centroid of a sorted ``codebook`` for every value.

    Nearest is measured in the domain the codebook was fitted in (log for ``log_domain``).
    """
    x = values.detach().reshape(-1).float()
    if codebook.numel() <= 1:
        return torch.zeros(x.numel(), dtype=torch.long)
    if log_domain:
        # nearest in log space = bucketize on geometric midpoints (log is monotonic: no log of x needed)
        lc = torch.log(codebook.double().clamp_min(torch.finfo(torch.float32).tiny))
        return torch.bucketize(x, torch.exp((lc[1:] + lc[:-1]) / 2).float())
    return torch.bucketize(x, (codebook[1:] + codebook[:-1]) / 2)


# ----------------------------------------------------------------------------------------------
# Index streams
# ----------------------------------------------------------------------------------------------

_MODE_BYTES, _MODE_PACKED, _MODE_SPLIT, _MODE_CONST, _MODE_RANS = 0, 1, 2, 3, 4
CODERS = ("auto", "zstd")
"""``auto``: the smallest of the zstd layouts and rANS (file format 2); ``zstd``: the zstd layouts only."""
_IDX_HEAD = struct.Struct("<BBQ")  # mode, bits, count


def _pack(idx: np.ndarray, bits: int) -> bytes:
    """Pack uint8 codes < 2**bits into a dense bit string (element-major, MSB first)."""
    if bits == 8:
        return idx.tobytes()
    if bits == 4:
        padded = np.concatenate([idx, np.zeros(idx.size % 2, np.uint8)])
        return ((padded[0::2] << 4) | padded[1::2]).astype(np.uint8).tobytes()
    planes = np.unpackbits(idx[:, None], axis=1)[:, 8 - bits :]
    return np.packbits(planes.reshape(-1)).tobytes()


def _unpack(data: bytes, bits: int, count: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return raw[:count].copy()
    if bits == 4:
        out = np.empty(raw.size * 2, np.uint8)
        out[0::2] = raw >> 4
        out[1::2] = raw & 0x0F
        return out[:count]
    planes = np.unpackbits(raw)[: count * bits].reshape(count, bits)
    return np.packbits(np.concatenate([np.zeros((count, 8 - bits), np.uint8), planes], axis=1), axis=1)[:, 0]


def _bits_for(max_code: int) -> int:
    return max(1, int(max_code).bit_length())


def encode_indices(idx: np.ndarray, *, level: int = 3, coder: str = "auto") -> bytes:
    """Entropy-code a uint8 code stream where 0 means "pruned"; returns a self-describing blob.

    The smallest layout is kept: bit-packed codes or an occupancy bitmap followed by the bit-packed
    nonzero codes (both zstd'd; the split one is best when most codes are 0), and with
    ``coder="auto"`` rANS over the codes with the stream's own frequencies, which reaches the
    order-0 entropy where zstd's byte-oriented coding does not (sparse masks, skewed codes).
    """
    idx = np.ascontiguousarray(idx, dtype=np.uint8).reshape(-1)
    n = idx.size
    # one counting pass answers "constant?", the largest code, the density and rANS's table
    counts = symbol_counts(idx)
    present = np.flatnonzero(counts)
    if present.size <= 1:
        return _IDX_HEAD.pack(_MODE_CONST, int(idx[0]) if n else 0, n)
    cctx = zstandard.ZstdCompressor(level=level)
    largest = int(present[-1])
    bits = _bits_for(largest)
    if (n - int(counts[0])) / n > 0.6:
        # dense: zstd on packed codes (plain bytes never won in measurements, so it is not tried)
        candidates = [(_MODE_PACKED, cctx.compress(_pack(idx, bits)))]
    else:
        # sparse: an occupancy bitmap plus the packed nonzero codes beats both dense layouts
        nz = idx != 0
        occ = cctx.compress(np.packbits(nz).tobytes())
        vals = idx[nz] - 1
        vbits = _bits_for(largest - 1)
        vblob = cctx.compress(_pack(vals, vbits))
        candidates = [(_MODE_SPLIT, struct.pack("<BQ", vbits, len(occ)) + occ + vblob)]
    if coder == "auto":
        rans = encode_rans(idx, counts)
        if rans is not None and n <= _max_symbols(len(rans)):  # else the reader would refuse it
            candidates.append((_MODE_RANS, rans))
    elif coder != "zstd":
        raise ValueError(f"unknown index coder {coder!r}; use one of {CODERS}")
    mode, payload = min(candidates, key=lambda c: len(c[1]))
    return _IDX_HEAD.pack(mode, bits, n) + payload


MAX_ZSTD_EXPANSION = 32_768
"""zstd encodes at most a 128 KiB block in a 4-byte RLE block: no real frame expands further."""


def bounded_decompress(frame: bytes | memoryview, limit: int) -> bytes:
    """Decompress one zstd frame whose output may not exceed ``limit`` bytes.

    zstandard allocates the size a frame *declares* and ignores ``max_output_size`` when the frame
    declares one, so the declaration is checked first: a crafted frame cannot make the reader
    allocate more than the caller knows to be possible.
    """
    declared = zstandard.frame_content_size(frame)
    if declared > limit:
        raise ValueError(f"a compressed stream declares {declared} bytes where at most {limit} fit")
    if declared > MAX_ZSTD_EXPANSION * len(frame) + (1 << 17):
        raise ValueError(f"a {len(frame)}-byte compressed stream declares {declared} bytes, more than zstd can encode")
    if declared == 0 or limit == 0:
        return b""
    return zstandard.ZstdDecompressor().decompress(frame, max_output_size=limit)


def _max_symbols(payload_bytes: int) -> int:
    """Most codes a stream of this many bytes may hold: zstd's own bound, so that no stream, whatever
    its coder, lets a few bytes of a crafted file claim (and make the reader allocate) far more."""
    return MAX_ZSTD_EXPANSION * payload_bytes + (1 << 17)


def holds_gil(blob: bytes | memoryview) -> bool:
    """Whether decoding this index stream holds the GIL throughout (rANS; unreadable ones count too)."""
    return len(blob) < _IDX_HEAD.size or blob[0] == _MODE_RANS


def decode_indices(blob: bytes | memoryview, expected: int | None = None) -> np.ndarray:
    """Inverse of :func:`encode_indices` (returns a uint8 array).

    Args:
        blob: the stream.
        expected: the number of codes the caller knows the stream must hold; a stream that claims
            another count is refused before anything is allocated.
    """
    if len(blob) < _IDX_HEAD.size:
        raise ValueError("index stream is shorter than its header")
    mode, bits, n = _IDX_HEAD.unpack_from(blob, 0)
    if expected is not None and n != expected:
        raise ValueError(f"index stream holds {n} codes where {expected} are expected")
    payload = memoryview(blob)[_IDX_HEAD.size :]
    if mode == _MODE_CONST:
        return np.full(n, bits, dtype=np.uint8)
    if not 1 <= bits <= 8:
        raise ValueError(f"index stream has {bits} bits per code")
    if mode == _MODE_BYTES:
        raw = np.frombuffer(bounded_decompress(payload, n), dtype=np.uint8).copy()
        if raw.size != n:
            raise ValueError(f"index stream holds fewer than the {n} codes it declares")
        return raw
    if mode == _MODE_PACKED:
        packed = bounded_decompress(payload, (n * bits + 7) // 8 + 1)
        if 8 * len(packed) < n * bits:
            raise ValueError(f"index stream holds fewer than the {n} codes it declares")
        return _unpack(packed, bits, n)
    if mode == _MODE_SPLIT:
        vbits, occ_len = struct.unpack_from("<BQ", payload, 0)
        off = struct.calcsize("<BQ")
        if not 1 <= vbits <= 8 or occ_len > len(payload) - off:
            raise ValueError("index stream's occupancy map is malformed")
        occupancy = bounded_decompress(payload[off : off + occ_len], (n + 7) // 8)
        if 8 * len(occupancy) < n:
            raise ValueError("index stream's occupancy map is too short")
        # positions, not a boolean mask: scattering through them is several times faster (and numpy
        # finds them several times faster in a bool array; the unpacked bits are 0 or 1)
        positions = np.unpackbits(np.frombuffer(occupancy, np.uint8), count=n).view(bool).nonzero()[0]
        count = positions.size
        packed = bounded_decompress(payload[off + occ_len :], (count * vbits + 7) // 8 + 1)
        if 8 * len(packed) < count * vbits:
            raise ValueError(f"index stream holds fewer than the {count} nonzero codes its occupancy map marks")
        vals = _unpack(packed, vbits, count)
        out = np.zeros(n, dtype=np.uint8)
        out[positions] = vals + 1
        return out
    if mode == _MODE_RANS:
        if n > _max_symbols(len(payload)):
            raise ValueError(f"a {len(payload)}-byte rANS stream claims {n} codes, more than the format allows")
        return decode_rans(payload, n)
    raise ValueError(f"unknown index-stream mode {mode}")


# ----------------------------------------------------------------------------------------------
# Lossless tensors (byte-grouped + zstd)
# ----------------------------------------------------------------------------------------------

_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
        torch.complex64,
        torch.complex128,
    )
}
KNOWN_DTYPE_NAMES = frozenset(_DTYPES)
"""Dtype names a header may carry."""


def dtype_name(dtype: torch.dtype) -> str:
    """Stable string name of a torch dtype (``"float32"``) used in file headers."""
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported tensor dtype {dtype}")
    return name


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown tensor dtype {name!r} in file header") from None


def encode_lossless(t: torch.Tensor, *, level: int = 1) -> bytes:
    """Store a tensor's exact bytes: one zstd frame per byte plane (byte-grouped, as ZipNN does).

    Measured on fp32 weights: zstd level 1 per plane is both smaller (exponent planes compress, the
    noisy mantissa planes are passed through quickly) and about as fast as plain zstd -3 of the bytes.
    """
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return b""
    raw = t.reshape(-1).view(torch.uint8).numpy() if t.dtype != torch.bool else t.numpy().view(np.uint8)
    width = t.element_size()
    cctx = zstandard.ZstdCompressor(level=level)
    planes = raw.reshape(-1, width).T if width > 1 else raw.reshape(1, -1)
    frames = [cctx.compress(np.ascontiguousarray(plane).tobytes()) for plane in planes]
    head = struct.pack(f"<B{len(frames)}Q", len(frames), *map(len, frames))
    return head + b"".join(frames)


def decode_lossless(blob: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`encode_lossless`."""
    numel = math.prod(shape)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    width = torch.empty(0, dtype=dtype).element_size()
    if len(blob) < 1:
        raise ValueError("lossless record is empty")
    (count,) = struct.unpack_from("<B", blob, 0)
    if count != width:
        raise ValueError(f"lossless record holds {count} byte planes, expected {width} for {dtype}")
    lengths = struct.unpack_from(f"<{count}Q", blob, 1)
    off = 1 + 8 * count
    if off + sum(lengths) != len(blob):
        raise ValueError("lossless record's plane lengths do not add up to its size")
    starts = [off + sum(lengths[:i]) for i in range(count)]
    for start, length in zip(starts, lengths, strict=True):  # every declared size checked before allocating
        if zstandard.frame_content_size(blob[start : start + length]) != numel:
            raise ValueError(f"lossless byte plane does not declare {numel} bytes")
        if numel > MAX_ZSTD_EXPANSION * length + (1 << 17):
            raise ValueError(f"a {length}-byte lossless byte plane cannot hold {numel} bytes")
    out = np.empty((width, numel), dtype=np.uint8)
    for i, length in enumerate(lengths):
        plane = bounded_decompress(blob[off : off + length], numel)
        if len(plane) != numel:
            raise ValueError(f"lossless byte plane {i} holds {len(plane)} bytes, expected {numel}")
        out[i] = np.frombuffer(plane, dtype=np.uint8)
        off += length
    raw = np.ascontiguousarray(out.T).reshape(-1)
    tensor = torch.from_numpy(raw)
    if dtype == torch.bool:
        return tensor.view(torch.bool).reshape(shape)
    return tensor.view(dtype).reshape(shape)
