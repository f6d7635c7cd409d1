"""ExCP: extreme checkpoint compression (weight-momentum joint shrinking, ICML 2024).

The codec (:mod:`.codec`, :mod:`.quantize`, :mod:`.chain`, :mod:`.fileformat`) imports no Lightning;
the Lightning glue (:class:`ExCP` callback and :class:`ExCPCheckpointIO`) is loaded on first use.
"""

from __future__ import annotations

from typing import Any

from callbacks.excp.chain import ExCPEncoder, chain_paths, decode_sequence, load_checkpoint
from callbacks.excp.codec import ExCPSettings
from callbacks.excp.fileformat import ExCPFormatError, is_excp_file
from callbacks.excp.torch_load import read_excp_checkpoints

__all__ = [
    "ExCP",
    "ExCPCheckpointIO",
    "ExCPEncoder",
    "ExCPFormatError",
    "ExCPSettings",
    "chain_paths",
    "decode_sequence",
    "is_excp_file",
    "load_checkpoint",
    "read_excp_checkpoints",
]


def __getattr__(name: str) -> Any:
    if name == "ExCP":
        from callbacks.excp.callback import ExCP

        return ExCP
    if name == "ExCPCheckpointIO":
        from callbacks.excp.checkpoint_io import ExCPCheckpointIO

        return ExCPCheckpointIO
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
