"""GD's step size is chosen by the stated rule on held-out data, and units where GD did not move are flagged."""

import torch

from datamodules.icl_tasks import Example, GDSelectionData, build_work_units
from lightning_modules.probes.icl_finetune import GDConfig
from lightning_modules.probes.icl_gd_selection import Candidate, choose, select_gd
from lightning_modules.probes.icl_runner import gd_flags


def _cand(lr, acc, changed, collapsed=False):
    return Candidate(lr, 2, {4: acc, 8: acc}, {4: changed, 8: changed}, {4: collapsed, 8: False})


def test_a_step_size_must_move_every_counted_n_and_small_n_do_not_count():
    # moves a lot at N=8 but not at N=4: the mean would pass, the rule asks for every N >= 4
    uneven = Candidate(1e-3, 2, {1: 0.5, 4: 0.8, 8: 0.8}, {1: 1.0, 4: 0.10, 8: 0.60}, {1: True, 4: False, 8: False})
    even = Candidate(3e-4, 2, {1: 0.5, 4: 0.7, 8: 0.7}, {1: 1.0, 4: 0.25, 8: 0.30}, {1: True, 4: False, 8: False})
    best, fallback = choose([uneven, even], n_dev=32)
    assert best is even and not fallback  # N=1 copying its one label is not a collapse of the rule
    assert even.as_dict()["counted_n"] == [4, 8] and even.min_changed == 0.25


def test_among_equally_accurate_step_sizes_the_one_that_moves_most_wins():
    small = _cand(3e-4, 0.67, 0.30)
    large = _cand(1e-3, 0.66, 0.36)  # one dev example less accurate: within one standard error on 64
    clearly_worse = _cand(3e-3, 0.54, 0.38)
    assert choose([small, large, clearly_worse], n_dev=32)[0] is large
    assert choose([small, large, clearly_worse], n_dev=100_000)[0] is small  # a dev set that resolves 0.01


def test_rule_prefers_accuracy_among_step_sizes_that_move_without_collapsing():
    still = _cand(1e-4, 0.80, 0.05)  # best accuracy, but GD left the model where it was
    moves = _cand(1e-3, 0.70, 0.40)
    worse = _cand(3e-4, 0.65, 0.30)
    collapsed = _cand(3e-3, 0.75, 0.60, collapsed=True)
    best, fallback = choose([still, worse, moves, collapsed], n_dev=1000)  # 0.70 vs 0.65: clearly more accurate
    assert best is moves and not fallback
    best, fallback = choose([still, collapsed], n_dev=32)  # nothing qualifies: best accuracy, flagged as fallback
    assert best is still and fallback


def test_select_gd_runs_the_grid_on_dev_and_reports_it():
    dev = [Example(i, {"text": str(i)}, i % 2) for i in range(6)]
    data = GDSelectionData(dev, {4: [dev[:4], dev[2:6]]})
    zero_shot = torch.zeros(6, dtype=torch.long)

    seen = []

    def after_gd(cfg, demos, test):  # lr 0.1 learns the labels, lr 1.0 collapses onto label 1
        seen.append((cfg.lr, demos[0].index))
        if cfg.lr == 0.1 and demos[0].index == 2:  # one draw learns only half the labels
            return torch.tensor([e.label if e.index < 3 else 0 for e in test])
        return torch.tensor([e.label for e in test]) if cfg.lr == 0.1 else torch.ones(6, dtype=torch.long)

    rec = select_gd(GDConfig(lr=0.01), [0.01, 0.1, 1.0], [1], data, lambda d: zero_shot, after_gd)
    assert seen == [(lr, k) for lr in (0.01, 0.1, 1.0) for k in (0, 2)]  # every draw of every candidate
    assert rec["selected"] == {"lr": 0.1, "epochs": 1} and not rec["fallback"] and rec["n_selection_sets"] == 2
    assert rec["grid"][1]["dev_accuracy"] == {"4": (1.0 + 4 / 6) / 2}  # averaged over the two draws
    assert rec["config"].lr == 0.1 and rec["config"].epochs == 1
    assert [c["lr"] for c in rec["grid"]] == [0.01, 0.1, 1.0]
    assert rec["grid"][2]["dev_collapsed"] == {"4": True}


def test_dev_set_is_disjoint_from_test_and_selection_demos():
    units = build_work_units(["sst2"], [1, 4], [0], n_test=8, n_dev=8, n_selection_sets=2)
    sel = units[0].selection
    test = {e.index for e in units[0].test}
    dev = {e.index for e in sel.dev}
    assert len(dev) == 8 and not dev & test
    assert [len(draws) for draws in sel.demos.values()] == [2, 2]
    for draws in sel.demos.values():
        assert {e.index for e in draws[0]} != {e.index for e in draws[1]} or len(draws[0]) == 1
        for demos in draws:
            assert not {e.index for e in demos} & (dev | test)
    assert all(u.selection is sel for u in units)


def test_flags():
    zs = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
    assert gd_flags(zs, zs.clone(), 2) == ["unchanged"]
    assert gd_flags(zs, torch.ones(10, dtype=torch.long), 2) == ["collapsed"]
    assert gd_flags(zs, 1 - zs, 2) == []
