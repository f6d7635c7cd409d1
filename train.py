"""Train, validate, test or run prediction with any component of the framework, from YAML configs.

    python train.py fit --config configs/quickstart.yaml
    python train.py fit --config configs/quickstart.yaml --config configs/trainer/ddp.yaml
    python train.py fit --config configs/quickstart.yaml --print_config

Model and data are chosen by ``class_path``/``init_args``, so any LightningModule or
LightningDataModule (ours or yours) plugs in by config alone.
"""

from __future__ import annotations

import os
import re
import sys
from argparse import ArgumentError
from collections.abc import Sequence
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from common.errors import UserFacingError

SHOW_TRACEBACK = "LUMENLM_TRACEBACK"
_CKPT_PATH_KEYWORDS = ("last", "best", "hpc")


def _has_excp_callback(subcommand_config: Any) -> bool:
    callbacks = (subcommand_config.get("trainer") or {}).get("callbacks") or []
    return any(str(getattr(c, "class_path", "")).rpartition(".")[2] == "ExCP" for c in callbacks)


class LumenCLI(LightningCLI):
    """LightningCLI that ends a fit with a short summary of where everything went."""

    def _parse_ckpt_path(self) -> None:
        """Read ``--ckpt_path``'s hyperparameters through the ExCP codec (ExCP or plain, safely).

        The one private LightningCLI hook this project overrides (tests/test_train_ckpt_path.py fails
        loudly if Lightning renames or changes it): LightningCLI ``torch.load``s the file here, which
        can neither read ExCP files nor report a bad file in one line. The merge below is Lightning's.
        """
        from callbacks.excp import is_excp_file, read_hyperparameters

        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or (ckpt_path in _CKPT_PATH_KEYWORDS or str(ckpt_path).startswith("registry")):
            return
        if not os.path.exists(ckpt_path):
            raise UserFacingError(f"--ckpt_path {ckpt_path} does not exist; pass a checkpoint file (or 'last')")
        if is_excp_file(ckpt_path) and not _has_excp_callback(self.config[subcommand]):
            raise UserFacingError(
                f"--ckpt_path {ckpt_path} is an ExCP file: add the callbacks.excp.ExCP callback to the config, "
                "or write it back as a .ckpt with `python -m callbacks.excp decompress`"
            )
        hparams = read_hyperparameters(ckpt_path)
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def after_fit(self) -> None:
        self._print_summary()

    @rank_zero_only
    def _print_summary(self) -> None:
        trainer = self.trainer
        lines = ["", "Run summary"]
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and getattr(checkpoint, "dirpath", None):
            lines.append(f"  checkpoints: {checkpoint.dirpath}")
            if checkpoint.last_model_path:
                lines.append(f"  last checkpoint: {checkpoint.last_model_path}")
        if trainer.logger is not None:
            from common.run_outputs import run_directory

            lines.append(f"  run folder: {run_directory(trainer)}")
        for callback in trainer.callbacks:
            summary = getattr(callback, "run_summary", None)
            if callable(summary):
                lines.extend(f"  {line}" for line in summary())
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/loss"))}
        if metrics:
            lines.append("  " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())))
        print("\n".join(lines))


def build_cli(args: Sequence[str] | None = None, run: bool = True, **kwargs: Any) -> LightningCLI:
    """Build the CLI; ``run=False`` only parses and instantiates (used by the config tests).

    Parse errors raise instead of exiting, so that ``main`` can print them as one line.
    """
    parser_kwargs = {"exit_on_error": False, **kwargs.pop("parser_kwargs", {})}
    return LumenCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs=parser_kwargs,
        args=list(args) if args is not None else None,
        run=run,
        **kwargs,
    )


def user_facing_cause(error: BaseException) -> UserFacingError | None:
    """Our own error hidden under the parser's wrapping, if the failure started with one."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, UserFacingError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


_SPECIFIC_PARSE_PROBLEMS = re.compile(
    r"(Option '[^']+' is not accepted|Key '[^']+' is not expected|unrecognized arguments:.*|No module named .*|"
    r"Problem with given class_path '[^']+'|does not exist.*|Expected a .*)"
)


def concise_parse_error(message: str) -> str:
    """One line out of jsonargparse's nested report: the config key and the most specific problem."""
    key = re.search(r'Parser key "([^"]+)"', message)
    problems = [m.group(0).strip() for line in message.splitlines() if (m := _SPECIFIC_PARSE_PROBLEMS.search(line))]
    specific = next((p for p in problems if not p.startswith(("Problem with", "Expected a"))), None)
    class_path = next((p for p in problems if p.startswith("Problem with")), None)
    if specific is None:
        return " ".join(message.split())[:300]
    where = f"{key.group(1)}: " if key else ""
    owner = f" (in {class_path.split(chr(39))[1]})" if class_path else ""
    return f"{where}{specific}{owner}"


def main(args: Sequence[str] | None = None) -> None:
    try:
        build_cli(args)
    except (UserFacingError, ArgumentError, TypeError, ValueError) as error:
        if os.environ.get(SHOW_TRACEBACK):
            raise
        cause = user_facing_cause(error)
        if cause is not None:
            print(f"error: {cause}", file=sys.stderr)
        elif isinstance(error, ArgumentError):
            print(
                f"error: {concise_parse_error(str(error))} (`python train.py fit --help` lists the options; "
                f"{SHOW_TRACEBACK}=1 shows the traceback)",
                file=sys.stderr,
            )
        else:
            raise
        sys.exit(2)


if __name__ == "__main__":
    main()
