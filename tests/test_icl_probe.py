"""The ICL-vs-GD probe end to end on a tiny model: configs, results files, DDP split and gather."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules.icl_tasks import ICLTaskDataModule
from lightning_modules.probes.icl_gd import RESULTS_FILE, ICLvsGDProbe
from tests.conftest import parse_config


@pytest.mark.parametrize("path", ["configs/probes/icl_gd.yaml", "configs/probes/icl_gd_tiny.yaml"])
def test_shipped_configs_parse_and_instantiate(path):
    cli = parse_config(path, subcommand="test")
    assert isinstance(cli.model, ICLvsGDProbe)
    assert isinstance(cli.datamodule, ICLTaskDataModule)
    assert cli.model.lm is None  # the model is loaded in setup, on every rank, not at parse time



# Short reviews keep the byte-level prompts short; the declaration is the shipped sst2 one otherwise.
SHORT_SST2 = {
    "name": "sst2",
    "source": "staicc:sst2",
    "label_words": ["negative", "positive"],
    "template": "Review: {text}\nSentiment:",
    "max_chars": 60,
}
SHORT_MR = SHORT_SST2 | {"name": "mr", "source": "staicc:rotten_tomatoes"}


def _probe(tiny_model_config):
    return ICLvsGDProbe(
        model=None,
        model_config=tiny_model_config,
        tokenizer="byt5",
        gd_lr=0.1,
        gd_epochs=2,
        gd_lr_grid=[0.03, 0.1],
        batch_size=8,
        analysis_examples=2,
        von_oswald=True,
        von_oswald_steps=20,
    )


def _data(**kw):
    args = dict(
        tasks=[SHORT_SST2, SHORT_MR],
        n_demos=[1, 2],
        seeds=[0],
        n_test=4,
        order_n_demos=2,
        n_permutations=2,
        random_init_control=True,
        order_on_random_init=True,
        n_dev=4,
    )
    return ICLTaskDataModule(**(args | kw))


def _run(root: Path, tiny_model_config, **trainer_kwargs) -> dict:
    trainer = L.Trainer(
        default_root_dir=str(root),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **trainer_kwargs,
    )
    trainer.test(_probe(tiny_model_config), datamodule=_data())
    return json.loads((root / RESULTS_FILE).read_text())


def _comparable(results: dict) -> list[dict]:
    return [{k: v for k, v in u.items() if k not in ("seconds", "rank")} for u in results["units"]]


def test_probe_writes_results_records_and_plots(tmp_path, tiny_model_config):
    res = _run(tmp_path, tiny_model_config, accelerator="cpu", devices=1)
    uids = [u["uid"] for u in res["units"]]
    assert len(uids) == len(set(uids)) == 2 * (2 + 1) * 2  # tasks x (N sweep + order) x model variants
    sweep = next(u for u in res["units"] if u["kind"] == "sweep")
    rec = sweep["records"][0]
    assert set(rec["loglik"]) == {"zero_shot", "icl", "gd"} and len(rec["loglik"]["icl"]) == 2
    assert set(rec["pred"]) == {"zero_shot", "icl", "gd"} and rec["prompt"].startswith("Review:")
    m = sweep["metrics"]
    for key in ("acc_zero_shot", "acc_icl", "acc_gd", "token_overlap", "rec2ftp", "sim_aou", "sim_am"):
        assert key in m
    assert {"label_cosine", "label_js", "vocab_cosine", "vocab_kl"} <= set(m["icl_vs_gd"])
    control = res["von_oswald_control"]
    assert set(control) == {"linear", "softmax", "linear_causal_2layer", "linear_2layer"}
    # the recorded control is the real one for the probe's settings (not bounds that hold by construction)
    from lightning_modules.probes.icl_von_oswald import run_control

    expected = run_control(train_steps=20, seed=0)
    assert set(control) == set(expected)
    for variant, figures in expected.items():
        assert control[variant] == pytest.approx(figures, rel=1e-6), variant
    agg = res["aggregate"]
    assert set(agg["sweep"]) == {"pretrained", "random_init"}
    order = agg["order"]["pretrained"]["sst2"]
    assert order["gd_full_batch"]["max_loglik_spread"] < 1e-4  # order-invariant up to fp32 summation
    for name in ("icl_gd_metrics_vs_n.png", "icl_gd_order.png", "icl_gd_records.csv", "icl_gd_aggregate.csv"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "icl_gd_summary.png").stat().st_size > 0
    prov = res["provenance"]
    assert prov["packages"]["torch"] and prov["date_utc"] and "commit" in prov["git"]
    assert prov["data"]["n_test"] == 4 and prov["seeds"]["seed"] == 0
    chosen = agg["gd_selection"]["pretrained"][sweep["task"]]
    assert chosen["selected"]["lr"] in (0.03, 0.1) and len(chosen["grid"]) == 2
    assert sweep["gd"]["lr"] == chosen["selected"]["lr"]  # the unit ran GD at the chosen step size
    assert 0.0 <= m["gd_vs_zero_shot_agreement"] <= 1.0 and isinstance(m["gd_flags"], list)


def test_ddp_split_and_gather_equals_one_process(tmp_path, tiny_model_config):
    one = _run(tmp_path / "one", tiny_model_config, accelerator="cpu", devices=1)
    two = _run(tmp_path / "two", tiny_model_config, accelerator="cpu", devices=2, strategy="ddp_spawn")
    assert {u["rank"] for u in two["units"]} == {0, 1}  # the work really was split
    a, b = _comparable(one), _comparable(two)
    assert [u["uid"] for u in a] == [u["uid"] for u in b]
    for ua, ub in zip(a, b, strict=True):
        for ra, rb in zip(ua["records"], ub["records"], strict=True):
            assert ra["pred" if "pred" in ra else "preds"] == rb["pred" if "pred" in rb else "preds"]
            for method in ra["loglik"]:
                torch.testing.assert_close(
                    torch.tensor(ra["loglik"][method]), torch.tensor(rb["loglik"][method]), atol=1e-5, rtol=0
                )
    for variant, tasks in one["aggregate"]["sweep"].items():
        for task, by_n in tasks.items():
            for n, row in by_n.items():
                for k in ("acc_zero_shot", "acc_icl", "acc_gd", "token_overlap", "icl_vs_gd_label_cosine"):
                    assert row[k] == pytest.approx(two["aggregate"]["sweep"][variant][task][n][k], abs=1e-6)
    for variant, tasks in one["aggregate"]["order"].items():
        for task, methods in tasks.items():
            for method in ("icl", "gd_full_batch", "gd_sgd_in_order"):
                assert (
                    methods[method]["accuracy_spread"]
                    == two["aggregate"]["order"][variant][task][method]["accuracy_spread"]
                )
