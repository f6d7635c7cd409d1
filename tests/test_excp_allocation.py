"""ExCP budget allocation: ``budget_allocation="fisher"`` moves bits to the tensors whose dropped updates
cost most loss, still meets the delta's budget, and lowers the Fisher-weighted error it targets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from callbacks.excp import ExCPSettings
from callbacks.excp.allocation import MIN_SHARE, AllocationInput, fisher_shares
from callbacks.excp.decoder import decode_sequence
from callbacks.excp.encoder import ExCPEncoder
from callbacks.excp.fileformat import ExCPFile
from common.atomic import atomic_write_bytes
from common.errors import UserFacingError
from tests.adam_series import adam_checkpoints, save_as_ckpt_files

BITS = (4, 4, 4)


def _inputs(v_scales: list[float | None], n: int = 20_000) -> list[AllocationInput]:
    """Tensors with the same residuals and m, and v scaled per tensor (None: no second moment)."""
    g = torch.Generator().manual_seed(0)
    dw, m = torch.randn(n, generator=g), torch.randn(n, generator=g)
    v = torch.rand(n, generator=g) + 0.5
    return [AllocationInput(n, dw, None if s is None else v * s, m.abs() > 2 * m.abs().mean()) for s in v_scales]


def _shares(items: list[AllocationInput], budget_per_param: float) -> list[float]:
    numel = [item.numel for item in items]
    return fisher_shares(numel, items.__getitem__, budget_per_param * sum(numel), BITS)


def test_bits_follow_the_fisher_weight_and_the_budget_is_kept():
    """A tensor whose v is 100x larger (each dropped update costs 100x more loss) gets more bits; the
    shares spend the budget; a tensor without v gets the even share."""
    shares = _shares(_inputs([1.0, 100.0]), 1.0)
    assert shares[1] > 1.5 * shares[0], shares
    assert sum(shares) / 2 == pytest.approx(1.0, rel=1e-6)
    with_none = _shares(_inputs([1.0, 100.0, None]), 1.0)
    assert with_none[2] == pytest.approx(1.0) and with_none[1] > with_none[0]
    assert sum(with_none) / 3 == pytest.approx(1.0, rel=1e-6)


def test_equal_tensors_get_equal_shares_and_no_v_anywhere_is_even():
    same = _shares(_inputs([1.0, 1.0]), 0.8)
    assert same[0] == pytest.approx(same[1], rel=1e-6) and same[0] == pytest.approx(0.8, rel=1e-6)
    assert _shares(_inputs([None, None]), 0.8) == [pytest.approx(0.8)] * 2


def test_a_tiny_budget_stays_at_the_floor():
    assert all(s >= MIN_SHARE for s in _shares(_inputs([1.0, 1e6]), 1e-4))


def _checkpoints() -> tuple[list[dict[str, Any]], list[str]]:
    """Two AdamW checkpoints of an MLP whose middle layer sees 30x larger gradients (its v is 900x, its
    updates as large: Adam divides the scale out)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(32, 96, bias=False),
        torch.nn.GELU(),
        torch.nn.Linear(96, 96, bias=False),
        torch.nn.Linear(96, 32),
    )
    net[2].weight.register_hook(lambda grad: grad * 30)
    return adam_checkpoints(net, 32, 32, steps=8, every=4)


def _encode(settings: ExCPSettings, folder: Path) -> tuple[dict[str, Any], list[Path], dict[str, torch.Tensor]]:
    series, names = _checkpoints()
    folder.mkdir()
    encoder = ExCPEncoder(settings)
    paths = []
    for ckpt in series:
        path = folder / f"step={ckpt['global_step']}.excp"
        encoded = encoder.encode(ckpt, target=path, optimizer_param_names=[names])
        atomic_write_bytes(path, encoded.data)
        encoder.commit(encoded, path)
        paths.append(path)
    return encoded.stats, paths, encoded.recon


def _fisher_error(recon: dict[str, torch.Tensor]) -> float:
    """sum v_hat * (W - W_hat)^2 over the coded weights: the loss the allocation minimises, to first order."""
    series, names = _checkpoints()
    last = series[-1]
    total = 0.0
    for index, name in enumerate(names):
        state = last["optimizer_states"][0]["state"][index]
        v = state["exp_avg_sq"] / (1 - 0.999 ** float(state["step"]))
        total += float((v * (last["state_dict"][name] - recon[name]) ** 2).sum())
    return total


@pytest.mark.parametrize("threads", [1, 2])
def test_fisher_allocation_meets_the_budget_decodes_and_lowers_the_fisher_error(tmp_path, threads):
    budget = ExCPSettings(target_bits_per_param=1.0, kmeans_sample=4096, weight_saliency="fisher", threads=threads)
    even_stats, _, even_recon = _encode(budget, tmp_path / "even")
    stats, paths, recon = _encode(
        ExCPSettings(**{**budget.to_dict(), "budget_allocation": "fisher"}), tmp_path / "fisher"
    )
    bits = stats["bits_per_param_w"] + stats["bits_per_param_m"] + stats["bits_per_param_v"]
    assert bits == pytest.approx(1.0, rel=0.03), stats
    *_, (_, decoded) = decode_sequence(paths)
    assert all(torch.equal(decoded["state_dict"][k], t) for k, t in recon.items())
    assert ExCPFile.open(paths[-1]).header["settings"]["budget_allocation"] == "fisher"
    # the bits move to the 30x-gradient layer, so the Fisher-weighted error falls (measured: 0.83x)
    assert _fisher_error(recon) < 0.9 * _fisher_error(even_recon), (_fisher_error(recon), _fisher_error(even_recon))


def test_fisher_allocation_without_a_budget_is_one_line():
    with pytest.raises(UserFacingError, match="budget_allocation='fisher' splits a bit budget") as info:
        ExCPSettings(budget_allocation="fisher")
    assert "\n" not in str(info.value)
    assert ExCPSettings.from_dict({"target_bits_per_param": 1.0}).budget_allocation == "even"  # older headers


def test_cli_passes_the_allocation(tmp_path):
    from callbacks.excp.cli import main

    series, _ = _checkpoints()
    inputs = save_as_ckpt_files(series, tmp_path)
    out = tmp_path / "out"
    args = ["compress", *inputs, "-o", str(out), "--target-bits-per-param", "1.5", "--budget-allocation", "fisher"]
    assert main(args) == 0
    assert ExCPFile.open(out / "step=8.excp").header["settings"]["budget_allocation"] == "fisher"


def test_the_split_ranks_exactly_the_entries_the_coder_will(monkeypatch):
    """The Fisher split computes saliencies only at the positions the coder's threshold search samples
    (same RNG, same draws): they must equal the whole tensor's saliency there, and the momentum
    candidates the whole tensor's criterion there."""
    from callbacks.excp import allocation
    from callbacks.excp.codec import momentum_candidates, tensor_generator
    from callbacks.excp.rate import SAMPLE, sample_positions
    from callbacks.excp.split import ParamEntry

    g = torch.Generator().manual_seed(0)
    n = 3 * SAMPLE + 5
    weight, ref, m = (torch.randn(n, generator=g) for _ in range(3))
    v = torch.rand(n, generator=g) + 0.1
    small = torch.randn(4096, generator=g)  # smaller than a sample: every entry is ranked
    entries = [
        ParamEntry("big", weight, m, v, None, None, second_moment_bias=0.5),
        ParamEntry("small", small, small.clone(), small.abs(), None, None, second_moment_bias=0.5),
    ]
    seen = []
    real_curve = allocation.cost_curve
    monkeypatch.setattr(
        allocation,
        "cost_curve",
        lambda sample, cand, *rest: seen.append((sample, cand)) or real_curve(sample, cand, *rest),
    )
    s = ExCPSettings(target_bits_per_param=1.0, weight_saliency="fisher", budget_allocation="fisher", seed=3)
    allocation.split_budget(entries, [ref, small - 0.01], [7, 8], 1.0 * (n + 4096), s)
    at = sample_positions(n, tensor_generator(s, 7))
    assert at is not None
    whole = (weight - ref).abs().double() * (v.double() / 0.5).sqrt()
    assert torch.equal(seen[0][0], whole[at])
    assert torch.equal(seen[0][1], momentum_candidates(m, s)[at])
    assert seen[1][0].numel() == 4096
