"""Flextron benchmark: perplexity vs measured CPU latency at budgets {0.3, 0.5, 0.7, 0.9, 1.0}.

Methods (same parent, same validation blocks, same latency harness):
  (a) flextron   Flextron with the static router (elastic -> router -> joint stages, KD loss); its
                 widths come from the budget-constrained decode of the router's distribution
                 (most probable widths whose table cost stays within the budget; a budget below the
                 narrowest sub-network is clamped to it and marked ``clamped``)
  (a') flextron_argmax  the same trained router, each layer's argmax (the unconstrained choice)
  (b) importance importance-ordered slicing, no training (uniform width closest to the budget)
  (c) random     random-order slicing, no training
  (d) uniform    MatFormer-style nested training with one width for all layers, no router, the same
                 number of extra tokens as (a)

Budgets are fractions of the prefill latency predicted by a lookup table measured on this CPU
(single thread, prefill of ``seq`` tokens). Reported per budget: validation perplexity, measured
prefill and per-token decode latency, realized/requested (table and measured), latency-table error;
plus export exactness and the speed-up of the exported 0.5-budget network over the full model.

    python bench/flextron.py --quick          # tiny parent pretrained here on Shakespeare bytes (< ~1-2 min)
    python bench/flextron.py                  # SmolLM2-135M parent (long: give it the machine to itself)
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("WANDB_MODE", "disabled")

import lightning as L  # noqa: E402

from common.atomic import atomic_write_bytes, atomic_write_json  # noqa: E402
from common.hf_loading import load_causal_lm  # noqa: E402
from datamodules.text import TextDataModule  # noqa: E402
from lightning_modules.flextron import ElasticLM, SubnetConfig, WidthSpace  # noqa: E402
from lightning_modules.flextron.budgets import latency_table, measure_latency  # noqa: E402
from lightning_modules.flextron.export import export_subnetwork  # noqa: E402
from lightning_modules.flextron.importance import (  # noqa: E402
    activation_importance,
    random_permutation,
    sort_by_importance,
)
from lightning_modules.flextron.losses import lm_loss  # noqa: E402
from lightning_modules.flextron.module import FlextronModule  # noqa: E402

BUDGETS = [0.3, 0.5, 0.7, 0.9, 1.0]
BETWEEN = [0.6, 0.8]
RESULTS = Path(__file__).resolve().parent / "results"

QUICK = dict(
    parent=None, parent_config={"model_type": "llama", "vocab_size": 384, "hidden_size": 128, "intermediate_size": 512,
                                "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
                                "max_position_embeddings": 512, "tie_word_embeddings": False},
    tokenizer="byt5", pretrain_steps=150, pretrain_lr=3e-3, block=64, batch=8, max_tokens=150_000, train_steps=200,
    elastic_frac=0.3, router_frac=0.3, lr=3e-4, seq=256, reps=9, val_blocks=16, calib=4,
    mlp_ratios=[0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0], attn_ratios=[0.25, 0.5, 0.75, 1.0], mlp_multiple=1,
)
FULL = dict(
    parent="smollm2-135m-instruct", parent_config=None, tokenizer=None, pretrain_steps=0, pretrain_lr=0.0, block=128,
    batch=2, max_tokens=300_000, train_steps=40, elastic_frac=0.3, router_frac=0.4, lr=5e-5, seq=256, reps=2,
    val_blocks=8, calib=4, mlp_ratios=[0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0],
    attn_ratios=[0.333, 0.667, 1.0], mlp_multiple=32,
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pretrain_parent(cfg: dict, dm: TextDataModule, out_dir: Path) -> Path:
    """Quick mode: a tiny parent trained from scratch, so importance and perplexity mean something."""
    torch.manual_seed(0)
    model = load_causal_lm(None, model_config=cfg["parent_config"], seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["pretrain_lr"], weight_decay=0.0)
    loader = dm.train_dataloader()
    it = iter(loader)
    model.train()
    for step in range(cfg["pretrain_steps"]):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        lr = cfg["pretrain_lr"] * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg["pretrain_steps"])))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    model.save_pretrained(out_dir)
    log(f"parent pretrained {cfg['pretrain_steps']} steps, last train loss {float(loss):.3f}")
    return out_dir


@torch.no_grad()
def val_ppl(model, blocks: list[dict]) -> float:
    tot, n = 0.0, 0
    for b in blocks:
        loss = lm_loss(model(input_ids=b["input_ids"], use_cache=False).logits, b["labels"])
        k = int((b["labels"][:, 1:] != -100).sum())
        tot += float(loss) * k
        n += k
    return math.exp(tot / n)


def closest_uniform(space: WidthSpace, lut, budget: float) -> SubnetConfig:
    """Uniform configuration (one MLP and one attention width everywhere) closest to the budget."""
    best = None
    for m in space.mlp:
        for a in space.attn:
            cfg = SubnetConfig([m] * space.num_layers, [a] * space.num_layers)
            err = abs(lut.of(space, cfg) / lut.full - budget)
            if best is None or err < best[0]:
                best = (err, cfg)
    return best[1]


def measure(elm: ElasticLM, cfg: SubnetConfig | None, seq: int, reps: int) -> dict:
    # minimum over many short repetitions: on a shared CPU interference only ever adds time
    return {"prefill_s": measure_latency(elm, cfg, "prefill", seq_len=seq, reps=2 * reps, num_threads=1),
            "decode_s": measure_latency(elm, cfg, "decode", seq_len=seq, reps=4 * reps, num_threads=1)}


def evaluate(name: str, elm: ElasticLM, configs: dict[float, SubnetConfig], lut, space, blocks, cfg: dict,
             full_latency: dict) -> list[dict]:
    rows = []
    # the full network is re-timed in the same window as this method's sub-networks, so a burst of
    # load from other processes shifts numerator and denominator of realized/requested alike
    full_now = measure(elm, None, cfg["seq"], cfg["reps"])["prefill_s"]
    for b, sub in configs.items():
        with elm.subnet(sub):
            ppl = val_ppl(elm.model, blocks)
        lat = measure(elm, sub, cfg["seq"], cfg["reps"])
        pred = lut.of(space, sub)
        rows.append({
            "method": name, "budget": b, "ppl": ppl, **lat,
            "realized_table": pred / lut.full, "realized_measured": lat["prefill_s"] / full_now, "full_prefill_s_same_window": full_now,
            "lut_pred_s": pred, "lut_rel_error": abs(pred - lat["prefill_s"]) / lat["prefill_s"],
            "mlp_mean_ratio": statistics.mean(sub.mlp) / space.mlp[-1],
            "attn_mean_ratio": statistics.mean(sub.attn) / space.attn[-1], "subnet": sub.to_dict(),
        })
        log(f"{name:10s} b={b:.2f} ppl={ppl:8.3f} prefill={lat['prefill_s'] * 1e3:7.2f}ms "
            f"decode={lat['decode_s'] * 1e3:6.2f}ms realized(table)={pred / lut.full:.3f}")
    return rows


def train_module(parent: str | None, cfg: dict, dm_kwargs: dict, lut_dict: dict | None, **overrides) -> FlextronModule:
    mod = FlextronModule(model=parent, tokenizer=cfg["tokenizer"], budgets=BUDGETS, budget_metric="latency_prefill",
                         mlp_ratios=cfg["mlp_ratios"], attn_ratios=cfg["attn_ratios"], mlp_multiple=cfg["mlp_multiple"],
                         calibration_batches=cfg["calib"], latency_seq_len=cfg["seq"], learning_rate=cfg["lr"],
                         warmup_steps=max(1, cfg["train_steps"] // 10), **overrides)
    if lut_dict is not None:  # reuse the table measured for this parent (one harness for every method)
        from lightning_modules.flextron.budgets import CostTable

        mod.cost = CostTable.from_dict(lut_dict)
    dm = TextDataModule(tokenizer=cfg["tokenizer"], block_size=cfg["block"], batch_size=cfg["batch"],
                        max_tokens=cfg["max_tokens"], **dm_kwargs)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=cfg["train_steps"], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(mod, dm)
    mod.eval()
    return mod


def time_plain(model, seq: int, reps: int) -> float:
    """Prefill latency of a plain (exported) model, single thread, min over reps."""
    ids = torch.randint(0, model.config.vocab_size, (1, seq))
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    ts = []
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
            for _ in range(reps):
                t = time.perf_counter()
                model(input_ids=ids, use_cache=False)
                ts.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(old)
    return min(ts)


def plot(rows: list[dict], path: Path, workload: str) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, marker in (("flextron", "o"), ("importance", "s"), ("random", "x"), ("uniform", "^")):
        rs = sorted((r for r in rows if r["method"] == name and r["budget"] in BUDGETS), key=lambda r: r["budget"])
        axes[0].plot([r["prefill_s"] * 1e3 for r in rs], [r["ppl"] for r in rs], marker=marker, label=name)
    axes[0].set_xlabel("measured prefill latency (ms, 1 CPU thread)")
    axes[0].set_ylabel("validation perplexity")
    axes[0].legend()
    import textwrap

    fig.suptitle("\n".join(textwrap.wrap(workload, 150)), fontsize=7)
    fx = sorted((r for r in rows if r["method"] == "flextron"), key=lambda r: r["budget"])
    axes[1].plot([0.25, 1.0], [0.25, 1.0], "k:", label="ideal")
    axes[1].plot([r["budget"] for r in fx], [r["realized_table"] for r in fx], "o-", label="table")
    axes[1].plot([r["budget"] for r in fx], [r["realized_measured"] for r in fx], "s--", label="measured")
    am = sorted((r for r in rows if r["method"] == "flextron_argmax"), key=lambda r: r["budget"])
    axes[1].plot([r["budget"] for r in am], [r["realized_table"] for r in am], "x:", label="table, argmax routing")
    axes[1].set_xlabel("requested latency budget")
    axes[1].set_ylabel("realized / full")
    axes[1].legend()
    axes[1].set_title("static router, constrained decode: realized vs requested", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny parent pretrained here (smoke / CI)")
    ap.add_argument("--out", default=str(RESULTS / "flextron.json"))
    args = ap.parse_args()
    cfg = QUICK if args.quick else FULL
    # one thread throughout: on a shared 2-core CPU a second worker thread made training ~40x slower
    # (threads wait on descheduled peers), and latency figures are single-thread by design
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="flextron_bench_"))

    dm_kwargs = {"val_fraction": 0.05, "seed": 0}
    parent = cfg["parent"]
    if parent is None:
        dm = TextDataModule(tokenizer=cfg["tokenizer"], block_size=cfg["block"], batch_size=cfg["batch"],
                            max_tokens=cfg["max_tokens"], **dm_kwargs)
        dm.prepare_data()
        dm.setup("fit")
        parent = str(pretrain_parent(cfg, dm, work / "parent"))
        log(f"setup + pretraining took {time.perf_counter() - t0:.1f}s")
    tok_name = cfg["tokenizer"] or parent
    dm = TextDataModule(tokenizer=tok_name, block_size=cfg["block"], batch_size=cfg["batch"],
                        max_tokens=cfg["max_tokens"], **dm_kwargs)
    dm.prepare_data()
    dm.setup("fit")
    blocks = [b for _, b in zip(range(cfg["val_blocks"] // cfg["batch"]), dm.val_dataloader(), strict=False)]
    calib = [b for _, b in zip(range(cfg["calib"]), dm.train_dataloader(), strict=False)]

    # (b) importance-ordered and (c) random-order slicing of the untrained parent
    base = load_causal_lm(parent).eval()
    parent_ppl = val_ppl(base, blocks)
    imp = copy.deepcopy(base)
    sort_by_importance(imp, activation_importance(imp, calib))
    imp_elm = ElasticLM(imp)
    space = WidthSpace.from_ratios(imp_elm.spec, cfg["mlp_ratios"], cfg["attn_ratios"], cfg["mlp_multiple"])
    lut = latency_table(imp_elm, space, "prefill", seq_len=cfg["seq"], reps=cfg["reps"], num_threads=1)
    log(f"latency table: full {lut.full * 1e3:.2f} ms predicted, fixed {lut.fixed * 1e3:.2f} ms")
    full_lat = measure(imp_elm, None, cfg["seq"], cfg["reps"])
    log(f"parent ppl {parent_ppl:.3f}; measured full prefill {full_lat['prefill_s'] * 1e3:.2f} ms, "
        f"decode {full_lat['decode_s'] * 1e3:.2f} ms/token")
    uniform_cfgs = {b: closest_uniform(space, lut, b) for b in BUDGETS}
    rows = evaluate("importance", imp_elm, uniform_cfgs, lut, space, blocks, cfg, full_lat)
    rnd = copy.deepcopy(base)
    random_permutation(rnd, seed=0)
    rows += evaluate("random", ElasticLM(rnd), uniform_cfgs, lut, space, blocks, cfg, full_lat)
    del rnd

    # (a) Flextron static router and (d) uniform nested training, same steps and tokens
    steps = cfg["train_steps"]
    e_steps, r_steps = int(steps * cfg["elastic_frac"]), int(steps * cfg["router_frac"])
    t = time.perf_counter()
    fx = train_module(parent, cfg, dm_kwargs, lut.to_dict(), elastic_steps=e_steps, router_steps=r_steps,
                      router="static", router_update="direct", loss="kd", interp_prob=0.25)
    log(f"flextron trained {steps} steps in {time.perf_counter() - t:.1f}s")
    fx_cfgs = {b: fx.subnet_for_budget(b, routing="constrained", clamp=True) for b in BUDGETS + BETWEEN}
    clamped = [b for b in BUDGETS + BETWEEN if not fx.is_reachable(b)]
    if clamped:
        log(f"budgets {clamped} are below the narrowest sub-network: clamped to it")
    rows += evaluate("flextron", fx.elastic, fx_cfgs, lut, space, blocks, cfg, full_lat)
    for r in rows:
        if r["method"] == "flextron":
            r["clamped"] = r["budget"] in clamped
    argmax_cfgs = {b: fx.subnet_for_budget(b, routing="argmax") for b in BUDGETS + BETWEEN}
    rows += evaluate("flextron_argmax", fx.elastic, argmax_cfgs, lut, space, blocks, cfg, full_lat)
    fx_full_ppl = val_ppl(fx.model, blocks)
    t = time.perf_counter()
    mf = train_module(parent, cfg, dm_kwargs, lut.to_dict(), elastic_steps=steps, router_steps=0,
                      elastic_sampling="uniform", loss="kd")
    log(f"uniform nested trained {steps} steps in {time.perf_counter() - t:.1f}s")
    rows += evaluate("uniform", mf.elastic, uniform_cfgs, lut, space, blocks, cfg, full_lat)

    # export of Flextron's 0.5 sub-network: exactness and speed-up over the full parent
    probe = blocks[0]["input_ids"][:2]
    report = export_subnetwork(fx.elastic, fx_cfgs[0.5], work / "export_b0.5", probe_ids=probe)
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(work / "export_b0.5", dtype=torch.float32).eval()
    full_plain = load_causal_lm(parent).eval()
    t_full = time_plain(full_plain, cfg["seq"], cfg["reps"] * 2)
    t_exp = time_plain(exported, cfg["seq"], cfg["reps"] * 2)
    log(f"export 0.5: {report['architecture']} {report['parameters']} params, max |dlogit| "
        f"{report['max_abs_logit_diff_vs_masked_elastic']:.2e}, speed-up {t_full / t_exp:.2f}x")

    # wall-clock of input-adaptive routing: a DynamicRouter picks per-sequence widths, which run as
    # masks over the full network (batched inputs cannot share one slice), so no time is saved
    from lightning_modules.flextron.routers import DynamicRouter, sample_choices, widths_to_masks

    dyn = DynamicRouter(fx.elastic.spec.hidden_size, BUDGETS, space.num_layers, len(space.mlp), len(space.attn)).eval()
    ids = torch.randint(0, fx.model.config.vocab_size, (1, cfg["seq"]))
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dyn_ts = []
    with torch.no_grad():
        for _ in range(cfg["reps"] + 1):
            t = time.perf_counter()
            lm_, la_ = dyn(fx.model.get_input_embeddings()(ids), 0.5)
            fx.elastic.set_masks(widths_to_masks(sample_choices(lm_, 1.0, False), space.unit_masks("mlp")),
                                 widths_to_masks(sample_choices(la_, 1.0, False), space.unit_masks("attn")))
            fx.model(input_ids=ids, use_cache=False)
            fx.elastic.set_subnet(None)
            dyn_ts.append(time.perf_counter() - t)
    torch.set_num_threads(old_threads)
    dyn_prefill = min(dyn_ts[1:])
    log(f"dynamic router (per-sequence masks) prefill {dyn_prefill * 1e3:.2f} ms vs full "
        f"{full_lat['prefill_s'] * 1e3:.2f} ms")

    def pick(name, b):
        return next(r for r in rows if r["method"] == name and r["budget"] == b)

    # the smallest reachable fraction: every layer at its narrowest width (fixed costs remain)
    floor = float(lut.fixed + lut.mlp[:, 0].sum() + lut.attn[:, 0].sum()) / lut.full
    def errors(name: str) -> dict:
        err = {b: abs(pick(name, b)["realized_table"] / b - 1) for b in BUDGETS + BETWEEN}
        reach = [err[b] for b in BUDGETS if b >= floor]
        return {"budget_error_max": max(err[b] for b in BUDGETS),
                "budget_error_max_reachable": max(reach) if reach else None,
                "budget_error_between_max": max(err[b] for b in BETWEEN),
                "overshoot_max_reachable": max([pick(name, b)["realized_table"] / b - 1 for b in BUDGETS + BETWEEN
                                                if b >= floor] or [0.0]),
                "realized_table": {str(b): pick(name, b)["realized_table"] for b in BUDGETS + BETWEEN},
                "ppl": {str(b): pick(name, b)["ppl"] for b in BUDGETS + BETWEEN}}

    fx_err, am_err = errors("flextron"), errors("flextron_argmax")
    lut_err = [r["lut_rel_error"] for r in rows]
    workload = (f"{'quick: tiny Llama pretrained here' if args.quick else 'full: SmolLM2-135M'}; "
                f"{steps} elastic-training steps x {cfg['batch']}x{cfg['block']} tokens for (a) and (d); "
                f"latency: prefill {cfg['seq']} tokens + decode at {cfg['seq']} context, batch 1, 1 CPU thread; "
                f"budget metric latency_prefill (table)")
    summary = {
        "mode": "quick" if args.quick else "full",
        "workload": workload,
        "device": "cpu",
        "parent": parent if not args.quick else "tiny llama (4 layers, hidden 128) pretrained on Shakespeare bytes",
        "budgets": BUDGETS, "between_budgets": BETWEEN,
        "parent_ppl": parent_ppl, "flextron_full_ppl": fx_full_ppl,
        "full_ppl_rel_change": fx_full_ppl / parent_ppl - 1,
        "routing": "constrained (slack 0.03); baseline: argmax of the same router",
        "budget_error_max": fx_err["budget_error_max"], "budget_floor": floor,
        "budget_error_max_reachable": fx_err["budget_error_max_reachable"],
        "budget_error_between_max": fx_err["budget_error_between_max"],
        "clamped_budgets": clamped,
        "flextron_constrained": fx_err, "flextron_argmax": am_err,
        "lut_rel_error_max": max(lut_err), "lut_rel_error_mean": statistics.mean(lut_err),
        "export_max_abs_logit_diff": report["max_abs_logit_diff_vs_masked_elastic"],
        "export_architecture": report["architecture"], "export_parameters": report["parameters"],
        "parent_parameters": report["parent_parameters"],
        "dynamic_router_masked_prefill_s": dyn_prefill,
        "dynamic_router_prefill_vs_full": dyn_prefill / full_lat["prefill_s"],
        "export_prefill_s": t_exp, "full_prefill_s": t_full, "export_speedup_at_0.5": t_full / t_exp,
        "ppl_ratio_flextron_vs_importance": {str(b): pick("flextron", b)["ppl"] / pick("importance", b)["ppl"] for b in BUDGETS},
        "ppl_ratio_flextron_vs_uniform": {str(b): pick("flextron", b)["ppl"] / pick("uniform", b)["ppl"] for b in BUDGETS},
        "latency_table": lut.to_dict(), "space": {"mlp": space.mlp, "attn": space.attn},
        "rows": rows, "seconds": time.perf_counter() - t0,
    }
    out = Path(args.out)
    atomic_write_json(out, summary)
    plot(rows, out.with_suffix(".png"), workload)
    keys = ["full_ppl_rel_change", "budget_error_max", "budget_floor", "budget_error_max_reachable", "budget_error_between_max", "lut_rel_error_max",
            "export_max_abs_logit_diff", "export_speedup_at_0.5", "clamped_budgets", "seconds"]
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    print(json.dumps({"flextron_constrained": fx_err, "flextron_argmax": am_err}, indent=2))
    print(json.dumps({"ppl_ratio_flextron_vs_importance": summary["ppl_ratio_flextron_vs_importance"],
                      "ppl_ratio_flextron_vs_uniform": summary["ppl_ratio_flextron_vs_uniform"]}, indent=2))
    log(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
