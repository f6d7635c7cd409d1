"""Train, validate, test or run prediction with any component of the framework, from YAML configs.

    python train.py fit --config configs/quickstart.yaml
    python train.py fit --config configs/quickstart.yaml --config configs/trainer/ddp.yaml
    python train.py fit --config configs/quickstart.yaml --print_config
    python train.py export --checkpoint runs/quickstart/checkpoints/last.ckpt --out runs/quickstart/hf

Model and data are chosen by ``class_path``/``init_args``, so any LightningModule or
LightningDataModule (ours or yours) plugs in by config alone.
"""

from __future__ import annotations

import argparse
import os
import sys
from argparse import ArgumentError
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from callbacks.config_logging import LogConfigToLoggers
from common.cli_errors import config_problem, exception_chain, first_line, user_facing_cause
from common.errors import UserFacingError
from common.process_group import release_process_group

SHOW_TRACEBACK = "LUMENLM_TRACEBACK"
HELP_HINT = f"`python train.py fit --help` lists the options; {SHOW_TRACEBACK}=1 shows the traceback"
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
        if os.path.isdir(ckpt_path):  # a DeepSpeed checkpoint folder (ExCP-coded or as the engine wrote it)
            from callbacks.excp.deepspeed_files import folder_hyperparameters, has_excp_files

            if has_excp_files(Path(ckpt_path)) and not _has_excp_callback(self.config[subcommand]):
                raise UserFacingError(f"--ckpt_path {ckpt_path} holds ExCP-coded DeepSpeed files: add the "
                                      "callbacks.excp.ExCP callback to the config")
            hparams = folder_hyperparameters(Path(ckpt_path))
        else:
            hparams = read_hyperparameters(ckpt_path)
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    @override
    def before_instantiate_classes(self) -> None:
        _loggers_follow_root_dir(self.config.get(self.subcommand) if self.subcommand else self.config)

    @override
    def instantiate_classes(self) -> None:
        """Build model, data and trainer; a constructor refusing its arguments becomes one line."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, ImportError, MisconfigurationException) as error:
            if user_facing_cause(error) is not None:
                raise
            raise ConfigError(f"{config_problem(error)} ({HELP_HINT})") from error

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
            from common.run_outputs import run_directory, wandb_sync_folder

            lines.append(f"  run folder: {run_directory(trainer)}")
            sync_folder = wandb_sync_folder(trainer)
            if sync_folder is not None:
                lines.append(f"  W&B run: {sync_folder} (upload an offline run with `wandb sync {sync_folder}`)")
        for callback in trainer.callbacks:
            summary = getattr(callback, "run_summary", None)
            if callable(summary):
                lines.extend(f"  {line}" for line in summary())
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/loss"))}
        if metrics:
            lines.append("  " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())))
        print("\n".join(lines))


def _loggers_follow_root_dir(config: Any) -> None:
    """A logger whose ``save_dir`` is None writes under ``trainer.default_root_dir`` (one path per run)."""
    trainer = config.get("trainer") if config is not None else None
    if trainer is None:
        return
    root = trainer.get("default_root_dir") or os.getcwd()
    loggers = trainer.get("logger")
    for spec in loggers if isinstance(loggers, list) else [loggers]:
        init_args = getattr(spec, "init_args", None)
        if init_args is not None and "save_dir" in init_args and init_args.save_dir is None:
            init_args.save_dir = str(root)


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
        save_config_callback=LogConfigToLoggers,
        save_config_kwargs={"overwrite": True},
        parser_kwargs=parser_kwargs,
        args=list(args) if args is not None else None,
        run=run,
        **kwargs,
    )


class ConfigError(UserFacingError):
    """A class named in the config could not be built from its arguments."""


def one_line_error(error: BaseException) -> str | None:
    """The one line to print for a mistake the user can fix, or None for a bug (show the traceback)."""
    cause = user_facing_cause(error)
    if cause is not None:
        return str(cause)
    if isinstance(error, ArgumentError):
        return f"{config_problem(error)} ({HELP_HINT})"
    misconfiguration = next((e for e in exception_chain(error) if isinstance(e, MisconfigurationException)), None)
    if misconfiguration is not None:
        return f"trainer: {first_line(misconfiguration)}"
    return None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint as a dict, from a plain ``.ckpt`` or an ExCP file (no pickled code is run)."""
    from callbacks.excp import is_excp_file, load_checkpoint

    path = Path(path)
    if not path.is_file():
        raise UserFacingError(f"checkpoint {path} does not exist or is not a file")
    if is_excp_file(path):
        return load_checkpoint(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means "not a checkpoint we can read safely"
        raise UserFacingError(f"{path} cannot be read as a checkpoint without running code from it "
                              f"({type(error).__name__}): pass a Lightning .ckpt or an ExCP file") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserFacingError(f"{path} holds no Lightning checkpoint (no state_dict): pass a .ckpt or an ExCP file")
    return checkpoint


def export(argv: Sequence[str]) -> None:
    """``python train.py export``: a checkpoint (plain or ExCP) to a Hugging Face folder."""
    parser = argparse.ArgumentParser(prog="python train.py export",
                                     description="Write a checkpoint's model and tokenizer as a Hugging Face folder.")
    parser.add_argument("--checkpoint", required=True, help="a Lightning .ckpt or ExCP file (e.g. .../last.ckpt)")
    parser.add_argument("--out", required=True, help="folder to write (refused if it exists, unless --force)")
    parser.add_argument("--class-path", default=None, help="LightningModule class when the checkpoint lacks it")
    parser.add_argument("--force", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="also upload to this Hub repo")
    args = parser.parse_args(list(argv))
    from lightning_modules.hf_export import export_hf_folder, push_folder_to_hub

    out = export_hf_folder(read_checkpoint(args.checkpoint), args.out, class_path=args.class_path,
                           overwrite=args.force)
    print(f"exported {args.checkpoint} -> {out} (load with AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    if args.push_to_hub:
        print(f"pushed to {push_folder_to_hub(out, args.push_to_hub)}")


def main(args: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    try:
        if argv[:1] == ["export"]:
            export(argv[1:])
            return
        build_cli(args)
    except Exception as error:
        message = None if os.environ.get(SHOW_TRACEBACK) else one_line_error(error)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
    release_process_group()
