"""FSDP2 sharding of Hugging Face causal LMs, shared by the LightningModules' ``configure_model``.

Under ``ModelParallelStrategy`` Lightning does not shard anything itself: the LightningModule must call
``fully_shard`` in ``configure_model``. The recipe is PyTorch's: one FSDP2 unit per decoder layer (so only
one layer's full weights exist at a time), then the root model (embeddings, final norm, LM head). Under
every other strategy these helpers do nothing, so a module keeps one code path for all of them. Under
FSDP1 (``FSDPStrategy``) Lightning wraps the module itself; the helper only keeps replicated parts out.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn

from common.errors import UserFacingError


class ShardingError(UserFacingError):
    """A model cannot be sharded as configured; the message says what to change."""


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Hugging Face causal LM (``model.layers``, ``transformer.h``, ``gpt_neox.layers``)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        node: object = model
        for name in path.split("."):
            node = getattr(node, name, None)
        if isinstance(node, nn.ModuleList) and len(node) > 0:
            return list(node)
    raise ShardingError(
        f"cannot find the decoder layers of {type(model).__name__} to shard them with FSDP2: "
        "use a Llama/Qwen/Mistral/GPT-2/GPT-NeoX-style model or strategy='ddp'"
    )


def is_fully_sharded(model: nn.Module) -> bool:
    """True once ``fully_shard`` has been applied to ``model`` (so ``configure_model`` can run again safely)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def configure_sharding(
    module: L.LightningModule,
    shard: Sequence[nn.Module] = (),
    replicate: Sequence[nn.Module] = (),
    per_rank_work: bool = False,
) -> None:
    """Call from ``configure_model``: shard ``shard`` under FSDP/FSDP2, keep ``replicate`` whole on every rank.

    * ``ModelParallelStrategy`` (FSDP2): ``fully_shard`` per decoder layer, then each model's root.
    * ``FSDPStrategy`` (FSDP1): Lightning wraps the module itself (``auto_wrap_policy``); ``replicate`` is
      added to FSDP's ``ignored_modules`` so it keeps its own full parameters.
    * Any other strategy: nothing to do (DDP and DeepSpeed handle every parameter).

    Replicated modules are for work that is not in lockstep across ranks (probes scoring their own share
    of the items: a sharded model would all-gather per forward and hang when ranks differ) or for small
    parts called outside the model's forward (Flextron's routers). Their trainable parameters' gradients
    are averaged over the data-parallel ranks here, since no sharded wrapper sees them.

    ``per_rank_work=True`` (the probes): no gradient averaging (ranks do different work), and DeepSpeed
    ZeRO-3 is refused, since it partitions every parameter and offers no way to keep a module whole.
    """
    trainer = module._trainer
    if trainer is None:
        return
    strategy = trainer.strategy
    if per_rank_work and isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        raise ShardingError(
            f"{type(module).__name__} under DeepSpeed ZeRO stage 3: ZeRO-3 partitions every parameter, but each "
            "rank runs its own share of the items (no lockstep forwards); use deepspeed_stage2, fsdp2, fsdp or ddp"
        )
    if isinstance(strategy, ModelParallelStrategy):
        group = _fsdp2_shard(module, shard)
    elif isinstance(strategy, FSDPStrategy):
        ignored = list(strategy.kwargs.get("ignored_modules") or [])
        strategy.kwargs["ignored_modules"] = ignored + [m for m in replicate if m not in ignored]
        group = None
    else:
        return
    device = strategy.root_device
    hooked = {id(p) for p in module.parameters() if hasattr(p, "_lumen_averaged")}
    extra = [] if isinstance(strategy, FSDPStrategy) else [module]  # FSDP2 leaves everything else in place
    with torch.no_grad():
        for part in [*replicate, *extra]:
            for tensor in [*part.parameters(), *part.buffers()]:
                if _is_dtensor(tensor):
                    continue
                if tensor.device != device:
                    tensor.data = tensor.data.to(device)
                # never on per-rank work: a copy (ICL's GD) would carry the hook into unmatched collectives
                trainable = isinstance(tensor, nn.Parameter) and tensor.requires_grad and not per_rank_work
                if trainable and id(tensor) not in hooked:
                    tensor.register_post_accumulate_grad_hook(_averager(group))
                    tensor._lumen_averaged = True
                    hooked.add(id(tensor))


def require_fsdp1_unit(module: L.LightningModule, model: nn.Module) -> None:
    """Under FSDP1, refuse a ``model`` that is not an FSDP unit of its own (call after wrapping, e.g. on_fit_start).

    Modules that step their optimizer inside ``training_step`` (manual optimization) run backward inside the
    forward of Lightning's root FSDP unit, which wraps the LightningModule; parameters that root unit holds
    fail torch's post-backward check (state FORWARD, not BACKWARD). Wrapping the whole model as a unit leaves
    the root unit nothing of its own.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    trainer = module._trainer
    if trainer is None or not isinstance(trainer.strategy, FSDPStrategy) or isinstance(model, FullyShardedDataParallel):
        return
    raise ShardingError(
        f"{type(module).__name__} under FSDPStrategy (FSDP1) needs its {type(model).__name__} wrapped as an FSDP unit "
        "of its own (its backward runs inside the root unit's forward): add that class to auto_wrap_policy, as "
        "configs/trainer/fsdp.yaml does for LlamaForCausalLM"
    )


def clip_grad_norm(module: L.LightningModule, optimizer: object, max_norm: float, shard: Sequence[nn.Module]) -> None:
    """Clip the gradients of ``module`` by their global norm, from inside ``training_step`` (manual optimization).

    Under FSDP1, Lightning's precision plugin refuses norm clipping and the root unit's ``clip_grad_norm_``
    refuses to run inside its own forward (where ``training_step`` runs), so the norm is computed as that
    method does: the squared norms of this rank's gradient shards (the parameters of ``shard``, the models
    wrapped by FSDP) summed over ranks, plus those of the parameters every rank keeps whole.
    """
    if not isinstance(module.trainer.strategy, FSDPStrategy):
        module.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")
        return
    import torch.distributed as dist

    sharded = {id(p) for model in shard for p in model.parameters()}
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return
    squares = torch.nn.utils.get_total_norm([p.grad for p in params if id(p) in sharded]) ** 2
    squares = squares.to(params[0].grad.device)  # the compute device (the collective's), also when no shard is here
    if dist.is_initialized():
        dist.all_reduce(squares)
    whole = torch.nn.utils.get_total_norm([p.grad for p in params if id(p) not in sharded]).to(squares)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, (squares + whole**2).sqrt())


def _fsdp2_shard(module: L.LightningModule, models: Sequence[nn.Module]) -> object:
    from torch.distributed.fsdp import fully_shard

    mesh = module.device_mesh
    if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
        raise ShardingError(
            "tensor parallelism is not implemented for these models: set ModelParallelStrategy's "
            f"tensor_parallel_size to 1 and data_parallel_size to the number of devices (got mesh {mesh})"
        )
    data_mesh = mesh["data_parallel"]
    for model in models:
        if is_fully_sharded(model):
            continue
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=data_mesh)
        fully_shard(model, mesh=data_mesh)
    return data_mesh.get_group()


def _averager(group: object | None):  # noqa: ANN202 - a hook
    import torch.distributed as dist

    def average(parameter: torch.Tensor) -> None:
        if parameter.grad is not None and dist.is_initialized():
            dist.all_reduce(parameter.grad, group=group)  # gloo has no AVG
            parameter.grad.div_(dist.get_world_size(group))

    return average


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)
