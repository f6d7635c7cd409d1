"""Budget-constrained decoding of router width distributions: feasibility, optimality, trained routers."""

from __future__ import annotations

import itertools

import pytest
import torch

from lightning_modules.flextron.budgets import CostTable
from lightning_modules.flextron.constrained import RTOL, BudgetUnreachableError, constrained_choices, min_cost
from lightning_modules.flextron.module import FlextronModule
from tests.conftest import parse_config


def _instance(seed: int, L: int = 3, km: int = 3, ka: int = 2):
    g = torch.Generator().manual_seed(seed)
    mlp_logp = torch.randn(L, km, generator=g, dtype=torch.float64) * 2
    attn_logp = torch.randn(L, ka, generator=g, dtype=torch.float64) * 2
    # nondecreasing costs per row, as wider units cost more
    mlp_c = torch.rand(L, km, generator=g, dtype=torch.float64).cumsum(-1)
    attn_c = torch.rand(L, ka, generator=g, dtype=torch.float64).cumsum(-1)
    fixed = float(torch.rand((), generator=g))
    return mlp_logp, attn_logp, fixed, mlp_c, attn_c


def _brute_force(mlp_logp, attn_logp, fixed, mlp_c, attn_c, limit, slack):
    mlp_lp, attn_lp = mlp_logp.log_softmax(-1), attn_logp.log_softmax(-1)
    L, km, ka = mlp_c.shape[0], mlp_c.shape[1], attn_c.shape[1]
    sols = []
    for mi in itertools.product(range(km), repeat=L):
        for ai in itertools.product(range(ka), repeat=L):
            cost = fixed + sum(float(mlp_c[i, mi[i]] + attn_c[i, ai[i]]) for i in range(L))
            if cost <= limit * (1 + RTOL):
                lp = sum(float(mlp_lp[i, mi[i]] + attn_lp[i, ai[i]]) for i in range(L))
                sols.append((cost, lp))
    best_cost = max(c for c, _ in sols)
    return max(lp for c, lp in sols if c >= (1 - slack) * best_cost - 1e-12)


@pytest.mark.parametrize("slack", [0.0, 0.05, 1.0])
def test_matches_brute_force_and_never_exceeds(slack):
    for seed in range(25):
        inst = _instance(seed)
        full = inst[2] + float(inst[3][:, -1].sum() + inst[4][:, -1].sum())
        floor = min_cost(inst[2], inst[3], inst[4])
        for frac in (0.3, 0.55, 0.8, 1.0):
            limit = floor + frac * (full - floor)
            d = constrained_choices(*inst, limit=limit, slack=slack, resolution=100_000)
            assert d.cost <= limit * (1 + RTOL)
            assert d.log_prob == pytest.approx(_brute_force(*inst, limit, slack), abs=1e-9), (seed, frac)


def test_never_exceeds_at_coarse_resolution():
    for seed in range(40):
        inst = _instance(seed, L=6, km=5, ka=3)
        full = inst[2] + float(inst[3][:, -1].sum() + inst[4][:, -1].sum())
        floor = min_cost(inst[2], inst[3], inst[4])
        limit = floor + 0.5 * (full - floor)
        d = constrained_choices(*inst, limit=limit, resolution=7)
        assert d.cost <= limit * (1 + RTOL)


def test_argmax_kept_when_it_fits():
    for seed in range(20):
        inst = _instance(seed)
        mlp_logp, attn_logp, fixed, mlp_c, attn_c = inst
        am, aa = mlp_logp.argmax(-1), attn_logp.argmax(-1)
        cost = fixed + float(mlp_c.gather(1, am[:, None]).sum() + attn_c.gather(1, aa[:, None]).sum())
        # budget exactly at the argmax's cost: it fits and nothing more probable exists
        d = constrained_choices(*inst, limit=cost, slack=0.0)
        assert (d.mlp, d.attn) == (am.tolist(), aa.tolist())
        # a looser budget: the argmax still wins under pure maximum probability
        d = constrained_choices(*inst, limit=cost * 1.5, slack=1.0)
        assert (d.mlp, d.attn) == (am.tolist(), aa.tolist())


def test_unreachable_budget_is_an_error_or_a_reported_clamp():
    inst = _instance(0)
    floor = min_cost(inst[2], inst[3], inst[4])
    with pytest.raises(BudgetUnreachableError, match="below the narrowest"):
        constrained_choices(*inst, limit=floor * 0.9)
    d = constrained_choices(*inst, limit=floor * 0.9, clamp=True)
    assert d.clamped and d.cost == pytest.approx(floor)
    assert not constrained_choices(*inst, limit=floor).clamped
    with pytest.raises(ValueError, match="slack"):
        constrained_choices(*inst, limit=floor, slack=2.0)


def test_trained_tiny_router_meets_budgets(tmp_path):
    cli = parse_config("configs/flextron/tiny.yaml", overrides=[
        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false"])
    module: FlextronModule = cli.model
    cli.trainer.fit(module, cli.datamodule)
    module.eval()
    metrics = cli.trainer.callback_metrics
    c = module.cost
    L, km, ka = c.mlp.shape[0], c.mlp.shape[1], c.attn.shape[1]
    grid = [(c.fixed + sum(float(c.mlp[i, mi[i]] + c.attn[i, ai[i]]) for i in range(L))) / c.full
            for mi in itertools.product(range(km), repeat=L) for ai in itertools.product(range(ka), repeat=L)]
    checked = 0
    for b in module.budgets:
        real = module.realized(module.subnet_for_budget(b))
        assert real <= b * (1 + RTOL)
        # validation logged the constrained choice
        assert float(metrics[f"val/realized_b{b:g}"]) == pytest.approx(real, rel=1e-6)
        best = max(g for g in grid if g <= b * (1 + RTOL))
        assert real >= (1 - module.hparams.routing_slack) * best - 1e-9
        if best >= 0.95 * b:  # the width grid has a sub-network within 5% under the budget
            assert abs(real / b - 1) <= 0.05, (b, real)
            checked += 1
    assert checked >= 3
    # the full budget deploys the full network, also from a table stored in float32 (as in checkpoints)
    module.cost = CostTable.from_dict(module.cost.to_dict())
    assert module.realized(module.subnet_for_budget(1.0)) == pytest.approx(1.0)
    # the argmax switch still exists and gives the router's own choice
    lm, la = module.router(0.7)
    assert module.subnet_for_budget(0.7, routing="argmax").mlp == [module.space.mlp[i] for i in lm.argmax(-1)]
