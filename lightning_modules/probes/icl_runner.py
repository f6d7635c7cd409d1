"""Run one probe work unit: zero-shot, ICL and GD on a demonstration set, and the metrics (no Lightning).

``run_unit`` takes a model, its tokenizer and a ``WorkUnit`` and returns a plain, picklable dict
(aggregate metrics plus per-example records) that DDP ranks can gather and rank zero can write.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from datamodules.icl_tasks import Example, ICLTask, WorkUnit
from lightning_modules.probes import icl_metrics as M
from lightning_modules.probes.icl_finetune import GDConfig, encode_demos, finetune_copy
from lightning_modules.probes.icl_internals import capture
from lightning_modules.probes.icl_lora import base_quantization, gd_variant
from lightning_modules.probes.icl_scoring import (
    ScoreResult,
    encode_requests,
    leading_special_tokens,
    score_requests,
)


@dataclass
class ScoringOptions:
    """How prompts are scored.

    Args:
        batch_size: Rows per forward pass.
        reuse_prefix: Reuse the demonstrations' KV cache across queries.
        full_vocab: Also compare full-vocabulary next-token distributions (memory: n_test x vocab floats).
        analysis_examples: Test examples per unit whose attention is captured for SimAOU/SimAM (0: off).
        add_special_tokens: Let the tokenizer add its BOS (as lm-eval's default does).
    """

    batch_size: int = 16
    reuse_prefix: bool = True
    full_vocab: bool = True
    analysis_examples: int = 4
    add_special_tokens: bool = True
    seed: int = 0
    zero_shot_cache: dict = field(default_factory=dict)


def _score(model, tok, task: ICLTask, demos: list[Example], test: list[Example], opts: ScoringOptions):
    contexts = [task.context(demos, q) for q in test]
    reqs = encode_requests(tok, contexts, task.choices(), opts.add_special_tokens)
    pad = getattr(tok, "pad_token_id", None) or 0
    return score_requests(
        model, reqs, opts.batch_size, opts.reuse_prefix, full_vocab=opts.full_vocab, pad_token_id=pad
    ), reqs


def _sim(a: ScoreResult, b: ScoreResult) -> dict[str, float]:
    out = {f"label_{k}": v for k, v in M.distribution_similarity(a.loglik, b.loglik).items()}
    if a.next_token_logprobs is not None and b.next_token_logprobs is not None:
        out |= {
            f"vocab_{k}": v
            for k, v in M.distribution_similarity(a.next_token_logprobs, b.next_token_logprobs).items()
        }
    return out


def _gd_model(model, tok, task: ICLTask, demos: list[Example], cfg: GDConfig, opts: ScoringOptions):
    pairs = [(task.render_input(d), task.choice(d.label)) for d in demos]
    pad = getattr(tok, "pad_token_id", None) or 0
    return finetune_copy(
        model, encode_demos(tok, pairs, opts.add_special_tokens), cfg.resolved(task.name), pad
    )


def zero_shot(model, tok, unit: WorkUnit, opts: ScoringOptions) -> ScoreResult:
    """Zero-shot scores of the unit's test set, computed once per (task, model variant) per process."""
    key = (unit.task, unit.model_variant, tuple(e.index for e in unit.test))
    if key not in opts.zero_shot_cache:
        opts.zero_shot_cache[key] = _score(model, tok, unit.task, [], unit.test, opts)[0]
    return opts.zero_shot_cache[key]


def run_sweep_unit(model, tok, unit: WorkUnit, gd: GDConfig, opts: ScoringOptions) -> dict:
    """Zero-shot vs ICL vs GD on one demonstration set; metrics and per-example records."""
    task, labels = unit.task, torch.tensor([e.label for e in unit.test])
    zs = zero_shot(model, tok, unit, opts)
    icl, icl_reqs = _score(model, tok, task, unit.demos, unit.test, opts)
    tuned, losses = _gd_model(model, tok, task, unit.demos, gd, opts)
    ft, zs_reqs = _score(tuned, tok, task, [], unit.test, opts)
    preds = {name: M.predictions(r.loglik) for name, r in (("zero_shot", zs), ("icl", icl), ("gd", ft))}
    correct = {k: p == labels for k, p in preds.items()}
    metrics: dict[str, float | list | dict] = {
        f"acc_{k}": M.accuracy(p, labels, task.num_classes) for k, p in preds.items()
    }
    metrics["token_overlap"] = M.token_overlap(preds["icl"], preds["gd"])
    metrics["gd_vs_zero_shot_agreement"] = M.token_overlap(preds["gd"], preds["zero_shot"])
    metrics["icl_vs_zero_shot_agreement"] = M.token_overlap(preds["icl"], preds["zero_shot"])
    metrics["gd_distinct_predictions"] = int(preds["gd"].unique().numel())
    metrics["gd_flags"] = gd_flags(preds["zero_shot"], preds["gd"], task.num_classes)
    metrics["icl_vs_gd"] = _sim(icl, ft)
    metrics["icl_shift_from_zero_shot"] = _sim(icl, zs)
    metrics["gd_shift_from_zero_shot"] = _sim(ft, zs)
    metrics["rec2ftp"] = M.rec2ftp(correct["zero_shot"], correct["icl"], correct["gd"])
    metrics["gd_losses"] = losses
    k = min(opts.analysis_examples, len(unit.test))
    if k:
        caps = {"zs": [], "icl": [], "ft": []}
        for i in range(k):
            q_len = len(zs_reqs[i].context) - (1 if _has_bos(tok, opts) else 0)
            caps["zs"].append(capture(model, zs_reqs[i].context, q_len))
            caps["icl"].append(capture(model, icl_reqs[i].context, q_len))
            caps["ft"].append(capture(tuned, zs_reqs[i].context, q_len))
        g = torch.Generator().manual_seed(opts.seed)
        metrics["sim_aou"] = M.sim_aou(
            *(torch.stack([c[0] for c in caps[m]]) for m in ("zs", "icl", "ft")), generator=g
        )
        metrics["sim_am"] = M.sim_am(*([c[1] for c in caps[m]] for m in ("icl", "ft", "zs")))
    del tuned
    records = [
        {
            "index": e.index,
            "label": e.label,
            "prompt": task.render_input(e),
            "loglik": {
                "zero_shot": zs.loglik[i].tolist(),
                "icl": icl.loglik[i].tolist(),
                "gd": ft.loglik[i].tolist(),
            },
            "pred": {m: int(p[i]) for m, p in preds.items()},
        }
        for i, e in enumerate(unit.test)
    ]
    return {"metrics": metrics, "records": records}


def run_order_unit(model, tok, unit: WorkUnit, gd: GDConfig, opts: ScoringOptions) -> dict:
    """ICL, full-batch GD and SGD-in-order for every order of one demonstration set."""
    task, labels = unit.task, torch.tensor([e.label for e in unit.test])
    cfg = gd.resolved(task.name)
    methods: dict[str, Callable[[list[Example]], torch.Tensor]] = {
        "icl": lambda demos: _score(model, tok, task, demos, unit.test, opts)[0].loglik,
        "gd_full_batch": lambda demos: (
            _score(
                _gd_model(model, tok, task, demos, cfg.with_mode("full_batch"), opts)[0],
                tok,
                task,
                [],
                unit.test,
                opts,
            )[0].loglik
        ),
        "gd_sgd_in_order": lambda demos: (
            _score(
                _gd_model(model, tok, task, demos, cfg.with_mode("sgd"), opts)[0],
                tok,
                task,
                [],
                unit.test,
                opts,
            )[0].loglik
        ),
    }
    metrics, per_order, logliks = {}, {}, {}
    for name, fn in methods.items():
        scores = torch.stack([fn([unit.demos[i] for i in order]) for order in unit.orders])
        preds = scores.argmax(-1)
        metrics[name] = M.order_sensitivity(preds, labels, task.num_classes)
        metrics[name]["max_loglik_spread"] = M.max_logprob_spread(scores)
        per_order[name] = preds.tolist()
        logliks[name] = scores.tolist()
    return {
        "metrics": metrics,
        "records": [
            {"orders": unit.orders, "preds": per_order, "loglik": logliks, "labels": labels.tolist()}
        ],
    }


def gd_flags(zero_shot: torch.Tensor, gd: torch.Tensor, num_classes: int) -> list[str]:
    """Why a unit's GD side may not measure GD learning the task.

    ``unchanged``: GD left >= 90% of the zero-shot predictions as they were (ICL-vs-GD is then mostly
    ICL-vs-zero-shot); ``collapsed``: GD predicts one label for every test example of a task with more.
    """
    flags = []
    if len(gd) and M.token_overlap(gd, zero_shot) >= 0.9:
        flags.append("unchanged")
    if len(gd) > 1 and num_classes > 1 and gd.unique().numel() == 1:
        flags.append("collapsed")
    return flags


def predictions_of(model, tok, task: ICLTask, demos: list[Example], test: list[Example], opts) -> torch.Tensor:
    """Top-1 label of every ``test`` example after ``demos`` in context (zero-shot when empty)."""
    return M.predictions(_score(model, tok, task, demos, test, opts)[0].loglik)


def predictions_after_gd(model, tok, task: ICLTask, cfg: GDConfig, demos, test, opts) -> torch.Tensor:
    """Top-1 label of every ``test`` example, zero-shot, after GD with ``cfg`` on ``demos``."""
    tuned, _ = _gd_model(model, tok, task, demos, cfg, opts)
    return predictions_of(tuned, tok, task, [], test, opts)


def _has_bos(tok, opts: ScoringOptions) -> bool:
    return bool(opts.add_special_tokens and leading_special_tokens(tok))


def run_unit(model, tok, unit: WorkUnit, gd: GDConfig, opts: ScoringOptions) -> dict:
    """Dispatch on ``unit.kind`` and attach the unit's identity and demonstrations.

    ``gd`` is the configuration for this unit's task (already chosen or resolved by the caller).
    """
    body = (run_sweep_unit if unit.kind == "sweep" else run_order_unit)(model, tok, unit, gd, opts)
    resolved = gd.resolved(unit.task.name)
    return {
        "uid": unit.uid,
        "kind": unit.kind,
        "task": unit.task.name,
        "n_demos": unit.n_demos,
        "seed": unit.seed,
        "model_variant": unit.model_variant,
        "gd": asdict(resolved),
        "gd_variant": gd_variant(resolved.lora, resolved.params, base_quantization(model)),
        "demonstrations": [
            {"index": d.index, "label": d.label, "text": unit.task.render_demo(d)} for d in unit.demos
        ],
        "demo_separator": unit.task.demo_separator,
        **body,
    }


def json_safe(obj):
    """NaN/inf -> None recursively (JSON has no NaN; a missing ratio is not a number)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj
