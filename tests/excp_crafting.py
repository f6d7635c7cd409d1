"""Build hostile ExCP files for the safety tests and bench/excp_safety.py: corrupted, truncated or
crafted with *valid* checksums (so the reader's structural checks, not its checksums, must stop them).
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import zstandard

from callbacks.excp import ExCPEncoder, ExCPSettings
from callbacks.excp.fileformat import END_MAGIC, MAGIC
from common.atomic import atomic_write_bytes

_PREFIX = struct.Struct("<8sII")

HUGE_NUMBERS: list[int] = [0, 1, 7, 2**16, 2**28, 2**31 - 1, 2**32, 2**40, 2**62, -1]
"""Sizes, counts and offsets a crafted header claims (edges of u32/u64 and of what fits in memory)."""
ODD_VALUES: list[Any] = [None, "x", [], {}, [2**20, 2**20], 1.5]
"""Values of the wrong type or shape for a header field."""
HEADER_FIELDS: list[tuple[str | int, ...]] = [
    ("entries", 0, "shape"),
    ("entries", 0, "rec_w"),
    ("entries", 0, "m"),
    ("entries", 0, "m", "rec"),
    ("entries", 0, "dtype"),
    ("entries", 0, "w_mode"),
    ("entries", 1, "shape"),
    ("records", 0, "length"),
    ("records", 0, "offset"),
    ("records", -1, "length"),
    ("extras",),
    ("aliases",),
    ("skeleton",),
    ("kind",),
    ("ref",),
    ("ref", "name"),
    ("ref", "file_id"),
    ("chain_index",),
    ("entries",),
    ("records",),
]
"""Header fields a crafted file changes (paths into the header; list indices may be negative)."""


def split_file(data: bytes) -> tuple[dict[str, Any], bytes]:
    """``(header, records bytes)`` of a well-formed ExCP file."""
    _, _, header_length = _PREFIX.unpack_from(data, 0)
    header_bytes = data[_PREFIX.size : _PREFIX.size + header_length]
    header = json.loads(zstandard.ZstdDecompressor().decompress(header_bytes))
    records = data[_PREFIX.size + header_length + 4 : -(32 + len(END_MAGIC))]
    return header, records


def assemble(header: dict[str, Any], records: bytes, version: int = 1) -> bytes:
    """File bytes with every checksum recomputed (header crc, record crcs are the caller's business)."""
    return assemble_compressed(zstandard.ZstdCompressor().compress(json.dumps(header).encode()), records, version)


def assemble_compressed(header_bytes: bytes, records: bytes, version: int = 1) -> bytes:
    """File bytes around an already compressed header of any content (header crc and file hash valid)."""
    body = _PREFIX.pack(MAGIC, version, len(header_bytes)) + header_bytes
    body += struct.pack("<I", zlib.crc32(header_bytes)) + records
    return body + hashlib.sha256(body).digest() + END_MAGIC


def rewrite(data: bytes, mutate: Callable[[dict[str, Any]], None]) -> bytes:
    """The same file with ``mutate`` applied to its header and checksums made valid again."""
    header, records = split_file(data)
    mutate(header)
    return assemble(header, records)


def replace_record(data: bytes, index: int, blob: bytes) -> bytes:
    """The same file with record ``index`` replaced by ``blob`` (record table and checksums valid)."""
    header, records = split_file(data)
    table = header["records"]
    parts = [records[r["offset"] : r["offset"] + r["length"]] for r in table]
    parts[index] = blob
    offset = 0
    for record, part in zip(table, parts, strict=True):
        record.update(offset=offset, length=len(part), crc32=zlib.crc32(part))
        offset += len(part)
    return assemble(header, b"".join(parts))


def constant_stream(count: int) -> bytes:
    """A quantized stream (empty codebook, constant code 0) claiming ``count`` codes in 14 bytes."""
    return struct.pack("<I", 0) + struct.pack("<BBQ", 3, 0, count)


def set_field(header: dict[str, Any], path: tuple[str | int, ...], value: Any) -> None:
    """Set ``header[path[0]][path[1]]... = value``; list indices wrap, so every path fits some header."""
    target: Any = header
    for key in path[:-1]:
        target = target[key] if isinstance(target, dict) else target[key % max(len(target), 1)]
    if isinstance(target, list):
        if not target:
            raise IndexError("an empty list has no element to change")
        target[path[-1] % len(target)] = value
    else:
        target[path[-1]] = value


class Planted:
    """Unpickling this (without ``weights_only``) creates ``marker``: proof that a file ran code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (Path(self.marker),))


def planted_skeleton(marker: str | Path) -> bytes:
    """A zstd'd pickle whose loading with weights_only=False creates ``marker``."""
    buffer = io.BytesIO()
    torch.save({"global_step": 1, "hyper_parameters": {"x": Planted(str(marker))}}, buffer, pickle_protocol=2)
    return zstandard.ZstdCompressor().compress(buffer.getvalue())


def raw_planted_pickle(marker: str | Path) -> bytes:
    """A plain pickle (not a torch zip) that creates ``marker`` when unpickled."""
    return pickle.dumps({"state_dict": {}, "x": Planted(str(marker))})


def checkpoint(step: int, size: int = 24) -> dict[str, Any]:
    """A small Adam-style training checkpoint whose weights drift with ``step``."""
    generator = torch.Generator().manual_seed(step)
    weight = torch.ones(size, size) + 1e-2 * step * torch.randn(size, size, generator=generator)
    return {
        "global_step": step,
        "epoch": 0,
        "state_dict": {"w": weight, "b": torch.full((size,), float(step))},
        "optimizer_states": [
            {
                "state": {
                    0: {"step": torch.tensor(float(step)), "exp_avg": 1e-3 * weight, "exp_avg_sq": 1e-6 * weight.abs()},
                },
                "param_groups": [{"params": [0], "lr": 1e-3}],
            }
        ],
    }


def write_chain(
    folder: Path, count: int = 3, keyframe_interval: int = 10, size: int = 24, first_step: int = 0
) -> list[Path]:
    """``count`` files of one chain (keyframe, deltas) in ``folder``; returns their paths.

    ``first_step=0`` gives a keyframe of constant weights (a few KB); from step 1 on, weights are noisy
    and a keyframe is about as large as its tensors.
    """
    encoder = ExCPEncoder(ExCPSettings(keyframe_interval=keyframe_interval, kmeans_sample=256))
    paths = []
    for step in range(first_step, first_step + count):
        path = folder / f"step{step}.ckpt"
        encoded = encoder.encode(checkpoint(step, size), target=path)
        atomic_write_bytes(path, encoded.data)
        encoder.commit(encoded, path)
        paths.append(path)
    return paths


def checkpoints_equal(a: Any, b: Any) -> bool:
    """Exact equality of two checkpoint structures: same nesting, same tensors (dtype, shape, values)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(checkpoints_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(checkpoints_equal, a, b))
    return a == b


def decode_code(
    code: Any,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    ref: torch.Tensor | None,
    *,
    kind: str = "delta",
    has_m: bool = True,
    has_v: bool = True,
    v_floor: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``decode_param`` of one encoder ``ParamCode`` (fp32 moments where present), as the reader calls it."""
    from callbacks.excp.codec import decode_param

    return decode_param(
        kind=kind,
        w_mode=code.w_mode,
        w_blob=code.w,
        m_blob=code.m,
        v_blob=code.v,
        ref=ref,
        shape=shape,
        dtype=dtype,
        m_dtype=torch.float32 if has_m else None,
        v_dtype=torch.float32 if has_v else None,
        v_floor=v_floor,
    )
