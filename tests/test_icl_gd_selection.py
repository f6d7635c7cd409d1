"""GD's step size is chosen by the stated rule on held-out data, and units where GD did not move are flagged."""

import torch

from datamodules.icl_tasks import Example, GDSelectionData, build_work_units
from lightning_modules.probes.icl_finetune import GDConfig
from lightning_modules.probes.icl_gd_selection import (
    MIN_CHANGED,
    Candidate,
    choose,
    harmful,
    required_dev_changed,
    select_gd,
)
from lightning_modules.probes.icl_runner import gd_flags


def _cand(lr, acc, changed, collapsed=False):
    return Candidate(lr, 2, {4: acc, 8: acc}, {4: changed, 8: changed}, {4: collapsed, 8: False})


def test_a_step_size_must_move_every_counted_n_and_small_n_do_not_count():
    # moves a lot at N=8 but not at N=4: the mean would pass, the rule asks for every N >= 4
    uneven = Candidate(1e-3, 2, {1: 0.5, 4: 0.8, 8: 0.8}, {1: 1.0, 4: 0.10, 8: 0.60}, {1: True, 4: False, 8: False})
    even = Candidate(3e-4, 2, {1: 0.5, 4: 0.7, 8: 0.7}, {1: 1.0, 4: 0.25, 8: 0.30}, {1: True, 4: False, 8: False})
    best, met = choose([uneven, even], n_dev=32)
    assert best is even and met == "margin"  # N=1 copying its one label is not a collapse of the rule
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
    best, met = choose([still, worse, moves, collapsed], n_dev=1000)  # 0.70 vs 0.65: clearly more accurate
    assert best is moves and met == "margin"
    best, met = choose([still, collapsed], n_dev=32)  # nothing qualifies: best accuracy, flagged as fallback
    assert best is still and met is None


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


def test_dev_margin_is_the_share_a_test_unit_keeps_above_20_percent_nine_times_in_ten():
    from scipy.stats import binom

    assert required_dev_changed(None) == MIN_CHANGED  # no test size given: no margin
    assert abs(required_dev_changed(32) - 0.306) < 1e-3
    shares = [required_dev_changed(n) for n in (8, 16, 32, 64, 1000)]
    assert shares == sorted(shares, reverse=True) and MIN_CHANGED < shares[-1] < 0.22  # shrinks with the unit
    for n in (8, 32, 64, 1000):
        k = -(-n // 5)  # changed predictions a unit of n queries needs for 20%
        p = required_dev_changed(n)
        assert abs(binom.sf(k - 1, n, p) - 0.9) < 1e-9  # P(X >= k) at the required share


def test_a_step_size_under_the_margin_is_only_taken_when_none_clears_it():
    just_over_20 = _cand(1e-3, 0.75, 0.25)  # more accurate, but a 32-query unit would often see < 20%
    clears = _cand(2e-3, 0.74, 0.35)
    required = required_dev_changed(32)
    assert choose([just_over_20, clears], n_dev=64, required=required) == (clears, "margin")
    assert choose([just_over_20], n_dev=64, required=required) == (just_over_20, "min_changed")
    assert choose([_cand(1e-4, 0.8, 0.1)], n_dev=64, required=required)[1] is None


def test_a_step_size_clearly_less_accurate_than_zero_shot_is_not_chosen():
    # zero-shot 0.80 on 64 dev x 2 N: one standard error 0.035, floor 0.729
    towards_one_label = _cand(3e-3, 0.71, 0.50)  # moves most, within one SE of 0.74, but below the floor
    learns = _cand(2e-3, 0.74, 0.35)
    assert harmful(towards_one_label, 64, 0.80) and not harmful(learns, 64, 0.80)
    assert choose([towards_one_label, learns], 64, 0.306, zero_shot_accuracy=0.80) == (learns, "margin")
    off = choose([towards_one_label, learns], 64, 0.306, zero_shot_accuracy=0.80, max_accuracy_loss_se=None)
    assert off == (towards_one_label, "margin")  # without the floor the stronger update wins



def test_moving_comes_before_the_accuracy_floor_and_the_loss_is_reported():
    # zero-shot 0.80 on 64 dev x 2 N (floor 0.729); nothing above the floor clears the margin
    towards_one_label = _cand(3e-3, 0.71, 0.50)
    costs_less = _cand(2e-3, 0.72, 0.40)
    harmless_but_small = _cand(1e-3, 0.78, 0.22)  # clears only the bare 20%
    still = _cand(1e-4, 0.80, 0.05)
    grid = [towards_one_label, costs_less, harmless_but_small, still]
    best, met = choose(grid, 64, 0.306, zero_shot_accuracy=0.80)
    # the margin (a test unit then changes >= 20% nine times in ten) beats the floor; among the movers
    # within one SE of the most accurate, the larger move wins, as without a floor
    assert (best, met) == (towards_one_label, "margin") and harmful(best, 64, 0.80)
    # a non-moving candidate is never preferred to a moving one for its accuracy
    small_move = choose([harmless_but_small, still], 64, 0.306, zero_shot_accuracy=0.80)
    assert small_move == (harmless_but_small, "min_changed")
    # below the floor but moving beats above the floor at the bare 20%: the margin comes first
    assert choose([costs_less, harmless_but_small], 64, 0.306, zero_shot_accuracy=0.80) == (costs_less, "margin")
    # collapsed candidates stay out whatever the floor: nothing moves -> most accurate, met None
    assert choose([_cand(5e-3, 0.5, 0.5, collapsed=True), still], 64, 0.306, zero_shot_accuracy=0.80) == (still, None)


def test_select_gd_records_that_the_chosen_step_size_lost_dev_accuracy():
    dev = [Example(i, {"text": str(i)}, i % 2) for i in range(8)]
    data = GDSelectionData(dev, {4: [dev[:4]]})
    truth = torch.tensor([e.label for e in dev])

    def after_gd(cfg, demos, test):  # lr 1.0 breaks 3 of 8 right answers; lr 0.01 changes nothing
        return truth if cfg.lr == 0.01 else torch.tensor([1 - truth[0], 1 - truth[1], 1, 1, 0, 1, 0, 1])

    rec = select_gd(GDConfig(), [0.01, 1.0], [1], data, lambda d: truth, after_gd, n_test=1000)
    assert rec["selected"]["lr"] == 1.0 and rec["met"] == "margin" and rec["below_zero_shot"]
    rec = select_gd(GDConfig(), [0.01, 1.0], [1], data, lambda d: truth, after_gd, n_test=1000,
                    max_accuracy_loss_se=None)
    assert rec["selected"]["lr"] == 1.0 and not rec["below_zero_shot"]  # no floor: nothing is below it


def test_select_gd_runs_only_the_counted_n_and_records_margin_and_floor():
    dev = [Example(i, {"text": str(i)}, i % 2) for i in range(10)]
    data = GDSelectionData(dev, {1: [dev[:1]], 4: [dev[:4]], 8: [dev[2:10]]})
    ran = []

    def after_gd(cfg, demos, test):
        ran.append(len(demos))
        return torch.tensor([e.label for e in test])  # learns the labels: 50% changed vs all-zero zero-shot

    rec = select_gd(GDConfig(), [0.1], [2], data, lambda d: torch.zeros(10, dtype=torch.long), after_gd, n_test=32)
    assert ran == [4, 8]  # N=1 neither counts nor is run
    assert rec["grid"][0]["counted_n"] == [4, 8] and list(rec["grid"][0]["dev_accuracy"]) == ["4", "8"]
    assert rec["required_dev_changed"] == required_dev_changed(32) and rec["n_test"] == 32
    assert rec["met"] == "margin" and not rec["fallback"] and not rec["grid"][0]["harmful"]
    assert not rec["below_zero_shot"]
    assert rec["max_accuracy_loss_se"] == 2.0 and rec["dev_accuracy_zero_shot"] == 0.5


def test_selection_defaults_in_code_and_shipped_config_agree():
    import inspect

    import yaml

    from datamodules.icl_tasks import ICLTaskDataModule
    from lightning_modules.probes.icl_gd import ICLvsGDProbe

    cfg = yaml.safe_load(open("configs/probes/icl_gd.yaml"))
    for cls, section, keys in (
        (ICLvsGDProbe, "model", ("gd_lr", "gd_epochs", "gd_lr_grid", "gd_epochs_grid", "gd_max_accuracy_loss_se",
                                   "gd_select_per_unit")),
        (ICLTaskDataModule, "data", ("n_test", "n_dev", "n_selection_sets")),
    ):
        defaults = inspect.signature(cls).parameters
        for key in keys:
            default = defaults[key].default
            default = list(default) if isinstance(default, tuple) else default
            assert cfg[section]["init_args"][key] == default, key


def test_per_unit_selection_tunes_each_unit_on_its_own_demonstrations(monkeypatch):
    from lightning_modules.probes import icl_gd

    seen = []

    def fake_select(base, lrs, epochs, data, zero_shot, after_gd, n_test=None, max_accuracy_loss_se=None):
        seen.append(data)
        return {"selected": {"lr": lrs[0], "epochs": 2}, "config": base, "grid": [], "n_dev": len(data.dev),
                "n_selection_sets": 1, "required_dev_changed": 0.25, "fallback": False, "met": "margin",
                "below_zero_shot": False}

    monkeypatch.setattr(icl_gd, "select_gd", fake_select)
    units = build_work_units(["sst2"], [1, 4], [0, 1], 8, order_n_demos=4, n_permutations=2,
                             model_variants=("pretrained", "random_init"), n_dev=8, n_selection_sets=2)
    probe = icl_gd.ICLvsGDProbe(model=None, model_config={"model_type": "llama"}, von_oswald=False)
    probe.lm = torch.nn.Linear(1, 1)  # never called: the selection is faked
    records = {u.uid: probe._gd_for(u)[1] for u in units}
    # one task-level choice (N=1 units, on the selection draws) and one per (N>=4, seed) on its own demos;
    # the random-init control and the order unit (same demonstrations as n4/s0) reuse them
    assert len(seen) == 3 and seen[0] is units[0].selection
    n4 = {u.seed: u for u in units if u.kind == "sweep" and u.n_demos == 4 and u.model_variant == "pretrained"}
    for data, seed in zip(seen[1:], (0, 1), strict=True):
        assert data.dev == units[0].selection.dev and data.demos == {4: [n4[seed].demos]}
    assert records["sst2/n4/s0/pretrained"]["per_unit"] and not records["sst2/n1/s0/pretrained"]["per_unit"]
    assert records["sst2/n4/s0/random_init"] is not None and "sst2/order/n4/pretrained" in records
    probe = icl_gd.ICLvsGDProbe(model=None, model_config={"model_type": "llama"}, gd_select_per_unit=False)
    probe.lm = torch.nn.Linear(1, 1)
    seen.clear()
    for u in units:
        probe._gd_for(u)
    assert len(seen) == 1  # once per task
