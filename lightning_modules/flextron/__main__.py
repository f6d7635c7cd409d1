"""Command line: export a trained Flextron sub-network as a stand-alone Hugging Face model.

    python -m lightning_modules.flextron export --checkpoint runs/.../last.ckpt --budget 0.5 --out exported/b0.5

The folder loads with ``AutoModelForCausalLM.from_pretrained(out)`` (uniform widths: a stock
architecture; per-layer widths: add ``trust_remote_code=True`` or ``import lightning_modules.flextron``
first). ``flextron_export.json`` inside records the widths, parameter count, realized budget and the
largest logit difference to the masked elastic forward.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_modules.flextron")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write the static router's sub-network for a budget")
    ex.add_argument("--checkpoint", required=True, help="a FlextronModule Lightning checkpoint (.ckpt)")
    pick = ex.add_mutually_exclusive_group(required=True)
    pick.add_argument("--budget", type=float,
                      help="fraction of the full cost, inside the trained range (static router)")
    pick.add_argument("--subnet", help='a fixed routing as JSON, e.g. \'{"mlp": [384, 768], "attn": [1, 2]}\' '
                      "(widths in neurons / KV groups per layer; optional \"skip\"): for dynamic routers or by hand")
    ex.add_argument("--routing", choices=("constrained", "argmax"), default=None,
                    help="with --budget: most probable widths within the budget (constrained) or each layer's argmax, "
                         "which can overshoot (default: the checkpoint's routing setting)")
    ex.add_argument("--clamp", action="store_true",
                    help="with --budget below the narrowest sub-network: export the narrowest one instead of failing")
    ex.add_argument("--out", required=True, help="output folder (created; replaced if it is an earlier export)")
    args = parser.parse_args(argv)

    from pathlib import Path

    import torch

    from .export import export_subnetwork
    from .module import FlextronModule

    ckpt = Path(args.checkpoint)
    if not ckpt.is_file():
        print(f"error: checkpoint {ckpt} not found", file=sys.stderr)
        return 2
    module = FlextronModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False)
    module.eval()
    if module.cost is None:
        module._build_cost_table()
    from .elastic import SubnetConfig

    try:
        if args.subnet is not None:
            cfg = SubnetConfig(**json.loads(args.subnet))
            module.elastic.set_subnet(cfg)  # validates widths against the model
            module.elastic.set_subnet(None)
        else:
            if args.clamp and not module.is_reachable(args.budget):
                print(f"warning: budget {args.budget} is below the narrowest sub-network; exporting that one "
                      "(realized budget below)", file=sys.stderr)
            cfg = module.subnet_for_budget(args.budget, routing=args.routing, clamp=args.clamp)
    except (ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    tokens = torch.randint(0, module.model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    report = export_subnetwork(module.elastic, cfg, args.out, probe_ids=tokens, extra={
        "budget_requested": args.budget, "budget_metric": module.hparams.budget_metric,
        "routing": None if args.budget is None else (args.routing or module.hparams.get("routing", "constrained")),
        "budget_realized": _realized(module, cfg), "checkpoint": str(ckpt)})
    if module.tokenizer is not None and hasattr(module.tokenizer, "save_pretrained"):
        try:
            module.tokenizer.save_pretrained(args.out)
        except Exception as error:  # byte tokenizers of tests may not serialise; the weights are what matter
            print(f"warning: tokenizer not saved ({error})", file=sys.stderr)
    print(json.dumps({k: report[k] for k in ("architecture", "parameters", "parent_parameters", "budget_requested",
                                             "budget_realized", "max_abs_logit_diff_vs_masked_elastic")}, indent=2))
    return 0


def _realized(module, cfg) -> float | None:
    """Cost fraction of ``cfg`` when its widths are among the trained choices (else None)."""
    try:
        return module.realized(cfg)
    except ValueError:
        return None


if __name__ == "__main__":
    sys.exit(main())
