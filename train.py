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


class LumenCLI(LightningCLI):
    """LightningCLI that ends a fit with a short summary of where everything went."""

    def _parse_ckpt_path(self) -> None:
        """LightningCLI ``torch.load``s ``--ckpt_path`` for its hyperparameters: let it read ExCP files too."""
        from callbacks.excp import read_excp_checkpoints

        with read_excp_checkpoints():
            super()._parse_ckpt_path()

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
            print(f"error: {concise_parse_error(str(error))} (`python train.py fit --help` lists the options; "
                  f"{SHOW_TRACEBACK}=1 shows the traceback)", file=sys.stderr)
        else:
            raise
        sys.exit(2)


if __name__ == "__main__":
    main()
