"""Activation-based importance and the permutation that sorts it (Flextron step 1).

Scores come from forward passes only: an MLP neuron scores the summed magnitude of its activation
(the input of the down projection, i.e. act(gate) * up for gated MLPs), a KV group scores the summed
L2 norm of the outputs of its heads (the input of the output projection). Sorting neurons and groups
by score with a permutation leaves the function unchanged and makes every prefix the best top-k, so
an elastic width is simply "the first k units".
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from transformers import PreTrainedModel

from .arch import arch_spec, layer_handles


@torch.no_grad()
def activation_importance(
    model: PreTrainedModel, batches: Iterable[Tensor | dict], max_batches: int | None = None
) -> dict[str, Tensor]:
    """Score MLP neurons and attention KV groups on calibration batches.

    Args:
        model: a supported HF causal LM (see ``arch.SUPPORTED``).
        batches: input_ids tensors ``[B, T]`` or dicts with ``input_ids`` (``attention_mask`` optional).
        max_batches: stop after this many batches (None: use all).

    Returns:
        {"mlp": [L, intermediate_size], "attn": [L, num_groups]} float64 sums (unnormalised, so sums
        from several DDP ranks can simply be added).
    """
    spec = arch_spec(model)
    handles = layer_handles(model)
    mlp = torch.zeros(spec.num_layers, spec.intermediate_size, dtype=torch.float64)
    attn = torch.zeros(spec.num_layers, spec.num_groups, dtype=torch.float64)
    hooks = []
    for i, h in enumerate(handles):

        def mlp_hook(_m, args, i=i):
            x = args[0].detach()
            mlp[i] += x.abs().reshape(-1, x.shape[-1]).sum(0).double().cpu()

        def attn_hook(_m, args, i=i):
            x = args[0].detach()
            x = x.reshape(-1, spec.num_groups, spec.heads_per_group, spec.head_dim)
            attn[i] += x.double().norm(dim=-1).sum(dim=(0, 2)).cpu()

        hooks.append(h.mlp_out.register_forward_pre_hook(mlp_hook))
        hooks.append(h.attn_out.register_forward_pre_hook(attn_hook))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = 0
    try:
        for batch in batches:
            if max_batches is not None and n >= max_batches:
                break
            if isinstance(batch, dict):
                kwargs = {"input_ids": batch["input_ids"].to(device)}
                if batch.get("attention_mask") is not None:
                    kwargs["attention_mask"] = batch["attention_mask"].to(device)
            else:
                kwargs = {"input_ids": batch.to(device)}
            model(**kwargs, use_cache=False)
            n += 1
    finally:
        for hk in hooks:
            hk.remove()
        model.train(was_training)
    if n == 0:
        raise ValueError("activation_importance got no calibration batches: pass at least one batch of input_ids.")
    return {"mlp": mlp, "attn": attn}


def _block_index(perm: Tensor, unit: int) -> Tensor:
    return (perm[:, None] * unit + torch.arange(unit)[None, :]).reshape(-1)


@torch.no_grad()
def _permute_rows(lin: torch.nn.Linear, idx: Tensor) -> None:
    idx = idx.to(lin.weight.device)
    lin.weight.copy_(lin.weight[idx])
    if lin.bias is not None:
        lin.bias.copy_(lin.bias[idx])


@torch.no_grad()
def _permute_cols(lin: torch.nn.Linear, idx: Tensor) -> None:
    lin.weight.copy_(lin.weight[:, idx.to(lin.weight.device)])


@torch.no_grad()
def permute_model(model: PreTrainedModel, mlp_perm: Tensor, attn_perm: Tensor) -> None:
    """Reorder MLP neurons and KV groups of every layer in place.

    Args:
        model: the model to reorder.
        mlp_perm: ``[L, intermediate_size]``, new position i holds old neuron ``mlp_perm[l, i]``.
        attn_perm: ``[L, num_groups]``, likewise for KV groups (their query heads move with them).
    """
    spec = arch_spec(model)
    for i, h in enumerate(layer_handles(model)):
        p = mlp_perm[i].long().cpu()
        if sorted(p.tolist()) != list(range(spec.intermediate_size)):
            raise ValueError(f"mlp_perm[{i}] is not a permutation of {spec.intermediate_size} neurons")
        for lin in h.mlp_in:
            _permute_rows(lin, p)
        _permute_cols(h.mlp_out, p)
        g = attn_perm[i].long().cpu()
        if sorted(g.tolist()) != list(range(spec.num_groups)):
            raise ValueError(f"attn_perm[{i}] is not a permutation of {spec.num_groups} KV groups")
        for lin, unit in h.attn_in:
            _permute_rows(lin, _block_index(g, unit))
        _permute_cols(h.attn_out, _block_index(g, h.attn_out_unit))


def sort_by_importance(model: PreTrainedModel, scores: dict[str, Tensor]) -> dict[str, Tensor]:
    """Permute ``model`` so that units are in descending importance; return the permutations used.

    Ties are broken by the original index (stable sort), so equal scores keep the original order and
    the result is identical on every DDP rank given identical scores.
    """
    mlp_perm = torch.sort(scores["mlp"], dim=-1, descending=True, stable=True).indices
    attn_perm = torch.sort(scores["attn"], dim=-1, descending=True, stable=True).indices
    permute_model(model, mlp_perm, attn_perm)
    return {"mlp": mlp_perm, "attn": attn_perm}


def random_permutation(model: PreTrainedModel, seed: int = 0) -> dict[str, Tensor]:
    """Permute ``model`` with a random order (the random-order slicing baseline)."""
    spec = arch_spec(model)
    gen = torch.Generator().manual_seed(seed)
    mlp_perm = torch.stack([torch.randperm(spec.intermediate_size, generator=gen) for _ in range(spec.num_layers)])
    attn_perm = torch.stack([torch.randperm(spec.num_groups, generator=gen) for _ in range(spec.num_layers)])
    permute_model(model, mlp_perm, attn_perm)
    return {"mlp": mlp_perm, "attn": attn_perm}
