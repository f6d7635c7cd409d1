"""Unpickle a checkpoint's metadata without running code from the file (no Lightning import).

The non-tensor part of a checkpoint (steps, loops, schedulers, callbacks' state, hyperparameters) is
a pickle. ``torch.load(weights_only=True)`` refuses every global that is not allow-listed, so a
planted ``__reduce__`` cannot run. Lightning checkpoints hold a few types beyond torch's defaults;
they are allow-listed here by dotted name and resolved only when their package is installed, so the
codec keeps no import-time dependency on Lightning.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import re
import sys
from typing import Any

import torch

__all__ = ["SAFE_GLOBAL_NAMES", "UnsafePickleError", "load_metadata", "safe_globals"]

SAFE_GLOBAL_NAMES = (
    "lightning.fabric.utilities.data.AttributeDict",
    "pathlib.PosixPath",
    "pathlib.WindowsPath",
    "pathlib.PurePosixPath",
    "pathlib.PureWindowsPath",
    "collections.defaultdict",
    "collections.OrderedDict",
    "datetime.datetime",
    "datetime.timedelta",
    "torch.torch_version.TorchVersion",
    "numpy.dtype",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtypes.Float64DType",
    "numpy.dtypes.Float32DType",
    "numpy.dtypes.Int64DType",
    "numpy.dtypes.Int32DType",
    "numpy.dtypes.UInt32DType",
    "numpy.dtypes.BoolDType",
)
"""Types a Lightning training checkpoint of this project holds besides torch's own allow-list."""

LOADED_ONLY_GLOBAL_NAMES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
"""Plain-data types of DeepSpeed's ZeRO checkpoint files (loss scaler settings, stage enum, slice records),
allowed only once ``deepspeed`` is imported (by the strategy), so reading other checkpoints never imports it."""


class UnsafePickleError(ValueError):
    """The metadata needs a type outside the allow-list (it may run code); the message names it."""


def _resolve(dotted: str) -> Any | None:
    module_name, _, attribute = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError):
        return None


def safe_globals() -> list[Any]:
    """The allow-listed types that exist in this environment."""
    resolved = []
    for dotted in SAFE_GLOBAL_NAMES:
        obj = _resolve(dotted)
        if obj is not None:
            resolved.append((obj, dotted) if getattr(obj, "__module__", None) != dotted.rpartition(".")[0] else obj)
    if "deepspeed" in sys.modules:
        resolved += [obj for obj in map(_resolve, LOADED_ONLY_GLOBAL_NAMES) if obj is not None]
    return resolved


def load_metadata(source: bytes | str | os.PathLike, *, trust_pickles: bool = False, mmap: bool = False) -> Any:
    """``torch.load`` the pickled metadata safely (``weights_only=True`` plus the allow-list).

    Args:
        source: the pickle's bytes, or a path to a ``torch.save`` file.
        mmap: map a file's tensors instead of reading them (cheap peeks at large files).
        trust_pickles: True unpickles anything (``weights_only=False``): a crafted file then runs
            arbitrary code on this machine. Only for files you produced yourself.

    Raises:
        UnsafePickleError: the file needs a type outside the allow-list, or is not a valid pickle.
    """
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    extra = {"mmap": True} if mmap and not isinstance(source, bytes) else {}
    if trust_pickles:
        return torch.load(stream, map_location="cpu", weights_only=False, **extra)
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(stream, map_location="cpu", weights_only=True, **extra)
    except pickle.UnpicklingError as error:
        needed = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        if not needed:  # not a refused type: the bytes are not a valid pickle at all
            raise UnsafePickleError("its bytes are not a torch checkpoint (invalid or damaged pickle)") from None
        detail = f"it needs {needed.group(1)}, which is not on the allow-list of checkpoint types"
        raise UnsafePickleError(
            f"its metadata cannot be loaded safely ({detail}); loading it with weights_only=False would "
            "run whatever code the file holds: do that only for files you made yourself"
        ) from None
    except (RuntimeError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError) as error:
        raise UnsafePickleError(
            f"its metadata is not a valid torch pickle ({type(error).__name__}: {error})"[:300]
        ) from None
