"""The loss surrogate engages at any loss scale, and then steers the routers toward their budgets."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from common.hf_loading import tiny_llama_config
from datamodules.text import TextDataModule
from lightning_modules.flextron.module import FlextronModule
from lightning_modules.flextron.routers import LossSurrogate


def _fit_synthetic(scale: float, steps: int = 80) -> list[float]:
    """Fit a surrogate online to losses that depend on the chosen widths, plus noise, times ``scale``."""
    torch.manual_seed(0)
    surrogate = LossSurrogate(2 * (3 + 2), hidden=64)
    optimizer = torch.optim.Adam(surrogate.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    errors = []
    for _ in range(steps):
        mlp = torch.nn.functional.one_hot(torch.randint(3, (2,), generator=gen), 3).float()
        attn = torch.nn.functional.one_hot(torch.randint(2, (2,), generator=gen), 2).float()
        # narrower widths (lower index) cost more loss; a small per-batch noise on top
        loss = 2.0 - 0.5 * mlp.argmax(-1).sum() - 0.3 * attn.argmax(-1).sum() + 0.05 * torch.randn((), generator=gen)
        fit = surrogate.fit_loss(mlp[None], attn[None], (scale * loss)[None])
        optimizer.zero_grad()
        fit.backward()
        optimizer.step()
        errors.append(float(surrogate.rel_error))
    return errors


def test_readiness_is_scale_free_so_distillation_losses_engage():
    kd_scale, lm_scale = _fit_synthetic(1e-3), _fit_synthetic(1.0)  # losses near 0.002 and near 2
    assert kd_scale[-1] < 0.5 and lm_scale[-1] < 0.5
    assert abs(kd_scale[-1] - lm_scale[-1]) < 0.05
    assert all(e == float("inf") for e in kd_scale[:5])  # not ready before it has seen a few losses


class _Trace(Callback):
    """Records the surrogate's error, the observed loss and each budget's expected cost after every step."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, float, dict[float, float]]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        with torch.no_grad():
            costs = {b: float(module.cost.expected(*(x.softmax(-1) for x in module.router(b))) / module.cost.full)
                     for b in module.budgets}
        self.rows.append((float(module.surrogate.rel_error), float(trainer.callback_metrics["train/loss"]), costs))


def test_routers_move_toward_their_budgets_in_surrogate_mode():
    torch.manual_seed(0)
    module = FlextronModule(model=None, model_config=tiny_llama_config(), tokenizer="byt5", budgets=[0.5, 0.7, 1.0],
                            budget_metric="params", mlp_ratios=[0.0, 0.25, 0.5, 1.0], attn_ratios=[0.0, 0.5, 1.0],
                            router_update="surrogate", elastic_steps=0, router_steps=50, calibration_batches=0,
                            full_prob=0.0)
    data = TextDataModule(tokenizer="byt5", block_size=32, batch_size=4, max_tokens=20000, val_fraction=0.05)
    trace = _Trace()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=50, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[trace])
    trainer.fit(module, data)
    errors, losses, costs = zip(*trace.rows, strict=True)
    assert max(losses) < 0.05  # a distillation loss on the scale where the old criterion never engaged
    assert min(errors) < module.hparams.surrogate_threshold  # the surrogate got ready ...
    start, end = costs[0], costs[-1]
    for budget in (0.5, 1.0):  # ... and the routers moved toward each budget
        assert abs(end[budget] - budget) < abs(start[budget] - budget) - 0.05, (budget, start, end)
