"""ExCP under sharded strategies: what each one writes, and how its checkpoints are read back through the codec.

* ``ModelParallelStrategy`` (FSDP2) with ``save_distributed_checkpoint=False`` gathers the full model and
  optimizer state on rank 0 and saves it through the CheckpointIO, so ExCP compresses it as under DDP. Its
  loader reads files with ``torch.load(mmap=True)`` instead of the CheckpointIO, so :func:`prepare_strategy`
  routes ExCP files through the codec (every rank decodes the chain) and loads the full state into the
  sharded model and optimizer the way Lightning does for a plain full checkpoint.
* ``FSDPStrategy`` (FSDP1) with ``state_dict_type="full"``: the same, rank 0 saves through the CheckpointIO
  and its loader reads with ``_lazy_load``; ExCP files are loaded as in :mod:`callbacks.excp.fsdp1`.
  ``"sharded"`` checkpoints are written and read by ``torch.distributed.checkpoint`` and are refused.
* ``DeepSpeedStrategy`` with ZeRO stage 2 or 3: the engine's checkpoint folders are compressed after it
  writes them and restored before it loads (:mod:`callbacks.excp.deepspeed_strategy`).
* Everything else that saves or loads outside the CheckpointIO is refused at setup in one line.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy

from callbacks.excp.codec import ExCPSettings
from callbacks.excp.deepspeed_strategy import SaveListener, route_deepspeed
from callbacks.excp.fileformat import is_excp_file
from callbacks.excp.fsdp1 import load_full_state as load_fsdp1_full_state
from common.errors import UserFacingError

# Strategies that save or load without going through the strategy's CheckpointIO (by class name, so that
# no optional package such as DeepSpeed is imported to check).
_BYPASSING = {
    "XLAStrategy": "XLA saves through its own xm.save path",
}

# The ZeRO stages whose files callbacks.excp.deepspeed_files maps (and the strategy matrix tests), and why
# ExCP refuses the others.
_DEEPSPEED_STAGES_COMPRESSED = (2, 3)
_DEEPSPEED_STAGES_REFUSED = {
    0: "without ZeRO the engine keeps the plain optimizer state in the module file, which ExCP does not map",
    1: "stage 1 is not tested with ExCP; stage 2 writes the same files and also partitions the gradients",
}


class ExCPStrategyError(UserFacingError):
    """ExCP cannot compress the checkpoints of the configured strategy; the message says what to use."""


def prepare_strategy(strategy: Strategy, settings: ExCPSettings, on_save: SaveListener | None = None) -> None:
    """Refuse strategies ExCP cannot serve; route FSDP/FSDP2 full-state loading and DeepSpeed folders through ExCP."""
    for cls in type(strategy).__mro__:
        if cls.__name__ in _BYPASSING:
            raise ExCPStrategyError(
                f"ExCP cannot compress checkpoints under {type(strategy).__name__}: {_BYPASSING[cls.__name__]}; "
                "or remove the ExCP callback"
            )
    if isinstance(strategy, ModelParallelStrategy):
        if strategy._save_distributed_checkpoint:
            raise ExCPStrategyError(
                "ExCP cannot compress ModelParallelStrategy's distributed (per-rank) checkpoints: set "
                "save_distributed_checkpoint: false (configs/trainer/fsdp2.yaml does) or remove the ExCP callback"
            )
        _route_full_loading(strategy, load_full_state)
    if isinstance(strategy, FSDPStrategy):
        if strategy._state_dict_type != "full":
            raise ExCPStrategyError(
                "ExCP cannot compress FSDPStrategy's sharded checkpoints (torch.distributed.checkpoint writes them, "
                "not the CheckpointIO): set state_dict_type: full (configs/trainer/fsdp.yaml does) or remove the "
                "ExCP callback"
            )
        _route_full_loading(strategy, load_fsdp1_full_state)
    if any(cls.__name__ == "DeepSpeedStrategy" for cls in type(strategy).__mro__):
        stage = strategy.config.get("zero_optimization", {}).get("stage", 0) if strategy.config else 0
        if stage not in _DEEPSPEED_STAGES_COMPRESSED:
            why = _DEEPSPEED_STAGES_REFUSED.get(stage, "its checkpoint files are laid out otherwise and are not mapped")
            raise ExCPStrategyError(
                f"ExCP compresses DeepSpeed checkpoints under ZeRO stages 2 and 3, not stage {stage}: {why}; use "
                "configs/trainer/deepspeed_stage2.yaml or deepspeed_stage3.yaml, or remove the ExCP callback"
            )
        route_deepspeed(strategy, settings, on_save)


def _route_full_loading(strategy: Strategy, load_full: Callable[[Any, dict[str, Any]], None]) -> None:
    """Read ExCP files through the codec, then ``load_full`` puts the state into the sharded model and optimizers."""
    if getattr(strategy, "_excp_loader_installed", False):
        return
    original = strategy.load_checkpoint

    def load_checkpoint(checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(strategy.broadcast(checkpoint_path))
        if not (path.is_file() and is_excp_file(path)):
            return original(checkpoint_path, weights_only=weights_only)
        checkpoint = strategy.checkpoint_io.load_checkpoint(path, weights_only=weights_only)
        load_full(strategy, checkpoint)
        return checkpoint

    strategy.load_checkpoint = load_checkpoint
    strategy._excp_loader_installed = True


def load_full_state(strategy: ModelParallelStrategy, checkpoint: dict[str, Any]) -> None:
    """Load a full (gathered) Lightning checkpoint into the FSDP2-sharded model and optimizers, in place.

    The same steps as Lightning's own full-checkpoint branch (``fabric/strategies/model_parallel.py``
    ``_load_checkpoint``), which only accepts a path: the model's entry is popped, as there.
    """
    from lightning.fabric.strategies.model_parallel import _load_raw_module_state, _rekey_optimizer_state_if_needed
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    module = strategy.model
    strict = strategy.lightning_module.strict_loading
    _load_raw_module_state(checkpoint.pop("state_dict"), module, strict=strict)
    options = StateDictOptions(broadcast_from_rank0=True, full_state_dict=True, strict=strict)
    for index, optimizer in enumerate(strategy.optimizers):
        state = _rekey_optimizer_state_if_needed(checkpoint["optimizer_states"][index], module)
        set_optimizer_state_dict(module, optimizer, optim_state_dict=state, options=options)
