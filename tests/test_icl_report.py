"""Aggregates leave N=0 out (agreement 1.0 by definition), and the paper-facing table reads them."""

from lightning_modules.probes import icl_paper_report, icl_report


def _metrics(overlap: float, gd_zs: float, flags: list[str]) -> dict:
    sim = {"label_cosine": 1.0, "label_js": 0.0}
    return {
        "acc_zero_shot": 0.5,
        "acc_icl": 0.6,
        "acc_gd": 0.7,
        "token_overlap": overlap,
        "gd_vs_zero_shot_agreement": gd_zs,
        "icl_vs_zero_shot_agreement": 0.8,
        "gd_flags": flags,
        "icl_vs_gd": sim,
        "icl_shift_from_zero_shot": sim,
        "gd_shift_from_zero_shot": sim,
        "rec2ftp": 0.5,
    }


def _unit(n: int, overlap: float, gd_zs: float = 0.6, flags=()) -> dict:
    return {
        "uid": f"sst2/n{n}/s0/pretrained",
        "kind": "sweep",
        "task": "sst2",
        "n_demos": n,
        "seed": 0,
        "model_variant": "pretrained",
        "metrics": _metrics(overlap, gd_zs, list(flags)),
        "records": [],
        "gd_selection": {"selected": {"lr": 3e-4, "epochs": 2}},
    }


def test_n0_is_kept_in_units_but_not_aggregated(tmp_path):
    units = [_unit(0, 1.0, 1.0, ["unchanged"]), _unit(4, 0.55), _unit(8, 0.65, 0.95, ["unchanged"])]
    agg = icl_report.aggregate(units)
    assert sorted(agg["sweep"]["pretrained"]["sst2"]) == ["4", "8"]
    assert agg["sweep"]["pretrained"]["sst2"]["8"]["gd_flags"] == ["unchanged"]
    assert agg["gd_selection"]["pretrained"]["sst2"]["selected"]["lr"] == 3e-4
    rows = icl_paper_report.summary_rows(agg)
    assert [r["N"] for r in rows] == [4, 8] and rows[0]["ICL~GD"] == 0.55 and rows[1]["GD~ZS"] == 0.95
    table = icl_paper_report.format_table(rows)
    assert "GD~ZS" in table and "unchanged" in table and len(table.splitlines()) == 4
    assert rows[0]["epochs"] == 2 and rows[0]["flags"] == "-"
    units[1]["gd_selection"]["fallback"] = True  # the rule could not qualify a step size for N=4
    # N=8 chose on its own demonstrations (gd_select_per_unit), a step size that lost dev accuracy
    units[2]["gd_selection"] = {"selected": {"lr": 1e-3, "epochs": 2}, "per_unit": True, "below_zero_shot": True}
    agg = icl_report.aggregate(units)
    rows = icl_paper_report.summary_rows(agg)
    assert [r["flags"] for r in rows] == ["fallback", "unchanged,below_zero_shot"]
    assert [r["lr"] for r in rows] == [3e-4, 1e-3]  # each row shows the step size its units ran with
    assert list(agg["gd_selection_per_unit"]["pretrained"]["sst2"]) == ["n8/s0"]
    # results written before per-unit selection: the task's record supplies lr and flags
    for row in agg["sweep"]["pretrained"]["sst2"].values():
        del row["gd_selected"], row["gd_selection_flags"]
    agg["gd_selection"]["pretrained"]["sst2"]["below_zero_shot"] = True
    legacy = icl_paper_report.summary_rows(agg)
    assert [r["flags"] for r in legacy] == ["below_zero_shot", "unchanged,below_zero_shot"] and legacy[1]["lr"] == 3e-4
    assert icl_paper_report.plot_summary(rows, tmp_path / "s.png").stat().st_size > 0
    assert icl_report.plot_sweep(agg, tmp_path / "sweep.png") is not None
