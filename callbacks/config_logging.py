"""Give every logger the run's complete, resolved config, not only the module's hyperparameters.

Lightning logs ``save_hyperparameters()`` of the model and data; the trainer settings, the callbacks
(ExCP's codec settings among them) and the seed would be missing from a W&B run, so the run could not
be reproduced from its page. This callback, installed by ``train.py`` as LightningCLI's config
callback, logs the whole config under ``config`` and attaches the YAML file to a W&B run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override

from common.atomic import atomic_write_text

CONFIG_KEY = "config"
ATTACHED_NAME = "lightning_config.yaml"


class LogConfigToLoggers(SaveConfigCallback):
    """``SaveConfigCallback`` that also logs the resolved config to every logger and attaches it to W&B.

    The config goes under one key (``config``) so it cannot collide with the module's own hyperparameter
    names (``model`` is both a config section and ``CausalLMModule``'s model name).
    """

    def resolved_config(self) -> dict[str, Any]:
        """The config as the parser would write it (every default filled in), as plain data."""
        return yaml.safe_load(self.parser.dump(self.config, skip_none=False))

    @override
    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        config = self.resolved_config()
        for logger in trainer.loggers:
            logger.log_hyperparams({CONFIG_KEY: config})
            if isinstance(logger, WandbLogger):
                _attach_to_wandb(logger, self.parser.dump(self.config, skip_none=False))


def _attach_to_wandb(logger: WandbLogger, text: str) -> None:
    """Files in the W&B run's ``files`` folder are uploaded with the run (now, or by ``wandb sync``)."""
    run_files = Path(logger.experiment.dir)
    atomic_write_text(run_files / ATTACHED_NAME, text)
