"""ExCP: extreme checkpoint compression (weight-momentum joint shrinking, ICML 2024).

The codec imports no Lightning: :mod:`.codec` and :mod:`.quantize` code tensors, :mod:`.split` takes a
checkpoint apart, :mod:`.encoder` writes chains, :mod:`.references` keeps what chains need on disk,
:mod:`.decoder` rebuilds checkpoints, :mod:`.fileformat` is the verified file, :mod:`.safe_pickle` loads
metadata without running code. The Lightning glue (:class:`ExCP` callback and
:class:`ExCPCheckpointIO`) is loaded on first use.
"""

from __future__ import annotations

from typing import Any

from callbacks.excp.codec import ExCPSettings
from callbacks.excp.decoder import decode_sequence, load_checkpoint, read_hyperparameters
from callbacks.excp.encoder import ExCPEncoder
from callbacks.excp.fileformat import ExCPFormatError, is_excp_file
from callbacks.excp.references import REFS_DIR, chain_paths
from callbacks.excp.torch_load import read_excp_checkpoints

__all__ = [
    "ExCP",
    "ExCPCheckpointIO",
    "ExCPEncoder",
    "ExCPFormatError",
    "ExCPSettings",
    "REFS_DIR",
    "chain_paths",
    "decode_sequence",
    "is_excp_file",
    "load_checkpoint",
    "read_excp_checkpoints",
    "read_hyperparameters",
]


def __getattr__(name: str) -> Any:
    if name == "ExCP":
        from callbacks.excp.callback import ExCP

        return ExCP
    if name == "ExCPCheckpointIO":
        from callbacks.excp.checkpoint_io import ExCPCheckpointIO

        return ExCPCheckpointIO
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
