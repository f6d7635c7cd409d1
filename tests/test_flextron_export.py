"""Export: physically sliced sub-networks reload with from_pretrained and match the masked forward."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from common.errors import UserFacingError
from lightning_modules.flextron import ElasticLM, SubnetConfig, activation_importance, sort_by_importance
from lightning_modules.flextron.budgets import param_table
from lightning_modules.flextron.elastic import WidthSpace
from lightning_modules.flextron.export import export_subnetwork
from tests.flextron_helpers import (
    calib_batches,
    tiny_llama,
    tiny_neox,
)


def _elastic(builder, **kw):
    model = builder(**kw)
    sort_by_importance(model, activation_importance(model, calib_batches(2)))
    return ElasticLM(model)


@pytest.mark.parametrize(
    ("builder", "cfg", "arch"),
    [
        (tiny_llama, SubnetConfig([64, 64], [2, 2]), "LlamaForCausalLM"),
        (tiny_llama, SubnetConfig([32, 128], [1, 3]), "FlextronLlamaForCausalLM"),
        (tiny_neox, SubnetConfig([64, 64], [4, 4]), "GPTNeoXForCausalLM"),
        (tiny_neox, SubnetConfig([96, 32], [2, 3]), "FlextronGPTNeoXForCausalLM"),
    ],
)
def test_export_matches_masked_forward_and_reloads(tmp_path, builder, cfg, arch):
    elm = _elastic(builder)
    report = export_subnetwork(elm, cfg, tmp_path / "sub")
    assert report["architecture"] == arch
    assert report["max_abs_logit_diff_vs_masked_elastic"] < 1e-5
    # reload in a fresh call and check the logits against the sliced elastic forward on new tokens
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sub", dtype=torch.float32).eval()
    ids = calib_batches(1, seed=11)[0]
    with torch.no_grad(), elm.subnet(cfg):
        ref = elm.model(input_ids=ids, use_cache=False).logits
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=False).logits
    assert (got - ref).abs().max() < 1e-5
    # the parameter count is real (smaller) and agrees with the budget table
    params = sum(p.numel() for p in model.parameters())
    assert params == report["parameters"] < report["parent_parameters"]
    space = WidthSpace(sorted(set(cfg.mlp) | {elm.spec.intermediate_size}),
                       sorted(set(cfg.attn) | {elm.spec.num_groups}), elm.spec.num_layers)
    assert param_table(elm, space).of(space, cfg) == params
    meta = json.loads((tmp_path / "sub" / "flextron_export.json").read_text())
    assert meta["subnet"] == cfg.to_dict()


def test_export_with_skipped_layer_runs_trust_remote_code(tmp_path):
    elm = _elastic(tiny_llama, num_hidden_layers=3)
    cfg = SubnetConfig([64, 64, 32], [2, 1, 2], [False, True, False])
    report = export_subnetwork(elm, cfg, tmp_path / "skip")
    assert report["max_abs_logit_diff_vs_masked_elastic"] < 1e-5
    assert (tmp_path / "skip" / "modeling_flextron.py").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "skip", trust_remote_code=True, dtype=torch.float32)
    out = model.generate(calib_batches(1, batch=1, seq=6)[0], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)


def test_export_refuses_foreign_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(UserFacingError, match="not a Flextron export"):
        export_subnetwork(_elastic(tiny_llama), SubnetConfig([64, 64], [2, 2]), tmp_path / "x")
