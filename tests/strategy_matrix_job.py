"""One 2-process CPU job per strategy: every component runs under it; rank 0 writes one JSON per component.

    python tests/strategy_matrix_job.py fsdp2,fsdp,deepspeed_stage2 <out_dir> [causal_lm,flextron,...]

(``icl_qlora_probe``, the ICL probe with QLoRA GD, is not a default component: it is slow on CPU and has its
own slow test, ``tests/test_icl_lora_strategies.py``.)

Lightning relaunches this script for rank 1 (the first Trainer's subprocess launcher), so everything here
runs on both ranks, and later Trainers join the same 2 processes and process group: one launch serves
every strategy, which saves a process start-up (~20 s on 2 cores) per strategy. Each strategy comes from
the shipped ``configs/trainer/<name>.yaml``; FSDP and DeepSpeed get the CPU shims of
``tests/strategy_shims.py`` (the only change: which class, see its docstring). Rank 0 writes
``<out_dir>/<strategy>/<component>.json``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

# bench/gpu_check.sh runs the same job on GPUs: LUMENLM_MATRIX_ACCELERATOR=gpu LUMENLM_MATRIX_DEVICES=1.
ACCELERATOR = os.environ.get("LUMENLM_MATRIX_ACCELERATOR", "cpu")
DEVICES = int(os.environ.get("LUMENLM_MATRIX_DEVICES", "2"))
if ACCELERATOR == "cpu":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported: its CPU accelerator
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common.hf_loading import tiny_llama_config  # noqa: E402
from tests.strategy_shims import CPUDeepSpeedStrategy, CPUFSDPStrategy  # noqa: E402

SHIMS = {"FSDPStrategy": CPUFSDPStrategy, "DeepSpeedStrategy": CPUDeepSpeedStrategy}
COMPONENTS = ("causal_lm", "flextron", "icl_probe", "honesty_probe")
# On a GPU the QLoRA variant of the ICL probe is cheap (bitsandbytes' CUDA kernels), so it joins the default cells.
GPU_COMPONENTS = (*COMPONENTS, "icl_qlora_probe")
# Checks that only one strategy needs, run after its components (same processes, no extra launch).
EXTRA_COMPONENTS = {"deepspeed_stage2": ("excp_deepspeed",), "deepspeed_stage3": ("excp_deepspeed",)}


def _resolve(value: Any) -> Any:
    """Class paths in ``auto_wrap_policy`` lists become classes (jsonargparse does this for the CLI)."""
    if isinstance(value, list) and value and all(isinstance(v, str) and "." in v for v in value):
        out = set()
        for path in value:
            module, name = path.rsplit(".", 1)
            out.add(getattr(importlib.import_module(module), name))
        return out
    return value


def strategy_from_config(name: str) -> Any:
    """The shipped trainer config's strategy, as a fresh object (a shim class where CPU needs one)."""
    trainer = yaml.safe_load((REPO / "configs" / "trainer" / f"{name}.yaml").read_text())["trainer"]
    spec = trainer["strategy"]
    if isinstance(spec, str):
        return spec
    module, cls_name = spec["class_path"].rsplit(".", 1)
    shim = SHIMS.get(cls_name) if ACCELERATOR == "cpu" else None
    cls = shim or getattr(importlib.import_module(module), cls_name)
    kwargs = {k: _resolve(v) for k, v in (spec.get("init_args") or {}).items()}
    if "data_parallel_size" in kwargs:
        kwargs["data_parallel_size"] = DEVICES
    return cls(**kwargs)


def _precision(name: str) -> str:
    """32-bit on CPU, on GPUs the shipped config's mixed precision where it sets one; or LUMENLM_MATRIX_PRECISION."""
    if os.environ.get("LUMENLM_MATRIX_PRECISION"):
        return os.environ["LUMENLM_MATRIX_PRECISION"]
    trainer = yaml.safe_load((REPO / "configs" / "trainer" / f"{name}.yaml").read_text())["trainer"]
    return "32-true" if ACCELERATOR == "cpu" else trainer.get("precision", "32-true")


def trainer(name: str, root: Path, **kwargs: Any) -> L.Trainer:
    args = dict(accelerator=ACCELERATOR, devices=DEVICES, strategy=strategy_from_config(name),
                precision=_precision(name), logger=False, enable_progress_bar=False, enable_model_summary=False,
                default_root_dir=str(root))
    return L.Trainer(**(args | kwargs))


def _text_data() -> Any:
    from datamodules.text import TextDataModule

    return TextDataModule(source="shakespeare", tokenizer="byt5", block_size=32, batch_size=2, val_fraction=0.05,
                          max_tokens=20000)


def run_causal_lm(name: str, root: Path) -> dict[str, Any]:
    """Fit 4 steps with checkpoints every 2 (ExCP where it is supported), resume from last.ckpt to 6."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from callbacks.excp import ExCP, is_excp_file, load_checkpoint
    from callbacks.excp.deepspeed_files import has_excp_files
    from lightning_modules.causal_lm import CausalLMModule

    def module() -> CausalLMModule:
        return CausalLMModule(model=None, model_config=tiny_llama_config(), learning_rate=1e-3, warmup_steps=1)

    out: dict[str, Any] = {}
    ckpt_dir = root / "ckpt"
    try:
        excp: list[Any] = [ExCP(print_summary=False, log_stats=False)]
        t = trainer(name, root, max_steps=4, limit_val_batches=1, val_check_interval=2,
                    callbacks=[*excp, ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1,
                                                      save_last=True)])
        t.fit(module(), datamodule=_text_data())
        out["excp"] = "compressed"
        out["delta_ratio"] = excp[0].summary()["delta_ratio_median"]  # rank 0 saves: its history
    except Exception as error:  # noqa: BLE001 - the refusal is the result of this cell
        out["excp"] = f"refused: {error}"
        if "ExCP" not in str(error):
            raise
        t = trainer(name, root, max_steps=4, limit_val_batches=1, val_check_interval=2,
                    callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1,
                                               save_last=True)])
        t.fit(module(), datamodule=_text_data())
    last = ckpt_dir / "last.ckpt"
    out["last_is_excp"] = is_excp_file(last) if last.is_file() else has_excp_files(last)  # DeepSpeed: a folder
    callbacks = [ExCP(print_summary=False, log_stats=False)] if out["excp"] == "compressed" else []
    if out["last_is_excp"] and last.is_file():
        out["restored_equals_decoded"] = _restored_equals_decoded(name, root, module(), last)
        groups = load_checkpoint(last)["optimizer_states"][0]["param_groups"]  # (weight decay, none)
        out["param_group_sizes"] = [len(g["params"]) for g in groups]
    resumed = trainer(name, root, max_steps=6, limit_val_batches=1, val_check_interval=2, callbacks=callbacks,
                      enable_checkpointing=False)
    resumed.fit(module(), datamodule=_text_data(), ckpt_path=str(last))
    out["resumed_global_step"] = resumed.global_step
    out["val_loss"] = float(resumed.callback_metrics["val/loss"])
    return out


def _restored_equals_decoded(name: str, root: Path, module: L.LightningModule, last: Path) -> bool:
    """Resume without training (max_steps already reached): the sharded weights must equal the decoded file."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from callbacks.excp import ExCP, load_checkpoint

    t = trainer(name, root, max_steps=4, limit_val_batches=0, callbacks=[ExCP(print_summary=False, log_stats=False)],
                enable_checkpointing=False)
    t.fit(module, datamodule=_text_data(), ckpt_path=str(last))
    # strategy.model: under FSDP1 the root FSDP unit wrapping the module holds the embeddings, norm and head.
    # No cpu_offload: FSDP1 on CPU would free the gathered storage its state dict points into (strategy_shims).
    restored = get_model_state_dict(t.strategy.model, options=StateDictOptions(full_state_dict=True))
    if t.global_rank != 0:
        return True
    decoded = load_checkpoint(last)["state_dict"]
    return restored.keys() == decoded.keys() and all(torch.equal(restored[k].cpu(), decoded[k]) for k in decoded)


def run_flextron(name: str, root: Path) -> dict[str, Any]:
    """A tiny Flextron fit (elastic then router stage); the router must be identical on every rank."""
    from common.run_outputs import gather_objects
    from lightning_modules.flextron.module import FlextronModule

    module = FlextronModule(model=None, model_config=tiny_llama_config(), budgets=[0.8, 1.0], budget_metric="params",
                            mlp_ratios=[0.5, 1.0], attn_ratios=[0.5, 1.0], elastic_steps=2, router_steps=2,
                            calibration_batches=1, warmup_steps=1)
    t = trainer(name, root, max_steps=4, limit_val_batches=1, val_check_interval=4, enable_checkpointing=False)
    t.fit(module, datamodule=_text_data())
    router = [float(p.detach().float().sum()) for p in module.router.parameters()]
    routers = gather_objects(t, router)
    return {"global_step": t.global_step, "routers_equal": all(r == routers[0] for r in routers),
            "val_loss_full": float(t.callback_metrics.get("val/loss", float("nan")))}


def run_icl_probe(name: str, root: Path) -> dict[str, Any]:
    from tests.strategy_probes import icl_data, icl_probe, icl_results

    t = trainer(name, root, enable_checkpointing=False)
    probe = icl_probe()
    t.test(probe, datamodule=icl_data())
    return {"results": icl_results(probe)}


def run_icl_qlora_probe(name: str, root: Path) -> dict[str, Any]:
    from tests.strategy_probes import icl_data, icl_qlora_probe, icl_results

    t = trainer(name, root, enable_checkpointing=False)
    probe = icl_qlora_probe()
    t.test(probe, datamodule=icl_data())
    return {"results": icl_results(probe)}


def run_honesty_probe(name: str, root: Path) -> dict[str, Any]:
    from tests.strategy_probes import honesty_data, honesty_probe, honesty_results

    t = trainer(name, root, enable_checkpointing=False)
    probe = honesty_probe()
    t.test(probe, datamodule=honesty_data())
    return {"results": honesty_results(probe)}


def run_excp_deepspeed(name: str, root: Path) -> dict[str, Any]:
    from tests.excp_deepspeed_checks import run_excp_deepspeed as run

    return run(name, root, trainer, _text_data)


def main() -> None:
    names, out = sys.argv[1].split(","), Path(sys.argv[2])
    components = sys.argv[3].split(",") if len(sys.argv) > 3 else GPU_COMPONENTS if ACCELERATOR == "gpu" else COMPONENTS
    torch.set_num_threads(1)
    for name in names:
        out_dir = out / name
        out_dir.mkdir(parents=True, exist_ok=True)
        extra = EXTRA_COMPONENTS.get(name, ()) if len(sys.argv) <= 3 else ()
        for component in (*components, *extra):
            L.seed_everything(0, verbose=False)
            start = time.perf_counter()
            try:
                result = {"ok": True, **globals()[f"run_{component}"](name, out_dir / component)}
            except Exception as error:  # noqa: BLE001 - recorded for the test to assert on
                result = {"ok": False, "error": f"{type(error).__name__}: {error}",
                          "traceback": traceback.format_exc()}
                # Now, before the barrier: a rank that fails alone leaves the others waiting in a collective,
                # and only its own output can say why.
                rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
                print(f"[rank {rank}] {name} x {component} failed:\n{result['traceback']}", file=sys.stderr, flush=True)
            result["seconds"] = round(time.perf_counter() - start, 2)
            if torch.distributed.is_initialized():
                torch.distributed.barrier()
            if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
                (out_dir / f"{component}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
    from common.process_group import release_process_group

    release_process_group()
