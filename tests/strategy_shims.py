"""Test-only shims that let FSDP (torch FSDP1) and DeepSpeed run on CPU with gloo. Never used by the library.

Both strategies are refused on CPU only by device checks, not by anything the computation needs:

* FSDP: ``lightning/pytorch/trainer/connectors/accelerator_connector.py`` (``_check_strategy_and_fallback``)
  raises "The strategy `fsdp` requires a GPU accelerator" when ``type(strategy) is FSDPStrategy`` (a
  subclass passes), and ``strategies/fsdp.py`` (``_setup_model``) passes ``device_id=root_device.index``,
  which is None on CPU, so torch's ``fsdp/_init_utils.py`` raises "FSDP needs a non-CPU accelerator device".
  The shim is a subclass that passes ``device_id=torch.device("cpu")`` and uses gloo. It also gathers full
  state dicts with ``offload_to_cpu=False``: Lightning's ``_get_full_state_dict_context`` always sets
  ``offload_to_cpu=True``, and torch's ``FlatParamHandle.to_cpu`` (``fsdp/_flat_param.py``) then moves the
  gathered flat parameter to the CPU (a no-op when it is already there, so the same storage) and frees the
  gathered storage, which the state dict's views still point into: the clone in ``_full_post_state_dict_hook``
  (``fsdp/_state_dict_utils.py``) segfaults. On GPUs the move is a copy, so nothing changes there.
* DeepSpeed: ``strategies/deepspeed.py`` ``setup_environment`` raises "The DeepSpeed strategy is only supported
  on CUDA GPUs" and ``setup_distributed`` checks CUDA device indices. With ``DS_ACCELERATOR=cpu`` DeepSpeed
  itself runs on CPU; the shim skips those two checks, initialises the process group with gloo and names
  the device ``cpu:<local rank>`` (the engine needs a device index: ``_set_distributed_vars`` compares it).
  It also declines DeepSpeed's CPU shared-memory op (``deepspeed/comm/torch.py`` ``build_shm_op``): that op
  serves only ``inference_all_reduce`` (training collectives go through gloo either way), yet on a fresh
  machine both ranks compile it with ninja (~1 min on 2 cores) and then rendezvous on ``/dev/shm`` segments,
  an extra way for the job to stall that tests nothing of ours.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.strategies.ddp import DDPStrategy
from typing_extensions import override


@contextlib.contextmanager
def _fsdp1_device_id_cpu() -> Iterator[None]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    original = FullyShardedDataParallel.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("device_id") is None:
            kwargs["device_id"] = torch.device("cpu")
        original(self, *args, **kwargs)

    FullyShardedDataParallel.__init__ = init
    try:
        yield
    finally:
        FullyShardedDataParallel.__init__ = original


class CPUFSDPStrategy(FSDPStrategy):
    """FSDPStrategy on CPU: ``device_id=cpu``, gloo, full state dicts gathered in place (see module docstring)."""

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._state_dict_type != "full":
            return super().lightning_module_state_dict()
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        assert self.model is not None
        # Lightning's own context, but offload_to_cpu=False (see module docstring)
        config = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
        with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT, config):
            return self.model.state_dict()

    @override
    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        with _fsdp1_device_id_cpu():
            return super()._setup_model(model)

    @override
    def _get_process_group_backend(self) -> str:
        return "gloo"


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeedStrategy on CPU (needs ``DS_ACCELERATOR=cpu``): the CUDA checks skipped, gloo (see module docstring)."""

    @property
    @override
    def root_device(self) -> torch.device:
        # DeepSpeed's engine reads `device_rank=root_device.index` and fails on None (plain "cpu");
        # torch treats cpu:<n> as the CPU.
        return torch.device("cpu", self.local_rank)

    @override
    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # DeepSpeedStrategy's own override only adds the CUDA check

    @override
    def setup_distributed(self) -> None:
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._process_group_backend = "gloo"
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # see the module docstring
        self._init_deepspeed_distributed()

    @override
    def _get_process_group_backend(self) -> str:
        return "gloo"
