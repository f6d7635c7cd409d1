"""Export a dynamic Flextron model (nested weights + per-sequence router) as one Hugging Face folder.

The folder holds the full importance-sorted weights, the router's weights, the cost table and width
choices in ``config.json``, and the standalone code of :mod:`.hf_dynamic` with the three files it
imports; ``auto_map`` points ``AutoModelForCausalLM`` there, so stock transformers loads it with
``trust_remote_code=True`` and each prompt runs the sliced widths its router picks.

The export is verified before it replaces anything: the folder is reloaded through the remote-code
path and, on a probe batch, its routed widths and logits are compared with the Lightning module's own
sliced dynamic forward (:func:`.dynamic.route_and_run`); ``flextron_export.json`` records both.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from common.atomic import atomic_write_json
from common.errors import UserFacingError

from . import hf_dynamic, hf_elastic, hf_modeling, knapsack
from .dynamic import ROUTING_RESOLUTION, route_and_run
from .export import check_export_target, staged_export
from .routers import DynamicRouter

#: the standalone files the exported model imports (copied under their own names: relative imports resolve)
CODE_FILES = (hf_dynamic, hf_elastic, hf_modeling, knapsack)
#: largest logit difference accepted between the reloaded folder and the module (same kernels: 0.0 expected)
EXACT_ATOL = 1e-5


def check_dynamic_exportable(module, budget: float) -> None:
    """Raise :class:`UserFacingError` naming why ``module`` cannot be exported dynamically at ``budget``."""
    router = module.router
    if not isinstance(router, DynamicRouter):
        raise UserFacingError("this checkpoint has a static router (one sub-network per budget): export it with "
                              "--budget without --dynamic")
    if router.per_token:
        raise UserFacingError("per-token routing picks widths for every token, which a batch cannot run sliced: "
                              "only per-sequence dynamic routers (per_token: false) export")
    if module.elastic.spec.family != "llama":
        raise UserFacingError(f"dynamic export supports the Llama family (SmolLM2); this model is "
                              f"{module.elastic.spec.family}: export a fixed routing with --subnet")
    lo, hi = module.budgets[0], module.budgets[-1]
    if not lo - 1e-6 <= budget <= hi + 1e-6:
        raise UserFacingError(f"budget {budget:g} outside the trained range [{lo:g}, {hi:g}]: the router was not "
                              "trained there")
    if module.cost is None:
        raise UserFacingError("the checkpoint holds no cost table: load it with FlextronModule and call "
                              "build_cost_table() first")


def dynamic_config(module, budget: float) -> hf_dynamic.FlextronDynamicConfig:
    """The exported config: the parent's Llama config plus what routing needs."""
    base = module.model.config.to_dict()
    for key in ("architectures", "auto_map", "model_type", "transformers_version", "quantization_config"):
        base.pop(key, None)
    cost = module.cost
    flextron = {
        "budgets": list(module.budgets), "budget": float(budget), "budget_metric": module.hparams.budget_metric,
        "mlp_widths": list(module.space.mlp), "attn_widths": list(module.space.attn),
        "cost": {**cost.to_dict(), "full": cost.full},
        "router_hidden": int(module.hparams.router_hidden),
        "routing_slack": float(module.hparams.get("routing_slack", 0.03)), "routing_resolution": ROUTING_RESOLUTION,
    }
    return hf_dynamic.FlextronDynamicConfig(flextron=flextron, **base)


def build_dynamic_model(module, budget: float) -> hf_dynamic.FlextronDynamicLlamaForCausalLM:
    """A fresh exportable model holding the module's nested weights and router (not a view: copies)."""
    config = dynamic_config(module, budget)
    model = hf_dynamic.FlextronDynamicLlamaForCausalLM(config).to(next(module.model.parameters()).dtype)
    state = {**module.model.state_dict(), **{f"router.{k}": v for k, v in module.router.state_dict().items()}}
    missing, unexpected = model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weights do not fit the dynamic export: missing={missing} unexpected={unexpected}")
    model.router.float()  # routing is decided in float32, as in training
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


@torch.no_grad()
def export_dynamic(module, out_dir: str | Path, budget: float, probe_ids: torch.Tensor | None = None,
                   extra: dict | None = None) -> dict:
    """Write ``module``'s dynamic model to ``out_dir`` (swapped in whole) and verify it.

    Args:
        module: a :class:`~.module.FlextronModule` with a per-sequence dynamic router and a cost table.
        out_dir: destination folder (an earlier Flextron export there is replaced once this one is verified).
        budget: the default budget of the exported model (callers may pass another in the trained range).
        probe_ids: ``[B, T]`` tokens for the check (default: 4 x 32 fixed random tokens).
        extra: more fields for ``flextron_export.json``.

    Returns:
        The report also written to ``flextron_export.json``.
    """
    check_dynamic_exportable(module, budget)
    check_export_target(out_dir)
    model = build_dynamic_model(module, budget)
    if probe_ids is None:
        vocab = module.model.config.vocab_size
        probe_ids = torch.randint(0, vocab, (4, 32), generator=torch.Generator().manual_seed(0))
    with staged_export(out_dir) as staging:
        return _write_verified(module, model, staging, budget, probe_ids, extra)


def _write_verified(module, model, folder: Path, budget: float, probe_ids: torch.Tensor, extra: dict | None) -> dict:
    """Save, add the code and ``auto_map``, reload through remote code, compare with the module's routed forward."""
    model.save_pretrained(folder)
    for code in CODE_FILES:
        shutil.copy(Path(code.__file__), folder / Path(code.__file__).name)
    conf_path = folder / "config.json"
    conf = json.loads(conf_path.read_text())
    conf["auto_map"] = {"AutoConfig": "hf_dynamic.FlextronDynamicConfig",
                        "AutoModelForCausalLM": "hf_dynamic.FlextronDynamicLlamaForCausalLM"}
    atomic_write_json(conf_path, conf)
    reloaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    was_training = module.training
    module.eval()
    try:
        reference = route_and_run(module, probe_ids, budget)
    finally:
        module.train(was_training)
    got = reloaded(input_ids=probe_ids, use_cache=False).logits.float()
    widths = reloaded.last_routing
    expected = [{"mlp": list(s.mlp), "attn": list(s.attn)} for s in reference.subnets]
    diff = float((got - reference.logits.float()).abs().max())
    if widths != expected or not diff <= EXACT_ATOL:
        raise UserFacingError(f"the exported folder does not reproduce the module (widths equal: {widths == expected}, "
                              f"largest logit difference {diff:.3g}): nothing was written")
    report = {
        "kind": "dynamic", "architecture": type(reloaded).__name__, "model_type": reloaded.config.model_type,
        "parameters": sum(p.numel() for p in reloaded.parameters()),
        "router_parameters": sum(p.numel() for p in reloaded.router.parameters()),
        "budget_default": budget, "budgets_trained": list(module.budgets),
        "trust_remote_code_files": sorted(Path(code.__file__).name for code in CODE_FILES),
        "probe_widths": widths, "probe_realized": reference.realized, "probe_width_groups": reference.groups,
        "max_abs_logit_diff_vs_module_routed": diff,
        **(extra or {}),
    }
    atomic_write_json(folder / "flextron_export.json", report)
    return report


__all__ = ["build_dynamic_model", "check_dynamic_exportable", "dynamic_config", "export_dynamic"]
