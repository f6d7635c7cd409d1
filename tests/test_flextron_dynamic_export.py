"""A dynamic Flextron model exports as one Hugging Face folder that routes and slices like the module.

Tolerance: the folder runs the same kernels on the same weights as the module's sliced dynamic forward
(:func:`route_and_run`), so logits agree to 1e-5 (0.0 observed); routed widths agree exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.dynamic_module_utils import get_imports

import lightning_modules.flextron.export_dynamic as export_dynamic_module
from common.errors import UserFacingError
from common.hf_loading import tiny_llama_config
from lightning_modules.flextron.__main__ import main
from lightning_modules.flextron.dynamic import route_and_run
from lightning_modules.flextron.export_dynamic import export_dynamic
from lightning_modules.flextron.module import FlextronModule

ATOL = 1e-5
BUDGET = 0.6
#: what the shipped code may import: a user's environment has transformers (hence torch and numpy), nothing more
SHIPPED_IMPORTS = {"__future__", "collections", "contextlib", "dataclasses", "numpy", "torch", "transformers"}


def _dynamic_module(router: str = "dynamic", per_token: bool = False, **config) -> FlextronModule:
    """A tiny Flextron module whose router is perturbed so that a batch splits into several width groups."""
    module = FlextronModule(model=None, model_config=tiny_llama_config(**config), tokenizer="byt5",
                            budgets=[0.5, 0.8, 1.0], budget_metric="params", router=router, per_token=per_token,
                            calibration_batches=0, mlp_ratios=[0.0, 0.25, 0.5, 1.0], attn_ratios=[0.0, 0.5, 1.0])
    module.setup("validate")
    module.eval()
    torch.manual_seed(0)
    layers = (module.router.proj, module.router.head.net[2]) if router == "dynamic" else (module.router.head.net[2],)
    for layer in layers:  # an untrained router sends every input alike
        torch.nn.init.normal_(layer.weight, std=2.0)
    return module


def _probe(batch: int = 6, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 384, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[FlextronModule, Path]:
    """A GQA model with tied embeddings (as SmolLM2), exported at the default budget."""
    module = _dynamic_module(num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("dyn") / "export"
    export_dynamic(module, folder, BUDGET)
    return module, folder


def _widths(subnets) -> list[dict]:
    return [{"mlp": list(s.mlp), "attn": list(s.attn)} for s in subnets]


def test_folder_reloads_through_remote_code_and_matches_the_module(exported):
    module, folder = exported
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules.")  # the folder's copy, not this package
    for code in ("hf_dynamic.py", "hf_elastic.py", "hf_modeling.py", "knapsack.py"):
        assert set(get_imports(folder / code)) <= SHIPPED_IMPORTS, code
    ids = _probe()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    reference = route_and_run(module, ids, BUDGET)
    assert reference.groups > 1  # the batch really splits by choice, so grouping is exercised
    assert model.last_routing == _widths(reference.subnets)
    assert (logits - reference.logits).abs().max() <= ATOL
    report = json.loads((folder / "flextron_export.json").read_text())
    assert report["max_abs_logit_diff_vs_module_routed"] <= ATOL
    assert all(r <= BUDGET * (1 + 1e-6) for r in report["probe_realized"])


@pytest.mark.slow  # a fresh interpreter importing torch and transformers: ~12 s of CPU
def test_folder_reloads_in_an_interpreter_without_this_project(exported, tmp_path):
    module, folder = exported
    ids = _probe()
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        "with torch.no_grad():\n"
        "    logits = model(input_ids=ids).logits\n"
        "assert 'lightning_modules' not in sys.modules and 'common' not in sys.modules\n"
        f"torch.save({{'logits': logits, 'widths': model.last_routing}}, {str(tmp_path / 'out.pt')!r})\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    got = torch.load(tmp_path / "out.pt")
    reference = route_and_run(module, ids, BUDGET)
    assert got["widths"] == _widths(reference.subnets)
    assert (got["logits"] - reference.logits).abs().max() <= ATOL


def test_each_group_computes_only_its_prefix_slices(exported):
    module, folder = exported
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = _probe()
    produced: list[tuple[int, int]] = []  # (rows in the call, neurons the first MLP computed)
    up_proj = model.model.layers[0].mlp.up_proj
    hook = up_proj.register_forward_hook(lambda mod, args, out: produced.append((out.shape[0], out.shape[-1])))
    try:
        with torch.no_grad():
            model(input_ids=ids, budget=0.5)
    finally:
        hook.remove()
    choices = [json.dumps(w) for w in model.last_routing]
    # one forward per group of equal widths, its first MLP cut to the group's width (0 skips it: no call)
    groups = [(choices.count(c), json.loads(c)["mlp"][0]) for c in set(choices)]
    assert sorted(produced) == sorted(g for g in groups if g[1] > 0) and len(groups) > 1
    assert min(width for _, width in groups) < module.space.mlp[-1]


def test_generate_gives_every_prompt_its_own_widths(exported):
    module, folder = exported
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = _probe(batch=4, length=8, seed=3)
    together = model.generate(ids, max_new_tokens=4, do_sample=False, budget=0.8)
    routed = route_and_run(module, ids, 0.8)
    assert model.last_routing == _widths(routed.subnets) and routed.groups > 1
    for row, subnet in enumerate(routed.subnets):
        alone = model.generate(ids[row : row + 1], max_new_tokens=4, do_sample=False, budget=0.8)
        assert torch.equal(together[row, : alone.shape[1]], alone[0])
        # the cached, sliced decode of the export equals the module's uncached forward at those widths
        with torch.no_grad(), module.elastic.subnet(subnet):
            reference = module.model.generate(ids[row : row + 1], max_new_tokens=4, do_sample=False, use_cache=False)
        assert torch.equal(alone, reference)


def test_budgets_outside_the_trained_range_are_refused(exported):
    _, folder = exported
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with pytest.raises(ValueError, match="outside the trained range"):
        model(input_ids=_probe(), budget=0.3)


def test_failed_verification_leaves_the_earlier_export_intact(exported, tmp_path, monkeypatch):
    module, _ = exported
    folder = tmp_path / "export"
    export_dynamic(module, folder, BUDGET)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real = export_dynamic_module.route_and_run

    def drifted(*args, **kwargs):
        routed = real(*args, **kwargs)
        routed.logits = routed.logits + 1.0
        return routed

    monkeypatch.setattr(export_dynamic_module, "route_and_run", drifted)
    with pytest.raises(UserFacingError, match="does not reproduce"):
        export_dynamic(module, folder, 0.9)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging folder left behind


def _checkpoint(module: FlextronModule, path: Path) -> Path:
    """A Lightning checkpoint of ``module`` as the trainer writes it (state, hyperparameters, cost table)."""
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                  "pytorch-lightning_version": lightning.__version__}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def test_cli_exports_dynamic_and_refuses_what_cannot_be_one_line(capsys, tmp_path):
    dynamic = _checkpoint(_dynamic_module(), tmp_path / "dynamic.ckpt")
    assert main(["export", "--checkpoint", str(dynamic), "--dynamic", "--budget", "0.6", "--out",
                 str(tmp_path / "dyn")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["architecture"] == "FlextronDynamicLlamaForCausalLM" and summary["budget_default"] == 0.6
    assert summary["max_abs_logit_diff_vs_module_routed"] <= ATOL
    cases = [
        (_checkpoint(_dynamic_module(router="static"), tmp_path / "static.ckpt"), ["--dynamic", "--budget", "0.6"],
         "static router"),
        (_checkpoint(_dynamic_module(per_token=True), tmp_path / "token.ckpt"), ["--dynamic", "--budget", "0.6"],
         "per-token"),
        (dynamic, ["--dynamic", "--budget", "0.3"], "outside the trained range"),
        (dynamic, ["--dynamic", "--budget", "0.6", "--clamp"], "--dynamic takes --budget"),
        (dynamic, ["--budget", "0.6"], "pass --dynamic"),
    ]
    for ckpt, flags, expected in cases:
        assert main(["export", "--checkpoint", str(ckpt), *flags, "--out", str(tmp_path / "refused")]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
        assert not (tmp_path / "refused").exists()
