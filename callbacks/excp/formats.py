"""Read and write the checkpoint formats the CLI compresses: Lightning ``.ckpt`` and HF Trainer folders.

Both become one checkpoint dict with ``state_dict`` and ``optimizer_states`` (where ExCP codes W, m
and v) plus whatever else the format holds, kept exactly, so decompression writes back files the
original tool loads.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from callbacks.excp.safe_pickle import UnsafePickleError, load_metadata
from common.atomic import atomic_directory, atomic_torch_save
from common.errors import UserFacingError

__all__ = ["FormatError", "checkpoint_step", "read_any", "write_any"]

LIGHTNING = "lightning"
HF_TRAINER = "hf_trainer"
_HF_OPTIMIZER = "optimizer.pt"


class FormatError(UserFacingError):
    """An input is not a checkpoint this tool understands (the message says why and what to pass)."""


def _is_hf_dir(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*.safetensors"))


def load_torch_file(path: Path, *, trust_pickles: bool = False, mmap: bool = False) -> Any:
    """``torch.load`` a regular file, safely unless ``trust_pickles`` (then a crafted file runs code)."""
    try:
        regular = stat.S_ISREG(path.stat().st_mode)
    except OSError as e:
        raise FormatError(f"{path}: cannot be read ({e.strerror})") from None
    if not regular:
        raise FormatError(f"{path}: is not a regular file (a device, FIFO or socket); pass a checkpoint file")
    try:
        return load_metadata(path, trust_pickles=trust_pickles, mmap=mmap)
    except UnsafePickleError as e:
        hint = "" if trust_pickles else " (--trust-pickles loads it anyway, for files you made yourself)"
        raise FormatError(f"{path}: {e}{hint}") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure under trust means "not a torch checkpoint"
        raise FormatError(f"{path}: cannot be read as a torch checkpoint ({type(e).__name__}: {e})") from None


def read_any(path: str | os.PathLike, *, trust_pickles: bool = False) -> tuple[dict[str, Any], str]:
    """Load a Lightning ``.ckpt`` file or an HF Trainer checkpoint folder as ``(checkpoint, format)``.

    Pickles (``.ckpt``, ``optimizer.pt``) load with ``weights_only=True`` unless ``trust_pickles``.
    """
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: does not exist")
    if path.is_dir():
        if not _is_hf_dir(path):
            raise FormatError(
                f"{path}: folder has no *.safetensors; pass a Hugging Face Trainer checkpoint folder "
                "(model.safetensors + optimizer.pt) or Lightning .ckpt files"
            )
        return _read_hf(path, trust_pickles), HF_TRAINER
    ckpt = load_torch_file(path, trust_pickles=trust_pickles)
    if not isinstance(ckpt, dict):
        raise FormatError(f"{path}: holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt, LIGHTNING


def _read_hf(path: Path, trust_pickles: bool) -> dict[str, Any]:
    state: dict[str, torch.Tensor] = {}
    shards: dict[str, dict[str, Any]] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            metadata = sf.metadata()
        tensors = load_file(str(f))
        shards[f.name] = {"keys": list(tensors), "metadata": metadata}
        for k, t in tensors.items():
            if k in state:
                raise FormatError(f"{path}: tensor {k} appears in two safetensors files")
            state[k] = t
    order = _model_order(path)
    if order:
        rank = {n: i for i, n in enumerate(order)}
        state = dict(sorted(state.items(), key=lambda kv: rank.get(kv[0], len(rank))))
    ckpt: dict[str, Any] = {"state_dict": state, "hf": {"safetensors": shards, "files": {}}}
    opt = path / _HF_OPTIMIZER
    if opt.is_file():
        ckpt["optimizer_states"] = [load_torch_file(opt, trust_pickles=trust_pickles)]
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path).as_posix()
        if f.is_file() and f.suffix != ".safetensors" and rel != _HF_OPTIMIZER:
            ckpt["hf"]["files"][rel] = f.read_bytes()
    return ckpt


def _model_order(path: Path) -> list[str]:
    """Parameter names in the model's own order (safetensors files sort them alphabetically).

    The Trainer's optimizer numbers parameters in model order, so this order is what lets ExCP match
    ``optimizer.pt`` slots to tensors. The model is built on the meta device from ``config.json``
    (no weights, no download); without transformers or a config the file order is kept.
    """
    if not (path / "config.json").is_file():
        return []
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(path, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return [n for n, _ in model.named_parameters()]
    except Exception:  # noqa: BLE001 - any failure only costs compression, never correctness
        return []


def write_any(ckpt: dict[str, Any], fmt: str, out: str | os.PathLike) -> Path:
    """Write a decoded checkpoint back in its original format; returns the path written.

    A ``.ckpt`` replaces ``out`` in one rename; an HF folder is built beside ``out`` and swapped in
    whole, so a reader never sees half a checkpoint. Callers decide whether ``out`` may be replaced.
    """
    out = Path(out)
    if fmt == HF_TRAINER:
        hf = ckpt["hf"]
        sd = ckpt["state_dict"]
        with atomic_directory(out) as staging:
            for name, shard in hf["safetensors"].items():
                tensors = {k: sd[k].contiguous() for k in shard["keys"]}
                save_file(tensors, str(staging / name), metadata=shard["metadata"])
            if ckpt.get("optimizer_states"):
                torch.save(ckpt["optimizer_states"][0], staging / _HF_OPTIMIZER)
            for rel, data in hf["files"].items():
                target = staging / rel
                if ".." in Path(rel).parts or Path(rel).is_absolute():
                    raise FormatError(f"{out}: the stored file name {rel!r} points outside the folder")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
        return out
    atomic_torch_save(ckpt, out)
    return out


def checkpoint_step(path: Path, ckpt: dict[str, Any], fmt: str) -> int:
    """Training step of a checkpoint, used to order a series (falls back to digits in the name)."""
    if fmt == LIGHTNING and isinstance(ckpt.get("global_step"), int):
        return ckpt["global_step"]
    if fmt == HF_TRAINER:
        state = ckpt["hf"]["files"].get("trainer_state.json")
        if state is not None:
            try:
                return int(json.loads(state)["global_step"])
            except (ValueError, KeyError, TypeError):
                pass
    digits = re.findall(r"\d+", path.name)
    return int(digits[-1]) if digits else 0
