"""GD through LoRA adapters (QLoRA on a 4-bit base, LoRA on 8-bit and float bases), on CPU.

bitsandbytes 0.50 has CPU kernels, so the quantized bases here are the real bitsandbytes layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.errors import UserFacingError
from common.hf_loading import load_causal_lm, tiny_llama_config
from lightning_modules.probes import icl_gd
from lightning_modules.probes.icl_finetune import GDConfig, demo_loss, encode_demos, finetune_copy
from lightning_modules.probes.icl_gd import RESULTS_FILE, ICLvsGDProbe
from lightning_modules.probes.icl_lora import LoraSettings, adapter_copy, gd_variant, prepare_quantized_base
from lightning_modules.probes.icl_scoring import encode_requests, score_requests
from tests.conftest import parse_config
from tests.shrink import shrunk_config_file
from tests.test_icl_finetune import DEMOS, QUERIES
from tests.test_icl_scoring import ByteTokenizer

TOK = ByteTokenizer(bos=True)
CHOICES = [" A", " B"]  # one byte each, so neither wins by length
LORA_GD = GDConfig("full_batch", "all", lr=0.3, epochs=2, lora=LoraSettings())


def _demos(label: str) -> list:
    return encode_demos(TOK, [(prompt, label) for prompt, _ in DEMOS])


def _loglik(model) -> torch.Tensor:
    return score_requests(model, encode_requests(TOK, QUERIES, CHOICES)).loglik


def _quantized(quantization: str):
    model = load_causal_lm(model_config=tiny_llama_config(), quantization=quantization, seed=0).eval()
    return prepare_quantized_base(model)


@pytest.fixture(scope="module")
def base_4bit():
    return _quantized("4bit")


def _snapshot(model) -> dict[str, torch.Tensor]:
    """Every stored base tensor, bit for bit: packed 4-bit weights, their NF4 scales, float weights, buffers."""
    out = {n: t.detach().clone() for n, t in (*model.named_parameters(), *model.named_buffers())}
    for n, p in model.named_parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            out[f"{n}.absmax"] = state.absmax.clone()
    return out


def test_qlora_gd_on_a_4bit_base_follows_the_demonstrations(base_4bit) -> None:
    assert {type(m).__name__ for m in base_4bit.modules()} >= {"Linear4bit"}
    zero_shot = _loglik(base_4bit).argmax(-1)
    assert zero_shot.tolist() == [1, 1, 1]  # the untouched tiny model prefers " B" on every query
    for label, expected in ((" A", 0), (" B", 1)):
        tuned, losses = finetune_copy(base_4bit, _demos(label), LORA_GD)
        assert losses[-1] < losses[0] - 0.5
        assert float(demo_loss(tuned, _demos(label))) < losses[0] - 0.5
        assert _loglik(tuned).argmax(-1).tolist() == [expected] * len(QUERIES)
    # GD on all-" A" demos flipped every prediction: the adapters, not the base, carry it
    tuned, _ = finetune_copy(base_4bit, _demos(" A"), LORA_GD)
    assert any("lora_A" in n for n, _ in tuned.named_parameters())
    assert not any("lora_A" in n for n, _ in base_4bit.named_parameters())


def test_every_lora_gd_run_starts_from_the_same_untouched_base(base_4bit) -> None:
    before, zs = _snapshot(base_4bit), _loglik(base_4bit)
    first, first_losses = finetune_copy(base_4bit, _demos(" A"), LORA_GD)
    first_scores = _loglik(first)
    other, other_losses = finetune_copy(base_4bit, _demos(" B"), LORA_GD)
    again, again_losses = finetune_copy(base_4bit, _demos(" A"), LORA_GD)
    # fresh adapters predict exactly as the base: each run's first loss is the base's loss on its demos
    with torch.no_grad():
        assert first_losses[0] == pytest.approx(float(demo_loss(base_4bit, _demos(" A"))), abs=1e-6)
        assert other_losses[0] == pytest.approx(float(demo_loss(base_4bit, _demos(" B"))), abs=1e-6)
    # nothing carried over from the " B" run: the repeat equals the first run exactly
    assert again_losses == first_losses
    assert torch.equal(_loglik(again), first_scores)
    assert torch.equal(_loglik(first), first_scores)  # and later runs did not touch earlier adapters
    after = _snapshot(base_4bit)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(_loglik(base_4bit), zs)
    # the copies share the base's 4-bit weights instead of duplicating them
    base_weight = base_4bit.model.layers[0].self_attn.q_proj.weight
    assert first.model.layers[0].self_attn.q_proj.base_layer.weight.data_ptr() == base_weight.data_ptr()


def test_lora_gd_on_an_8bit_base_shares_its_int8_state() -> None:
    base = _quantized("8bit")
    zero_shot = _loglik(base)  # bitsandbytes fills each layer's state (int8 weight, scales) on its first call
    layer = base.model.layers[0].self_attn.k_proj
    assert type(layer).__name__ == "Linear8bitLt" and layer.state.CB is not None
    with torch.inference_mode(False):
        shell, adapters = adapter_copy(base, LoraSettings(r=4))
    assert shell.model.layers[0].self_attn.k_proj.base_layer.state.CB is layer.state.CB  # not a second int8 copy
    assert adapters and all(p.requires_grad and p.dtype == torch.float32 for p in adapters)
    tuned, losses = finetune_copy(base, _demos(" A"), LORA_GD)
    assert losses[-1] < losses[0] - 0.5
    assert (_loglik(tuned) - zero_shot).abs().max() > 0.5


def test_kv_lora_on_a_float_base_adapts_only_key_value_projections() -> None:
    base = load_causal_lm(model_config=tiny_llama_config(), seed=0).eval().requires_grad_(False)
    before = _snapshot(base)
    cfg = GDConfig("sgd", "kv", lr=0.3, epochs=1, lora=LoraSettings(r=4, alpha=8))
    tuned, losses = finetune_copy(base, _demos(" A"), cfg)
    adapted = {n.rsplit(".lora_", 1)[0] for n, _ in tuned.named_parameters() if ".lora_" in n}
    assert adapted and all(n.endswith(("k_proj", "v_proj")) for n in adapted)
    assert len(losses) == len(DEMOS) and (_loglik(tuned) - _loglik(base)).abs().max() > 1e-2
    assert all(torch.equal(t, before[n]) for n, t in _snapshot(base).items())


def test_the_variant_names_say_what_gd_trained() -> None:
    lora = LoraSettings(r=8)
    assert gd_variant(None, "all", None) == "GD (full)"
    assert gd_variant(None, "kv", None) == "GD (full, K/V only)"
    assert gd_variant(lora, "all", "4bit") == "GD (QLoRA r=8, 4-bit base)"
    assert gd_variant(lora, "all", "8bit") == "GD (LoRA r=8, 8-bit base)"
    assert gd_variant(lora, "kv", None) == "GD (LoRA r=8, K/V only)"


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_full_gd_on_a_quantized_base_is_refused_before_anything_loads(quantization, monkeypatch) -> None:
    def no_loading(*args, **kwargs):
        raise AssertionError("the refusal must come before the model is loaded or anything scored")

    monkeypatch.setattr(icl_gd, "load_causal_lm", no_loading)
    with pytest.raises(UserFacingError, match=f"full GD cannot update a {quantization} .*use gd_method: lora"):
        ICLvsGDProbe(model=None, model_config=tiny_llama_config(), tokenizer="byt5", quantization=quantization)
    probe = ICLvsGDProbe(model=None, model_config=tiny_llama_config(), tokenizer="byt5", quantization=quantization,
                         gd_method="lora")
    assert probe.lm is None and probe.gd.lora == LoraSettings(init_seed=0)
    with pytest.raises(UserFacingError, match="gd_method must be 'full' or 'lora'"):
        ICLvsGDProbe(model=None, model_config=tiny_llama_config(), gd_method="adapters")
    with pytest.raises(UserFacingError, match="lora_r >= 1"):
        ICLvsGDProbe(model=None, model_config=tiny_llama_config(), gd_method="lora", lora_r=0)


def test_shipped_qlora_config_runs_shrunk_and_names_the_variant(tmp_path: Path, capsys) -> None:
    cli = parse_config(shrunk_config_file("configs/probes/icl_gd_qlora.yaml", root=tmp_path),
                       overrides=["--data.init_args.n_dev=4", "--model.init_args.gd_lr_grid=[0.01, 0.1]"])
    cli.trainer.test(cli.model, datamodule=cli.datamodule)
    (path,) = tmp_path.rglob(RESULTS_FILE)
    results = json.loads(path.read_text())
    qlora = "GD (QLoRA r=16, 4-bit base)"
    assert results["gd_variant"] == {"pretrained": qlora, "random_init": "GD (LoRA r=16)"}
    assert results["config"]["gd_method"] == "lora" and results["config"]["quantization"] == "4bit"
    for unit in results["units"]:
        assert unit["gd_variant"] == (qlora if unit["model_variant"] == "pretrained" else "GD (LoRA r=16)")
        assert unit["gd"]["lora"]["r"] == 16 and unit["gd"]["lora"]["target_modules"] == "all-linear"
    assert f"GD = {qlora}" in capsys.readouterr().out  # the printed table says which GD it compares
