"""Turn a training checkpoint into a Hugging Face folder that ``from_pretrained``, lm-eval and vLLM load.

After continued pretraining a user wants the model, not a Lightning checkpoint: this rebuilds the
module's architecture from the checkpoint's hyperparameters on the meta device (nothing is loaded
twice), materialises a plain ``AutoModelForCausalLM`` from its config, loads the trained weights into
it strictly, and writes weights, config, generation config and tokenizer as one folder swapped in
whole. Reading the checkpoint file (plain or ExCP-compressed) is the caller's job.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from common.atomic import atomic_directory
from common.errors import UserFacingError

DEFAULT_MODULE = "lightning_modules.causal_lm.CausalLMModule"
MODEL_PREFIX = "model."


class ExportError(UserFacingError):
    """The checkpoint cannot be exported as a Hugging Face model; the message says why."""


def _module_class(hyper_parameters: dict[str, Any], class_path: str | None) -> type:
    path = class_path or hyper_parameters.get("_class_path") or DEFAULT_MODULE
    module_name, _, class_name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ExportError(f"cannot import the checkpoint's module class {path!r}: pass --class-path") from error


def rebuild_on_meta(checkpoint: dict[str, Any], class_path: str | None = None) -> Any:
    """The LightningModule a checkpoint came from, built from its hyperparameters without weights."""
    hyper_parameters = checkpoint.get("hyper_parameters")
    if not isinstance(hyper_parameters, dict):
        raise ExportError("the checkpoint has no hyper_parameters: it was not written by a LightningModule that "
                          "calls save_hyperparameters()")
    init_args = {k: v for k, v in hyper_parameters.items() if not k.startswith("_")}
    with torch.device("meta"):
        return _module_class(hyper_parameters, class_path)(**init_args)


def trained_model(checkpoint: dict[str, Any], module: Any) -> PreTrainedModel:
    """A CPU ``AutoModelForCausalLM`` with the module's architecture and the checkpoint's trained weights."""
    inner = getattr(module, "model", None)
    if not isinstance(inner, PreTrainedModel):
        raise ExportError(f"{type(module).__name__} keeps no Hugging Face model in `.model`: nothing to export")
    state = {k[len(MODEL_PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(MODEL_PREFIX)}
    if not state:
        raise ExportError("the checkpoint's state_dict has no 'model.*' weights")
    dtype = next(iter(state.values())).dtype
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(inner.config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ExportError(f"the checkpoint's weights do not fit {type(model).__name__}: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    model.tie_weights()
    model.generation_config = inner.generation_config
    return model.eval()


def export_hf_folder(checkpoint: dict[str, Any], out: str | Path, *, class_path: str | None = None,
                     overwrite: bool = False) -> Path:
    """Write ``checkpoint``'s model and tokenizer to ``out`` as a Hugging Face folder (atomically).

    Args:
        checkpoint: a Lightning checkpoint dict (``state_dict`` + ``hyper_parameters``).
        out: the folder to write; refused when it exists unless ``overwrite``.
        class_path: the LightningModule class, when the checkpoint does not record it (runs outside
            LightningCLI): defaults to :data:`DEFAULT_MODULE`.
        overwrite: replace an existing folder (the old one stays until the new one is complete).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists: choose another --out or pass --force to replace it")
    module = rebuild_on_meta(checkpoint, class_path)
    model = trained_model(checkpoint, module)
    try:
        with atomic_directory(out) as staging:
            model.save_pretrained(staging)
            tokenizer = getattr(module, "tokenizer", None)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
    except OSError as error:
        raise ExportError(f"cannot write {out}: {error.strerror or error}") from error
    return out


def push_folder_to_hub(folder: str | Path, repo_id: str) -> str:
    """Upload an exported folder to the Hugging Face Hub; returns the repo URL."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        return str(api.upload_folder(folder_path=str(folder), repo_id=repo_id))
    except Exception as error:  # noqa: BLE001 - network, auth and permission failures all mean "could not push"
        raise ExportError(f"cannot push to the Hub repo {repo_id!r} ({type(error).__name__}: {error}); the export "
                          f"is complete at {folder}: push it later with `huggingface-cli upload {repo_id} {folder}`"
                          ) from error
