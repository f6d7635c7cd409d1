"""An API key given to the honesty probe never reaches its hparams, a checkpoint or the logger's config."""

from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

from lightning_modules.probes.honesty.probe import REDACTED, HonestyProbe

SECRET = "sk-test-0123456789-do-not-leak"


class _ConfigCapture(Logger):
    """What a W&B logger would upload as the run config."""

    def __init__(self) -> None:
        super().__init__()
        self.config: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return "capture"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        self.config.update(dict(params))

    def log_metrics(self, metrics, step=None) -> None:
        pass


def _probe() -> HonestyProbe:
    spec = {"kind": "openai", "label": "api", "model": "m", "base_url": "http://127.0.0.1:9", "api_key": SECRET}
    return HonestyProbe(models=[spec], methods=["letter"], plots=False)


def test_api_key_is_used_but_never_saved(tmp_path):
    probe = _probe()
    assert probe.model_specs[0]["api_key"] == SECRET  # the backend still gets the real key
    assert probe.hparams["models"][0]["api_key"] == REDACTED
    assert SECRET not in repr(dict(probe.hparams)) and SECRET not in repr(dict(probe.hparams_initial))

    capture = _ConfigCapture()
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        logger=capture,
        limit_test_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.test(probe, dataloaders=DataLoader([], collate_fn=list))
    assert capture.config["models"][0]["api_key"] == REDACTED
    assert SECRET not in repr(capture.config)

    trainer.save_checkpoint(tmp_path / "probe.ckpt")
    raw = (tmp_path / "probe.ckpt").read_bytes()
    assert SECRET.encode() not in raw
    ckpt = torch.load(tmp_path / "probe.ckpt", weights_only=False)
    assert ckpt["hyper_parameters"]["models"][0]["api_key"] == REDACTED
