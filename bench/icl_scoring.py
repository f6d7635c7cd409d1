"""Benchmark: our label-word scoring vs lm-evaluation-harness (HF backend) on the same requests.

Both scorers get the same model object, tokenizer and (context, continuation) pairs: N-shot ICL
prompts of a real task (SST-2 from staicc by default) with every label word as a continuation. We
measure examples (queries, all label words scored) per second for each and the largest absolute
difference between the per-choice log-likelihoods, and write ``bench/results/icl_scoring.json`` (+ png).

    python bench/icl_scoring.py --quick          # smoke check, well under a minute on 2 cores
    python bench/icl_scoring.py   # the full workload
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from common.atomic import atomic_save_figure, atomic_write_json  # noqa: E402
from datamodules.icl_tasks import get_task, load_examples, sample_demos, split_test_and_pool  # noqa: E402
from lightning_modules.probes.icl_scoring import encode_requests, score_requests  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def build_requests(task_name: str, n_demos: int, n_queries: int, seed: int):
    task = get_task(task_name)
    test, pool = split_test_and_pool(load_examples(task), n_queries, task.num_classes, seed)
    demos = sample_demos(pool, n_demos, task.num_classes, seed)
    return task, [task.context(demos, q) for q in test], task.choices()


def run_ours(model, tok, contexts, choices, batch_size: int, reuse_prefix: bool):
    start = time.perf_counter()
    reqs = encode_requests(tok, contexts, choices)
    res = score_requests(
        model, reqs, batch_size=batch_size, reuse_prefix=reuse_prefix, pad_token_id=tok.pad_token_id or 0
    )
    return time.perf_counter() - start, res.loglik


def run_lm_eval(lm, contexts, choices):
    from lm_eval.api.instance import Instance

    instances = [
        Instance("loglikelihood", {}, (ctx, choice), idx=j)
        for ctx in contexts
        for j, choice in enumerate(choices)
    ]
    start = time.perf_counter()
    out = lm.loglikelihood(instances, disable_tqdm=True)
    seconds = time.perf_counter() - start
    return seconds, torch.tensor([ll for ll, _ in out], dtype=torch.float64).view(len(contexts), len(choices))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="smollm2-135m-instruct", help="alias / Hub id / path (load_causal_lm)"
    )
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--n-demos", type=int, default=8)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="timed repetitions; the best one counts")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="4 demos, 16 queries, 1 repeat")
    parser.add_argument("--out", type=Path, default=RESULTS / "icl_scoring.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_demos, args.queries, args.repeats = 4, 16, 1
    torch.set_num_threads(args.threads)

    from common.hf_loading import load_causal_lm, load_tokenizer

    model = load_causal_lm(args.model, dtype="float32").eval()
    tok = load_tokenizer(args.model)
    task, contexts, choices = build_requests(args.task, args.n_demos, args.queries, args.seed)
    workload = {
        "model": args.model,
        "task": task.name,
        "n_demos": args.n_demos,
        "queries": len(contexts),
        "choices_per_query": len(choices),
        "mean_prompt_tokens": sum(len(tok.encode(c)) for c in contexts) / len(contexts),
        "batch_size": args.batch_size,
        "dtype": "float32",
        "threads": args.threads,
        "repeats": args.repeats,
        "device": "cpu",
        "platform": platform.platform(),
    }
    result: dict = {"workload": workload}
    print(f"workload: {json.dumps(workload)}")

    try:
        from lm_eval.models.huggingface import HFLM
    except Exception as err:  # noqa: BLE001 - report exactly why the baseline could not run
        result |= {
            "lm_eval_error": f"lm-eval unavailable: {type(err).__name__}: {err}",
            "speed_ratio_vs_lm_eval": None,
            "max_abs_loglik_diff": None,
        }
        lm = None
    else:
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size, device="cpu", dtype="float32")

    timings: dict[str, list[float]] = {"ours": [], "ours_no_prefix_reuse": [], "lm_eval": []}
    scores: dict[str, torch.Tensor] = {}
    # warm-up on two queries so one-off costs (allocator, lazy init) do not land on the first scorer
    run_ours(model, tok, contexts[:2], choices, args.batch_size, True)
    if lm is not None:
        run_lm_eval(lm, contexts[:2], choices)
    for _ in range(args.repeats):
        if lm is not None:
            t, scores["lm_eval"] = run_lm_eval(lm, contexts, choices)
            timings["lm_eval"].append(t)
        t, scores["ours"] = run_ours(model, tok, contexts, choices, args.batch_size, True)
        timings["ours"].append(t)
        t, scores["ours_no_prefix_reuse"] = run_ours(model, tok, contexts, choices, args.batch_size, False)
        timings["ours_no_prefix_reuse"].append(t)

    n = len(contexts)
    eps = {k: n / min(v) for k, v in timings.items() if v}
    result |= {
        "examples_per_second": eps,
        "seconds_best": {k: min(v) for k, v in timings.items() if v},
        "seconds_all": timings,
        "max_abs_loglik_diff_prefix_reuse_vs_plain": float(
            (scores["ours"] - scores["ours_no_prefix_reuse"]).abs().max()
        ),
    }
    if lm is not None:
        result["speed_ratio_vs_lm_eval"] = eps["ours"] / eps["lm_eval"]
        result["speed_ratio_vs_lm_eval_no_prefix_reuse"] = eps["ours_no_prefix_reuse"] / eps["lm_eval"]
        result["max_abs_loglik_diff"] = float((scores["ours"] - scores["lm_eval"]).abs().max())
        result["same_predictions"] = bool(
            torch.equal(scores["ours"].argmax(-1), scores["lm_eval"].argmax(-1))
        )
        result["agrees_within_1e-4"] = result["max_abs_loglik_diff"] <= 1e-4
    result["quick"] = args.quick

    atomic_write_json(args.out, result)
    _plot(result, args.out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if k != "workload"}, indent=2))
    return result


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = result["examples_per_second"]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(list(eps), list(eps.values()), color=["tab:blue", "tab:cyan", "tab:gray"][: len(eps)])
    w = result["workload"]
    ax.set_ylabel("queries / s (all label words)")
    ax.set_title(f"{w['model']} {w['task']} {w['n_demos']}-shot, {w['threads']} CPU threads", fontsize=8)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=90)


if __name__ == "__main__":
    main()
