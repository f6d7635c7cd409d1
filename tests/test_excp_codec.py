"""ExCP codec: quantizers, index coding, per-tensor round trips and chains (no Lightning)."""

from __future__ import annotations

import copy
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from callbacks.excp.codec import ExCPSettings, encode_param_delta, encode_param_keyframe
from callbacks.excp.decoder import decode_sequence, load_checkpoint
from callbacks.excp.encoder import ExCPEncoder
from callbacks.excp.quantize import (
    decode_indices,
    decode_lossless,
    encode_indices,
    encode_lossless,
    kmeans_1d,
    uniform_levels,
)
from common.atomic import atomic_write_bytes
from tests.excp_crafting import decode_code


def test_codec_modules_do_not_import_lightning():
    import subprocess

    code = (
        "import sys, callbacks.excp.encoder, callbacks.excp.decoder, callbacks.excp.references,"
        " callbacks.excp.codec, callbacks.excp.fileformat, callbacks.excp.cli;"
        "assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules),"
        " 'lightning imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_kmeans_recovers_clusters_and_handles_few_values():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([-3.0, -1.0, 0.5, 2.0])
    x = centers[torch.randint(0, 4, (5000,), generator=g)] + 0.01 * torch.randn(5000, generator=g)
    cb = kmeans_1d(x, 4, generator=g)
    assert cb.dtype == torch.float32
    assert torch.allclose(cb, centers, atol=0.01)
    assert torch.equal(kmeans_1d(torch.tensor([3.0, 1.0, 3.0]), 15), torch.tensor([1.0, 3.0]))
    assert kmeans_1d(torch.zeros(0), 15).numel() == 0


def test_kmeans_log_domain_keeps_tiny_second_moments():
    # v values far below fp16's smallest subnormal (6e-8): the reference code's fp16 codebooks zero them
    g = torch.Generator().manual_seed(0)
    v = torch.exp(torch.empty(10000).uniform_(math.log(1e-14), math.log(1e-9), generator=g))
    cb = kmeans_1d(v, 15, log_domain=True, generator=g)
    assert cb.dtype == torch.float32 and (cb > 0).all() and cb.min() < 1e-12
    assert torch.isinf(cb.half().float().log()).any()  # what fp16 codebooks would have done


def test_uniform_levels_in_the_log_domain_keep_every_decade_of_v():
    # a linear grid over v spanning five decades puts ~all entries in its lowest level (off 100x+)
    g = torch.Generator().manual_seed(0)
    v = torch.exp(torch.empty(10000).uniform_(math.log(1e-14), math.log(1e-9), generator=g))
    linear = uniform_levels(v, 7)
    assert torch.allclose(linear, torch.linspace(float(v.min()), float(v.max()), 7))
    grid = uniform_levels(v, 7, log_domain=True)
    assert grid.dtype == torch.float32 and grid.numel() == 7 and (grid > 0).all()
    steps = grid.double().log().diff()
    assert torch.allclose(steps, steps.mean().expand_as(steps), rtol=1e-4)  # evenly spaced in log v
    assert grid[0] == pytest.approx(float(v.min()), rel=1e-5) and grid[-1] == pytest.approx(float(v.max()), rel=1e-5)


def test_uniform_levels_of_a_signed_stream_are_centred_on_zero():
    # an asymmetric m: a min..max grid's middle level (+0.0495) would bias every small entry
    x = torch.cat([torch.full((100,), -0.001), torch.linspace(-0.001, 0.1, 1000)])
    for k, expected in ((3, [-0.1, 0.0, 0.1]), (7, [-0.1, -2 / 30, -1 / 30, 0.0, 1 / 30, 2 / 30, 0.1])):
        assert torch.allclose(uniform_levels(x, k), torch.tensor(expected), atol=1e-7)
    assert torch.allclose(uniform_levels(x, 1), x.mean().reshape(1))
    one_signed = uniform_levels(x.abs() + 1, 3)  # min..max
    assert torch.allclose(one_signed, torch.tensor([1.0, 1.05, 1.1]), atol=1e-4)


def test_uniform_quantizer_codes_v_in_the_log_domain():
    g = torch.Generator().manual_seed(1)
    n = 4096
    w = torch.randn(n, generator=g)
    ref = w - 0.01 * torch.randn(n, generator=g)
    m = 0.01 * torch.randn(n, generator=g)
    v = torch.exp(torch.empty(n).uniform_(math.log(1e-12), math.log(1e-6), generator=g))
    s = ExCPSettings(quantizer="uniform", bits_w=3, bits_m=3, bits_v=3, momentum_criterion=False)
    code = encode_param_delta(w, ref, m, v, s, g)
    _, _, decoded = decode_code(code, (n,), torch.float32, ref)  # pruned entries decode to 0 here
    assert decoded is not None
    kept = decoded > 0
    assert int(kept.sum()) == code.kept_m > n // 4
    decoded_v = decoded[kept]
    ratio = (decoded_v.double() / v[kept].double()).log().abs()
    # 7 levels over six decades: each entry within half a step (log(1e6) / 12) of its value
    assert float(ratio.max()) <= math.log(1e6) / 12 + 1e-3


@pytest.mark.parametrize("density", [0.0, 0.02, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_index_stream_round_trip(density: float, bits: int):
    rng = np.random.default_rng(bits)
    n = 10007
    idx = rng.integers(1, 2**bits, n).astype(np.uint8) if bits > 1 else np.ones(n, np.uint8)
    idx[rng.random(n) >= density] = 0
    assert np.array_equal(decode_indices(encode_indices(idx)), idx)
    assert decode_indices(encode_indices(np.zeros(0, np.uint8))).size == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64])
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (7,), (13, 17), (2, 3, 5)])
def test_lossless_round_trip_is_bit_exact(dtype, shape):
    t = (torch.randn(shape) * 100).to(dtype)
    out = decode_lossless(encode_lossless(t), dtype, shape)
    assert out.dtype == dtype and out.shape == t.shape
    assert torch.equal(
        out.view(-1).view(torch.uint8) if out.numel() else out,
        t.view(-1).view(torch.uint8) if t.numel() else t,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(), (0,), (1,), (5,), (31, 7), (3, 4, 5)])
def test_delta_round_trip_matches_encoder_reconstruction(dtype, shape):
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(shape, generator=g).to(dtype)
    w = (ref.float() + 0.01 * torch.randn(shape, generator=g)).to(dtype)
    m = 0.01 * torch.randn(shape, generator=g)
    v = 1e-6 * torch.rand(shape, generator=g)
    code = encode_param_delta(w, ref, m, v, ExCPSettings(), g)
    w2, m2, v2 = decode_code(code, shape, dtype, ref)
    assert w2.dtype == dtype and w2.shape == w.shape
    assert torch.equal(w2, code.recon_w)
    assert m2.shape == m.shape and v2.shape == v.shape
    # pruned entries are exactly zero, kept ones are close; v shares m's mask
    assert torch.equal(m2 != 0, v2 != 0) or (v2[m2 != 0] == 0).sum() == 0
    if w.numel() > 20:
        kept = m2 != 0
        assert kept.any()
        assert ((m2[kept] - m[kept]).abs() <= m.abs().max() * 0.2).all()


def test_all_zero_tensor_and_zero_delta():
    s = ExCPSettings()
    g = torch.Generator().manual_seed(0)
    z = torch.zeros(40, 3)
    code = encode_param_delta(z, z.clone(), torch.zeros_like(z), torch.zeros_like(z), s, g)
    w2, m2, v2 = decode_code(code, (40, 3), torch.float32, z.clone())
    assert torch.equal(w2, z) and torch.equal(m2, z) and torch.equal(v2, z)
    assert len(code.w) < 100  # nothing changed, nothing stored


def test_joint_shrinking_follows_the_notes():
    """Weight mask from |dW| vs median*min(cap, alpha/sqrt(mean v)); m mask = beta AND weight mask."""
    g = torch.Generator().manual_seed(3)
    n = 4000
    ref = torch.zeros(n)
    dw = torch.randn(n, generator=g)
    m = torch.randn(n, generator=g)
    v = torch.full((n,), 4e-8)  # alpha/sqrt(mean v) = 5e-5/2e-4 = 0.25
    s = ExCPSettings(bits_w=8, bits_m=8, bits_v=8)
    code = encode_param_delta(dw, ref, m, v, s, g)
    w2, m2, v2 = decode_code(code, (n,), torch.float32, ref)
    wmask = dw.abs() > dw.abs().median() * 0.25
    mmask = (m.abs() > 2.0 * m.abs().mean()) & wmask
    assert torch.equal(w2 != 0, wmask)
    assert torch.equal(m2 != 0, mmask)
    assert torch.equal(v2 != 0, mmask)
    # cap: a vanishing v gives factor min(2.5, huge) = 2.5
    code = encode_param_delta(dw, ref, m, torch.full((n,), 1e-30), s, g)
    w3, _, _ = decode_code(code, (n,), torch.float32, ref)
    assert torch.equal(w3 != 0, dw.abs() > dw.abs().median() * 2.5)
    # ablation: no residual codes W itself and decodes without the reference
    code = encode_param_delta(dw + 1.0, ref + 0.5, m, v, ExCPSettings(residual=False), g)
    w5, _, _ = decode_code(code, (n,), torch.float32, None)
    assert code.w_mode == "absolute" and torch.equal(w5, code.recon_w)
    # ablation: weight-only pruning keeps m wherever W survived
    code = encode_param_delta(dw, ref, m, v, ExCPSettings(momentum_criterion=False), g)
    _, m4, _ = decode_code(code, (n,), torch.float32, ref)
    assert torch.equal(m4 != 0, wmask & (m != 0))


def test_fisher_saliency_masks_by_dw_times_sqrt_v_and_loses_less_fisher_weighted_error():
    """weight_saliency="fisher" thresholds |dW| * sqrt(v / mean v) with the method's median rule; at
    the same bit budget it leaves a smaller v-weighted error (a second-order loss estimate) than |dW|."""
    g = torch.Generator().manual_seed(5)
    n = 8000
    ref = torch.zeros(n)
    dw = torch.randn(n, generator=g)
    m = torch.randn(n, generator=g)
    v = 4e-8 * torch.rand(n, generator=g) ** 4  # decades apart, independent of |dW|
    s = ExCPSettings(bits_w=8, bits_m=8, bits_v=8, weight_saliency="fisher")
    code = encode_param_delta(dw, ref, m, v, s, g)
    w2, _, _ = decode_code(code, (n,), torch.float32, ref)
    saliency = dw.abs() * (v.double() / v.double().mean()).sqrt().float()
    factor = min(2.5, 5e-5 / math.sqrt(float(v.double().mean())))
    assert torch.equal(w2 != 0, saliency > saliency.median() * factor)

    def weighted_error(saliency_rule: str) -> float:
        settings = ExCPSettings(weight_saliency=saliency_rule, target_bits_per_param=1.5)
        code = encode_param_delta(dw, ref, m, v, settings, torch.Generator().manual_seed(0))
        return float((v * (code.recon_w - dw) ** 2).sum())

    assert weighted_error("fisher") < 0.6 * weighted_error("magnitude")


def test_fisher_saliency_without_a_second_moment_is_the_magnitude_rule():
    g = torch.Generator().manual_seed(6)
    ref, dw, m = torch.zeros(3000), torch.randn(3000, generator=g), torch.randn(3000, generator=g)
    codes = [
        encode_param_delta(dw, ref, m, None, ExCPSettings(weight_saliency=rule), torch.Generator().manual_seed(0))
        for rule in ("magnitude", "fisher")
    ]
    assert codes[0].w == codes[1].w and codes[0].m == codes[1].m


def test_an_unknown_weight_saliency_is_one_line():
    from common.errors import UserFacingError

    with pytest.raises(UserFacingError, match="weight_saliency='l2' is invalid: use 'magnitude' or 'fisher'"):
        ExCPSettings(weight_saliency="l2")


@pytest.mark.parametrize(
    "name", ["weight_saliency", "budget_allocation", "quantizer", "keyframe_moments", "entropy_coder"]
)
def test_an_unknown_option_names_the_ones_there_are(name):
    from callbacks.excp.codec import CHOICES
    from common.errors import UserFacingError

    options = " or ".join(repr(c) for c in CHOICES[name])
    with pytest.raises(UserFacingError, match=re.escape(f"ExCP {name}='nope' is invalid: use {options}")):
        ExCPSettings(**{name: "nope"})


def test_keyframe_param_is_lossless():
    s = ExCPSettings()
    w, m, v = torch.randn(9, 4).bfloat16(), torch.randn(9, 4), torch.rand(9, 4)
    code = encode_param_keyframe(w, m, v, s)
    assert code.w_mode == "lossless"
    w2, m2, v2 = decode_code(code, (9, 4), torch.bfloat16, None, kind="keyframe")
    assert torch.equal(w2, w) and torch.equal(m2, m) and torch.equal(v2, v)


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 12)
        self.lin = torch.nn.Linear(12, 7)
        self.norm = torch.nn.LayerNorm(7)
        self.head = torch.nn.Linear(7, 50, bias=False)
        self.scalar = torch.nn.Parameter(torch.tensor(0.5))
        self.register_buffer("counter", torch.arange(300, dtype=torch.float32))

    def forward(self, x):
        return self.head(self.norm(self.lin(self.emb(x)))) * self.scalar


def _train(net, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 50, (8, 5), generator=g)
        loss = torch.nn.functional.cross_entropy(net(x).reshape(-1, 50), x.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()


def _write_chain(tmp_path, net, opt, n, settings, names=None):
    enc = ExCPEncoder(settings)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3)
    out = []
    for i in range(n):
        _train(net, opt, 5, i)
        sched.step()
        ckpt = copy.deepcopy(
            {
                "epoch": 0,
                "global_step": 5 * (i + 1),
                "state_dict": net.state_dict(),
                "optimizer_states": [opt.state_dict()],
                "lr_schedulers": [sched.state_dict()],
                "rng": torch.get_rng_state(),
                "hyper_parameters": {"lr": 1e-2, "name": "x"},
            }
        )
        e = enc.encode(ckpt, target=tmp_path / f"c{i}.ckpt", optimizer_param_names=names)
        atomic_write_bytes(tmp_path / f"c{i}.ckpt", e.data)
        enc.commit(e, tmp_path / f"c{i}.ckpt")
        out.append((tmp_path / f"c{i}.ckpt", ckpt, e))
    return out


@pytest.mark.parametrize("optim", ["adamw", "sgd", "adagrad"])
def test_chain_reconstructs_what_encoder_tracked(tmp_path, optim):
    torch.manual_seed(0)
    net = _Net()
    if optim == "adamw":
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2, betas=(0.9, 0.95))
    elif optim == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=1e-1, momentum=0.9)
    else:
        opt = torch.optim.Adagrad(net.parameters(), lr=1e-2)
    names = [[n for n, _ in net.named_parameters()]]
    chain = _write_chain(tmp_path, net, opt, 6, ExCPSettings(keyframe_interval=4), names)
    kinds = [e.header["kind"] for _, _, e in chain]
    assert kinds == ["keyframe", "delta", "delta", "delta", "keyframe", "delta"]
    for path, ckpt, e in chain:
        got = load_checkpoint(path)
        # exact: weights equal the encoder's closed-loop reconstruction
        for k in e.recon:
            assert torch.equal(got["state_dict"][k], e.recon[k]), k
        # everything that is not W/m/v round-trips exactly
        assert got["global_step"] == ckpt["global_step"] and got["hyper_parameters"] == ckpt["hyper_parameters"]
        assert torch.equal(got["rng"], ckpt["rng"])
        assert got["lr_schedulers"] == ckpt["lr_schedulers"]
        assert torch.equal(got["state_dict"]["counter"], ckpt["state_dict"]["counter"])
        assert list(got["state_dict"]) == list(ckpt["state_dict"])
        so, go = ckpt["optimizer_states"][0], got["optimizer_states"][0]
        assert go["param_groups"] == so["param_groups"]
        for idx, st in so["state"].items():
            for key, val in st.items():
                g = go["state"][idx][key]
                if optim == "adagrad" or key == "step" or e.header["kind"] == "keyframe":
                    assert torch.equal(g, val), (idx, key)  # lossless
                else:
                    assert g.shape == val.shape and g.dtype == val.dtype
        # the reconstruction is close to the truth
        for k, t in ckpt["state_dict"].items():
            if t.dtype.is_floating_point and t.numel() > 20:
                assert (got["state_dict"][k] - t).abs().max() <= t.abs().max() * 0.25 + 1e-3
    # decoding the series in one pass gives the same checkpoints
    seq = list(decode_sequence([p for p, _, _ in chain]))
    for (p, got), (_, _, e) in zip(seq, chain, strict=True):
        assert all(torch.equal(got["state_dict"][k], e.recon[k]) for k in e.recon), p
    # a rebuilt optimizer accepts the state and keeps training
    got = load_checkpoint(chain[-1][0])
    net2 = _Net()
    net2.load_state_dict(got["state_dict"])
    opt2 = type(opt)(net2.parameters(), lr=1e-2)
    opt2.load_state_dict(got["optimizer_states"][0])
    _train(net2, opt2, 2, 99)


def test_name_inference_matches_live_mapping(tmp_path):
    from callbacks.excp.split import infer_optimizer_param_names

    torch.manual_seed(0)
    net = _Net()
    decay = [p for n, p in net.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in net.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2)
    _train(net, opt, 2, 0)
    id2name = {id(p): n for n, p in net.named_parameters()}
    live = [id2name[id(p)] for g in opt.param_groups for p in g["params"]]
    assert infer_optimizer_param_names(net.state_dict(), opt.state_dict()) == live


def test_tied_weights_stay_tied(tmp_path):
    sd = {"state_dict": {"a": torch.randn(4, 4)}}
    sd["state_dict"]["b"] = sd["state_dict"]["a"]
    enc = ExCPEncoder()
    e = enc.encode(sd, target=tmp_path / "t.ckpt")
    atomic_write_bytes(tmp_path / "t.ckpt", e.data)
    got = load_checkpoint(tmp_path / "t.ckpt")
    assert got["state_dict"]["a"] is got["state_dict"]["b"]
    assert len(e.header["aliases"]) == 1


def test_weight_rule_bias_corrects_v_with_adams_own_step():
    """mean(v) / (1 - beta2**step) sets the weight factor (raw v early in a run prunes most of the update)."""
    from callbacks.excp.split import second_moment_bias, split_checkpoint

    net = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, betas=(0.9, 0.95))
    for _ in range(3):
        net(torch.randn(4, 8)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    ckpt = {"state_dict": dict(net.named_parameters()), "optimizer_states": [opt.state_dict()]}
    split = split_checkpoint(ckpt, None, [["weight", "bias"]])
    assert [e.second_moment_bias for e in split.entries] == pytest.approx([1 - 0.95**3] * 2)
    sgd = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.9)
    assert second_moment_bias({"momentum_buffer": torch.zeros(1)}, sgd.param_groups[0]) == 1.0
    assert second_moment_bias({"step": torch.tensor(3.0)}, {"lr": 1.0}) == 1.0  # no betas: no correction
    assert second_moment_bias({"step": 0}, {"betas": (0.9, 0.95)}) == 1.0

    g = torch.Generator().manual_seed(3)
    n = 4000
    ref, dw, m = torch.zeros(n), torch.randn(n, generator=g), torch.randn(n, generator=g)
    v = torch.full((n,), 4e-8)  # raw factor alpha/sqrt(mean v) = 0.25; bias 0.25 -> sqrt(0.25) * 0.25 = 0.125
    for settings, factor in ((ExCPSettings(bits_w=8), 0.125), (ExCPSettings(bits_w=8, v_bias_correction=False), 0.25)):
        code = encode_param_delta(dw, ref, m, v, settings, g, v_bias=0.25)
        w2, _, _ = decode_code(code, (n,), torch.float32, ref)
        assert torch.equal(w2 != 0, dw.abs() > dw.abs().median() * factor)


def test_quantized_streams_nest_at_the_masks_positions():
    """W codes sit exactly at the weight mask, m's one per weight survivor where the momentum criterion
    holds, v's at m's survivors: the positional gathers keep the boolean masks' order and nesting."""
    from callbacks.excp.codec import _quantize_streams, momentum_candidates
    from callbacks.excp.quantize import assign

    g = torch.Generator().manual_seed(0)
    n = 50_000
    dw, m = torch.randn(n, generator=g), torch.randn(n, generator=g)
    v = torch.rand(n, generator=g) + 0.1
    wmask = torch.rand(n, generator=g) < 0.2
    s = ExCPSettings()
    candidates = momentum_candidates(m, s)
    codes = _quantize_streams(dw, wmask, m, v, candidates, s, torch.Generator().manual_seed(1))
    assert codes.idx_w is not None and codes.cb_w is not None
    assert np.array_equal(codes.idx_w != 0, wmask.numpy())
    # each survivor carries the code of its own value's nearest centroid (the order was kept)
    assert np.array_equal(codes.idx_w[codes.idx_w != 0] - 1, assign(dw[wmask], codes.cb_w).numpy())
    assert np.array_equal(codes.idx_m != 0, candidates[wmask].numpy())
    assert codes.cb_m is not None
    assert np.array_equal(codes.idx_m[codes.idx_m != 0] - 1, assign(m[wmask & candidates], codes.cb_m).numpy())
    assert torch.equal(codes.kept_v, wmask & candidates)
    assert codes.kept_w == int(wmask.sum()) and codes.kept_m == int((wmask & candidates).sum())
    assert codes.idx_v.size == codes.kept_m and codes.cb_v is not None
    assert np.array_equal(codes.idx_v - 1, assign(v[codes.kept_v], codes.cb_v, log_domain=True).numpy())
