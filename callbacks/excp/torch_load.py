"""Let code that ``torch.load``s a checkpoint path read ExCP files too (no Lightning import).

LightningCLI reads ``--ckpt_path`` with ``torch.load`` to recover hyperparameters before it builds the
model, and ``LightningModule.load_from_checkpoint`` does the same; neither goes through the
Trainer's CheckpointIO. Inside :func:`read_excp_checkpoints`, ``torch.load`` of an ExCP file path
rebuilds the checkpoint through its chain; every other call is passed through unchanged.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from callbacks.excp.decoder import load_checkpoint
from callbacks.excp.fileformat import is_excp_file

__all__ = ["read_excp_checkpoints"]


def _excp_path(f: Any) -> str | None:
    """The path of an ExCP file given as a path or as an open file (Lightning opens it with fsspec)."""
    if isinstance(f, (str, os.PathLike)):
        return os.fspath(f) if is_excp_file(f) else None
    if hasattr(f, "read") and hasattr(f, "seek") and hasattr(f, "tell"):
        name = getattr(f, "path", None) or getattr(f, "name", None)
        if isinstance(name, (str, os.PathLike)) and os.path.isfile(name) and is_excp_file(name):
            return os.fspath(name)
    return None


@contextlib.contextmanager
def read_excp_checkpoints() -> Iterator[None]:
    """Route ``torch.load(<ExCP file path>, ...)`` to :func:`load_checkpoint` while the block runs.

    For code that this project does not control (``LightningModule.load_from_checkpoint``); it
    patches ``torch.load`` process-wide for the duration of the block, so avoid it in threaded code.
    ``train.py`` and the Trainer do not need it: they read ExCP files through the codec directly.

    Example::

        with read_excp_checkpoints():
            module = CausalLMModule.load_from_checkpoint("runs/x/checkpoints/last.ckpt")
    """
    original = torch.load

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        path = _excp_path(f)
        if path is not None:
            # like torch >= 2.6: safe unless the caller passes weights_only=False explicitly
            return load_checkpoint(path, weights_only=kwargs.get("weights_only", True))
        return original(f, *args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original
