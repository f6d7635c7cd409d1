"""Pruned second-moment entries decode to the per-tensor mean of what was pruned (v_floor), or to zero
when the setting is off; files without the header field decode as before (zero)."""

from __future__ import annotations

import torch

from callbacks.excp.codec import ExCPSettings, encode_param_delta
from tests.excp_crafting import decode_code


def _code(v_floor: bool):
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=generator)
    ref = w - 1e-3 * torch.randn(64, 64, generator=generator)
    m = 1e-3 * torch.randn(64, 64, generator=generator)
    v = 1e-6 * torch.rand(64, 64, generator=generator) + 1e-7
    code = encode_param_delta(w, ref, m, v, ExCPSettings(v_floor=v_floor), torch.Generator().manual_seed(1))
    return code, ref, v


def _decode(code, ref, floor):
    return decode_code(code, (64, 64), torch.float32, ref, v_floor=floor)


def test_pruned_v_decodes_to_the_mean_of_the_pruned_entries():
    code, ref, v = _code(v_floor=True)
    _, m, decoded_v = _decode(code, ref, code.v_floor)
    pruned = m == 0
    assert 0 < pruned.float().mean() < 1
    assert torch.allclose(torch.tensor(code.v_floor), v[pruned].double().mean().float(), rtol=1e-5)
    assert torch.all(decoded_v[pruned] == torch.tensor(code.v_floor))
    assert torch.all(decoded_v[~pruned] > 0)


def test_without_the_floor_pruned_v_is_zero():
    code, ref, _ = _code(v_floor=False)
    assert code.v_floor == 0.0
    _, m, decoded_v = _decode(code, ref, 0.0)
    assert torch.all(decoded_v[m == 0] == 0)


def test_the_floor_of_a_tensor_spanning_several_slices_is_the_mean_of_its_pruned_entries():
    """The mean is summed slice by slice (no copy of a whole large tensor): the same value as one mean,
    including a slice where everything is kept and the all-kept tensor (0.0)."""
    from callbacks.excp.codec import _PRUNED_SLICE, _pruned_mean

    generator = torch.Generator().manual_seed(0)
    n = 2 * _PRUNED_SLICE + 12_345
    v = torch.rand(n, generator=generator) * 1e-6
    kept = torch.rand(n, generator=generator) < 0.1
    kept[_PRUNED_SLICE : 2 * _PRUNED_SLICE] = True  # a whole slice kept
    expected = float(v[~kept].double().mean())
    assert abs(_pruned_mean(v, kept) - expected) <= 1e-12 * expected
    assert _pruned_mean(v, torch.ones(n, dtype=torch.bool)) == 0.0
