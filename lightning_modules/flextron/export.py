"""Export a sub-network as a physically sliced, stand-alone Hugging Face model.

* Uniform widths without skipped layers export as the stock architecture (``LlamaForCausalLM`` with
  smaller ``intermediate_size`` / head counts; GPT-NeoX when only the MLP shrinks).
* Anything else uses the registered ``flextron_llama`` / ``flextron_gpt_neox`` classes from
  ``hf_modeling.py``, which is copied into the export folder with an ``auto_map`` so that
  ``from_pretrained(dir, trust_remote_code=True)`` works without this package.

The export is verified: the reloaded model's logits are compared with the masked elastic forward on a
probe batch and the largest absolute difference is recorded in ``flextron_export.json``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, PreTrainedModel

from common.atomic import atomic_directory, atomic_write_json
from common.errors import UserFacingError

from . import hf_modeling
from .arch import layer_handles
from .elastic import ElasticLM, SubnetConfig, WidthSpace

hf_modeling.register()


def _sliced_state_dict(elm: ElasticLM, cfg: SubnetConfig) -> dict[str, torch.Tensor]:
    """Parent state dict with every elastic linear cut to ``cfg`` (skipped layers dropped)."""
    model = elm.model
    names = {id(m): n for n, m in model.named_modules()}
    cut: dict[str, torch.Tensor] = {}
    drop: list[str] = []
    for i, h in enumerate(layer_handles(model)):
        if cfg.skip[i]:
            drop.append(names[id(h.layer)] + ".")
            continue
        d, g = cfg.mlp[i], cfg.attn[i]
        # a sub-layer of width 0 exports as a parameter-free skipped module
        drop += [names[id(module)] + "." for module, width in ((h.mlp, d), (h.attn, g)) if width == 0]
        for lin, rows in [(lin, d) for lin in h.mlp_in] + [(lin, g * u) for lin, u in h.attn_in]:
            cut[names[id(lin)] + ".weight"] = lin.weight[:rows]
            if lin.bias is not None:
                cut[names[id(lin)] + ".bias"] = lin.bias[:rows]
        cut[names[id(h.mlp_out)] + ".weight"] = h.mlp_out.weight[:, :d]
        cut[names[id(h.attn_out)] + ".weight"] = h.attn_out.weight[:, : g * h.attn_out_unit]
    out = {}
    for k, v in model.state_dict().items():
        if any(k.startswith(p) for p in drop):
            continue
        out[k] = cut.get(k, v).detach().clone().contiguous()
    return out


def export_config(elm: ElasticLM, cfg: SubnetConfig):
    """The config of the exported model: stock when the widths allow it, Flextron's otherwise."""
    base = elm.model.config.to_dict()
    for key in ("architectures", "auto_map", "model_type", "transformers_version", "quantization_config"):
        base.pop(key, None)
    s = elm.spec
    uniform = (len(set(cfg.mlp)) == 1 and len(set(cfg.attn)) == 1 and not any(cfg.skip)
               and cfg.mlp[0] > 0 and cfg.attn[0] > 0)
    if s.family == "llama":
        if uniform:
            base.update(intermediate_size=cfg.mlp[0], num_key_value_heads=cfg.attn[0],
                        num_attention_heads=cfg.attn[0] * s.heads_per_group, head_dim=s.head_dim)
            return LlamaConfig(**base)
        base.pop("layer_intermediate_sizes", None)
        return hf_modeling.FlextronLlamaConfig(layer_intermediate_sizes=cfg.mlp, layer_kv_groups=cfg.attn,
                                               skip_layers=cfg.skip, **base)
    if uniform and cfg.attn[0] == s.num_groups:
        base.update(intermediate_size=cfg.mlp[0])
        return GPTNeoXConfig(**base)
    return hf_modeling.FlextronGPTNeoXConfig(layer_intermediate_sizes=cfg.mlp, layer_kv_groups=cfg.attn,
                                             skip_layers=cfg.skip, **base)


def build_subnetwork(elm: ElasticLM, cfg: SubnetConfig) -> PreTrainedModel:
    """A fresh, physically sliced model holding ``cfg``'s weights (not elastic)."""
    config = export_config(elm, cfg)
    dtype = next(elm.model.parameters()).dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = _sliced_state_dict(elm, cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(
            f"sliced weights do not fit the export architecture: missing={missing} unexpected={unexpected}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@torch.no_grad()
def export_subnetwork(elm: ElasticLM, cfg: SubnetConfig, out_dir: str | Path, probe_ids: torch.Tensor | None = None,
                      extra: dict | None = None) -> dict:
    """Write ``cfg`` as a stand-alone model to ``out_dir`` and verify it.

    Args:
        elm: the elastic model (its weights are read, not changed).
        cfg: the sub-network.
        out_dir: destination folder (staged beside it, then swapped in whole; an earlier export is replaced).
        probe_ids: ``[B, T]`` tokens for the exactness check (default: 2 x 32 fixed random tokens).
        extra: more fields for ``flextron_export.json`` (e.g. the budget).

    Returns:
        The report also written to ``flextron_export.json``: config, parameter count, class, the largest
        absolute logit difference between the reloaded export and the masked elastic forward.
    """
    check_export_target(out_dir)
    sub = build_subnetwork(elm, cfg)
    with staged_export(out_dir) as staging:
        return _write_verified(elm, cfg, sub, staging, probe_ids, extra)


def check_export_target(out_dir: str | Path) -> None:
    """Refuse a file, or a folder holding something other than an earlier Flextron export (never overwritten)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserFacingError(f"cannot write the export to {out}: it is a file, not a folder")
    if out.exists() and any(out.iterdir()) and not (out / "flextron_export.json").exists():
        raise UserFacingError(f"{out} exists and is not a Flextron export: choose an empty or new folder")


@contextmanager
def staged_export(out_dir: str | Path) -> Iterator[Path]:
    """A staging folder beside ``out_dir``, swapped in whole when the body succeeds (see ``atomic_directory``).

    An earlier export stays intact until the new one is written and verified; a disk error (read-only,
    full) becomes one :class:`UserFacingError` line.
    """
    check_export_target(out_dir)
    try:
        with atomic_directory(out_dir) as staging:
            yield staging
    except OSError as error:
        raise UserFacingError(f"cannot write the export to {out_dir}: {error}") from error


def _write_verified(elm: ElasticLM, cfg: SubnetConfig, sub: PreTrainedModel, folder: Path,
                    probe_ids: torch.Tensor | None, extra: dict | None) -> dict:
    """Save ``sub`` into ``folder``, reload it from disk, compare with the masked elastic forward, write the report."""
    sub.save_pretrained(folder)
    custom = sub.config.model_type.startswith("flextron_")
    if custom:
        shutil.copy(Path(hf_modeling.__file__), folder / "modeling_flextron.py")
        conf_path = folder / "config.json"
        conf = json.loads(conf_path.read_text())
        prefix = "FlextronLlama" if conf["model_type"] == "flextron_llama" else "FlextronGPTNeoX"
        conf["auto_map"] = {"AutoConfig": f"modeling_flextron.{prefix}Config",
                            "AutoModelForCausalLM": f"modeling_flextron.{prefix}ForCausalLM"}
        atomic_write_json(conf_path, conf)
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if probe_ids is None:
        probe_ids = torch.randint(0, elm.model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    reference = _elastic_reference_logits(elm, cfg, probe_ids)
    got = reloaded(input_ids=probe_ids.cpu(), use_cache=False).logits.float()
    report = {
        "subnet": cfg.to_dict(), "parameters": sum(p.numel() for p in reloaded.parameters()),
        "parent_parameters": sum(p.numel() for p in elm.model.parameters()),
        "architecture": type(reloaded).__name__, "model_type": reloaded.config.model_type,
        "trust_remote_code_files": ["modeling_flextron.py"] if custom else [],
        "max_abs_logit_diff_vs_masked_elastic": float((got - reference).abs().max()),
        "files_sha256": {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file()},
        **(extra or {}),
    }
    atomic_write_json(folder / "flextron_export.json", report)
    return report


@torch.no_grad()
def _elastic_reference_logits(elm: ElasticLM, cfg: SubnetConfig, probe_ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``cfg`` in the elastic parent: through masks (an independent path from slicing) where
    masks can express it, through the sliced forward when a layer is skipped."""
    device = next(elm.model.parameters()).device
    was_training = elm.model.training
    elm.model.eval()
    try:
        if any(cfg.skip):
            with elm.subnet(cfg):
                return elm.model(input_ids=probe_ids.to(device), use_cache=False).logits.float().cpu()
        mlp_masks, attn_masks = subnet_masks(elm, cfg)
        elm.set_masks(mlp_masks.to(device), attn_masks.to(device))
        try:
            return elm.model(input_ids=probe_ids.to(device), use_cache=False).logits.float().cpu()
        finally:
            elm.set_subnet(None)
    finally:
        elm.model.train(was_training)


def subnet_masks(elm: ElasticLM, cfg: SubnetConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """0/1 prefix masks ``[L, units]`` equivalent to the hard widths of ``cfg``."""
    s = elm.spec
    mlp = (torch.arange(s.intermediate_size)[None, :] < torch.tensor(cfg.mlp)[:, None]).float()
    attn = (torch.arange(s.num_groups)[None, :] < torch.tensor(cfg.attn)[:, None]).float()
    return mlp, attn


def uniform_subnet(elm: ElasticLM, space: WidthSpace, index: int) -> SubnetConfig:
    """Every layer at choice ``index`` of ``space`` (clamped per list)."""
    L = space.num_layers
    mlp, attn = space.mlp[min(index, len(space.mlp) - 1)], space.attn[min(index, len(space.attn) - 1)]
    return SubnetConfig([mlp] * L, [attn] * L)


__all__ = ["build_subnetwork", "check_export_target", "export_config", "export_subnetwork", "staged_export",
           "subnet_masks", "uniform_subnet"]
