"""The honesty-vs-helpfulness probe as a LightningModule: ``python train.py test --config configs/probes/honesty.yaml``.

Each test batch is a list of trials from :class:`datamodules.honesty.HonestyDataModule`. For every
model and every method the module turns a trial into a probability over its options:

* ``loglik``: softmax of each option text's log-likelihood as the answer (local models);
* ``letter``: options listed as A, B, ...; softmax over the letters as the next token;
* ``generate``: free generation(s) parsed back to an option; replies that name no option are
  counted as unparseable and reported, not dropped.

Chain-of-thought trials first generate reasoning (greedy), then score the answer given it. At the
end of the epoch every rank's records are gathered, deduplicated, scored per condition (honesty,
helpfulness, fitted lambda with a bootstrap CI, human reference values) and written by rank zero.
"""

from __future__ import annotations

import json
import re
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from scipy.special import softmax
from typing_extensions import override

from common.atomic import atomic_write_json
from common.errors import UserFacingError
from common.hf_loading import MODEL_ALIASES, load_causal_lm, load_tokenizer, resolve_alias
from common.run_outputs import gather_objects, log_image, log_table, publish_file, run_directory
from datamodules.honesty_prompts import build_messages, option_labels, parse_answer
from datamodules.honesty_trials import Trial
from lightning_modules.probes.honesty.backends import Backend, HFBackend, OpenAIChatBackend
from lightning_modules.probes.honesty.plots import (
    plot_honesty_vs_helpfulness,
    plot_lambda_by_framing,
    plot_rounding_by_context,
)
from lightning_modules.probes.honesty.scoring import aggregate, dedupe, record_utilities
from lightning_modules.probes.honesty.speaker_model import helpfulness, honesty
from lightning_modules.probes.provenance import model_source_hash, provenance
from lightning_modules.sharding import configure_sharding

METHODS: tuple[str, ...] = ("loglik", "letter", "generate")
ANSWER_FORMAT = {"loglik": "text", "letter": "letter", "generate": "text"}
DEFAULT_MODELS: list[dict[str, Any]] = [
    {"label": "smollm2-135m-instruct", "model": "smollm2-135m-instruct", "chat": True}
]
_HF_KEYS = {"label", "kind", "model", "tokenizer", "model_config", "chat", "dtype", "quantization", "seed"}
_OPENAI_KEYS = {
    "label",
    "kind",
    "model",
    "base_url",
    "api_key",
    "api_key_env",
    "timeout_s",
    "max_retries",
    "backoff_s",
    "cache_dir",
    "top_logprobs",
}


REDACTED = "<redacted>"


def redact_api_keys(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the model entries with any ``api_key`` value replaced by ``REDACTED``."""
    return [{k: (REDACTED if k == "api_key" else v) for k, v in m.items()} for m in models]


class HonestyProbe(L.LightningModule):
    """Scores how models trade honesty against helpfulness, per model, method and condition.

    Args:
        models: one entry per model. Local HF models: ``{label, model | model_config, tokenizer,
            chat, dtype, quantization}`` (``chat: false`` renders plain text, for base models; a
            base-vs-chat pair is two entries). API models: ``{kind: openai, label, model, base_url,
            api_key_env, timeout_s, max_retries, cache_dir}``. Default: the shipped SmolLM2-135M-Instruct.
        methods: any of ``loglik``, ``letter``, ``generate``.
        cot_max_new_tokens: length of the reasoning generated for chain-of-thought trials.
        answer_max_new_tokens: length of a free-text answer (method ``generate``).
        n_samples: free generations per trial; >1 needs ``temperature > 0``.
        temperature: sampling temperature of free answers (0: greedy).
        fit_beta: fit the speaker rationality with lambda; otherwise hold it at ``beta``.
        beta: speaker rationality when not fitted.
        n_boot: bootstrap resamples (over items) for the confidence intervals (BCa intervals,
            ``scipy.stats.bootstrap``; see ``honesty.bootstrap``).
        confidence: CI level.
        seed: seeds sampling (per trial, so results do not depend on how ranks split the items).
        plots: write the PNG plots (and log them to W&B).
    """

    def __init__(
        self,
        models: list[dict[str, Any]] | None = None,
        methods: list[str] = ["loglik", "letter", "generate"],  # noqa: B006  (shown by --print_config)
        cot_max_new_tokens: int = 48,
        answer_max_new_tokens: int = 16,
        n_samples: int = 1,
        temperature: float = 0.0,
        fit_beta: bool = True,
        beta: float = 1.0,
        n_boot: int = 1000,
        confidence: float = 0.95,
        seed: int = 0,
        plots: bool = True,
    ) -> None:
        super().__init__()
        models = [dict(m) for m in (models or DEFAULT_MODELS)]
        bad = [m for m in methods if m not in METHODS]
        if bad or not methods:
            raise UserFacingError(f"unknown or empty methods {methods}: choose from {list(METHODS)}")
        if n_samples > 1 and temperature <= 0:
            raise UserFacingError("n_samples > 1 needs temperature > 0 (greedy samples would be identical)")
        labels = [m.get("label") or m.get("model") or "tiny" for m in models]
        if len(set(labels)) != len(labels):
            raise UserFacingError(f"model labels must be unique, got {labels}; set `label` on each entry")
        for m, label in zip(models, labels, strict=True):
            m["label"] = label
            kind = m.get("kind", "hf")
            allowed = _HF_KEYS if kind == "hf" else _OPENAI_KEYS if kind == "openai" else None
            if allowed is None:
                raise UserFacingError(f"model {label!r}: kind must be 'hf' or 'openai', got {kind!r}")
            if extra := set(m) - allowed:
                raise UserFacingError(
                    f"model {label!r}: unknown fields {sorted(extra)}; allowed: {sorted(allowed)}"
                )
            if kind == "openai" and "loglik" in methods:
                raise UserFacingError(
                    f"model {label!r} is an API model: chat completions cannot score option text; "
                    "drop method 'loglik' (use 'letter' and/or 'generate')"
                )
        self.model_specs = models
        # hparams end up in results.json, the checkpoint and the logger's config: the model entries are
        # saved with every API key replaced by a marker, never as given.
        self.save_hyperparameters(ignore=["models"])
        self.save_hyperparameters({**self.hparams, "models": redact_api_keys(models)})
        self.lms = torch.nn.ModuleDict()
        self.backends: dict[str, Backend] = {}
        self._records: list[dict[str, Any]] = []
        self.results: dict[str, Any] | None = None

    # ---- models ----------------------------------------------------------------------------------

    @override
    def configure_model(self) -> None:
        """Load the local models here, not in ``__init__``: parsing a config must not load weights."""
        if self.backends:
            return
        for spec in self.model_specs:
            label = spec["label"]
            if spec.get("kind", "hf") == "openai":
                self.backends[label] = OpenAIChatBackend(**{k: v for k, v in spec.items() if k != "kind"})
                continue
            lm = load_causal_lm(
                spec.get("model"),
                model_config=spec.get("model_config"),
                dtype=spec.get("dtype", "float32"),
                quantization=spec.get("quantization"),
                seed=spec.get("seed", 0),
            ).eval()
            tok_name = spec.get("tokenizer") or spec.get("model") or "byt5"
            key = re.sub(r"\W", "_", label)
            self.lms[key] = lm
            self.backends[label] = HFBackend(
                lm, load_tokenizer(tok_name), label, bool(spec.get("chat", True))
            )
        # never sharded: each rank generates for its own trials, and sharded forwards would need lockstep
        configure_sharding(self, replicate=list(self.lms.values()), per_rank_work=True)

    # ---- scoring ---------------------------------------------------------------------------------

    def _score(self, backend: Backend, trial: Trial, method: str, reasoning: str | None) -> dict[str, Any]:
        fmt = ANSWER_FORMAT[method]
        messages = build_messages(trial, fmt)
        rec: dict[str, Any] = {
            "prompt": backend.prompt(messages, reasoning) if isinstance(backend, HFBackend) else messages,
            "reasoning": reasoning,
        }
        if method == "loglik":
            logps = backend.option_logprobs(messages, trial.options, reasoning)
            rec |= {"logprobs": logps.tolist(), "probs": softmax(logps).tolist()}
        elif method == "letter":
            logps = backend.letter_logprobs(messages, option_labels(len(trial.options)), reasoning)
            finite = np.isfinite(logps)
            rec |= {"logprobs": [float(x) if np.isfinite(x) else None for x in logps], "probs": None}
            if finite.any():
                rec["probs"] = np.where(finite, softmax(np.where(finite, logps, -np.inf)), 0.0).tolist()
        else:
            texts = backend.generate(
                messages,
                reasoning=reasoning,
                max_new_tokens=self.hparams.answer_max_new_tokens,
                n=self.hparams.n_samples,
                temperature=self.hparams.temperature,
                seed=self._trial_seed(trial),
            )
            parsed = [parse_answer(trial, t, fmt) for t in texts]
            counts = np.bincount([p for p in parsed if p is not None], minlength=len(trial.options))
            rec |= {
                "generations": texts,
                "parsed": parsed,
                "n_unparsed_samples": sum(p is None for p in parsed),
                "probs": (counts / counts.sum()).tolist() if counts.sum() else None,
            }
        return rec

    def _trial_seed(self, trial: Trial) -> int:
        return (int(trial.trial_id[:8], 16) + self.hparams.seed) % 2**31

    def _reason(self, backend: Backend, trial: Trial, fmt: str) -> str:
        return backend.generate(
            build_messages(trial, fmt),
            for_reasoning=True,
            max_new_tokens=self.hparams.cot_max_new_tokens,
            seed=self._trial_seed(trial),
        )[0]

    @override
    def on_test_start(self) -> None:
        trials = getattr(self.trainer.datamodule, "trials", None) or []
        if "letter" in self.hparams.methods and any(len(t.options) > 26 for t in trials):
            raise UserFacingError(
                "method 'letter' needs at most 26 options per trial: set data n_options <= 26 "
                "or drop 'letter' from methods"
            )

    @override
    def on_test_epoch_start(self) -> None:
        self._records = []

    @override
    def test_step(self, batch: list[Trial], batch_idx: int) -> None:
        for trial in batch:
            for label, backend in self.backends.items():
                reasoning: dict[str, str] = {}
                for method in self.hparams.methods:
                    fmt = ANSWER_FORMAT[method]
                    if trial.cot and fmt not in reasoning:
                        reasoning[fmt] = self._reason(backend, trial, fmt)
                    scored = self._score(backend, trial, method, reasoning.get(fmt))
                    self._records.append(self._record(trial, label, method, scored))

    @staticmethod
    def _record(trial: Trial, model: str, method: str, scored: dict[str, Any]) -> dict[str, Any]:
        rec = trial.to_dict() | {"model": model, "method": method} | scored
        if rec["probs"] is not None:
            util = record_utilities(rec)
            rec["honesty"] = honesty(rec["probs"], util)
            h = helpfulness(rec["probs"], util)
            rec["helpfulness"] = None if np.isnan(h) else h
            rec["chosen"] = trial.options[int(np.argmax(rec["probs"]))]
        else:
            rec |= {"honesty": None, "helpfulness": None, "chosen": None}
        return rec

    # ---- results ---------------------------------------------------------------------------------

    @override
    def on_test_epoch_end(self) -> None:
        gathered = gather_objects(self.trainer, self._records)
        records = dedupe(r for part in gathered for r in part)
        h = self.hparams
        rows = aggregate(
            records, n_boot=h.n_boot, confidence=h.confidence, fit_beta=h.fit_beta, beta=h.beta, seed=h.seed
        )
        self.results = {"aggregates": rows, "records": records}
        metrics = {}
        for row in rows:
            for name in ("honesty", "helpfulness", "lambda_hat", "unparseable_share"):
                if row.get(name) is not None:
                    metrics[f"honesty_probe/{row['group']}/{name}"] = float(row[name])
        if metrics:
            self.log_dict(metrics, sync_dist=True)
        if self.trainer.is_global_zero:
            self._write(rows, records)

    def _write(self, rows: list[dict[str, Any]], records: list[dict[str, Any]]) -> None:
        out = run_directory(self.trainer) / "honesty"
        data = getattr(self.trainer, "datamodule", None)
        models = []
        for spec in self.hparams.models:
            local = spec.get("kind", "hf") == "hf"
            source = spec.get("model") if local else None  # an API model has no local weights to hash
            if source in MODEL_ALIASES:
                source = resolve_alias(source)
            models.append({"label": spec["label"], "model": spec.get("model"), **model_source_hash(source)})
        payload = {
            "hparams": dict(self.hparams),
            "provenance": provenance(
                models=models,
                data=dict(data.hparams) if data is not None else None,
                seeds={"seed": self.hparams.seed, "stimuli": getattr(data.hparams, "seed", None) if data else None},
            ),
            "n_records": len(records),
            "note": "Small models mostly show surface priors over the options; read these as what this "
            "model does on these stimuli, not as a replication of the paper's findings.",
            "aggregates": rows,
            "records": records,
        }
        atomic_write_json(out / "results.json", payload)
        publish_file(self.trainer, out / "results.json")
        columns = [
            "group",
            "n_items",
            "unparseable_share",
            "honesty",
            "helpfulness",
            "lambda_hat",
            "lambda_lo",
            "lambda_hi",
            "beta_hat",
            "human_lambda_free_choice",
            "human_lambda_endorsement",
        ]
        table = []
        for r in rows:
            ci = r.get("lambda_ci") or [None, None]
            human = r.get("human_lambda") or {}
            table.append(
                [
                    r["group"],
                    r["n_items"],
                    r["unparseable_share"],
                    r.get("honesty"),
                    r.get("helpfulness"),
                    r.get("lambda_hat"),
                    ci[0],
                    ci[1],
                    r.get("beta_hat"),
                    human.get("free_choice"),
                    human.get("endorsement"),
                ]
            )
        log_table(self.trainer, "honesty_probe/aggregates", columns, table)
        rec_cols = [
            "trial_id",
            "model",
            "method",
            "condition",
            "prompt",
            "reasoning",
            "options",
            "probs",
            "chosen",
            "generations",
            "honesty",
            "helpfulness",
        ]
        log_table(
            self.trainer,
            "honesty_probe/records",
            rec_cols,
            [
                [
                    r.get(c)
                    if c not in ("prompt", "options", "probs", "generations")
                    else json.dumps(r.get(c))
                    for c in rec_cols
                ]
                for r in records
            ],
        )
        if self.hparams.plots:
            for key, fn in (
                ("lambda_by_framing", plot_lambda_by_framing),
                ("honesty_vs_helpfulness", plot_honesty_vs_helpfulness),
                ("rounding_by_context", plot_rounding_by_context),
            ):
                log_image(self.trainer, f"honesty_probe/{key}", fn(rows, out / f"{key}.png"))
        rank_zero_info(
            f"honesty probe: {len(records)} records, {len(rows)} conditions -> {out / 'results.json'}"
        )
        for r in rows:
            ci = r.get("lambda_ci")
            lam = (
                "n/a"
                if r.get("lambda_hat") is None
                else f"{r['lambda_hat']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
            )
            hon = "n/a" if r.get("honesty") is None else f"{r['honesty']:.2f}"
            hlp = "n/a" if r.get("helpfulness") is None else f"{r['helpfulness']:.2f}"
            rank_zero_info(
                f"  {r['group']:<60} honesty {hon}  helpfulness {hlp}  lambda {lam}"
                f"  unparseable {r['unparseable_share']:.0%}"
            )
