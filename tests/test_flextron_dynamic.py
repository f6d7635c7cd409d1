"""Per-sequence dynamic routing runs each sequence's sliced sub-network and stays within the budget."""

from __future__ import annotations

import torch

from common.hf_loading import tiny_llama_config
from lightning_modules.flextron.dynamic import route_and_run
from lightning_modules.flextron.module import FlextronModule


def test_each_sequence_runs_its_own_sliced_subnetwork_within_the_budget():
    module = FlextronModule(model=None, model_config=tiny_llama_config(), tokenizer="byt5", budgets=[0.5, 1.0],
                            budget_metric="params", router="dynamic", calibration_batches=0,
                            mlp_ratios=[0.0, 0.25, 0.5, 1.0], attn_ratios=[0.0, 0.5, 1.0])
    module.setup("validate")
    module.eval()
    torch.manual_seed(0)
    for layer in (module.router.proj, module.router.head.net[2]):  # an untrained router sends every input alike
        torch.nn.init.normal_(layer.weight, std=2.0)
    input_ids = torch.randint(0, 384, (6, 16), generator=torch.Generator().manual_seed(1))
    routed = route_and_run(module, input_ids, 0.6)
    assert routed.groups > 1  # the batch really split by choice
    assert all(r <= 0.6 * (1 + 1e-6) for r in routed.realized) and len(routed.subnets) == 6
    for row, subnet in enumerate(routed.subnets):
        with torch.no_grad(), module.elastic.subnet(subnet):
            alone = module.model(input_ids=input_ids[row : row + 1], use_cache=False).logits
        assert torch.allclose(routed.logits[row : row + 1], alone, atol=1e-5)
