"""GD's step size is chosen by the stated rule on held-out data, and units where GD did not move are flagged."""

import torch

from datamodules.icl_tasks import Example, GDSelectionData, build_work_units
from lightning_modules.probes.icl_finetune import GDConfig
from lightning_modules.probes.icl_gd_selection import Candidate, choose, select_gd
from lightning_modules.probes.icl_runner import gd_flags


def _cand(lr, acc, changed, collapsed=False):
    return Candidate(lr, 2, {4: acc, 8: acc}, {4: changed, 8: changed}, {4: collapsed, 8: False})


def test_rule_prefers_accuracy_among_step_sizes_that_move_without_collapsing():
    still = _cand(1e-4, 0.80, 0.05)  # best accuracy, but GD left the model where it was
    moves = _cand(1e-3, 0.70, 0.40)
    worse = _cand(3e-4, 0.65, 0.30)
    collapsed = _cand(3e-3, 0.75, 0.60, collapsed=True)
    best, fallback = choose([still, worse, moves, collapsed])
    assert best is moves and not fallback
    best, fallback = choose([still, collapsed])  # nothing qualifies: best accuracy, flagged as fallback
    assert best is still and fallback


def test_select_gd_runs_the_grid_on_dev_and_reports_it():
    dev = [Example(i, {"text": str(i)}, i % 2) for i in range(6)]
    data = GDSelectionData(dev, {4: dev[:4]})
    zero_shot = torch.zeros(6, dtype=torch.long)

    def after_gd(cfg, demos, test):  # lr 0.1 learns the labels, lr 1.0 collapses onto label 1
        return torch.tensor([e.label for e in test]) if cfg.lr == 0.1 else torch.ones(6, dtype=torch.long)

    rec = select_gd(GDConfig(lr=0.01), [0.01, 0.1, 1.0], [1], data, lambda d: zero_shot, after_gd)
    assert rec["selected"] == {"lr": 0.1, "epochs": 1} and not rec["fallback"]
    assert rec["config"].lr == 0.1 and rec["config"].epochs == 1
    assert [c["lr"] for c in rec["grid"]] == [0.01, 0.1, 1.0]
    assert rec["grid"][2]["dev_collapsed"] == {"4": True}


def test_dev_set_is_disjoint_from_test_and_selection_demos():
    units = build_work_units(["sst2"], [1, 4], [0], n_test=8, n_dev=8)
    sel = units[0].selection
    test = {e.index for e in units[0].test}
    dev = {e.index for e in sel.dev}
    assert len(dev) == 8 and not dev & test
    for demos in sel.demos.values():
        assert not {e.index for e in demos} & (dev | test)
    assert all(u.selection is sel for u in units)


def test_flags():
    zs = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
    assert gd_flags(zs, zs.clone(), 2) == ["unchanged"]
    assert gd_flags(zs, torch.ones(10, dtype=torch.long), 2) == ["collapsed"]
    assert gd_flags(zs, 1 - zs, 2) == []
