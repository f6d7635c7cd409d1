"""Flextron benchmark: routed sub-networks vs uniform nested training at equal budget and equal tokens.

Methods, each trained from the same parent on the same number of tokens (steps x batch x block):
  flextron        static router (elastic -> router -> joint stages, KD loss); the sub-network for a budget
                  is the constrained decode of the router (most probable widths whose table cost is within
                  the budget), so its realized budget never exceeds the requested one
  uniform_nested  MatFormer-style nested training: every step trains the full model or one uniform width
                  pair (an MLP ratio and the attention ratio closest to it) in every layer; evaluated only
                  at the pairs it trained, at the most expensive one within each budget

Both run for every seed; perplexity is on the same validation blocks. Budgets are fractions of the
prefill latency predicted by one lookup table measured on this CPU (1 thread) for the parent. Also
reported: the exported 0.5 sub-network's prefill and decode speed-up over the full model (timed in one
loop that alternates full and export), and a dynamic (per-sequence) router trained like the static one,
timed after training: each sequence runs the sliced sub-network decoded for it under the budget.

    python bench/flextron.py --quick     # tiny parent pretrained here on Shakespeare bytes, 3 seeds
    python bench/flextron.py             # SmolLM2-135M parent (long: give it the machine to itself)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("WANDB_MODE", "disabled")

import lightning as L  # noqa: E402
from records import read_record  # noqa: E402

from common.atomic import atomic_save_figure, atomic_write_json  # noqa: E402
from common.hf_loading import load_causal_lm, tiny_llama_config  # noqa: E402
from datamodules.text import TextDataModule  # noqa: E402
from lightning_modules.flextron import ElasticLM, SubnetConfig, WidthSpace  # noqa: E402
from lightning_modules.flextron.budgets import CostTable, latency_table  # noqa: E402
from lightning_modules.flextron.dynamic import route_and_run  # noqa: E402
from lightning_modules.flextron.export import export_subnetwork  # noqa: E402
from lightning_modules.flextron.importance import activation_importance, sort_by_importance  # noqa: E402
from lightning_modules.flextron.losses import lm_loss  # noqa: E402
from lightning_modules.flextron.module import FlextronModule  # noqa: E402
from lightning_modules.schedules import warmup_cosine  # noqa: E402

BUDGETS = [0.3, 0.5, 0.7, 0.9, 1.0]
METHODS = ("flextron", "uniform_nested")
RESULTS = Path(__file__).resolve().parent / "results"

QUICK = dict(
    parent=None, parent_config=tiny_llama_config(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                                 num_attention_heads=8, num_key_value_heads=4),
    tokenizer="byt5", pretrain_steps=150, pretrain_lr=3e-3, block=64, batch=8, max_tokens=150_000, train_steps=120,
    elastic_frac=0.3, router_frac=0.3, lr=3e-4, seq=256, reps=15, val_blocks=16, calib=4, seeds=[0, 1, 2],
    mlp_ratios=[0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0], attn_ratios=[0.0, 0.25, 0.5, 0.75, 1.0],
    mlp_multiple=1,
)
FULL = dict(
    parent="smollm2-135m-instruct", parent_config=None, tokenizer=None, pretrain_steps=0, pretrain_lr=0.0, block=128,
    batch=2, max_tokens=300_000, train_steps=40, elastic_frac=0.3, router_frac=0.4, lr=5e-5, seq=128, reps=5,
    val_blocks=8, calib=4, seeds=[0, 1, 2], mlp_ratios=[0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0],
    attn_ratios=[0.0, 0.333, 0.667, 1.0], mlp_multiple=32,
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def next_batch(iterator, loader):
    try:
        return next(iterator), iterator
    except StopIteration:
        iterator = iter(loader)
        return next(iterator), iterator


def pretrain_parent(cfg: dict, dm: TextDataModule, out_dir: Path) -> Path:
    """Quick mode: a tiny parent trained from scratch, so importance and perplexity mean something."""
    torch.manual_seed(0)
    model = load_causal_lm(None, model_config=cfg["parent_config"], seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["pretrain_lr"], weight_decay=0.0)
    loader = dm.train_dataloader()
    iterator = iter(loader)
    model.train()
    steps = cfg["pretrain_steps"]
    for step in range(steps):
        batch, iterator = next_batch(iterator, loader)
        for group in optimizer.param_groups:
            group["lr"] = cfg["pretrain_lr"] * warmup_cosine(step, 20, steps, 0.1)
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()
    model.save_pretrained(out_dir)
    log(f"parent pretrained {steps} steps, last train loss {float(loss):.3f}")
    return out_dir


@torch.no_grad()
def val_ppl(model, blocks: list[dict]) -> float:
    total, tokens = 0.0, 0
    for block in blocks:
        loss = lm_loss(model(input_ids=block["input_ids"], use_cache=False).logits, block["labels"])
        count = int((block["labels"][:, 1:] != -100).sum())
        total += float(loss) * count
        tokens += count
    return math.exp(total / tokens)


def uniform_pairs(space: WidthSpace) -> list[SubnetConfig]:
    """The sub-networks uniform nested training draws (``elastic_sampling="uniform"``): each MLP width with
    the attention width of the closest ratio, in every layer, plus the full model."""
    pairs = []
    for m in space.mlp:
        ratio = m / space.mlp[-1]
        a = min(space.attn, key=lambda g: abs(g / space.attn[-1] - ratio))
        pairs.append(SubnetConfig([m] * space.num_layers, [a] * space.num_layers))
    return pairs


def best_trained_pair(pairs: list[SubnetConfig], table: CostTable, space: WidthSpace, budget: float
                      ) -> SubnetConfig | None:
    """The most expensive trained pair whose cost is within ``budget`` (None: none is)."""
    within = [p for p in pairs if table.of(space, p) <= budget * table.full * (1 + 1e-9)]
    return max(within, key=lambda p: table.of(space, p)) if within else None


def train_module(parent: str, cfg: dict, dm_kwargs: dict, table: CostTable, seed: int, **overrides) -> FlextronModule:
    """One training run of ``train_steps`` steps with the shared latency table (equal tokens for every method)."""
    torch.manual_seed(seed)
    module = FlextronModule(model=parent, tokenizer=cfg["tokenizer"], budgets=BUDGETS, budget_metric="latency_prefill",
                            mlp_ratios=cfg["mlp_ratios"], attn_ratios=cfg["attn_ratios"],
                            mlp_multiple=cfg["mlp_multiple"], calibration_batches=cfg["calib"],
                            latency_seq_len=cfg["seq"], learning_rate=cfg["lr"],
                            warmup_steps=max(1, cfg["train_steps"] // 10), seed=seed, **overrides)
    module.cost = CostTable.from_dict(table.to_dict())  # one harness for every method and seed
    dm = TextDataModule(tokenizer=cfg["tokenizer"], block_size=cfg["block"], batch_size=cfg["batch"],
                        max_tokens=cfg["max_tokens"], **dm_kwargs)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=cfg["train_steps"], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, dm)
    module.eval()
    return module


def ppl_at(module: FlextronModule, subnet: SubnetConfig | None, blocks: list[dict]) -> float:
    with module.elastic.subnet(subnet):
        return val_ppl(module.model, blocks)


DECODE_STEPS = 16


@torch.no_grad()
def _one_pass(model, mode: str, ids: torch.Tensor) -> float:
    """Seconds of one prefill of ``ids``, or per token of ``DECODE_STEPS`` cached decode steps after
    ``ids[:, :-DECODE_STEPS]`` as context (one step alone is too short to time on a shared CPU)."""
    if mode == "prefill":
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        return time.perf_counter() - start
    cache = DynamicCache(config=model.config)
    model(input_ids=ids[:, :-DECODE_STEPS], cache=cache, use_cache=True)
    start = time.perf_counter()
    for position in range(ids.shape[1] - DECODE_STEPS, ids.shape[1]):
        model(input_ids=ids[:, position : position + 1], cache=cache, use_cache=True)
    return (time.perf_counter() - start) / DECODE_STEPS


def alternating_speedup(full, other, mode: str, seq: int, reps: int) -> dict:
    """Time ``full`` and ``other`` alternately in one loop, swapping which goes first every repetition (load
    drifts and order effects hit both alike); min over repetitions."""
    ids = torch.randint(0, full.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    for model in (full, other):
        _one_pass(model, mode, ids)  # warm-up
    t_full, t_other = [], []
    for rep in range(reps):
        if rep % 2:
            t_other.append(_one_pass(other, mode, ids))
            t_full.append(_one_pass(full, mode, ids))
        else:
            t_full.append(_one_pass(full, mode, ids))
            t_other.append(_one_pass(other, mode, ids))
    return {"full_s": min(t_full), "other_s": min(t_other), "speedup": min(t_full) / min(t_other)}


@torch.no_grad()
def dynamic_eval(module: FlextronModule, budget: float, blocks: list[dict]) -> dict:
    """Perplexity and realized (table) budgets of the trained dynamic router, each sequence run through the
    sliced sub-network decoded for it under the budget."""
    total, tokens, costs, groups = 0.0, 0, [], []
    for block in blocks:
        routed = route_and_run(module, block["input_ids"], budget)
        loss = lm_loss(routed.logits, block["labels"])
        count = int((block["labels"][:, 1:] != -100).sum())
        total, tokens = total + float(loss) * count, tokens + count
        costs += routed.realized
        groups.append(routed.groups)
    return {"ppl": math.exp(total / tokens), "realized_mean": statistics.mean(costs), "realized_max": max(costs),
            "distinct_subnets_per_batch_mean": statistics.mean(groups)}


@torch.no_grad()
def time_dynamic_vs_full(module: FlextronModule, budget: float, seq: int, reps: int) -> dict:
    """Prefill of one sequence with the trained dynamic router (route, decode its sub-network under the
    budget, run it sliced) vs the full model, alternated in one loop; routing time counts."""
    ids = torch.randint(0, module.model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))

    def routed() -> float:
        start = time.perf_counter()
        route_and_run(module, ids, budget)
        return time.perf_counter() - start

    def full() -> float:
        start = time.perf_counter()
        module.model(input_ids=ids, use_cache=False)
        return time.perf_counter() - start

    routed(), full()
    t_dyn, t_full = [], []
    for rep in range(reps):
        if rep % 2:
            t_dyn.append(routed())
            t_full.append(full())
        else:
            t_full.append(full())
            t_dyn.append(routed())
    return {"full_s": min(t_full), "dynamic_s": min(t_dyn), "speedup": min(t_full) / min(t_dyn)}


def spread(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def plot(summary: dict, path: Path) -> None:
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, marker in (("flextron", "o"), ("uniform_nested", "^")):
        xs, ys, lo, hi = [], [], [], []
        for b in BUDGETS:
            s = summary["ppl_seed_spread"][method].get(str(b))
            if s is None:
                continue
            xs.append(statistics.mean(summary["realized_budgets"][method][str(b)]))
            ys.append(s["mean"])
            lo.append(s["mean"] - s["min"])
            hi.append(s["max"] - s["mean"])
        axes[0].errorbar(xs, ys, yerr=[lo, hi], marker=marker, capsize=3, label=method)
    axes[0].set_yscale("log")  # perplexities span decades where a sub-network is unusable
    axes[0].set_xlabel("realized prefill-latency budget (table, mean over seeds)")
    axes[0].set_ylabel("validation perplexity (mean, min-max over seeds)")
    axes[0].legend()
    ratios = summary["ppl_ratio_vs_uniform_nested"]
    bs = [b for b in BUDGETS if ratios.get(str(b)) is not None]
    axes[1].axhline(1.0, color="k", linestyle=":")
    axes[1].errorbar(bs, [ratios[str(b)]["mean"] for b in bs],
                     yerr=[[ratios[str(b)]["mean"] - ratios[str(b)]["min"] for b in bs],
                           [ratios[str(b)]["max"] - ratios[str(b)]["mean"] for b in bs]], marker="o", capsize=3)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("requested budget")
    axes[1].set_ylabel("ppl flextron / ppl uniform nested (per seed)")
    fig.suptitle("\n".join(textwrap.wrap(summary["workload"], 150)), fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    atomic_save_figure(fig, path)


def prepare(cfg: dict, work: Path, dm_kwargs: dict) -> tuple[str, list[dict], list[dict]]:
    """The parent (pretrained here in quick mode), validation blocks and calibration batches."""
    parent = cfg["parent"]
    if parent is None:
        dm = TextDataModule(tokenizer=cfg["tokenizer"], block_size=cfg["block"], batch_size=cfg["batch"],
                            max_tokens=cfg["max_tokens"], **dm_kwargs)
        dm.prepare_data()
        dm.setup("fit")
        parent = str(pretrain_parent(cfg, dm, work / "parent"))
    dm = TextDataModule(tokenizer=cfg["tokenizer"] or parent, block_size=cfg["block"], batch_size=cfg["batch"],
                        max_tokens=cfg["max_tokens"], **dm_kwargs)
    dm.prepare_data()
    dm.setup("fit")
    blocks = [b for _, b in zip(range(cfg["val_blocks"] // cfg["batch"]), dm.val_dataloader(), strict=False)]
    calib = [b for _, b in zip(range(cfg["calib"]), dm.train_dataloader(), strict=False)]
    return parent, blocks, calib


def run_seed(seed: int, parent: str, cfg: dict, dm_kwargs: dict, table: CostTable, space: WidthSpace,
             blocks: list[dict]) -> tuple[dict, FlextronModule]:
    """Train both methods for one seed; perplexity and realized budget per method and budget."""
    steps = cfg["train_steps"]
    elastic_steps, router_steps = int(steps * cfg["elastic_frac"]), int(steps * cfg["router_frac"])
    start = time.perf_counter()
    flextron = train_module(parent, cfg, dm_kwargs, table, seed, elastic_steps=elastic_steps,
                            router_steps=router_steps, router="static", router_update="direct", loss="kd",
                            interp_prob=0.25)
    uniform = train_module(parent, cfg, dm_kwargs, table, seed, elastic_steps=steps, router_steps=0,
                           elastic_sampling="uniform", loss="kd")
    out = {"flextron": {}, "uniform_nested": {}, "flextron_widths_uniform_weights": {}}
    pairs = uniform_pairs(space)
    for b in BUDGETS:
        routed = flextron.subnet_for_budget(b, routing="constrained")
        out["flextron"][b] = {"ppl": ppl_at(flextron, routed, blocks), "realized": table.of(space, routed) / table.full,
                              "subnet": routed.to_dict()}
        # analysis, not a baseline: uniform-trained weights at the widths Flextron chose
        out["flextron_widths_uniform_weights"][b] = {"ppl": ppl_at(uniform, routed, blocks)}
        pair = best_trained_pair(pairs, table, space, b)
        if pair is not None:
            out["uniform_nested"][b] = {"ppl": ppl_at(uniform, pair, blocks),
                                        "realized": table.of(space, pair) / table.full, "subnet": pair.to_dict()}
    log(f"seed {seed}: trained and evaluated both methods in {time.perf_counter() - start:.1f}s: " + ", ".join(
        f"b={b} fx {out['flextron'][b]['ppl']:.3f} un "
        f"{out['uniform_nested'][b]['ppl'] if b in out['uniform_nested'] else float('nan'):.3f}" for b in BUDGETS))
    return out, flextron


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny parent pretrained here (smoke / CI)")
    ap.add_argument("--out", default=None, help="default: results/flextron.json (quick), flextron_smollm2.json")
    ap.add_argument("--plot-only", metavar="JSON", default=None, help="redraw the PNG of a result JSON, run nothing")
    args = ap.parse_args()
    if args.plot_only:
        record = Path(args.plot_only)
        try:
            plot(read_record(record, "replot", "bench/flextron.py"), record.with_suffix(".png"))
        except KeyError as err:
            message = f"{record}: the record lacks {err} to replot; run `python bench/flextron.py` again"
            raise SystemExit(message) from None
        return
    cfg = QUICK if args.quick else FULL
    args.out = args.out or str(RESULTS / ("flextron.json" if args.quick else "flextron_smollm2.json"))
    # one thread throughout: on a shared 2-core CPU a second worker thread made training far slower (threads
    # wait on descheduled peers), and every latency figure is single-thread by design
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    # the quick parent, the tokenized data and the exported sub-network go away with the run
    with tempfile.TemporaryDirectory(prefix="flextron_bench_") as tmp:
        _measure(args, cfg, Path(tmp), t0)


def _measure(args: argparse.Namespace, cfg: dict, work: Path, t0: float) -> None:
    """Train every method, time the latency table and the export, and write the record and its plot."""
    dm_kwargs = {"val_fraction": 0.05, "seed": 0}
    parent, blocks, calib = prepare(cfg, work, dm_kwargs)
    log(f"setup took {time.perf_counter() - t0:.1f}s")

    # one latency table for every method and seed: the importance-sorted parent (sorting moves no cost)
    base = load_causal_lm(parent).eval()
    parent_ppl = val_ppl(base, blocks)
    sorted_parent = copy.deepcopy(base)
    sort_by_importance(sorted_parent, activation_importance(sorted_parent, calib))
    elastic = ElasticLM(sorted_parent)
    space = WidthSpace.from_ratios(elastic.spec, cfg["mlp_ratios"], cfg["attn_ratios"], cfg["mlp_multiple"])
    table = latency_table(elastic, space, "prefill", seq_len=cfg["seq"], reps=cfg["reps"], num_threads=1)
    floor = (table.fixed + float(table.mlp.min(-1).values.sum() + table.attn.min(-1).values.sum())) / table.full
    log(f"latency table: full {table.full * 1e3:.2f} ms, floor {floor:.3f}; parent ppl {parent_ppl:.3f}")

    per_seed, modules = {}, {}
    for seed in cfg["seeds"]:
        per_seed[seed], modules[seed] = run_seed(seed, parent, cfg, dm_kwargs, table, space, blocks)

    # export of seed 0's 0.5 sub-network: exactness, and speed-up over the full parent timed alternately
    first = modules[cfg["seeds"][0]]
    half = first.subnet_for_budget(0.5, routing="constrained")
    report = export_subnetwork(first.elastic, half, work / "export_b0.5", probe_ids=blocks[0]["input_ids"][:2])
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(work / "export_b0.5", dtype=torch.float32,
                                                    trust_remote_code=True).eval()
    full_plain = load_causal_lm(parent).eval()
    prefill = alternating_speedup(full_plain, exported, "prefill", cfg["seq"], cfg["reps"] * 2)
    decode = alternating_speedup(full_plain, exported, "decode", cfg["seq"], cfg["reps"] * 3)
    log(f"export 0.5: {report['architecture']}, max |dlogit| {report['max_abs_logit_diff_vs_masked_elastic']:.2e}, "
        f"prefill {prefill['speedup']:.2f}x, decode {decode['speedup']:.2f}x")

    # dynamic (per-sequence) router, trained like the static one (seed 0), timed after training
    steps = cfg["train_steps"]
    dynamic = train_module(parent, cfg, dm_kwargs, table, cfg["seeds"][0],
                           elastic_steps=int(steps * cfg["elastic_frac"]), router_steps=int(steps * cfg["router_frac"]),
                           router="dynamic", router_update="direct", loss="kd", interp_prob=0.25)
    dyn_eval = dynamic_eval(dynamic, 0.5, blocks)
    dyn_time = time_dynamic_vs_full(dynamic, 0.5, cfg["seq"], cfg["reps"] * 2)
    static_half_ppl = per_seed[cfg["seeds"][0]]["flextron"][0.5]["ppl"]
    log(f"dynamic router at 0.5: ppl {dyn_eval['ppl']:.3f} (static {static_half_ppl:.3f}), realized mean "
        f"{dyn_eval['realized_mean']:.3f}, prefill speed-up vs full {dyn_time['speedup']:.2f}x")

    seeds = cfg["seeds"]
    ppl = {m: {str(b): [per_seed[s][m][b]["ppl"] for s in seeds] for b in BUDGETS if b in per_seed[seeds[0]][m]}
           for m in (*METHODS, "flextron_widths_uniform_weights")}
    realized = {m: {str(b): [per_seed[s][m][b]["realized"] for s in seeds] for b in BUDGETS
                    if b in per_seed[seeds[0]][m]} for m in METHODS}
    ratio = {}
    for b in BUDGETS:
        if b in per_seed[seeds[0]]["uniform_nested"]:
            per = [per_seed[s]["flextron"][b]["ppl"] / per_seed[s]["uniform_nested"][b]["ppl"] for s in seeds]
            ratio[str(b)] = {**spread(per), "per_seed": per}
        else:
            ratio[str(b)] = None
    errors = [abs(r / b - 1) for b in BUDGETS for r in realized["flextron"][str(b)]]
    overshoot = max(r / b - 1 for m in METHODS for b in BUDGETS for r in realized[m].get(str(b), []))
    parent_name = ("quick: tiny Llama (4 layers, hidden 128) pretrained here on Shakespeare bytes" if args.quick
                   else "full: SmolLM2-135M")
    workload = (f"{parent_name}; "
                f"each method {steps} steps x {cfg['batch']}x{cfg['block']} tokens per seed, seeds {seeds}; "
                f"budgets = fractions of a prefill-latency table ({cfg['seq']} tokens, batch 1) measured here; "
                f"torch.set_num_threads(1) throughout (2 shared CPU cores, other jobs running); "
                f"speed-ups: min over alternated repetitions")
    summary = {
        "mode": "quick" if args.quick else "full", "workload": workload, "device": "cpu", "parent": parent if not
        args.quick else "tiny llama pretrained here", "seeds": seeds, "budgets": BUDGETS,
        "realized_budgets": realized, "ppl": ppl,
        "ppl_seed_spread": {m: {b: spread(v) for b, v in ppl[m].items()} for m in ppl},
        "ppl_ratio_vs_uniform_nested": ratio,
        "export_speedup_prefill_at_0.5": prefill["speedup"], "export_speedup_decode_at_0.5": decode["speedup"],
        "export_timing": {"prefill": prefill, "decode": decode},
        "export_max_abs_logit_diff": report["max_abs_logit_diff_vs_masked_elastic"],
        "export_architecture": report["architecture"], "export_subnet": half.to_dict(),
        "export_parameters": report["parameters"], "parent_parameters": report["parent_parameters"],
        "dynamic_speedup_vs_full": dyn_time["speedup"], "dynamic_timing": dyn_time,
        "dynamic_ppl_vs_static": dyn_eval["ppl"] / static_half_ppl, "dynamic_at_0.5": dyn_eval,
        "dynamic_note": "per-sequence router trained through masks; at inference each sequence's widths are "
                        "decoded under the budget and run sliced (routing and decoding time included)",
        "budget_error_max": max(errors), "budget_overshoot_max_any_method": overshoot, "budget_floor": floor,
        "parent_ppl": parent_ppl, "latency_table": table.to_dict(), "space": {"mlp": space.mlp, "attn": space.attn},
        "per_seed": {str(s): {m: {str(b): v for b, v in per_seed[s][m].items()} for m in per_seed[s]} for s in seeds},
        "seconds": time.perf_counter() - t0,
    }
    out = Path(args.out)
    atomic_write_json(out, summary)
    plot(summary, out.with_suffix(".png"))
    keys = ["ppl_ratio_vs_uniform_nested", "budget_error_max", "budget_overshoot_max_any_method",
            "export_speedup_prefill_at_0.5", "export_speedup_decode_at_0.5", "dynamic_speedup_vs_full",
            "dynamic_ppl_vs_static", "seconds"]
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    log(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
