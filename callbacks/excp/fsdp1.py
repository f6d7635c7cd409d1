"""ExCP under Lightning's ``FSDPStrategy`` (torch FSDP1) with ``state_dict_type="full"``: loading through the codec.

Saving needs nothing: with ``"full"`` Lightning gathers the model and optimizer state on rank 0 and writes it
through the CheckpointIO (``strategies/fsdp.py`` ``save_checkpoint`` -> ``Strategy.save_checkpoint``), so ExCP
compresses it as under DDP. Lightning's loader reads a full checkpoint with ``_lazy_load`` instead of the
CheckpointIO, so :func:`load_full_state` does, for a checkpoint ExCP decoded, what its full-checkpoint branch
does for a path (``FSDPStrategy.load_checkpoint``), with Lightning's and torch's own helpers.
``"sharded"`` checkpoints are written by ``torch.distributed.checkpoint`` and never reach the CheckpointIO:
:mod:`callbacks.excp.sharded` refuses them.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import FSDPStrategy

from common.errors import UserFacingError


def load_full_state(strategy: FSDPStrategy, checkpoint: dict[str, Any]) -> None:
    """Load a full (gathered) Lightning checkpoint into the FSDP1-wrapped model and, when fitting, its optimizers.

    Every rank holds the whole decoded checkpoint, as with Lightning's own loader (``rank0_only=False``). The
    model's entry is popped, as there (``load_model_state_dict`` is a no-op under FSDP).
    """
    from lightning.fabric.strategies.fsdp import _get_full_state_dict_context
    from lightning.fabric.strategies.model_parallel import _load_raw_module_state, _rekey_optimizer_state_if_needed
    from lightning.pytorch.trainer.states import TrainerFn
    from torch.distributed.fsdp import FullyShardedDataParallel

    module, lightning_module = strategy.model, strategy.lightning_module
    assert module is not None and lightning_module is not None
    _load_raw_module_state(
        checkpoint.pop("state_dict"), module=module, world_size=strategy.world_size,
        strict=lightning_module.strict_loading,
    )
    optimizer_states = checkpoint.get("optimizer_states")
    if optimizer_states is None or lightning_module.trainer.state.fn != TrainerFn.FITTING:
        return
    if len(strategy.optimizers) != len(optimizer_states):
        raise UserFacingError(
            f"The checkpoint holds {len(optimizer_states)} optimizer states but {len(strategy.optimizers)} optimizers "
            "are configured: resume with the same optimizers"
        )
    with _get_full_state_dict_context(module, world_size=strategy.world_size, rank0_only=False):
        for optimizer, state in zip(strategy.optimizers, optimizer_states, strict=True):
            state = _rekey_optimizer_state_if_needed(state, module)  # saved keyed by parameter index
            state = FullyShardedDataParallel.optim_state_dict_to_load(model=module, optim=optimizer,
                                                                      optim_state_dict=state)
            optimizer.load_state_dict(state)
