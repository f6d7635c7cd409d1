"""Every configured budget is reachable: sub-layers of width 0 lower the floor; an unreachable budget is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from common.errors import UserFacingError
from common.hf_loading import tiny_llama_config
from lightning_modules.flextron import ElasticLM, SubnetConfig
from lightning_modules.flextron.budgets import param_table
from lightning_modules.flextron.elastic import WidthSpace
from lightning_modules.flextron.export import export_subnetwork
from lightning_modules.flextron.module import FlextronModule
from tests.flextron_helpers import calib_batches, tiny_llama, tiny_neox

ROOT = Path(__file__).resolve().parents[1]


def test_skipped_sublayers_export_exactly_and_generate_with_a_cache(tmp_path):
    elm = ElasticLM(tiny_llama(num_hidden_layers=3))
    # layer 0 keeps no attention (the cache still counts its tokens), layer 1 keeps nothing at all
    cfg = SubnetConfig([0, 0, 128], [0, 0, 4])
    report = export_subnetwork(elm, cfg, tmp_path / "skip")
    assert report["max_abs_logit_diff_vs_masked_elastic"] < 1e-5
    space = WidthSpace.from_ratios(elm.spec, [0.0, 0.5, 1.0], [0.0, 0.5, 1.0])
    assert space.mlp == [0, 64, 128] and space.attn == [0, 2, 4]
    assert param_table(elm, space).of(space, cfg) == report["parameters"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "skip", trust_remote_code=True, dtype=torch.float32)
    prompt = calib_batches(1, batch=1, seq=6)[0]
    cached = model.eval().generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with elm.subnet(cfg):
        uncached = elm.model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, uncached)


def test_width_zero_is_refused_where_an_output_bias_would_remain():
    with pytest.raises(UserFacingError, match="without bias"):
        WidthSpace.from_ratios(ElasticLM(tiny_neox()).spec, [0.0, 1.0], [1.0])


def _tiny(budgets, **kwargs) -> FlextronModule:
    return FlextronModule(model=None, model_config=tiny_llama_config(), budgets=budgets, calibration_batches=0,
                          budget_metric="params", **kwargs)


def test_budget_below_the_floor_is_an_error_at_setup():
    module = _tiny([0.2, 1.0], mlp_ratios=[0.0, 0.5, 1.0], attn_ratios=[0.0, 1.0])
    with pytest.raises(UserFacingError, match=r"budgets \[0.2\] are below the smallest reachable"):
        module.setup("validate")
    # without width 0 the tiny model's floor is higher: 0.5 is out of reach, with it 0.5 trains
    with pytest.raises(UserFacingError, match="below the smallest reachable"):
        _tiny([0.5, 1.0], mlp_ratios=[0.125, 1.0], attn_ratios=[0.5, 1.0]).setup("validate")
    reachable = _tiny([0.5, 1.0], mlp_ratios=[0.0, 0.125, 1.0], attn_ratios=[0.0, 0.5, 1.0])
    reachable.setup("validate")
    assert reachable.budget_floor() < 0.5
    assert 0.5 * 0.95 <= reachable.realized(reachable.subnet_for_budget(0.5)) <= 0.5


def _smollm2_config_reaches_every_budget(metric: str) -> None:
    """The shipped SmolLM2 config's own widths and budgets (read from the YAML, so they cannot drift apart)."""
    args = yaml.safe_load((ROOT / "configs/flextron/smollm2.yaml").read_text())["model"]["init_args"]
    module = FlextronModule(**{**args, "budget_metric": metric, "calibration_batches": 0, "latency_reps": 2})
    module.setup("validate")  # refuses unreachable budgets
    assert min(module.budgets) == 0.3 and module.budget_floor() < 0.3
    for budget in module.budgets:  # an untrained router: the constrained decode alone meets every budget
        assert budget * 0.95 <= module.realized(module.subnet_for_budget(budget)) <= budget * (1 + 1e-6)


def test_smollm2_config_reaches_every_budget_of_params(tmp_cache):
    _smollm2_config_reaches_every_budget("params")


@pytest.mark.slow
def test_smollm2_config_reaches_every_budget_of_prefill_latency(tmp_cache):
    """Measures SmolLM2's latency table here (~20 s on an idle CPU, minutes on a shared one)."""
    _smollm2_config_reaches_every_budget("latency_prefill")
