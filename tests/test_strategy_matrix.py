"""Every component under FSDP (FSDP1), FSDP2 and DeepSpeed ZeRO-2/3 on 2 CPU processes (gloo).

One 2-process job (``tests/strategy_matrix_job.py``) per strategy family (FSDP2 + FSDP1, DeepSpeed ZeRO-2 + 3)
runs its cells, because starting the processes costs more than the tiny runs; each family has its own time
limit, so a stalled family fails its own cells with the end of its output and leaves the other's standing.
FSDP and DeepSpeed are refused on CPU only by device checks; the job swaps
in the test-only shims of ``tests/strategy_shims.py``, whose docstring names the refusing lines:
``accelerator_connector.py`` ``_check_strategy_and_fallback`` and ``strategies/fsdp.py`` ``_setup_model``
(``device_id=None``) for FSDP, ``strategies/deepspeed.py`` ``setup_environment``/``setup_distributed`` for
DeepSpeed (run with ``DS_ACCELERATOR=cpu``). FSDP2 (``ModelParallelStrategy``) runs as shipped.

Where the work is split (the probes score their own share of the items on each rank), the results must
equal a one-process run of the same probe.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest

from common.hf_loading import TINY_LLAMA_CONFIG
from tests.conftest import REPO_ROOT

# One 2-process job per family; each family's job takes ~40 s on 2 quiet cores, and the limit leaves room for
# a loaded CI machine.
FAMILIES = (("fsdp2", "fsdp"), ("deepspeed_stage2", "deepspeed_stage3"))
FAMILY_TIMEOUT_S = 300
STRATEGIES = tuple(strategy for family in FAMILIES for strategy in family)
COMPONENTS = ("causal_lm", "flextron", "icl_probe", "honesty_probe")
# Cells refused at setup, with the start of their one-line message; every other cell must work.
REFUSED = {
    ("deepspeed_stage3", "icl_probe"): "ICLvsGDProbe under DeepSpeed ZeRO stage 3",
    ("deepspeed_stage3", "honesty_probe"): "HonestyProbe under DeepSpeed ZeRO stage 3",
}
# ExCP compresses full-state FSDP/FSDP2 files and DeepSpeed ZeRO-2/3 folders; elsewhere it refuses in one line.
EXCP = {
    "fsdp2": "compressed",
    "fsdp": "compressed",
    "deepspeed_stage2": "compressed",
    "deepspeed_stage3": "compressed",
}


def _run_family(family: tuple[str, ...], out: Path, components: tuple[str, ...] = ()) -> str | None:
    """Run one family's job; the failure message (None on success) names the family and ends with its output.

    The job runs in its own session so a timeout kills Lightning's rank-1 child too, not only rank 0.
    ``components`` replaces the job's default cells.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DS_ACCELERATOR": "cpu", "MPLBACKEND": "Agg"}
    env.pop("LOCAL_RANK", None)
    job = [sys.executable, str(REPO_ROOT / "tests" / "strategy_matrix_job.py"), ",".join(family), str(out)]
    job += [",".join(components)] if components else []
    with subprocess.Popen(job, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=out, env=env,
                          start_new_session=True) as process:
        try:
            output, _ = process.communicate(timeout=FAMILY_TIMEOUT_S)
            problem = None if process.returncode == 0 else f"exited with {process.returncode}"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            problem = f"ran past {FAMILY_TIMEOUT_S} s"
    return None if problem is None else f"the {'+'.join(family)} job {problem}; its output ends:\n{output[-4000:]}"


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The output folder of the job that ran a strategy's family, running that job on first use."""
    out = tmp_path_factory.mktemp("matrix")
    failures: dict[tuple[str, ...], str | None] = {}

    def folder(strategy: str) -> Path:
        family = next(f for f in FAMILIES if strategy in f)
        if family not in failures:
            failures[family] = _run_family(family, out)
        if failures[family] is not None:
            pytest.fail(failures[family], pytrace=False)
        return out

    return folder


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The probes' results on one process: what every split run must reproduce."""
    from tests.strategy_probes import honesty_data, honesty_probe, honesty_results, icl_data, icl_probe, icl_results

    root = tmp_path_factory.mktemp("one")
    kwargs = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, default_root_dir=str(root))
    L.seed_everything(0, verbose=False)
    icl = icl_probe()
    L.Trainer(**kwargs).test(icl, datamodule=icl_data(), verbose=False)
    L.seed_everything(0, verbose=False)
    honesty = honesty_probe()
    L.Trainer(**kwargs).test(honesty, datamodule=honesty_data(), verbose=False)
    return {"icl_probe": icl_results(icl), "honesty_probe": honesty_results(honesty)}


def _decay_group_sizes() -> list[int]:
    """(weights, biases and norms) of the tiny Llama in one process, by ``ndim`` as no sharding hides it."""
    from common.hf_loading import load_causal_lm

    params = list(load_causal_lm(None, model_config=TINY_LLAMA_CONFIG).parameters())
    return [sum(p.ndim >= 2 for p in params), sum(p.ndim < 2 for p in params)]


def _cell(matrix: Callable[[str], Path], strategy: str, component: str) -> dict[str, Any]:
    path = matrix(strategy) / strategy / f"{component}.json"
    assert path.is_file(), f"the job wrote no result for {strategy} x {component}"
    return json.loads(path.read_text())


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("component", COMPONENTS)
def test_cell(matrix: Callable[[str], Path], one_process: dict[str, Any], strategy: str, component: str) -> None:
    cell = _cell(matrix, strategy, component)
    refusal = REFUSED.get((strategy, component))
    if refusal is not None:
        assert not cell["ok"] and cell["error"].startswith(f"ShardingError: {refusal}"), cell.get("error")
        assert "\n" not in cell["error"]
        return
    assert cell["ok"], cell.get("traceback", cell)
    if component == "causal_lm":
        assert cell["excp"].startswith(EXCP[strategy]), cell["excp"]
        assert cell["last_is_excp"] == (EXCP[strategy] == "compressed")
        if cell["last_is_excp"] and not strategy.startswith("deepspeed"):  # DeepSpeed: the excp_deepspeed test
            assert cell["restored_equals_decoded"], "the sharded model did not get the decoded ExCP weights"
            assert cell["delta_ratio"] > 5, cell  # moments matched to their weights (names as in the state dict)
            assert cell["param_group_sizes"] == _decay_group_sizes(), "sharding changed the weight-decay groups"
        assert cell["resumed_global_step"] == 6  # resumed at step 4 from last.ckpt, then 2 more steps
        assert cell["val_loss"] < 6.0  # ln(384) = 5.95: finite and not worse than uniform after resuming
    elif component == "flextron":
        assert cell["global_step"] == 4
        assert cell["routers_equal"], "replicated routers drifted apart across ranks"
    else:
        reference = one_process[component]
        if component == "icl_probe":
            assert cell["results"]["ranks"] == [0, 1], "the work was not split across the 2 ranks"
            assert cell["results"]["units"] == reference["units"]
        else:
            assert cell["results"]["records"] == reference["records"]


# fsdp.yaml as shipped, but the CPU shim (tests/strategy_shims.py) and 32-bit on 2 CPU processes
_FSDP1_ON_CPU = ["--trainer.strategy.class_path=tests.strategy_shims.CPUFSDPStrategy", "--trainer.accelerator=cpu",
                 "--trainer.devices=2", "--trainer.precision=32-true"]


@pytest.mark.slow
@pytest.mark.parametrize(("trainer_config", "cpu_overrides"), [("fsdp2", []), ("fsdp", _FSDP1_ON_CPU)])
def test_train_py_writes_excp_files_and_resumes_from_them(
    tmp_path: Path, trainer_config: str, cpu_overrides: list[str]
) -> None:
    """The README command on 2 CPU processes: quickstart + fsdp2.yaml / fsdp.yaml with a tiny model, then
    --ckpt_path (for FSDP1 also its norm clipping, which Lightning's FSDP precision plugin refuses)."""
    from callbacks.excp import is_excp_file, load_checkpoint

    tiny = json.dumps(TINY_LLAMA_CONFIG)
    base = [sys.executable, "train.py", "fit", "--config", "configs/quickstart.yaml", "--config",
            f"configs/trainer/{trainer_config}.yaml", *cpu_overrides, "--config", "configs/trainer/csv_logger.yaml",
            f"--trainer.logger.init_args.save_dir={tmp_path}/logs", "--model.init_args.model=null",
            f"--model.init_args.model_config={tiny}", "--model.init_args.tokenizer=byt5",
            "--data.init_args.tokenizer=byt5", "--data.init_args.max_tokens=20000", "--trainer.limit_val_batches=1",
            f"--trainer.default_root_dir={tmp_path}/run", f"--trainer.callbacks.dirpath={tmp_path}/ckpt"]
    env = {**os.environ, "MPLBACKEND": "Agg", "WANDB_MODE": "offline"}
    first = subprocess.run([*base, "--trainer.max_steps=20"], capture_output=True, text=True, cwd=REPO_ROOT,
                           env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    last = tmp_path / "ckpt" / "last.ckpt"
    assert is_excp_file(last) and is_excp_file(tmp_path / "ckpt" / "epoch=0-step=20.ckpt")
    assert load_checkpoint(last)["global_step"] == 20
    second = subprocess.run([*base, "--trainer.max_steps=30", f"--ckpt_path={last}"], capture_output=True,
                            text=True, cwd=REPO_ROOT, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Restored all states from the checkpoint" in second.stdout + second.stderr
    assert load_checkpoint(tmp_path / "ckpt" / "last.ckpt")["global_step"] == 30


# The engine files of one checkpoint folder: each rank's partition, and the module file(s): rank 0's full
# module under ZeRO-2, one file per rank of empty placeholders plus client state under ZeRO-3.
DEEPSPEED_FILES = {
    "deepspeed_stage2": ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                         "zero_pp_rank_1_mp_rank_00_optim_states.pt"],
    "deepspeed_stage3": ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                         "zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"],
}


@pytest.mark.parametrize("strategy", ["deepspeed_stage2", "deepspeed_stage3"])
def test_excp_deepspeed_compresses_rotates_and_resumes(matrix: Callable[[str], Path], strategy: str) -> None:
    """ZeRO-2/3 folders hold ExCP files (smaller than the engine's), survive deleting older folders, and resume.

    The job fits 4 steps (checkpoints every 2, top-1 + last: step 2's folder is rotated away), deletes the
    step-4 folder whose delta last.ckpt's chain needs, then resumes from last.ckpt to step 6.
    """
    _check_excp_deepspeed_cell(_cell(matrix, strategy, "excp_deepspeed"), strategy, DEEPSPEED_FILES[strategy])


def _check_excp_deepspeed_cell(cell: dict[str, Any], strategy: str, engine_files: list[str],
                               twin_shrink: float = 50) -> None:
    assert cell["ok"], cell.get("traceback", cell)
    assert cell["folders_after_fit"] == ["epoch=0-step=4.ckpt", "last.ckpt"]
    files = cell["files"]
    assert sorted(files) == sorted(engine_files)
    for name, f in files.items():
        assert f["excp"], name
        assert f["chain"] == ["keyframe", "twin", "delta", "twin"], (name, f["chain"])  # step 2, last, step 4, last
        if strategy == "deepspeed_stage3" and "model_states" in name:
            continue  # placeholders and client state only: nothing for a delta to shrink
        assert f["chain_bytes"] < f["plain_bytes"] / 5, (name, f)  # the delta against the engine's own file
        assert f["bytes"] < f["plain_bytes"] / twin_shrink, (name, f)  # last.ckpt: a same-step twin stores no tensors
    cli = cell["cli"]  # `python -m callbacks.excp decompress last.ckpt`: the folder as the engine wrote it
    assert cli["returncode"] == 0 and cli["plain"] and cli["global_step"] == 4, cli
    assert "latest" in cli["files"] and "zero_to_fp32.py" in cli["files"], cli["files"]
    kinds = [(h["step"], h["keyframe"], h["twin"]) for h in cell["history"]]
    assert kinds == [(2, 1.0, 0.0), (2, 0.0, 1.0), (4, 0.0, 0.0), (4, 0.0, 1.0)]
    assert cell["resumed_global_step"] == 6
    assert 0 < cell["train_loss"] < 6.0  # ln(384) = 5.95: finite and learning after the resume
    for rank in cell["relative_error"]:  # the restored ZeRO state against the state the last save wrote
        assert rank["w"] < 0.01, rank  # fp32 master weights: delta-coded, lossy within ExCP's bounds
        assert rank["m"] < 0.6 and rank["v"] < 0.9, rank  # moments pruned and quantized, not lost
    assert cell["folders_after_resume"] == ["epoch=0-step=6.ckpt"]
    assert cell["leftover_temporaries"] == []


@pytest.mark.slow
def test_deepspeed_bf16_mixed_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped DeepSpeed configs' own precision, bf16-mixed, on the CPU shims (about 40 s on 2 quiet cores).

    bf16 is what GPU users run, and it differs in two ways the 32-bit matrix cannot show: the engine names its
    partition files ``bf16_zero_pp_rank_*`` (ExCP must compress them too), and it casts the weights to bf16
    without autocast (Flextron's routers are fed float32 budget encodings).
    """
    monkeypatch.setenv("LUMENLM_MATRIX_PRECISION", "bf16-mixed")
    family = ("deepspeed_stage2", "deepspeed_stage3")
    failure = _run_family(family, tmp_path, components=("causal_lm", "flextron", "excp_deepspeed"))
    assert failure is None, failure
    def job_output(strategy: str) -> Path:
        return tmp_path

    for strategy in family:
        cells = {c: _cell(job_output, strategy, c) for c in ("causal_lm", "flextron", "excp_deepspeed")}
        assert cells["flextron"]["ok"] and cells["flextron"]["routers_equal"], cells["flextron"].get("traceback")
        assert cells["causal_lm"]["ok"] and cells["causal_lm"]["resumed_global_step"] == 6, cells["causal_lm"]
        bf16_names = [f"bf16_{n}" if n.endswith("_optim_states.pt") else n for n in DEEPSPEED_FILES[strategy]]
        # twin_shrink 25: a bf16 module file is half an fp32 one, while the twin's client state is the same size
        _check_excp_deepspeed_cell(cells["excp_deepspeed"], strategy, bf16_names, twin_shrink=25)
