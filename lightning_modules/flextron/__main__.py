"""Command line: export a trained Flextron sub-network as a stand-alone Hugging Face model.

    python -m lightning_modules.flextron export --checkpoint runs/.../last.ckpt --budget 0.5 --out exported/b0.5

    python -m lightning_modules.flextron export --checkpoint runs/.../last.ckpt --dynamic --budget 0.6 --out dyn

The folder loads with ``AutoModelForCausalLM.from_pretrained(out)`` (uniform widths: a stock
architecture; per-layer widths: add ``trust_remote_code=True`` or ``import lightning_modules.flextron``
first). ``flextron_export.json`` inside records the widths, parameter count, realized budget and the
largest logit difference to the masked elastic forward.

``--dynamic`` (a per-sequence dynamic router) writes the full nested weights and the router as one
folder that loads with ``trust_remote_code=True`` and runs every prompt at the sliced widths its
router picks; ``--budget`` is then the default budget, and callers may pass ``budget=`` to ``forward``
and ``generate``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.errors import UserFacingError


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
    ex.add_argument("--dynamic", action="store_true",
                    help="with --budget (the default budget): export the dynamic router with the full nested weights "
                         "as one folder that routes every prompt (trust_remote_code)")
    ex.add_argument("--out", required=True, help="output folder (created; replaced if it is an earlier export)")
    args = parser.parse_args(argv)
    try:
        summary = export(args)
    except UserFacingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def _load_module(path: Path):
    """The FlextronModule of a checkpoint, with its cost table; any failure to read it is one clear error."""
    from .module import FlextronModule

    if not path.is_file():
        raise UserFacingError(f"checkpoint {path} not found")
    try:
        module = FlextronModule.load_from_checkpoint(path, map_location="cpu", weights_only=False)
    except UserFacingError:
        raise
    except Exception as error:  # a torn file, a foreign checkpoint, missing hyperparameters: all unreadable here
        raise UserFacingError(f"cannot load {path} as a FlextronModule checkpoint ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else 'no detail'})") from error
    module.eval()
    if module.cost is None:
        module.build_cost_table()
    return module


def _chosen_subnet(module, args: argparse.Namespace):
    """The sub-network named by ``--subnet`` (validated against the model) or routed for ``--budget``."""
    from .elastic import SubnetConfig
    from .routers import StaticRouter

    if args.subnet is not None:
        try:
            cfg = SubnetConfig(**json.loads(args.subnet))
            module.elastic.set_subnet(cfg)  # validates widths against the model
        except (ValueError, TypeError) as error:
            raise UserFacingError(f"--subnet {args.subnet}: {error}") from error
        finally:
            module.elastic.set_subnet(None)
        return cfg
    if not isinstance(module.router, StaticRouter):
        raise UserFacingError("this checkpoint has a dynamic router, which picks widths per input: pass --dynamic to "
                              "export it with the nested weights, or --subnet for one fixed routing")
    if not args.clamp and args.budget < module.budgets[0]:
        reach = "reachable" if module.is_reachable(args.budget) else "below the narrowest sub-network"
        raise UserFacingError(
            f"budget {args.budget:g} is below the trained range (from {module.budgets[0]:g}) and {reach} "
            f"(floor {module.budget_floor():.3f}): pass --clamp to export the closest sub-network")
    if args.clamp and not module.is_reachable(args.budget):
        print(f"warning: budget {args.budget:g} is below the narrowest sub-network ({module.budget_floor():.3f}); "
              "exporting that one", file=sys.stderr)
    elif args.clamp and args.budget < module.budgets[0]:
        print(f"warning: budget {args.budget:g} is below the trained range; routing it with budget "
              f"{module.budgets[0]:g}'s widths under the requested cost", file=sys.stderr)
    return module.subnet_for_budget(args.budget, routing=args.routing, clamp=args.clamp)


def export(args: argparse.Namespace) -> dict:
    """Run ``export``; returns the summary printed on success, raises :class:`UserFacingError` otherwise."""
    import torch

    from .export import export_subnetwork

    ckpt = Path(args.checkpoint)
    if args.dynamic and (args.budget is None or args.routing or args.clamp):
        raise UserFacingError("--dynamic takes --budget (the default budget, inside the trained range) and neither "
                              "--subnet, --routing nor --clamp")
    module = _load_module(ckpt)
    if args.dynamic:
        return _export_dynamic(module, args, ckpt)
    cfg = _chosen_subnet(module, args)
    tokens = torch.randint(0, module.model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    routing = None if args.budget is None else (args.routing or module.hparams.get("routing", "constrained"))
    report = export_subnetwork(module.elastic, cfg, args.out, probe_ids=tokens, extra={
        "budget_requested": args.budget, "budget_metric": module.hparams.budget_metric, "routing": routing,
        "budget_realized": _realized(module, cfg), "checkpoint": str(ckpt)})
    _save_tokenizer(module, args.out)
    keys = ("architecture", "parameters", "parent_parameters", "budget_requested", "budget_realized",
            "max_abs_logit_diff_vs_masked_elastic")
    return {k: report[k] for k in keys}


def _export_dynamic(module, args: argparse.Namespace, ckpt: Path) -> dict:
    """``--dynamic``: nested weights + router as one folder; returns the summary printed on success."""
    from .export_dynamic import export_dynamic

    report = export_dynamic(module, args.out, args.budget, extra={
        "budget_metric": module.hparams.budget_metric, "checkpoint": str(ckpt)})
    _save_tokenizer(module, args.out)
    keys = ("architecture", "parameters", "router_parameters", "budget_default", "budgets_trained", "probe_realized",
            "max_abs_logit_diff_vs_module_routed")
    return {k: report[k] for k in keys}


def _save_tokenizer(module, out: str) -> None:
    """Save the module's tokenizer into the export folder (a warning, not a failure, when it cannot)."""
    if module.tokenizer is not None and hasattr(module.tokenizer, "save_pretrained"):
        try:
            module.tokenizer.save_pretrained(out)
        except Exception as error:  # byte tokenizers of tests may not serialise; the weights are what matter
            print(f"warning: tokenizer not saved ({error})", file=sys.stderr)


def _realized(module, cfg) -> float | None:
    """Cost fraction of ``cfg`` when its widths are among the trained choices (else None)."""
    try:
        return module.realized(cfg)
    except ValueError:
        return None


if __name__ == "__main__":
    sys.exit(main())
