"""ExCP rate control: ``target_bits_per_param`` meets its budget whatever the gradient scale; ``alpha`` does not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.excp import ExCP, ExCPSettings, is_excp_file, load_checkpoint
from callbacks.excp.decoder import decode_sequence
from callbacks.excp.encoder import ExCPEncoder
from callbacks.excp.fileformat import ExCPFile
from common.atomic import atomic_write_bytes
from common.errors import UserFacingError
from tests.adam_series import adam_checkpoints, save_as_ckpt_files

TOLERANCE = 0.03
"""Achieved W+m+v bits per parameter of a delta stay within 3% of the target (measured: within 0.7%)."""


def _series(loss_scale: float) -> tuple[list[dict[str, Any]], list[str]]:
    """Three AdamW checkpoints of an MLP regression whose loss (hence gradients) is scaled by ``loss_scale``.

    Adam's updates do not depend on the gradient scale, its second moment grows with its square: the
    weights move alike, ``alpha / sqrt(mean(v))`` changes by the scale.
    """
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 128), torch.nn.GELU(), torch.nn.Linear(128, 16)
    )
    return adam_checkpoints(net, 32, 16, steps=12, every=4, loss_scale=loss_scale)


def _delta_bits(settings: ExCPSettings, series, names, folder: Path) -> tuple[list[float], list[Path], list[dict]]:
    """Bits per parameter of the coded W, m, v of each delta; the files; the encoder's reconstructions."""
    folder.mkdir()
    encoder = ExCPEncoder(settings)
    bits, paths, recons = [], [], []
    for i, ckpt in enumerate(series):
        path = folder / f"{i}.excp"
        encoded = encoder.encode(ckpt, target=path, optimizer_param_names=[names])
        atomic_write_bytes(path, encoded.data)
        encoder.commit(encoded, path)
        stats = encoded.stats
        if not stats["keyframe"]:
            bits.append(stats["bits_per_param_w"] + stats["bits_per_param_m"] + stats["bits_per_param_v"])
        paths.append(path)
        recons.append(encoded.recon)
    return bits, paths, recons


@pytest.fixture(scope="module")
def workloads():
    return {scale: _series(scale) for scale in (0.01, 1.0, 100.0)}


@pytest.mark.parametrize("target", [2.0, 0.75])
def test_budget_is_met_whatever_the_gradient_scale_and_alpha_is_not(workloads, tmp_path, target):
    budget = ExCPSettings(target_bits_per_param=target, kmeans_sample=4096)
    paper = ExCPSettings(kmeans_sample=4096)
    achieved, by_alpha = {}, {}
    for scale, (series, names) in workloads.items():
        achieved[scale], paths, recons = _delta_bits(budget, series, names, tmp_path / f"budget-{scale}")
        by_alpha[scale], _, _ = _delta_bits(paper, series, names, tmp_path / f"alpha-{scale}")
        # every delta within tolerance of the target
        assert all(abs(b - target) <= TOLERANCE * target for b in achieved[scale]), (scale, achieved[scale])
        # decoding reproduces the encoder's reconstruction bit for bit
        for (_, ckpt), recon in zip(decode_sequence(paths), recons, strict=True):
            assert all(torch.equal(ckpt["state_dict"][k], t) for k, t in recon.items())
    # alpha: the same weights trajectory costs far more bits when gradients are larger (at scale 1 this
    # early run, 8-12 steps at beta2 0.999, already keeps nearly every residual once v is bias-corrected;
    # measured: 0.14 and 0.21 bits/param at scale 0.01, 5.9 and 5.9 at scales 1 and 100)
    mean = {scale: sum(b) / len(b) for scale, b in by_alpha.items()}
    assert mean[100.0] > 1.5 * mean[0.01], by_alpha


def test_a_delta_budget_pays_for_small_tensors_first(workloads, tmp_path):
    """Biases keep every residual; the large tensors get what the delta's budget has left."""
    series, names = workloads[1.0]
    bits, paths, _ = _delta_bits(
        ExCPSettings(target_bits_per_param=1.0, kmeans_sample=4096), series, names, tmp_path / "d"
    )
    decoded = list(decode_sequence(paths))
    last = decoded[-1][1]["state_dict"]
    bias = "2.bias"
    assert torch.allclose(
        last[bias], series[-1]["state_dict"][bias], atol=0.05 * float(series[-1]["state_dict"][bias].abs().max())
    )
    assert all(abs(b - 1.0) <= TOLERANCE for b in bits)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 5e-5, "target_bits_per_param": 2.0}, "two rate modes"),
        ({"target_bits_per_param": 0.0}, "target_bits_per_param=0.0 is invalid"),
        ({"target_bits_per_param": float("nan")}, "is invalid"),
        ({"target_bits_per_param": 40}, "is invalid"),
        ({"target_bits_per_param": True}, "is invalid"),
        ({"alpha": -1.0}, "alpha=-1.0 is invalid"),
        ({"entropy_coder": "huffman"}, "entropy_coder='huffman' is invalid"),
        ({"v_floor": "no"}, "v_floor='no' is invalid: use true or false"),
        ({"residual": 0}, "residual=0 is invalid: use true or false"),
        ({"keyframe_interval": "20"}, "keyframe_interval='20' is invalid: use an integer"),
        ({"threads": 2.0}, "threads=2.0 is invalid: use an integer"),
        ({"beta": "2"}, "beta='2' is invalid: use a number"),
        ({"alpha": "5e-5"}, "alpha='5e-5' is invalid: use a number or null"),
        ({"quantizer": None}, "quantizer=None is invalid: use a string"),
    ],
)
def test_bad_rate_settings_are_one_line(kwargs, message):
    with pytest.raises(UserFacingError, match=message) as info:
        ExCPSettings(**kwargs)
    assert "\n" not in str(info.value)


def test_header_round_trips_the_mode():
    s = ExCPSettings(target_bits_per_param=1.5)
    assert ExCPSettings.from_dict(s.to_dict()) == s and s.weight_alpha == 5e-5
    assert ExCPSettings().alpha is None and ExCPSettings().weight_alpha == 5e-5
    assert ExCPSettings.from_dict({"alpha": 1e-4}).weight_alpha == 1e-4  # version-1 headers


@pytest.mark.parametrize("allocation", ["even", "fisher"])
def test_resume_from_a_budget_coded_delta(tiny_model_config, cpu_trainer_kwargs, tmp_path, allocation):
    from datamodules.text import TextDataModule
    from lightning_modules.causal_lm import CausalLMModule

    def module() -> CausalLMModule:
        return CausalLMModule(model=None, model_config=tiny_model_config, learning_rate=1e-2, warmup_steps=0)

    def trainer(folder: Path, steps: int) -> pl.Trainer:
        codec = ExCPSettings(target_bits_per_param=2.0, keyframe_interval=3, budget_allocation=allocation)
        excp = ExCP(codec=codec, print_summary=False)
        mc = ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=2, save_top_k=-1)
        kw = dict(cpu_trainer_kwargs, enable_checkpointing=True, limit_val_batches=0, max_steps=steps)
        return pl.Trainer(callbacks=[excp, mc], **kw)

    def data() -> TextDataModule:
        return TextDataModule(block_size=32, batch_size=4, max_tokens=20_000, val_fraction=0.05)

    first = trainer(tmp_path / "a", 4)
    first.fit(module(), datamodule=data())
    delta = tmp_path / "a" / "step=4.ckpt"
    assert is_excp_file(delta)
    header = ExCPFile.open(delta).header
    assert header["kind"] == "delta" and header["settings"]["budget_allocation"] == allocation
    ckpt = load_checkpoint(delta)
    assert ckpt["global_step"] == 4 and ckpt["optimizer_states"][0]["state"]
    second = trainer(tmp_path / "b", 6)
    second.fit(module(), datamodule=data(), ckpt_path=str(delta))
    assert second.global_step == 6


def test_cli_compresses_to_a_budget_and_refuses_two_modes(workloads, tmp_path, capsys):
    from callbacks.excp.cli import main

    series, _ = workloads[1.0]
    inputs = save_as_ckpt_files(series, tmp_path)
    out = tmp_path / "out"
    assert main(["compress", *inputs, "-o", str(out), "--target-bits-per-param", "1.5", "--alpha", "1e-4"]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["compress", *inputs, "-o", str(out), "--target-bits-per-param", "1.5"]) == 0
    header = ExCPFile.open(out / "step=12.excp").header
    assert header["settings"]["target_bits_per_param"] == 1.5 and header["kind"] == "delta"
    stats = header["stats"]
    bits = stats["bits_per_param_w"] + stats["bits_per_param_m"] + stats["bits_per_param_v"]
    assert abs(bits - 1.5) <= TOLERANCE * 1.5


@pytest.mark.parametrize("moments", ["adam", "sgd", "none"])
@pytest.mark.parametrize("shape", [(), (0,), (5,), (3000,), (64, 80)])
def test_budget_mode_codes_any_tensor_and_decodes_to_the_reconstruction(moments, shape):
    from callbacks.excp.codec import encode_param_delta
    from tests.excp_crafting import decode_code

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(shape, generator=g)
    w = ref + 1e-3 * torch.randn(shape, generator=g) ** 3
    m = None if moments == "none" else 1e-3 * torch.randn(shape, generator=g)
    v = 1e-6 * torch.rand(shape, generator=g) if moments == "adam" else None
    s = ExCPSettings(target_bits_per_param=1.0, kmeans_sample=1024)
    code = encode_param_delta(w, ref, m, v, s, torch.Generator().manual_seed(1))
    got_w, got_m, got_v = decode_code(code, shape, torch.float32, ref, v_floor=code.v_floor)
    assert torch.equal(got_w, code.recon_w) and (got_m is None) == (m is None) and (got_v is None) == (v is None)
    if w.numel() > 1024:
        bits = 8 * (len(code.w) + len(code.m or b"") + len(code.v or b""))
        assert bits <= 1.0 * w.numel() * (1 + TOLERANCE)


def _tiny_config_with_codec(tmp_path: Path, **codec: Any) -> Path:
    import yaml

    root = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((root / "configs/excp/tiny_from_scratch.yaml").read_text())
    excp = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ExCP")][0]
    excp["init_args"]["codec"].update(codec)
    path = tmp_path / "budget.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_yaml_budget_mode_parses_and_two_modes_are_one_line(tmp_path):
    from tests.conftest import parse_config
    from tests.shrink import TINY_MODEL_OVERRIDES

    cli = parse_config(
        _tiny_config_with_codec(tmp_path, alpha=None, target_bits_per_param=2.0), overrides=TINY_MODEL_OVERRIDES
    )
    excp = [c for c in cli.trainer.callbacks if isinstance(c, ExCP)][0]
    assert excp.settings.target_bits_per_param == 2.0 and excp.settings.alpha is None
    import train

    with pytest.raises(ValueError) as info:  # jsonargparse wraps the settings' error; train.py unwraps it
        parse_config(_tiny_config_with_codec(tmp_path, target_bits_per_param=2.0), overrides=TINY_MODEL_OVERRIDES)
    assert train.one_line_error(info.value) == (
        "ExCP alpha=5e-05 and target_bits_per_param=2.0 are two rate modes: set one of them "
        "(alpha: null to use the bit budget)"
    )
