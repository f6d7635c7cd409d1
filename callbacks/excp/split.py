"""Take a training checkpoint apart for coding: weight/moment entries, lossless extras, a skeleton.

A checkpoint is any nested dict. Two places get lossy coding, everything else is kept exactly:

* ``ckpt["state_dict"]``: floating-point parameters (W), delta-coded against the reconstructed
  previous checkpoint;
* ``ckpt["optimizer_states"][i]["state"][idx]``: Adam/AdamW ``exp_avg``/``exp_avg_sq`` (m, v), SGD
  ``momentum_buffer`` (m) or bitsandbytes 8-bit optimizers' ``state1``/``state2`` (m, v), matched to
  parameter *names* through the order of ``param_groups``.

Large tensors anywhere else (buffers, other optimizers' state, AMSGrad's ``max_exp_avg_sq``) become
lossless "extras"; the rest of the structure (the "skeleton": step counts, param_groups, schedulers,
loops, RNG, callbacks, hyperparameters, small tensors) is pickled and round-trips exactly.
No Lightning is imported here.
"""

from __future__ import annotations

import copy
import math
import zlib
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from callbacks.excp.blockwise8bit import QUANT_STATE_KEY
from callbacks.excp.quantize import dtype_name

__all__ = [
    "FLOAT_DTYPES",
    "CheckpointSplit",
    "KeyPath",
    "ParamEntry",
    "get_at",
    "infer_optimizer_param_names",
    "raw_tensor_bytes",
    "same_state_fingerprint",
    "set_at",
    "split_checkpoint",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
EXTRA_MIN_NUMEL = 256
"""Tensors outside W/m/v with fewer elements stay in the pickled skeleton (not worth a record)."""

KeyPath = tuple[str | int, ...]
"""Where a value sits in the nested checkpoint, e.g. ``("optimizer_states", 0, "state", 3, "exp_avg")``."""


@dataclass
class ParamEntry:
    """One trainable tensor and, when an optimizer holds them, its moments and where they sit."""

    name: str
    weight: torch.Tensor
    first_moment: torch.Tensor | None = None
    second_moment: torch.Tensor | None = None
    first_moment_path: KeyPath | None = None
    second_moment_path: KeyPath | None = None
    second_moment_bias: float = 1.0
    """Adam's ``1 - beta2**step`` for this parameter (1.0 where the optimizer records no step or betas):
    what ``exp_avg_sq`` underestimates the gradient's second moment by early in a run."""


@dataclass
class CheckpointSplit:
    """A checkpoint taken apart: coded entries, tied weights, lossless extras and the hollow rest."""

    entries: list[ParamEntry]
    aliases: list[tuple[KeyPath, str]]
    extras: list[tuple[KeyPath, torch.Tensor]]
    skeleton: Any


def _moment_keys(state: dict[str, Any], shape: torch.Size) -> tuple[KeyPath | None, KeyPath | None]:
    """Where in one parameter's optimizer state the (m, v) coded sit; other entries stay lossless.

    bitsandbytes' 8-bit optimizers keep them as ``state1``/``state2`` in a nested quant-state dict
    (fp32 for small parameters; blockwise 8-bit ones arrive here already expanded to fp32 by
    ``blockwise8bit.expand_8bit_states``).
    """

    def codable(holder: Any, key: str) -> bool:
        tensor = holder.get(key) if isinstance(holder, dict) else None
        return isinstance(tensor, torch.Tensor) and tensor.dtype in FLOAT_DTYPES and tensor.shape == shape

    if codable(state, "exp_avg") and codable(state, "exp_avg_sq"):
        return ("exp_avg",), ("exp_avg_sq",)
    if codable(state, "momentum_buffer"):
        return ("momentum_buffer",), None
    quant = state.get(QUANT_STATE_KEY)
    if codable(quant, "state1") and codable(quant, "state2"):
        return (QUANT_STATE_KEY, "state1"), (QUANT_STATE_KEY, "state2")
    if codable(quant, "state1"):
        return (QUANT_STATE_KEY, "state1"), None
    return None, None


def second_moment_bias(slot_state: Any, group: Any) -> float:
    """``1 - beta2**step`` from a parameter's optimizer state and its group (1.0 when either is absent).

    torch's Adam/AdamW, bitsandbytes' and DeepSpeed's keep ``step`` per parameter and ``betas`` per group.
    """
    step = slot_state.get("step") if isinstance(slot_state, dict) else None
    betas = group.get("betas") if isinstance(group, dict) else None
    try:
        step = float(step.item() if isinstance(step, torch.Tensor) else step)
        beta2 = float(betas[1])  # type: ignore[index]
    except (TypeError, ValueError, IndexError, RuntimeError):
        return 1.0
    if not (step >= 1 and math.isfinite(step) and 0 <= beta2 < 1):
        return 1.0
    return 1.0 - beta2**step


def _state_shape(state: dict[str, Any]) -> torch.Size | None:
    quant = state.get(QUANT_STATE_KEY)
    for holder, key in ((state, "exp_avg"), (state, "momentum_buffer"), (quant, "state1")):
        tensor = holder.get(key) if isinstance(holder, dict) else None
        if isinstance(tensor, torch.Tensor):
            return tensor.shape
    return None


def infer_optimizer_param_names(state_dict: dict[str, Any], optimizer_state: dict[str, Any]) -> list[str | None]:
    """Guess the parameter name of each optimizer slot when the live model is not available (CLI).

    Optimizers number parameters in ``param_groups`` order, and within a group parameters keep the
    model's order, so each group is matched as an in-order subsequence of the state dict's float
    tensors, by shape. A wrong guess only costs compression (masks use another tensor's statistics),
    never correctness: every stream is reconstructed from what was stored.
    """
    names = [k for k, t in state_dict.items() if isinstance(t, torch.Tensor) and t.dtype in FLOAT_DTYPES]
    state = optimizer_state.get("state", {})
    claimed: set[str] = set()
    slot_names: list[str | None] = []
    for group in optimizer_state.get("param_groups", []):
        search_from = 0
        for slot in group.get("params", []):
            shape = _state_shape(state.get(slot, {}))
            found = None
            if shape is not None:
                for j in range(search_from, len(names)):
                    if names[j] not in claimed and state_dict[names[j]].shape == shape:
                        found = j
                        break
            if found is None:
                slot_names.append(None)
                continue
            claimed.add(names[found])
            slot_names.append(names[found])
            search_from = found + 1
    return slot_names


def _is_container(obj: Any) -> bool:
    return isinstance(obj, (dict, list))


def walk_tensors(obj: Any, prefix: KeyPath = ()) -> Iterator[tuple[KeyPath, torch.Tensor]]:
    """Every tensor reachable through dicts (str/int keys) and lists, with its key path."""
    if isinstance(obj, dict):
        items = [(k, v) for k, v in obj.items() if type(k) in (str, int)]
    elif isinstance(obj, list):
        items = list(enumerate(obj))
    else:
        return
    for key, value in items:
        if isinstance(value, torch.Tensor):
            yield prefix + (key,), value
        elif _is_container(value):
            yield from walk_tensors(value, prefix + (key,))


def _hollow(obj: Any, leaves: set[KeyPath], prefix: KeyPath = ()) -> Any:
    """Shallow-copy the containers of ``obj``, replacing the leaves at ``leaves`` with None."""
    if isinstance(obj, dict):
        copied = copy.copy(obj)
        for key, value in obj.items():
            path = prefix + (key,)
            if path in leaves:
                copied[key] = None
            elif _is_container(value):
                copied[key] = _hollow(value, leaves, path)
        return copied
    if isinstance(obj, list):
        return [
            None
            if prefix + (i,) in leaves
            else (_hollow(value, leaves, prefix + (i,)) if _is_container(value) else value)
            for i, value in enumerate(obj)
        ]
    return obj


def set_at(obj: Any, path: Sequence[str | int], value: Any) -> None:
    """``obj[path[0]]...[path[-1]] = value``."""
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value


def get_at(obj: Any, path: Sequence[str | int]) -> Any:
    """``obj[path[0]]...[path[-1]]``."""
    for key in path:
        obj = obj[key]
    return obj


def _moment_paths(
    ckpt: dict[str, Any],
    state_dict: dict[str, Any],
    optimizer_param_names: Sequence[Sequence[str | None] | None] | None,
) -> dict[str, tuple[KeyPath, KeyPath | None, float]]:
    """Parameter name -> (path of m, path of v, v's bias); the first optimizer that holds a parameter wins."""
    optimizers = ckpt.get("optimizer_states")
    optimizers = optimizers if isinstance(optimizers, list) else []
    paths: dict[str, tuple[KeyPath, KeyPath | None, float]] = {}
    for i, optimizer in enumerate(optimizers):
        if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict):
            continue
        names = optimizer_param_names[i] if optimizer_param_names and i < len(optimizer_param_names) else None
        if names is None:
            names = infer_optimizer_param_names(state_dict, optimizer)
        slots = [(slot, group) for group in optimizer.get("param_groups", []) for slot in group.get("params", [])]
        for position, (slot, group) in enumerate(slots):
            name = names[position] if position < len(names) else None
            slot_state = optimizer["state"].get(slot)
            if name is None or name in paths or not isinstance(slot_state, dict) or name not in state_dict:
                continue
            first_key, second_key = _moment_keys(slot_state, state_dict[name].shape)
            if first_key is not None:
                base: KeyPath = ("optimizer_states", i, "state", slot)
                second = None if second_key is None else base + second_key
                paths[name] = (base + first_key, second, second_moment_bias(slot_state, group))
    return paths


def _is_codable_weight(name: Any, tensor: Any) -> bool:
    return (
        isinstance(tensor, torch.Tensor) and tensor.dtype in FLOAT_DTYPES and not tensor.is_sparse and type(name) is str
    )


def split_checkpoint(
    ckpt: dict[str, Any],
    param_names: Collection[str] | None,
    optimizer_param_names: Sequence[Sequence[str | None] | None] | None,
) -> CheckpointSplit:
    """Take ``ckpt`` apart (it is not modified; the skeleton shares its unchanged leaves)."""
    state_dict = ckpt.get("state_dict")
    state_dict = state_dict if isinstance(state_dict, dict) else {}
    moment_paths = _moment_paths(ckpt, state_dict, optimizer_param_names)
    entries: list[ParamEntry] = []
    aliases: list[tuple[KeyPath, str]] = []
    taken: set[KeyPath] = set()
    first_name_of_storage: dict[tuple, str] = {}
    for name, tensor in state_dict.items():
        if not _is_codable_weight(name, tensor) or (param_names is not None and name not in param_names):
            continue
        storage_key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.dtype,
        )
        if tensor.numel() > 0 and storage_key in first_name_of_storage:  # tied weights are stored once
            aliases.append((("state_dict", name), first_name_of_storage[storage_key]))
            taken.add(("state_dict", name))
            continue
        first_name_of_storage[storage_key] = name
        entry = ParamEntry(name, tensor)
        if name in moment_paths:
            first_path, second_path, entry.second_moment_bias = moment_paths[name]
            entry.first_moment_path, entry.second_moment_path = first_path, second_path
            entry.first_moment = get_at(ckpt, first_path)
            taken.add(first_path)
            if second_path is not None:
                entry.second_moment = get_at(ckpt, second_path)
                taken.add(second_path)
        taken.add(("state_dict", name))
        entries.append(entry)
    extras = [
        (path, tensor)
        for path, tensor in walk_tensors(ckpt)
        if path not in taken and tensor.numel() >= EXTRA_MIN_NUMEL and not tensor.is_sparse and _encodable(tensor)
    ]
    taken.update(path for path, _ in extras)
    return CheckpointSplit(entries, aliases, extras, _hollow(ckpt, taken))


def _encodable(tensor: torch.Tensor) -> bool:
    try:
        dtype_name(tensor.dtype)
    except ValueError:
        return False
    return tensor.layout == torch.strided


def same_state_fingerprint(ckpt: dict[str, Any], split: CheckpointSplit) -> tuple | None:
    """(step, epoch, crc32 of every weight): equal fingerprints mean one training state saved twice."""
    step = ckpt.get("global_step")
    if not isinstance(step, int):
        return None
    checksums = []
    for entry in split.entries:
        weight = entry.weight.detach().cpu().contiguous()
        crc = zlib.crc32(weight.reshape(-1).view(torch.uint8).numpy()) if weight.numel() else 0
        checksums.append((entry.name, crc, entry.first_moment_path, entry.second_moment_path))
    return (step, ckpt.get("epoch"), tuple(checksums))


def raw_tensor_bytes(ckpt: Any) -> int:
    """Bytes of every tensor in the checkpoint as stored uncompressed."""
    return sum(t.numel() * t.element_size() for _, t in walk_tensors(ckpt))
