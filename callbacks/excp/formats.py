"""Read and write the checkpoint formats the CLI compresses: Lightning ``.ckpt`` and HF Trainer folders.

Both become one checkpoint dict with ``state_dict`` and ``optimizer_states`` (where ExCP codes W, m
and v) plus whatever else the format holds, kept exactly, so decompression writes back files the
original tool loads.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from callbacks.excp.fileformat import atomic_write_bytes
from common.errors import UserFacingError

__all__ = ["FormatError", "checkpoint_step", "read_any", "write_any"]

LIGHTNING = "lightning"
HF_TRAINER = "hf_trainer"
_HF_OPTIMIZER = "optimizer.pt"


class FormatError(UserFacingError):
    """An input is not a checkpoint this tool understands (the message says why and what to pass)."""


def _is_hf_dir(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*.safetensors"))


def read_any(path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """Load a Lightning ``.ckpt`` file or an HF Trainer checkpoint folder as ``(checkpoint, format)``."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: does not exist")
    if path.is_dir():
        if not _is_hf_dir(path):
            raise FormatError(
                f"{path}: folder has no *.safetensors; pass a Hugging Face Trainer checkpoint folder "
                "(model.safetensors + optimizer.pt) or Lightning .ckpt files"
            )
        return _read_hf(path), HF_TRAINER
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a torch checkpoint"
        raise FormatError(f"{path}: cannot be read as a torch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict):
        raise FormatError(f"{path}: holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt, LIGHTNING


def _read_hf(path: Path) -> dict[str, Any]:
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
        ckpt["optimizer_states"] = [torch.load(opt, map_location="cpu", weights_only=False)]
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
    """Write a decoded checkpoint back in its original format; returns the path written."""
    out = Path(out)
    if fmt == HF_TRAINER:
        out.mkdir(parents=True, exist_ok=True)
        hf = ckpt["hf"]
        sd = ckpt["state_dict"]
        for name, shard in hf["safetensors"].items():
            tensors = {k: sd[k].contiguous() for k in shard["keys"]}
            tmp = out / f".{name}.tmp"
            save_file(tensors, str(tmp), metadata=shard["metadata"])
            os.replace(tmp, out / name)
        if ckpt.get("optimizer_states"):
            tmp = out / f".{_HF_OPTIMIZER}.tmp"
            torch.save(ckpt["optimizer_states"][0], tmp)
            os.replace(tmp, out / _HF_OPTIMIZER)
        for rel, data in hf["files"].items():
            atomic_write_bytes(out / rel, data)
        return out
    tmp = out.parent / f".{out.name}.tmp"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, tmp)
    os.replace(tmp, out)
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
