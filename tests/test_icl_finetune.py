"""GD on the demonstrations: full-batch is order-invariant, ICL and SGD-in-order are not (tiny fp64 model)."""

import pytest
import torch

from lightning_modules.probes.icl_finetune import DAI_LEARNING_RATES, GDConfig, encode_demos, finetune_copy
from lightning_modules.probes.icl_scoring import encode_requests, score_requests
from tests.test_icl_scoring import ByteTokenizer, tiny_llama

DEMOS = [
    ("Input: great fun\nLabel:", " yes"),
    ("Input: dull plot\nLabel:", " no"),
    ("Input: loved it\nLabel:", " yes"),
    ("Input: awful\nLabel:", " no"),
]
QUERIES = ["Input: fine film\nLabel:", "Input: boring\nLabel:", "Input: superb acting\nLabel:"]
ORDERS = [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]]


def _gd_scores(model, tok, cfg):
    out = []
    for order in ORDERS:
        tuned, losses = finetune_copy(model, encode_demos(tok, [DEMOS[i] for i in order]), cfg)
        assert len(losses) == cfg.epochs * (1 if cfg.mode == "full_batch" else len(DEMOS))
        out.append(score_requests(tuned, encode_requests(tok, QUERIES, [" no", " yes"])).loglik)
    return torch.stack(out)


def _spread(x):
    return float((x.max(0).values - x.min(0).values).abs().max())


def test_full_batch_gd_is_order_invariant_icl_and_sgd_are_not():
    model, tok = tiny_llama(torch.float64), ByteTokenizer(bos=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    full = _gd_scores(model, tok, GDConfig("full_batch", "all", lr=0.5, epochs=3))
    sgd = _gd_scores(model, tok, GDConfig("sgd", "all", lr=0.5, epochs=1))
    zero = score_requests(model, encode_requests(tok, QUERIES, [" no", " yes"])).loglik
    icl = torch.stack(
        [
            score_requests(
                model,
                encode_requests(
                    tok,
                    ["\n\n".join(p + t for p, t in (DEMOS[i] for i in order)) + "\n\n" + q for q in QUERIES],
                    [" no", " yes"],
                ),
            ).loglik
            for order in ORDERS
        ]
    )
    assert _spread(full) < 1e-10
    assert _spread(sgd) > 1e-4
    assert _spread(icl) > 1e-4
    assert (full[0] - zero).abs().max() > 1e-3  # GD actually moved the model
    for k, v in model.state_dict().items():  # the original model is untouched
        assert torch.equal(v, before[k])


def test_kv_only_updates_only_key_value_projections():
    model, tok = tiny_llama(torch.float64), ByteTokenizer()
    tuned, _ = finetune_copy(model, encode_demos(tok, DEMOS), GDConfig("sgd", "kv", lr=0.5))
    ref = dict(model.named_parameters())
    changed = {n for n, p in tuned.named_parameters() if not torch.equal(p, ref[n])}
    assert changed and all(n.endswith(("k_proj.weight", "v_proj.weight")) for n in changed)
    with pytest.raises(ValueError, match="kv_pattern"):
        finetune_copy(model, encode_demos(tok, DEMOS), GDConfig(params="kv", kv_pattern="nothing_here"))


def test_config_validation_and_dai_preset():
    with pytest.raises(ValueError, match="mode"):
        GDConfig(mode="adam")
    dai = GDConfig(preset="dai", lr=1e-3).resolved("sst2")
    assert (dai.mode, dai.params, dai.epochs, dai.lr) == ("sgd", "kv", 1, DAI_LEARNING_RATES["sst2"])
    assert GDConfig(preset="dai", lr=1e-3).resolved("trec").lr == 1e-3


def test_quantized_weights_fail_clearly():
    model, tok = tiny_llama(torch.float64), ByteTokenizer()
    layer = model.model.layers[0].self_attn.k_proj
    layer.weight = torch.nn.Parameter(layer.weight.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="quantized"):
        finetune_copy(model, encode_demos(tok, DEMOS), GDConfig(params="kv"))
