"""How much a file may make the reader allocate: losslessly stored tensors are bounded by the file's size.

Quantized streams are bounded by their reference (a delta's tensor must have its reference's shape),
but a lossless byte plane is one zstd frame, and zstd expands a frame up to 32,768x (a 4-byte block
per 128 KiB of zeros): a crafted 4 KB keyframe claiming a 16M-element zero tensor made the reader
allocate 285 MB. Real lossless tensors shrink about 1.2-2x (byte-grouped float planes), constant
buffers far more, but a whole file's lossless content is dominated by its weights, so a header that
declares more than :data:`MAX_LOSSLESS_EXPANSION` times the file's size (plus
:data:`LOSSLESS_SLACK_BYTES`, for tiny models of constant tensors) is refused before decoding.
"""

from __future__ import annotations

import math
from typing import Any

from callbacks.excp.fileformat import ExCPFile, ExCPFormatError
from callbacks.excp.quantize import dtype_from_name

__all__ = ["LOSSLESS_SLACK_BYTES", "MAX_LOSSLESS_EXPANSION", "check_lossless_size", "lossless_bytes", "tensor_bytes"]

MAX_LOSSLESS_EXPANSION = 64
LOSSLESS_SLACK_BYTES = 1 << 20


def tensor_bytes(shape: list[int], dtype: str) -> int:
    """Raw bytes of a tensor a header describes (ValueError on an unknown dtype name)."""
    return math.prod(shape) * dtype_from_name(dtype).itemsize


def lossless_bytes(header: dict[str, Any]) -> int:
    """Bytes of the tensors a (structurally checked) header stores losslessly, moments of those included.

    A twin's entries describe its reference's tensors (it stores none), so only its extras count.
    """
    total = 0
    for entry in header["entries"] if header["kind"] != "twin" else []:
        if entry["w_mode"] == "lossless":
            total += tensor_bytes(entry["shape"], entry["dtype"])
            for key in ("m", "v") if entry.get("moments") != "quantized" else ():
                if entry.get(key) is not None:
                    total += tensor_bytes(entry["shape"], entry[key]["dtype"])
    return total + sum(tensor_bytes(extra["shape"], extra["dtype"]) for extra in header["extras"])


def check_lossless_size(file: ExCPFile) -> None:
    """Raise :class:`ExCPFormatError` when ``file`` declares more lossless tensor bytes than its size allows."""
    try:
        declared = lossless_bytes(file.header)
    except ValueError as error:  # an unknown dtype name
        raise ExCPFormatError(file.path, f"{error} (file is corrupted)") from None
    limit = MAX_LOSSLESS_EXPANSION * file.size + LOSSLESS_SLACK_BYTES
    if declared > limit:
        raise ExCPFormatError(
            file.path,
            f"its header declares {declared / 2**20:.1f} MiB of losslessly stored tensors, more than "
            f"{MAX_LOSSLESS_EXPANSION}x its {file.size} bytes (crafted or corrupted)",
            "If the file is yours and mostly constant tensors, load it with weights_only=False",
        )
