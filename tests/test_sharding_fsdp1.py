"""FSDP1 helpers of ``lightning_modules/sharding.py`` and ``param_groups.py`` that need no process group.

The 2-process runs are in ``tests/test_strategy_matrix.py``, where CausalLM and Flextron train under FSDP1."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from lightning_modules.sharding import ShardingError, clip_grad_norm, require_fsdp1_unit


class _Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 4))
        self.router = torch.nn.Linear(4, 2)


def _attached(strategy: object) -> _Module:
    module = _Module()
    module._trainer = SimpleNamespace(strategy=strategy)
    return module


def test_fsdp1_refuses_a_model_that_is_not_its_own_unit_in_one_line() -> None:
    module = _attached(FSDPStrategy())
    with pytest.raises(ShardingError, match="needs its Sequential wrapped as an FSDP unit of its own") as error:
        require_fsdp1_unit(module, module.model)
    assert "\n" not in str(error.value) and "auto_wrap_policy" in str(error.value)
    require_fsdp1_unit(_attached(DDPStrategy()), module.model)  # other strategies: nothing to check
    require_fsdp1_unit(_Module(), module.model)  # no trainer yet


def test_fsdp1_clipping_on_one_process_equals_torch_clip_grad_norm() -> None:
    """World size 1: the shards are the whole gradients, so the summed norm must be torch's global norm."""
    module = _attached(FSDPStrategy())
    torch.manual_seed(0)
    for p in module.parameters():
        p.grad = torch.randn_like(p) * 3
    reference = copy.deepcopy(module)
    for ours, theirs in zip(module.parameters(), reference.parameters(), strict=True):
        theirs.grad = ours.grad.clone()
    clip_grad_norm(module, None, 1.0, shard=[module.model])
    torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 1.0)
    for ours, theirs in zip(module.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad)
    assert torch.nn.utils.get_total_norm([p.grad for p in module.parameters()]) == pytest.approx(1.0, rel=1e-5)


def test_weight_decay_groups_survive_fsdp1_flattening() -> None:
    """FSDP1 shows each parameter to the optimizer as a 1-D view of this rank's shard: the groups must not change."""
    from common.hf_loading import load_causal_lm, tiny_llama_config
    from lightning_modules.param_groups import decay_split

    model = load_causal_lm(None, model_config=tiny_llama_config())
    by_ndim = [p for p in model.parameters() if p.ndim >= 2]
    decay, no_decay = decay_split(model)
    assert [id(p) for p in decay] == [id(p) for p in by_ndim] and len(no_decay) == 5  # 2 norms per layer + final
    for p in model.parameters():
        p.data = p.data.flatten()  # what use_orig_params leaves the optimizer to see
    assert decay_split(model) == (decay, no_decay)
