"""Chains that start from the weights a run began with (a pretrained model), named by content hash.

Continued pretraining and fine-tuning start from weights the user already keeps (a Hugging Face folder
or the Hub cache). Coding the first checkpoint against them, instead of storing a lossless keyframe
(~1.2x), makes every file of the run a delta. The first file's header then records a *base*: the
sha256 of those weights (names, dtypes, shapes and bytes), their names and dtypes, and where they came
from. A reader gets them back from a weights dict it is given (a Trainer resume passes the module it
has just built), or from the recorded safetensors folder, and uses them only when the hash matches:
the wrong base is an error, never a silently different model. No Lightning is imported here.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from callbacks.excp.fileformat import ExCPFormatError
from callbacks.excp.quantize import KNOWN_DTYPE_NAMES, dtype_from_name, dtype_name

__all__ = [
    "BaseSource",
    "base_record",
    "find_pretrained_base",
    "resolve_base",
    "weights_digest",
]

log = logging.getLogger(__name__)

Weights = dict[str, torch.Tensor]
BaseSource = Mapping[str, torch.Tensor] | Callable[[], Mapping[str, torch.Tensor]] | str | os.PathLike
"""What a reader may pass as the base: weights, a function returning them, or a safetensors folder/file."""


def weights_digest(weights: Mapping[str, torch.Tensor], names: list[str]) -> str:
    """sha256 over each named tensor's name, dtype, shape and bytes, in the order of ``names``."""
    digest = hashlib.sha256()
    for name in names:
        tensor = weights[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{dtype_name(tensor.dtype)}\0{list(tensor.shape)}\0".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def base_record(weights: Mapping[str, torch.Tensor], source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The header record that names ``weights`` as a chain's base (floating tensors only)."""
    names = sorted(n for n, t in weights.items() if t.is_floating_point())
    return {
        "sha256": weights_digest(weights, names),
        "names": names,
        "dtypes": [dtype_name(weights[n].dtype) for n in names],
        "source": source,
    }


# ----------------------------------------------------------------------------------------------
# Finding the pretrained weights a module was loaded from
# ----------------------------------------------------------------------------------------------


def _pretrained_submodule(module: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    """The first submodule that is a Hugging Face model loaded from somewhere (``name_or_path`` set)."""
    for qualified, sub in module.named_modules():
        path = getattr(sub, "name_or_path", None)
        if isinstance(path, str) and path and hasattr(sub, "config"):
            return qualified, sub
    return None


def _safetensors_files(path: str) -> list[Path]:
    """The ``*.safetensors`` files of a local folder, a single file, or a Hub id already in the local cache."""
    candidate = Path(path)
    if candidate.is_file() and candidate.suffix == ".safetensors":
        return [candidate]
    if not candidate.is_dir():
        try:
            from huggingface_hub import snapshot_download

            candidate = Path(snapshot_download(path, allow_patterns=["*.safetensors"], local_files_only=True))
        except Exception:  # noqa: BLE001 - not a Hub id, or not cached: there is no file to point at
            return []
    return sorted(p for p in candidate.glob("*.safetensors") if p.is_file())


def _load_safetensors(path: str, prefix: str) -> Weights:
    from safetensors.torch import load_file

    weights: Weights = {}
    for file in _safetensors_files(path):
        weights.update({prefix + k: v for k, v in load_file(str(file)).items()})
    return weights


def find_pretrained_base(module: torch.nn.Module) -> tuple[Weights, dict[str, Any]] | None:
    """The weights ``module`` holds, when they are exactly those of the safetensors it was loaded from.

    Returns:
        ``(weights keyed like module.state_dict(), source record)``, or None when the module was not
        loaded from safetensors a reader can find again, or has changed since (then a keyframe starts
        the chain, because nobody could rebuild the base).
    """
    found = _pretrained_submodule(module)
    if found is None:
        return None
    qualified, sub = found
    prefix = f"{qualified}." if qualified else ""
    try:
        from_files = _load_safetensors(sub.name_or_path, prefix)
    except Exception as error:  # noqa: BLE001 - an unreadable folder only means: no base
        log.info(
            "ExCP: the pretrained files at %s cannot be read (%s); starting with a keyframe", sub.name_or_path, error
        )
        return None
    state = module.state_dict()
    matched: Weights = {}
    for name, tensor in from_files.items():
        current = state.get(name)
        if current is None or not current.is_floating_point() or current.shape != tensor.shape:
            return None
        converted = tensor.to(current.dtype)
        if not torch.equal(converted, current.detach().cpu()):
            return None
        matched[name] = converted
    if not matched:
        return None
    return matched, {"path": str(sub.name_or_path), "prefix": prefix}


# ----------------------------------------------------------------------------------------------
# Getting a base back when reading
# ----------------------------------------------------------------------------------------------


def _candidate_weights(
    path: str | os.PathLike, given: BaseSource | None, record: dict[str, Any]
) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """What might be the base, cheapest first; lazily, so the recorded folder is read only when needed."""
    if given is not None:
        if isinstance(given, (str, os.PathLike)):
            try:
                weights = _load_safetensors(os.fspath(given), _source_prefix(record))
            except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
                raise ExCPFormatError(
                    path, f"its base {given} cannot be read as safetensors ({error})", "Pass the pretrained folder"
                ) from None
            yield f"base {given}", weights
        elif callable(given):
            yield "the model being resumed", given()
        else:
            yield "the weights passed as base", given
    source = record.get("source")
    if isinstance(source, dict) and isinstance(source.get("path"), str):
        try:
            weights = _load_safetensors(source["path"], _source_prefix(record))
        except Exception:  # noqa: BLE001 - moved or unreadable: reported below with what was tried
            weights = {}
        if weights:
            yield f"recorded source {source['path']}", weights


def _source_prefix(record: dict[str, Any]) -> str:
    source = record.get("source")
    prefix = source.get("prefix", "") if isinstance(source, dict) else ""
    return prefix if isinstance(prefix, str) else ""


def _as_recorded(weights: Mapping[str, Any], record: dict[str, Any]) -> Weights | None:
    """``weights`` restricted to the record's names and cast to its dtypes (None when any is missing)."""
    out: Weights = {}
    for name, dtype in zip(record["names"], record["dtypes"], strict=True):
        tensor = weights.get(name)
        if not isinstance(tensor, torch.Tensor):
            return None
        out[name] = tensor.detach().cpu().to(dtype_from_name(dtype))
    return out


def resolve_base(path: str | os.PathLike, record: Any, given: BaseSource | None) -> Weights:
    """The base weights a chain's first file was coded against, verified by their sha256.

    Args:
        path: the file naming the base (for error messages).
        record: its header's ``base`` record.
        given: what the caller offers (weights, a function returning them, or a safetensors path); the
            recorded source folder is tried after it.

    Raises:
        ExCPFormatError: the record is malformed, or no candidate has the recorded hash.
    """
    if not _valid_record(record):
        raise ExCPFormatError(path, "its base record is malformed (file is corrupted)")
    tried = []
    for label, weights in _candidate_weights(path, given, record):
        try:
            restricted = _as_recorded(weights, record)
            if restricted is not None and weights_digest(restricted, record["names"]) == record["sha256"]:
                return restricted
        except Exception:  # noqa: BLE001 - e.g. sharded tensors (DTensor) that cannot be hashed here: not this base
            pass
        tried.append(label)
    source = record.get("source") or {}
    raise ExCPFormatError(
        path,
        f"its chain starts from base weights sha256 {record['sha256'][:12]}... (recorded source: "
        f"{source.get('path', 'none')}) and {'none of ' + ', '.join(tried) if tried else 'nothing offered'} "
        "has that hash",
        "Pass the pretrained model the run started from (`--base FOLDER` on the command line, `base=` in Python, "
        "or resume with the same model config)",
    )


def _valid_record(record: Any) -> bool:
    return (
        isinstance(record, dict)
        and isinstance(record.get("sha256"), str)
        and isinstance(record.get("names"), list)
        and isinstance(record.get("dtypes"), list)
        and len(record["names"]) == len(record["dtypes"])
        and all(isinstance(n, str) for n in record["names"])
        and all(isinstance(d, str) and d in KNOWN_DTYPE_NAMES for d in record["dtypes"])
    )
