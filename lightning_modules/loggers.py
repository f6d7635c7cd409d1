"""W&B logging that works on a machine with no account and no network."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from common.errors import UserFacingError

#: What a ``save_dir`` of None means outside ``train.py`` (which puts logs under ``default_root_dir``).
DEFAULT_SAVE_DIR = "."


def wandb_credentials_available() -> bool:
    """Whether ``wandb`` would find an API key (environment or ``~/.netrc``) without asking anyone."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


class AutoWandbLogger(WandbLogger):
    """A ``WandbLogger`` that logs online when an account is configured and offline otherwise.

    Offline runs keep everything in a local run folder that ``wandb sync <folder>`` uploads later, so
    a run never blocks on a login prompt or a missing network.

    Args:
        offline: Force offline (True) or online (False); None decides from the credentials found and
            ``WANDB_MODE``.
        project: W&B project name.
        save_dir: Parent folder of the local ``wandb/`` run folders; None: the Trainer's
            ``default_root_dir`` when built by ``train.py`` (the current folder otherwise).
        **kwargs: Passed to ``WandbLogger`` (name, tags, log_model, entity, ...).
    """

    def __init__(self, offline: bool | None = None, project: str = "lumenlm", save_dir: str | None = None,
                 **kwargs: Any) -> None:
        save_dir = save_dir or DEFAULT_SAVE_DIR
        try:
            import wandb  # noqa: F401
        except ImportError as error:
            raise UserFacingError(
                "W&B logging needs the `wandb` package: `pip install wandb`, or log to CSV files with "
                "`--config configs/trainer/csv_logger.yaml`"
            ) from error
        mode = os.environ.get("WANDB_MODE", "")
        if offline is None:
            offline = mode in ("offline", "dryrun") or not wandb_credentials_available()
            if offline and mode not in ("offline", "dryrun"):
                rank_zero_info(
                    f"W&B: no API key found (run `wandb login` or set WANDB_API_KEY): logging offline under "
                    f"{save_dir}/wandb; upload later with `wandb sync {save_dir}/wandb/offline-run-*`"
                )
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(offline=offline, project=project, save_dir=save_dir, **kwargs)


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` whose folder defaults to the run's own: no second path to keep in sync in configs.

    Args:
        save_dir: Parent folder of the ``name/version_N`` folders; None: the Trainer's ``default_root_dir``
            when built by ``train.py`` (the current folder otherwise).
        name: Sub-folder for this experiment.
        **kwargs: Passed to ``CSVLogger`` (version, prefix, flush_logs_every_n_steps).
    """

    def __init__(self, save_dir: str | None = None, name: str = "csv", **kwargs: Any) -> None:
        super().__init__(save_dir=save_dir or DEFAULT_SAVE_DIR, name=name, **kwargs)
