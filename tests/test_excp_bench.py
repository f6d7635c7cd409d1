"""The ExCP benchmark's measurements on a few-step toy run: a lossy run really resumes from every file it
writes (also from the pretrained weights, no keyframe), the whole-run ratio counts every byte written,
the seed spread and the keyframe-interval trade-off are computed as their JSON says, and an ablation
resumes from its own reconstruction."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from excp_quality import ablation_resumes, resume_quality  # noqa: E402
from excp_storage import folder_bytes, keyframe_tradeoff, keyframe_tradeoff_estimate, storage_summary  # noqa: E402
from excp_workload import Run, quick_workload, train  # noqa: E402

from callbacks.excp.codec import ExCPSettings  # noqa: E402


@pytest.fixture(scope="module")
def workload():
    return replace(quick_workload(), interval=2, checkpoints=4, batch=2, block=16, val_batches=1, warmup=1)


def test_a_lossy_run_resumes_from_every_file_but_the_last_and_counts_every_byte(workload, tmp_path):
    run = train(workload, seed=1, lossy=ExCPSettings(threads=2), workdir=tmp_path)
    assert run.resumes == workload.checkpoints - 1
    assert [f["step"] for f in run.files] == [2, 4, 6, 8]
    assert all("val_loss_after_resume" in v for v in run.val[:-1]) and "val_loss_after_resume" not in run.val[-1]
    (tmp_path / "sidecar").write_bytes(b"x" * 1000)  # anything the run left in its folder is counted
    storage = storage_summary(run.files, tmp_path)
    assert storage["written_bytes_all_files"] == sum(f["stats"]["file_bytes"] for f in run.files) + 1000
    assert storage["overall_ratio"] == pytest.approx(
        storage["raw_wmv_fp32_bytes_all_checkpoints"] / storage["written_bytes_all_files"]
    )
    assert storage["keyframes"] == 1 and storage["delta_ratio_median"] > storage["keyframe_ratios"][0]


def test_runs_from_the_same_checkpoint_leave_it_untouched_and_agree(workload):
    start = train(workload, seed=0, keep="all", stop=2).ckpts[0]
    moments = {i: {k: t.clone() for k, t in st.items()} for i, st in start["optimizer_states"][0]["state"].items()}
    first = train(workload, seed=0, start=start, stop=4).final_val
    for i, st in start["optimizer_states"][0]["state"].items():
        for k, t in st.items():
            assert torch.equal(t, moments[i][k]), f"state {i}/{k} was stepped in place"
    assert train(workload, seed=0, start=start, stop=4).final_val == first


def test_a_run_from_pretrained_weights_writes_no_keyframe(workload, tmp_path):
    pretrained = replace(workload, from_pretrained=True)
    run = train(pretrained, seed=0, lossy=ExCPSettings(), workdir=tmp_path)
    assert run.resumes == workload.checkpoints - 1
    storage = storage_summary(run.files, tmp_path)
    assert storage["keyframes"] == 0
    assert storage["overall_ratio"] > 5


def test_seed_spread_and_mean_absolute_delta():
    def run(final: float) -> Run:
        return Run(names=[], val=[{"step": 1, "val_loss": final}], resumes=5)

    quality = resume_quality({0: (run(2.0), run(2.02)), 1: (run(2.2), run(2.2)), 2: (run(2.4), run(2.376))})
    assert quality["final_loss_delta_abs_rel"] == pytest.approx((0.01 + 0 + 0.01) / 3)
    assert quality["seed_spread_rel"] == pytest.approx(0.4 / 2.2)
    assert quality["within_seed_spread"] and quality["resumes_per_run"] == 5


def test_keyframe_tradeoff_estimate_places_keyframes_and_replays_from_the_last():
    deltas = [{"step": s, "kind": "delta", "bytes": 10, "decode_s": 1.0} for s in (1, 2, 3, 4)]
    rows = keyframe_tradeoff_estimate(deltas, {"bytes": 100, "decode_s": 5.0}, [2, 1000], raw_per_ckpt=400)["rows"]
    assert rows[0] == {
        "keyframe_interval": 2,
        "keyframes": 2,
        "total_bytes": 220,
        "overall_ratio": 1600 / 220,
        "load_last_s": 5.0,
        "deltas_at_median": [],
        "long_run_ratio": 800 / 110,  # a long run: segments of one keyframe + one median delta
        "load_worst_s": 6.0,
    }
    assert rows[1]["keyframes"] == 0 and rows[1]["total_bytes"] == 40 and rows[1]["load_last_s"] == 4.0
    assert rows[1]["long_run_ratio"] == pytest.approx(400_000 / (100 + 999 * 10))
    assert rows[1]["load_worst_s"] == pytest.approx(5.0 + 999)


def test_a_file_the_run_wrote_as_a_keyframe_is_costed_as_the_median_delta_where_an_interval_makes_it_one():
    files = [{"step": s, "kind": "delta", "bytes": b, "decode_s": 1.0} for s, b in ((1, 10), (2, 12), (3, 30))]
    files.append({"step": 4, "kind": "keyframe", "bytes": 100, "decode_s": 5.0})
    rows = keyframe_tradeoff_estimate(files, {"bytes": 100, "decode_s": 5.0}, [4, 1000], raw_per_ckpt=400)["rows"]
    assert rows[0]["total_bytes"] == 152 and rows[0]["deltas_at_median"] == []
    assert rows[1]["total_bytes"] == 10 + 12 + 30 + 12 and rows[1]["deltas_at_median"] == [4]
    assert rows[1]["load_last_s"] == 4.0


def test_keyframe_tradeoff_encodes_each_interval(workload, tmp_path):
    base = train(workload, seed=0, keep="all")
    rows = keyframe_tradeoff(base.ckpts, ExCPSettings(), base.names, [1, 1000], tmp_path)["rows"]
    assert [r["keyframes"] for r in rows] == [4, 1]
    assert rows[0]["total_bytes"] == folder_bytes(tmp_path / "interval-1") > rows[1]["total_bytes"]
    assert all(r["load_last_s"] > 0 for r in rows)


def test_an_ablation_resumes_from_its_reconstruction(workload, tmp_path):
    base = train(workload, seed=0, keep="all")
    variants = {"method": ExCPSettings(), "1-bit": ExCPSettings(bits_w=1, bits_m=1, bits_v=1)}
    rows, series, _ = ablation_resumes(workload, base, variants, tmp_path, workload.build(0))
    assert [r["resumed_from_step"] for r in rows] == [4, 4] and rows[0]["resumed_steps"] == workload.interval
    # the resumed runs really trained from different states: their losses differ
    assert rows[0]["val_loss_after_resume_delta_rel"] != rows[1]["val_loss_after_resume_delta_rel"]
    decoded = series["method"][1]["decoded"]
    assert not torch.equal(decoded["state_dict"]["lm_head.weight"], base.ckpts[1]["state_dict"]["lm_head.weight"])


def test_an_alternative_setting_reruns_every_seed_against_the_same_uninterrupted_runs(workload, tmp_path):
    from excp import _alternatives, _resumes_with

    default = ExCPSettings(threads=2)
    pairs = {
        s: (train(workload, seed=s), train(workload, seed=s, lossy=default, workdir=tmp_path / f"d{s}")) for s in (0, 1)
    }
    label, settings = next(iter(_alternatives(default).items()))
    out = _resumes_with(workload, pairs, settings, label, tmp_path)
    assert out["settings"] == settings.to_dict() and out["settings"]["quantizer"] == "uniform"
    assert len(out["final_loss_delta_rel_per_seed"]) == 2
    for seed, delta in zip((0, 1), out["final_loss_delta_rel_per_seed"], strict=True):
        base = pairs[seed][0].final_val
        assert delta != 0 and abs(delta) < 1  # a run of its own, not the default's lossy run
        assert delta != pytest.approx((pairs[seed][1].final_val - base) / base, rel=1e-9)
    assert out["delta_ratio_median"] > 1 and out["overall_ratio"] > 1


def test_full_mode_and_extra_settings_measure_every_alternative_once():
    from excp import SETTING_AT_70X_FISHER_SPLIT, _alternatives, _alternatives_for

    default = ExCPSettings(threads=2)
    every, full, extra = _alternatives(default), _alternatives_for("full", default), _alternatives_for("extra", default)
    assert _alternatives_for("quick", default) == every
    assert SETTING_AT_70X_FISHER_SPLIT in full and not set(full) & set(extra)
    assert {**full, **extra} == every and extra  # nothing measured twice, nothing left out


def test_an_extra_settings_record_compares_each_setting_over_the_seeds_and_replots(workload, tmp_path):
    import json

    from excp import _extra_settings, _replot

    uniform = ExCPSettings(threads=2, quantizer="uniform")
    out = tmp_path / "extra.json"
    _extra_settings(workload, {"uniform": uniform}, 2, out, tmp_path / "work")
    record = json.loads(out.read_text())
    row = record["alternative_settings"]["uniform"]
    assert row["settings"] == uniform.to_dict() and len(row["final_loss_delta_rel_per_seed"]) == 2
    finals = record["final_val_uninterrupted_per_seed"]
    assert len(finals) == 2 and finals[0] != finals[1]  # two seeds really trained
    assert row["seed_spread_rel"] == pytest.approx((max(finals) - min(finals)) / (sum(finals) / 2))
    assert out.with_suffix(".png").stat().st_size > 0
    out.with_suffix(".png").unlink()
    _replot(out)  # a record without the default's runs still redraws
    assert out.with_suffix(".png").stat().st_size > 0


def test_a_split_resume_swaps_in_only_the_named_decoded_part():
    from excp_resume_damage import _with_decoded

    def checkpoint(fill: float) -> dict:
        state = {
            0: {"step": torch.tensor(3.0), "exp_avg": torch.full((2,), fill), "exp_avg_sq": torch.full((2,), fill)}
        }
        return {"state_dict": {"w": torch.full((2,), fill)}, "optimizer_states": [{"state": state}]}

    exact, decoded = checkpoint(1.0), checkpoint(2.0)
    weights = _with_decoded(exact, decoded, "weights")
    assert weights["state_dict"]["w"][0] == 2 and weights["optimizer_states"][0]["state"][0]["exp_avg"][0] == 1
    m_only = _with_decoded(exact, decoded, "exp_avg")
    state = m_only["optimizer_states"][0]["state"][0]
    assert state["exp_avg"][0] == 2 and state["exp_avg_sq"][0] == 1 and m_only["state_dict"]["w"][0] == 1
    assert exact["optimizer_states"][0]["state"][0]["exp_avg"][0] == 1  # the exact checkpoint is not modified


def test_one_resume_is_measured_against_the_uninterrupted_run_on_the_same_batches(workload, tmp_path):
    from excp_resume_damage import AT_70X, _seed, _summary

    settings = {
        "lossless-ish": ExCPSettings(threads=2, bits_w=8, bits_m=8, bits_v=8, alpha=1e-12),
        AT_70X: ExCPSettings(threads=2, target_bits_per_param=1.37, quantizer="uniform"),
    }
    seeds = [_seed(workload, seed, settings, workload.interval, 2, tmp_path) for seed in (0, 1)]
    rows = seeds[0]["settings"]
    assert rows[AT_70X]["ratio"] > rows["lossless-ish"]["ratio"] > 1
    assert set(rows[AT_70X]["parts_after_horizon"]) == {"weights only", "m only", "v only"}
    assert "parts_after_horizon" not in rows["lossless-ish"]
    summary = _summary(seeds, list(settings))
    after = [s["settings"][AT_70X]["val_loss_delta_rel_after_horizon"] for s in seeds]
    assert summary[AT_70X]["val_loss_delta_rel_after_horizon"]["mean"] == pytest.approx(sum(after) / 2)


def test_momentum_oracle_restores_exact_m_only_where_the_weight_stayed_at_its_reference():
    from excp_momentum_oracle import exact_m_where_pruned

    names = ["w"]
    base = {"w": torch.tensor([1.0, 2.0, 3.0])}
    exact_m = torch.tensor([0.5, 0.6, 0.7])
    exact = {"optimizer_states": [{"state": {0: {"exp_avg": exact_m.clone()}}}]}
    decoded = {
        "state_dict": {"w": torch.tensor([1.0, 2.5, 3.0])},  # entries 0 and 2 pruned, 1 kept
        "optimizer_states": [{"state": {0: {"exp_avg": torch.tensor([0.0, 0.4, 0.0])}}}],
    }
    restored, share = exact_m_where_pruned(decoded, exact, base, names)
    assert restored["optimizer_states"][0]["state"][0]["exp_avg"].tolist() == pytest.approx([0.5, 0.4, 0.7])
    assert share == pytest.approx(2 / 3)
    assert decoded["optimizer_states"][0]["state"][0]["exp_avg"][0] == 0  # the decoded checkpoint is untouched


def test_own_mask_moments_are_coded_under_m_own_mask_and_cost_their_streams():
    from excp_momentum_oracle import own_mask_moments

    generator = torch.Generator().manual_seed(0)
    m = torch.randn(4096, generator=generator)
    v = torch.rand(4096, generator=generator) + 0.1
    ckpt = {
        "state_dict": {"w": torch.randn(4096, generator=generator)},
        "optimizer_states": [{"state": {0: {"exp_avg": m, "exp_avg_sq": v}}}],
    }
    decoded, spent = own_mask_moments(ckpt, ["w"], ExCPSettings(beta=2.0))
    m_hat, v_hat = decoded[0]["exp_avg"], decoded[0]["exp_avg_sq"]
    kept = m.abs() > 2.0 * m.abs().mean()
    assert torch.equal(m_hat != 0, kept)  # m's own mask, not nested in any weight mask
    assert (m_hat[kept] - m[kept]).abs().mean() < 0.1  # a 4-bit codebook of the survivors (|m| > ~1.6 here)
    assert torch.all(v_hat[~kept] == v_hat[~kept][0]) and v_hat[~kept][0] > 0  # pruned v decode to the floor
    assert 0 < spent < 4096 * 8  # far under fp32 m + v


def test_momentum_oracle_resumes_each_variant_against_the_same_uninterrupted_run(workload, tmp_path):
    from excp_momentum_oracle import VARIANTS, _seed

    settings = ExCPSettings(threads=2, alpha=None, target_bits_per_param=1.37, weight_saliency="fisher")
    row = _seed(workload, 0, settings, workload.interval, 2, tmp_path)
    deltas = row["val_loss_delta_rel_after_horizon"]
    assert set(deltas) == set(VARIANTS) and all(abs(d) < 1 for d in deltas.values())
    assert 0 < row["weight_pruned_share"] < 1
    assert row["bits_per_param_m_v_own_mask"] > 0 and row["ratio"] > 1
    charged = row["bits_per_param_m_v_own_mask"] - row["bits_per_param_m_v_file"]
    assert (row["ratio_with_own_mask_m"] < row["ratio"]) == (charged > 0)
