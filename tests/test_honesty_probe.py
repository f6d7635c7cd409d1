"""The probe end to end: configs through train.py's parser, a tiny model, a planted speaker, DDP."""

import json

import lightning as L
import numpy as np
import pytest

from datamodules.honesty import HonestyDataModule
from datamodules.honesty_prompts import build_messages
from lightning_modules.probes.honesty.backends import Backend
from lightning_modules.probes.honesty.probe import HonestyProbe
from lightning_modules.probes.honesty.speaker_model import speaker_probs
from tests.conftest import parse_config, quiet_cpu_trainer_kwargs

TINY = "configs/probes/honesty_tiny.yaml"


def test_shipped_config_parses_without_loading_weights():
    cli = parse_config("configs/probes/honesty.yaml", subcommand="test")
    assert isinstance(cli.model, HonestyProbe) and len(cli.model.lms) == 0  # weights load in configure_model
    assert cli.model.model_specs[0]["model"] == "smollm2-135m-instruct"
    assert isinstance(cli.datamodule, HonestyDataModule)
    assert len(cli.datamodule.trials) == 4 * 3 * 2 + 3 * 2 * 2
    assert cli.trainer.num_devices == 1


def test_tiny_config_end_to_end(tmp_path):
    cli = parse_config(TINY, subcommand="test", overrides=[f"--trainer.default_root_dir={tmp_path}"])
    cli.trainer.test(cli.model, datamodule=cli.datamodule)
    out = tmp_path / "honesty"
    res = json.loads((out / "results.json").read_text())
    n_trials = len(cli.datamodule.trials)
    assert res["n_records"] == len(res["records"]) == 3 * n_trials
    for r in res["records"]:
        assert (
            r["prompt"].endswith(("Answer:", "\nAnswer:"))
            and r["options"]
            and len(r["order"]) == len(r["options"])
        )
        if r["probs"] is not None:
            assert sum(r["probs"]) == pytest.approx(1.0) and 0 <= r["honesty"] <= 1
        if r["method"] == "generate":
            assert len(r["generations"]) == 1 and len(r["parsed"]) == 1
        if r["cot"]:
            assert r["reasoning"] is not None and "Reasoning:" in r["prompt"]
    for row in res["aggregates"]:
        recs = [
            r
            for r in res["records"]
            if r["model"] == row["model"]
            and r["method"] == row["method"]
            and r["condition"].startswith(f"{row['paradigm']}/{row['framing']}")
            and r["context"] == row["context"]
            and r["cot"] == row["cot"]
        ]
        assert row["n_items"] == len(recs)
        assert row["n_unparseable"] == sum(r["probs"] is None for r in recs)  # counted, not dropped
        if row["paradigm"] == "signaling":
            assert set(row["human_lambda"]) == {"free_choice", "endorsement"}
            if row["lambda_hat"] is not None:
                assert 0 <= row["lambda_hat"] <= 1
                # a bootstrap over a single item means nothing: no interval is reported then
                assert (row["lambda_ci"] is not None) == (row["n_items"] - row["n_unparseable"] >= 2)
    for png in ("lambda_by_framing", "honesty_vs_helpfulness", "rounding_by_context"):
        assert (out / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "honesty_probe_records.csv").is_file() and (
        tmp_path / "honesty_probe_aggregates.csv"
    ).is_file()
    assert any(k.endswith("/honesty") for k in cli.trainer.callback_metrics)


class PlantedSpeaker(Backend):
    """Answers letters with the RSA speaker's own probabilities for a planted lambda and beta."""

    label, chat = "planted", True

    def __init__(self, trials, lam_by_framing, beta):
        self.table = {}
        for t in trials:
            lam = lam_by_framing[t.framing] + (0.1 if t.cot else 0.0)
            self.table[build_messages(t, "letter")[1]["content"]] = np.log(
                speaker_probs(t.utilities(), lam, beta)
            )

    def letter_logprobs(self, messages, letters, reasoning=None):
        return self.table[messages[1]["content"]]

    def generate(self, messages, **kwargs):
        return ["I reason that the answer follows."]

    def option_logprobs(self, messages, options, reasoning=None):
        raise AssertionError("not used")


def test_planted_speaker_lambda_is_recovered_per_condition(tmp_path, cpu_trainer_kwargs):
    dm = HonestyDataModule(n_signaling=12, n_time=10, n_options=5, seed=3)
    lam = {"belief": 0.2, "ambiguous": 0.5, "utility": 0.8}
    probe = HonestyProbe(
        models=[{"label": "planted", "model_config": {}}], methods=["letter"], n_boot=20, plots=False
    )
    probe.backends = {"planted": PlantedSpeaker(dm.trials, lam, beta=2.5)}
    L.Trainer(**cpu_trainer_kwargs).test(probe, datamodule=dm)
    rows = {r["group"]: r for r in probe.results["aggregates"]}
    for framing, value in lam.items():
        assert rows[f"planted/letter/signaling/{framing}/direct"]["lambda_hat"] == pytest.approx(
            value, abs=0.01
        )
        assert rows[f"planted/letter/signaling/{framing}/cot"]["lambda_hat"] == pytest.approx(
            value + 0.1, abs=0.01
        )
    assert all(
        r["lambda_ci"][0] <= r["lambda_hat"] + 1e-4 and r["lambda_hat"] <= r["lambda_ci"][1] + 1e-4
        for r in rows.values()
    )
    for ctx in ("regular", "watch"):
        row = rows[f"planted/letter/time/ambiguous/{ctx}/direct"]
        assert row["lambda_hat"] == pytest.approx(0.5, abs=0.01) and row["beta_hat"] == pytest.approx(
            2.5, rel=0.02
        )
    # with lambda 0.5 a speaker rounds more when the listener only needs the nearest five minutes
    assert (
        rows["planted/letter/time/ambiguous/regular/direct"]["rounding_rate"]
        > rows["planted/letter/time/ambiguous/watch/direct"]["rounding_rate"]
    )


def test_bad_probe_arguments_fail_early():
    with pytest.raises(ValueError, match="unknown or empty methods"):
        HonestyProbe(methods=["vibes"])
    with pytest.raises(ValueError, match="drop method 'loglik'"):
        HonestyProbe(models=[{"kind": "openai", "model": "m", "base_url": "http://x"}], methods=["loglik"])
    with pytest.raises(ValueError, match="unknown fields"):
        HonestyProbe(models=[{"model": "m", "temprature": 1}])
    with pytest.raises(ValueError, match="unique"):
        HonestyProbe(models=[{"model": "m"}, {"model": "m"}])
    with pytest.raises(ValueError, match="temperature > 0"):
        HonestyProbe(n_samples=3)


SMALLER = [  # 4 trials, 2 methods: enough to split across two ranks and pad the last batch
    "--data.init_args.signaling_framings=[utility]",
    "--data.init_args.time_contexts=[watch]",
    "--model.init_args.methods=[loglik, generate]",
    "--model.init_args.n_boot=0",
    "--model.init_args.plots=false",
]


def _run_tiny(root, **trainer):
    cli = parse_config(TINY, subcommand="test", overrides=[f"--trainer.default_root_dir={root}", *SMALLER])
    kwargs = quiet_cpu_trainer_kwargs(root) | trainer
    L.Trainer(**kwargs).test(cli.model, datamodule=cli.datamodule)
    return json.loads((root / "honesty" / "results.json").read_text())


def test_ddp_two_processes_split_items_and_gather_the_same_results(tmp_path):
    single = _run_tiny(tmp_path / "single")
    ddp = _run_tiny(tmp_path / "ddp", devices=2, strategy="ddp_spawn")
    key = lambda r: (r["trial_id"], r["method"])  # noqa: E731
    assert len(single["records"]) == 2 * 4
    assert sorted(map(key, ddp["records"])) == sorted(map(key, single["records"]))  # each item once
    by_key = {key(r): r for r in single["records"]}
    for r in ddp["records"]:
        s = by_key[key(r)]
        if r["probs"] is None:
            assert s["probs"] is None
        else:
            np.testing.assert_allclose(r["probs"], s["probs"], atol=1e-5)
    assert [a["honesty"] for a in ddp["aggregates"]] == pytest.approx(
        [a["honesty"] for a in single["aggregates"]], abs=1e-5
    )


def test_api_model_through_the_probe_and_rerun_served_from_cache(tmp_path, cpu_trainer_kwargs):
    from tests.test_honesty_http_backend import _Server

    dm = HonestyDataModule(
        n_signaling=1,
        n_time=1,
        n_options=3,
        signaling_framings=["utility"],
        time_contexts=["regular"],
        cot=[False, True],
    )
    spec = {
        "kind": "openai",
        "label": "api",
        "model": "test-model",
        "timeout_s": 2.0,
        "max_retries": 0,
        "cache_dir": str(tmp_path / "cache"),
    }
    with _Server() as server:
        spec["base_url"] = server.url
        probe = HonestyProbe(models=[spec], methods=["letter", "generate"], n_boot=0, plots=False)
        L.Trainer(**cpu_trainer_kwargs).test(probe, datamodule=dm)
        first = len(server.requests)
        # direct: letter + answer; cot: 2 reasonings (one per answer format) + letter + answer
        assert first == 2 * 2 + 2 * 4
        records = probe.results["records"]
        letter = [r for r in records if r["method"] == "letter"]
        assert all(r["chosen"] == r["options"][1] for r in letter)  # the server always prefers "B"
        generated = [r for r in records if r["method"] == "generate"]
        assert all(r["probs"] is None for r in generated)  # "B is my answer" names no option
        assert {
            row["unparseable_share"] for row in probe.results["aggregates"] if row["method"] == "generate"
        } == {1.0}
        rerun = HonestyProbe(models=[spec], methods=["letter", "generate"], n_boot=0, plots=False)
        L.Trainer(**cpu_trainer_kwargs).test(rerun, datamodule=dm)
        assert len(server.requests) == first  # everything came from the cache
        assert [r["probs"] for r in rerun.results["records"]] == [r["probs"] for r in records]


def test_api_key_is_never_saved_and_letter_needs_few_options(cpu_trainer_kwargs):
    probe = HonestyProbe(
        models=[{"kind": "openai", "model": "m", "base_url": "http://127.0.0.1:9", "api_key": "sk-x"}],
        methods=["letter"],
    )
    assert "sk-x" not in json.dumps(dict(probe.hparams)) and probe.model_specs[0]["api_key"] == "sk-x"
    with pytest.raises(ValueError, match="at most 26 options"):
        L.Trainer(**cpu_trainer_kwargs).test(
            probe, datamodule=HonestyDataModule(n_signaling=1, n_time=0, n_options=None)
        )


@pytest.mark.slow
def test_shipped_config_on_the_real_model_shrunk(tmp_path, tmp_cache):
    """The shipped config's real path (SmolLM2 chat template, all methods, CoT) on two trials."""
    cli = parse_config(
        "configs/probes/honesty.yaml",
        subcommand="test",
        overrides=[
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
            "--data.init_args.n_signaling=1",
            "--data.init_args.n_time=0",
            "--data.init_args.signaling_framings=[utility]",
            "--model.init_args.n_boot=0",
        ],
    )
    cli.trainer.test(cli.model, datamodule=cli.datamodule)
    res = json.loads((tmp_path / "honesty" / "results.json").read_text())
    assert res["n_records"] == 3 * 2
    for r in res["records"]:
        assert "<|im_start|>assistant" in r["prompt"]
        if r["method"] != "generate":
            assert sum(r["probs"]) == pytest.approx(1.0)
