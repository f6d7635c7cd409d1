"""Tiny ICL and honesty probes for the strategy matrix, and the parts of their results that must not depend on it.

The same builders run in one process (the reference) and in every 2-process strategy job, so "equal to
one process" compares like with like.
"""

from __future__ import annotations

from typing import Any

from common.hf_loading import tiny_llama_config
from tests.test_icl_probe import SHORT_SST2


def icl_probe(**overrides: Any) -> Any:
    from lightning_modules.probes.icl_gd import ICLvsGDProbe

    args = dict(model=None, model_config=tiny_llama_config(max_position_embeddings=2048), tokenizer="byt5",
                gd_lr=0.1, gd_epochs=1, batch_size=8, analysis_examples=1, von_oswald=False)
    return ICLvsGDProbe(**(args | overrides))


def icl_qlora_probe() -> Any:
    """The same probe with GD through LoRA adapters on a 4-bit base."""
    return icl_probe(quantization="4bit", gd_method="lora", gd_lr=0.3)


def icl_data() -> Any:
    from datamodules.icl_tasks import ICLTaskDataModule

    return ICLTaskDataModule(tasks=[SHORT_SST2], n_demos=[1, 2], seeds=[0], n_test=2, order_n_demos=None,
                             n_permutations=0, random_init_control=True)


def icl_results(probe: Any) -> dict[str, Any]:
    """Per-unit predictions and log-likelihoods (rounded: float sums may differ in the last bits)."""
    units = {}
    for unit in probe.results["units"]:
        units[unit["uid"]] = [
            {"pred": rec.get("pred"), "loglik": {m: [round(x, 4) for x in v] for m, v in rec["loglik"].items()}}
            for rec in unit["records"]
        ]
    return {"units": units, "ranks": sorted({u["rank"] for u in probe.results["units"]})}


def honesty_probe() -> Any:
    from lightning_modules.probes.honesty.probe import HonestyProbe

    spec = {"label": "tiny", "model_config": tiny_llama_config(max_position_embeddings=1024), "tokenizer": "byt5",
            "chat": False}
    return HonestyProbe(models=[spec], methods=["loglik", "letter", "generate"], cot_max_new_tokens=3,
                        answer_max_new_tokens=4, n_boot=5, plots=False)


def honesty_data() -> Any:
    from datamodules.honesty import HonestyDataModule

    return HonestyDataModule(n_signaling=1, n_time=1, n_options=3, cot=[False, True])


def honesty_results(probe: Any) -> dict[str, Any]:
    """Every record's parsed answer and rounded probabilities, keyed by trial and method."""
    records = {}
    for r in probe.results["records"]:
        key = f"{r['trial_id']}/{r['method']}/{r['cot']}"
        records[key] = {"parsed": r.get("parsed"), "probs": None if r["probs"] is None else
                        [round(p, 4) for p in r["probs"]]}
    return {"records": records}
