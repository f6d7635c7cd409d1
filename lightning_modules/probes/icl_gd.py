"""The ICL-vs-GD probe as a LightningModule: ``python train.py test --config configs/probes/icl_gd.yaml``.

Does in-context learning on N demonstrations behave like gradient descent on the same N
demonstrations? For every work unit the datamodule hands out (task x N x seed x model variant, plus
one order-permutation unit per task), the probe scores zero-shot, ICL and GD (a fine-tuned copy of
the model) by the log-likelihood of every label word and computes the comparison metrics. Units are
split across DDP ranks by Lightning's distributed sampler; at the end every rank's results are
gathered, deduplicated and rank zero writes ``icl_gd_results.json`` (aggregates + per-example records)
and plots into the run directory, and logs tables and images to W&B when the run logs there.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from common.atomic import atomic_write_json
from common.errors import UserFacingError
from common.hf_loading import MODEL_ALIASES, load_causal_lm, load_tokenizer, resolve_alias
from common.run_outputs import gather_objects, log_image, log_table, publish_file, run_directory
from datamodules.icl_tasks import GDSelectionData, WorkUnit
from lightning_modules.probes import icl_paper_report, icl_report
from lightning_modules.probes.icl_finetune import DAI_LEARNING_RATES, GDConfig
from lightning_modules.probes.icl_gd_selection import MAX_ACCURACY_LOSS_SE, MIN_MOVE_N, select_gd
from lightning_modules.probes.icl_lora import DEFAULT_TARGET_MODULES, LoraSettings, prepare_quantized_base
from lightning_modules.probes.icl_runner import (
    ScoringOptions,
    json_safe,
    predictions_after_gd,
    predictions_of,
    run_unit,
)
from lightning_modules.probes.provenance import git_revision, model_source_hash, provenance
from lightning_modules.sharding import configure_sharding

RESULTS_FILE = "icl_gd_results.json"


class ICLvsGDProbe(L.LightningModule):
    """Zero-shot vs ICL vs GD on the same demonstrations, for any Hugging Face causal LM.

    Args:
        model: Alias, Hub id, local dir or .gguf path (see ``load_causal_lm``); None with ``model_config``.
        model_config: A config dict (``model_type`` + fields) for a randomly initialised model (tests).
        tokenizer: Defaults to ``model``; ``"byt5"`` for tiny config models.
        dtype: Weights dtype ("float32", "bfloat16", "float64").
        quantization: None, "8bit" or "4bit" (bitsandbytes, CPU or CUDA): needs ``gd_method: lora``, since
            GD cannot step quantized weights; a 4-bit base with LoRA GD is the QLoRA recipe.
        gd_method: "full" (GD updates the weights of a copy of the model) or "lora" (GD trains fresh LoRA
            adapters on the frozen, shared base in every run; see ``icl_lora``). Results name the variant.
        lora_r: Adapter rank (``gd_method: lora``).
        lora_alpha: Adapter scale numerator (updates are scaled by ``lora_alpha / lora_r``).
        lora_dropout: Dropout on the adapters' input during GD steps (0: deterministic GD).
        lora_target_modules: peft ``target_modules``: "all-linear" (every linear layer but the head: on
            Llama q/k/v/o and gate/up/down projections), module-name suffixes, or a regex.
        gd_mode: "full_batch" or "sgd" (batch 1, demos in the given order).
        gd_params: "all" or "kv" (attention key/value projections only).
        gd_lr: SGD learning rate when no grid is given (``gd_lr_grid: null``).
        gd_epochs: Passes over the demonstrations when no grid is given.
        gd_lr_grid: Learning rates among which GD's step size is chosen per model variant and task on
            the datamodule's held-out dev set (see ``icl_gd_selection`` for the rule); None: use ``gd_lr``.
        gd_epochs_grid: Epoch counts searched with ``gd_lr_grid``; None: ``[gd_epochs]``.
        gd_max_accuracy_loss_se: The selection's accuracy floor: a step size whose dev accuracy is more
            than this many standard errors below zero-shot's is chosen only when no other one moves the
            model, and is then flagged ``below_zero_shot``; None: no floor (``icl_gd_selection``).
        gd_select_per_unit: Choose the step size of every unit with N >= 4 on the dev set after GD on
            that unit's own demonstrations (True), or once per task on the selection draws (False). How
            far a few steps move the model depends on which N examples it saw about as much as on the
            step size: on SmolLM2 at lr 3e-3 SST-2's 4-example selection draws changed 27% of dev
            predictions while the test unit's own 4 examples collapsed it onto one label (MR, 8
            examples: draws 34%, unit collapsed). Tuning a fine-tuning run's step size for its own
            training data on held-out data is ordinary practice and never looks at the test set.
        gd_preset: None or "dai" (SGD, K/V only, 1 epoch, Dai et al.'s per-task learning rates; a task
            the preset does not cover gets the chosen or given step size).
        batch_size: Scoring batch size.
        reuse_prefix: Reuse the demonstrations' KV cache across queries (exact; faster).
        full_vocab: Also compare the full-vocabulary next-token distributions.
        analysis_examples: Test examples per unit for SimAOU/SimAM attention captures (0: off).
        random_init_seed: Seed of the random-init control model (same architecture as ``model``).
        von_oswald: Run the synthetic linear-self-attention-vs-GD control (rank zero, ~10-60 s CPU).
        von_oswald_steps: Training steps per LSA variant in that control.
        seed: Seed for the random baselines inside the metrics.
        num_threads: torch CPU threads per process (None: torch's default). On CPUs shared with other
            jobs, 1 thread can be several times faster than 2 fighting for the cores.
    """

    def __init__(
        self,
        model: str | None = "smollm2-135m-instruct",
        model_config: dict | None = None,
        tokenizer: str | None = None,
        dtype: str = "float32",
        quantization: str | None = None,
        gd_method: str = "full",
        lora_r: int = 16,
        lora_alpha: float = 32,
        lora_dropout: float = 0.0,
        lora_target_modules: str | list[str] = DEFAULT_TARGET_MODULES,
        gd_mode: str = "full_batch",
        gd_params: str = "all",
        gd_lr: float = 1e-3,
        gd_epochs: int = 2,
        gd_lr_grid: Sequence[float] | None = (3e-4, 1e-3, 2e-3, 3e-3),
        gd_epochs_grid: Sequence[int] | None = None,
        gd_max_accuracy_loss_se: float | None = MAX_ACCURACY_LOSS_SE,
        gd_select_per_unit: bool = True,
        gd_preset: str | None = None,
        batch_size: int = 16,
        reuse_prefix: bool = True,
        full_vocab: bool = True,
        analysis_examples: int = 4,
        random_init_seed: int = 1234,
        von_oswald: bool = True,
        von_oswald_steps: int = 600,
        seed: int = 0,
        num_threads: int | None = None,
    ) -> None:
        super().__init__()
        if gd_method not in ("full", "lora"):
            raise UserFacingError(f"gd_method must be 'full' or 'lora', got {gd_method!r}")
        if quantization is not None and gd_method == "full":
            # bitsandbytes' 8/4-bit weights are integer tensors SGD cannot step. Refuse before any model
            # is loaded or any example scored, not after the scoring has run.
            raise UserFacingError(
                f"full GD cannot update a {quantization} quantized model's weights: use gd_method: lora "
                "(LoRA adapters on the quantized base, the QLoRA recipe), or quantization: null"
            )
        self.save_hyperparameters()
        lora = None
        if gd_method == "lora":
            targets = lora_target_modules if isinstance(lora_target_modules, str) else tuple(lora_target_modules)
            lora = LoraSettings(lora_r, lora_alpha, lora_dropout, targets, init_seed=seed)
        self.gd = GDConfig(gd_mode, gd_params, gd_lr, gd_epochs, gd_preset, lora=lora)
        self.opts = ScoringOptions(batch_size, reuse_prefix, full_vocab, analysis_examples, seed=seed)
        self.lm: torch.nn.Module | None = None
        self.tokenizer = None
        self._random_lm: torch.nn.Module | None = None
        self._selections: dict[tuple[str, str], dict] = {}
        self._results: list[dict] = []
        self.results: dict[str, Any] | None = None
        self._summary: str | None = None

    @override
    def setup(self, stage: str) -> None:
        if self.lm is not None:
            return
        hp = self.hparams
        self._git_at_start = git_revision()  # the code that ran, even if the checkout moves on meanwhile
        if hp.num_threads:
            torch.set_num_threads(hp.num_threads)
        self.lm = load_causal_lm(
            hp.model, model_config=hp.model_config, dtype=hp.dtype, quantization=hp.quantization, seed=hp.seed
        ).eval()
        if hp.quantization is not None:
            self.lm = prepare_quantized_base(self.lm)  # before any scoring: every arm sees this base
        self.lm.requires_grad_(False)
        self.tokenizer = load_tokenizer(hp.tokenizer or hp.model or "byt5")

    @override
    def configure_model(self) -> None:
        """Never sharded: each rank scores its own work units, so a sharded model would need lockstep forwards."""
        configure_sharding(self, replicate=[self.lm], per_rank_work=True)

    def _model_for(self, variant: str) -> torch.nn.Module:
        if variant == "pretrained":
            return self.lm
        if variant != "random_init":
            raise ValueError(f"unknown model variant {variant!r}")
        if self._random_lm is None:
            # Same architecture and dtype, fresh weights: the Deutch et al. baseline for every similarity.
            from transformers import AutoModelForCausalLM

            # Built outside the test loop's inference mode: LoRA GD backpropagates through these shared
            # weights, and autograd refuses inference tensors.
            with torch.random.fork_rng(), torch.inference_mode(False):
                torch.manual_seed(self.hparams.random_init_seed)
                self._random_lm = (
                    AutoModelForCausalLM.from_config(self.lm.config)  # unquantized, even for a quantized base
                    .to(dtype=getattr(torch, self.hparams.dtype), device=next(self.lm.parameters()).device)
                    .eval()
                )
            self._random_lm.requires_grad_(False)
        return self._random_lm

    @override
    def transfer_batch_to_device(
        self, batch: WorkUnit, device: torch.device, dataloader_idx: int
    ) -> WorkUnit:
        # A work unit is metadata (texts, indices); tensors are built on the model's device when scored.
        return batch

    @override
    def on_test_epoch_start(self) -> None:
        self._results = []
        self.opts.zero_shot_cache.clear()

    def _gd_for(self, unit: WorkUnit) -> tuple[GDConfig, dict | None]:
        """The GD configuration of ``unit``, chosen on its task's dev set once per process.

        With ``gd_select_per_unit`` a unit with N >= ``MIN_MOVE_N`` is tuned on its own demonstrations
        (key: task, N, seed; the random-init control and the order unit of the same demonstrations reuse
        it); other units use the task's choice on the selection draws. Every rank that meets a key runs
        the same deterministic selection, so DDP ranks agree without communicating.
        """
        hp, task = self.hparams, unit.task
        if (self.gd.preset == "dai" and task.name in DAI_LEARNING_RATES) or not hp.gd_lr_grid:
            return self.gd.resolved(task.name), None
        if unit.selection is None:
            raise UserFacingError(
                "gd_lr_grid needs held-out dev examples: set the datamodule's n_dev > 0 (or gd_lr_grid: null)"
            )
        # the random-init control reuses the pretrained model's choice (icl_gd_selection)
        data, key, label = unit.selection, (task.name,), task.name
        if hp.gd_select_per_unit and unit.n_demos >= MIN_MOVE_N:
            data = GDSelectionData(unit.selection.dev, {unit.n_demos: [unit.demos]})
            key, label = (task.name, unit.n_demos, unit.seed), f"{task.name}/n{unit.n_demos}/s{unit.seed}"
        model = self.lm
        if key not in self._selections:
            start = time.perf_counter()
            tok, opts = self.tokenizer, self.opts
            base = replace(self.gd, preset=None)
            record = select_gd(
                base.resolved(task.name) if self.gd.preset is None else replace(base, mode="sgd", params="kv"),
                list(hp.gd_lr_grid),
                list(hp.gd_epochs_grid or [hp.gd_epochs]),
                data,
                lambda dev: predictions_of(model, tok, task, [], dev, opts),
                lambda cfg, demos, dev: predictions_after_gd(model, tok, task, cfg, demos, dev, opts),
                n_test=len(unit.test),
                max_accuracy_loss_se=hp.gd_max_accuracy_loss_se,
            )
            record["seconds"] = time.perf_counter() - start
            record["per_unit"] = len(key) > 1
            self._selections[key] = record
            chosen = record["selected"]
            grid = "; ".join(
                f"lr {c['lr']:g} x{c['epochs']}: dev acc {c['mean_dev_accuracy']:.2f}, "
                f"changed >= {c['min_dev_changed']:.2f}"
                f"{', collapsed' if any(c['dev_collapsed'][str(n)] for n in c['counted_n']) else ''}"
                f"{', below zero-shot' if c['harmful'] else ''}"
                for c in record["grid"]
            )
            rank_zero_info(
                f"[icl_gd] {label}: GD lr {chosen['lr']:g}, {chosen['epochs']} epoch(s) chosen on "
                f"{record['n_dev']} dev examples x {record['n_selection_sets']} demo set(s) per N, needing "
                f">= {record['required_dev_changed']:.2f} changed"
                f"{' (fallback: ' + str(record['met'] or 'nothing moved') + ')' if record['fallback'] else ''}"
                f"{' (below zero-shot dev accuracy)' if record['below_zero_shot'] else ''} [{grid}]"
            )
        record = self._selections[key]
        return record["config"], {k: v for k, v in record.items() if k != "config"}

    @override
    def test_step(self, batch: WorkUnit, batch_idx: int) -> None:
        start = time.perf_counter()
        model = self._model_for(batch.model_variant)
        gd, selection = self._gd_for(batch)
        result = run_unit(model, self.tokenizer, batch, gd, self.opts)
        result["gd_selection"] = selection
        result["seconds"] = time.perf_counter() - start
        result["rank"] = self.global_rank
        self._results.append(json_safe(result))
        rank_zero_info(f"[icl_gd] {batch.uid}: {result['seconds']:.1f}s")

    @override
    def on_test_epoch_end(self) -> None:
        units = icl_report.merge_units(gather_objects(self.trainer, self._results))
        agg = icl_report.aggregate(units)
        for variant, tasks in agg["sweep"].items():
            for task, by_n in tasks.items():
                for n, row in by_n.items():
                    for key in (
                        "acc_zero_shot",
                        "acc_icl",
                        "acc_gd",
                        "token_overlap",
                        "icl_vs_gd_label_cosine",
                    ):
                        if row[key] is not None:
                            # Every rank holds the same gathered values, so no further sync is needed.
                            self.log(f"icl_gd/{variant}/{task}/n{n}/{key}", float(row[key]), sync_dist=False)
        control = None
        if self.hparams.von_oswald and self.trainer.is_global_zero:
            from lightning_modules.probes.icl_von_oswald import run_control

            control = run_control(train_steps=self.hparams.von_oswald_steps, seed=self.hparams.seed)
        self.results = {
            "gd_variant": agg["gd_variant"],
            "config": dict(self.hparams),
            "provenance": self._provenance(),
            "aggregate": agg,
            "von_oswald_control": control,
            "units": units,
        }
        if self.trainer.is_global_zero:
            self._write(self.results)

    def _write(self, results: dict) -> None:
        out = run_directory(self.trainer)
        atomic_write_json(out / RESULTS_FILE, json_safe(results))
        publish_file(self.trainer, out / RESULTS_FILE)
        rows = []
        for u in results["units"]:
            if u["kind"] != "sweep":
                continue
            for r in u["records"]:
                rows.append(
                    [
                        u["uid"],
                        u["model_variant"],
                        u["task"],
                        u["n_demos"],
                        u["seed"],
                        r["index"],
                        r["label"],
                        r["pred"]["zero_shot"],
                        r["pred"]["icl"],
                        r["pred"]["gd"],
                        r["prompt"],
                    ]
                )
        log_table(
            self.trainer,
            "icl_gd/records",
            [
                "uid",
                "variant",
                "task",
                "n_demos",
                "seed",
                "index",
                "label",
                "pred_zero_shot",
                "pred_icl",
                "pred_gd",
                "prompt",
            ],
            rows,
        )
        agg_rows = [
            [v, t, int(n), *(row[k] for k in icl_report.SCALARS)]
            for v, tasks in results["aggregate"]["sweep"].items()
            for t, by_n in tasks.items()
            for n, row in by_n.items()
        ]
        log_table(
            self.trainer, "icl_gd/aggregate", ["variant", "task", "n_demos", *icl_report.SCALARS], agg_rows
        )
        for key, fn in (
            ("icl_gd/metrics_vs_n", icl_report.plot_sweep),
            ("icl_gd/order", icl_report.plot_order),
        ):
            png = fn(results["aggregate"], out / f"{key.replace('/', '_')}.png")
            if png is not None:
                log_image(self.trainer, key, png)
        rows = icl_paper_report.summary_rows(results["aggregate"])
        gd = icl_paper_report.gd_label(results["aggregate"])
        png = icl_paper_report.plot_summary(rows, out / icl_paper_report.REPORT_PNG, gd)
        if png is not None:
            log_image(self.trainer, "icl_gd/summary", png)
        rank_zero_info(f"[icl_gd] results written to {out / RESULTS_FILE}")
        self._summary = f"\n{icl_paper_report.format_table(rows, gd)}\nsummary figure: {png}"

    @override
    def teardown(self, stage: str) -> None:
        # The paper-facing summary ends the run's output, after Lightning's metrics table
        # (ICL~GD, GD~ZS: share of test examples with the same top-1 label).
        if self._summary:
            print(self._summary, flush=True)
            self._summary = None

    def _provenance(self) -> dict:
        """Versions, git revision, date, the model's source and hash, the data settings and the seeds."""
        hp = self.hparams
        source = hp.model
        if source in MODEL_ALIASES:
            source = resolve_alias(source)
        data = getattr(self.trainer, "datamodule", None)
        return provenance(
            model=model_source_hash(source) | {"name": hp.model, "config": hp.model_config},
            data=dict(data.hparams) if data is not None else None,
            seeds={"seed": hp.seed, "random_init_seed": hp.random_init_seed},
            git=getattr(self, "_git_at_start", None) or git_revision(),
        )

    @override
    def configure_optimizers(self):
        return None
