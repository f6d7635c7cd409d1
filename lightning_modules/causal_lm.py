"""A LightningModule around any Hugging Face causal LM: (continued) pretraining and evaluation."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric
from typing_extensions import override

from common.errors import UserFacingError
from common.hf_loading import BYTE_TOKENIZER, load_causal_lm, load_tokenizer
from lightning_modules.param_groups import decay_split
from lightning_modules.schedules import warmup_cosine
from lightning_modules.sharding import clip_grad_norm, configure_sharding

OPTIMIZERS = ("adamw", "adamw8bit")


class CausalLMModule(L.LightningModule):
    """Trains a causal LM on ``{"input_ids", "labels"}`` batches and reports loss and perplexity.

    The model is built in ``__init__`` from the saved hyperparameters, so a checkpoint alone rebuilds
    the module (``CausalLMModule.load_from_checkpoint(path)``).

    Args:
        model: Alias (``smollm2-135m-instruct``), Hub id, local directory or ``.gguf`` file.
        model_config: Inline config for a randomly initialised model; used when ``model`` is None.
        tokenizer: Tokenizer name; defaults to ``model``, or the offline byte tokenizer for inline configs.
        learning_rate: Peak learning rate reached after warmup.
        weight_decay: Decoupled weight decay; never applied to biases and norm weights.
        betas: Adam betas. (0.9, 0.95) is the usual LLM choice.
        warmup_steps: Linear warmup length in optimizer steps.
        min_lr_ratio: Cosine schedule floor, as a fraction of ``learning_rate``.
        optimizer: ``adamw`` (torch) or ``adamw8bit`` (bitsandbytes 8-bit states, CUDA or CPU) to save optimizer memory.
        seed: Seeds the initialisation of an inline-config model.
    """

    def __init__(
        self,
        model: str | None = "smollm2-135m-instruct",
        model_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        learning_rate: float = 3e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 10,
        min_lr_ratio: float = 0.1,
        optimizer: str = "adamw",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise UserFacingError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise UserFacingError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.save_hyperparameters()
        self.model = load_causal_lm(model, model_config=model_config, seed=seed)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps submodules' modes as found
        tokenizer_name = tokenizer or (model if model is not None else BYTE_TOKENIZER)
        self.tokenizer = load_tokenizer(tokenizer_name)
        if self.tokenizer.vocab_size > self.model.config.vocab_size:
            raise UserFacingError(
                f"tokenizer {tokenizer_name!r} has {self.tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{self.model.config.vocab_size}: raise vocab_size in model_config or pick a matching tokenizer"
            )
        self.val_loss = MeanMetric()

    @override
    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``: FSDP2 per decoder layer, then the root (a no-op otherwise)."""
        configure_sharding(self, shard=[self.model])

    @override
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        return self.model(input_ids=input_ids, labels=labels, **kwargs)

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        batch_size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        # Perplexity is derived from the loss: log it only on the steps the logger writes, since every
        # self.log call costs ~1.5 ms, which small models notice (bench/train_overhead.py).
        if self.trainer.logger is not None and (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log("train/ppl", torch.exp(loss.detach()), batch_size=batch_size)
        return loss

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self._loss(batch)
        tokens = (batch["labels"][:, 1:] != -100).sum()
        self.val_loss.update(loss.detach(), weight=tokens)

    def _compute_and_reset_loss(self) -> torch.Tensor:
        # Token-weighted mean over every rank's batches (torchmetrics syncs across ranks).
        loss = self.val_loss.compute()
        # Evaluation runs under inference mode; fresh states made there could not be updated later in a
        # fit's no-grad validation, so they are created outside it.
        with torch.inference_mode(False):
            self.val_loss.reset()
        return loss

    @override
    def on_validation_epoch_end(self) -> None:
        loss = self._compute_and_reset_loss()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", torch.exp(loss))

    @override
    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    @override
    def on_test_epoch_end(self) -> None:
        loss = self._compute_and_reset_loss()
        self.log("test/loss", loss)
        self.log("test/ppl", torch.exp(loss))

    def _parameter_groups(self) -> list[dict[str, Any]]:
        decay, no_decay = decay_split(self.model)
        return [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def _make_optimizer(self) -> torch.optim.Optimizer:
        kwargs = {"lr": self.hparams.learning_rate, "betas": tuple(self.hparams.betas)}
        if self.hparams.optimizer == "adamw8bit":
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(self._parameter_groups(), **kwargs)
        return torch.optim.AdamW(self._parameter_groups(), **kwargs)

    @override
    def configure_gradient_clipping(
        self, optimizer: Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Lightning's default, but norm clipping under FSDP1 too (its precision plugin refuses it: see sharding)."""
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            clip_grad_norm(self, optimizer, gradient_clip_val, shard=[self.model])
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    @override
    def configure_optimizers(self) -> Any:
        optimizer = self._make_optimizer()
        total = max(1, int(self.trainer.estimated_stepping_batches))
        hp = self.hparams
        scheduler = LambdaLR(optimizer, lambda step: warmup_cosine(step, hp.warmup_steps, total, hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
