"""bitsandbytes 8-bit optimizer state is coded as the moments it stands for and restored in its own format."""

from __future__ import annotations

import copy

import pytest
import torch

from callbacks.excp.blockwise8bit import QUANT_STATE_KEY, dequantize, expand_8bit_states, quantize
from callbacks.excp.codec import ExCPSettings
from callbacks.excp.decoder import load_checkpoint
from callbacks.excp.encoder import ExCPEncoder
from common.atomic import atomic_write_bytes

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is a core dependency; its CPU build runs 8-bit Adam")


def _net_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.Linear(300, 8))  # 19,200 weights: 8-bit state
    return net, bnb.optim.AdamW8bit(net.parameters(), lr=1e-3)


def _train(net: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        net(torch.randn(4, 64, generator=generator)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def _checkpoint(net, optimizer, step: int) -> dict:
    return copy.deepcopy({"global_step": step, "state_dict": net.state_dict(),
                          "optimizer_states": [optimizer.state_dict()]})


def test_dequantize_matches_bitsandbytes_and_quantize_inverts_it() -> None:
    import bitsandbytes.functional as F

    values = torch.randn(19_200) * torch.logspace(-6, 0, 19_200)
    indices, state = F.quantize_blockwise(values, blocksize=256)
    ours = dequantize(indices, state.code, state.absmax, 256)
    assert torch.equal(ours, F.dequantize_blockwise(indices, state))
    mine, absmax = quantize(values, state.code, 256)  # as close to the values as bitsandbytes' own
    ours_error = (dequantize(mine, state.code, absmax, 256) - values).abs().max()
    assert ours_error <= (F.dequantize_blockwise(indices, state) - values).abs().max() * 1.01


def test_8bit_moments_are_coded_counted_and_restored_for_the_same_optimizer(tmp_path) -> None:
    net, optimizer = _net_and_optimizer()
    encoder = ExCPEncoder(ExCPSettings(keyframe_interval=10))
    saved = []
    for i in range(2):  # a keyframe, then a delta (pruned, quantized moments)
        _train(net, optimizer, 5, i)
        ckpt = _checkpoint(net, optimizer, 5 * (i + 1))
        path = tmp_path / f"c{i}.ckpt"
        encoded = encoder.encode(ckpt, target=path)
        atomic_write_bytes(path, encoded.data)
        encoder.commit(encoded, path)
        saved.append((path, ckpt, encoded))
    path, ckpt, encoded = saved[-1]
    entries = {e["name"]: e for e in encoded.header["entries"]}
    big = entries["0.weight"]
    assert list(big["m"]["path"][-2:]) == [QUANT_STATE_KEY, "state1"]
    assert big["v"] is not None  # weight pruning keeps its second-moment criterion
    # the fp32 W+m+v baseline counts the 8-bit moments as the moments they are
    numel = sum(p.numel() for p in net.parameters())
    assert encoded.stats["raw_wmv_bytes"] == 4 * 3 * numel

    got = load_checkpoint(path)
    original = ckpt["optimizer_states"][0]["state"][0][QUANT_STATE_KEY]
    restored = got["optimizer_states"][0]["state"][0][QUANT_STATE_KEY]
    assert set(restored) == set(original)
    for key in ("state1", "state2"):
        assert restored[key].dtype == torch.uint8 and restored[key].shape == original[key].shape
    truth = expand_8bit_states(ckpt)["optimizer_states"][0]["state"][0][QUANT_STATE_KEY]
    decoded = expand_8bit_states(got)["optimizer_states"][0]["state"][0][QUANT_STATE_KEY]
    scale = truth["state1"].abs().max()
    assert (decoded["state1"] - truth["state1"]).abs().max() <= 0.5 * scale  # lossy, but the same moments
    assert not torch.equal(restored["state1"], torch.zeros_like(restored["state1"]))

    # the same optimizer takes the restored state and keeps training
    net2, optimizer2 = _net_and_optimizer()
    net2.load_state_dict(got["state_dict"])
    optimizer2.load_state_dict(got["optimizer_states"][0])
    _train(net2, optimizer2, 2, 99)
    assert all(torch.isfinite(p).all() for p in net2.parameters())


def test_keyframe_round_trip_gives_back_the_8bit_moments_within_one_code_step(tmp_path) -> None:
    net, optimizer = _net_and_optimizer()
    _train(net, optimizer, 3, 0)
    ckpt = _checkpoint(net, optimizer, 3)
    encoded = ExCPEncoder().encode(ckpt, target=tmp_path / "k.ckpt")
    atomic_write_bytes(tmp_path / "k.ckpt", encoded.data)
    got = load_checkpoint(tmp_path / "k.ckpt")
    truth = expand_8bit_states(ckpt)["optimizer_states"][0]["state"]
    back = expand_8bit_states(got)["optimizer_states"][0]["state"]
    for slot, state in truth.items():
        for key in ("state1", "state2"):
            value = state[QUANT_STATE_KEY][key]
            step = 0.03 * value.abs().max()  # the code book's spacing near 1.0 is < 1%
            assert (back[slot][QUANT_STATE_KEY][key] - value).abs().max() <= step, (slot, key)
