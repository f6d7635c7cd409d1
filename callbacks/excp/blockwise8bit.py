"""bitsandbytes 8-bit optimizer state, seen by the codec as the fp32 moments it stands for.

An 8-bit optimizer (``bnb.optim.AdamW8bit`` and kin) keeps each large parameter's Adam moments as
``uint8`` indices into a 256-entry code book (``qmap1``/``qmap2``) with one ``absmax`` scale per block
(``state1``/``state2``/``absmax1``/``absmax2``, wrapped under ``__bnb_optimizer_quant_state__`` in its
``state_dict``); small parameters keep fp32 ``state1``/``state2`` there. Stored as opaque bytes, the
moments would be neither pruned nor quantised, the checkpoint's fp32 W+m+v baseline would count them
as nothing, and weight pruning would lose its second-moment criterion. So before coding, blockwise
states are expanded to the fp32 moments they encode (``code[index] * absmax[block]``, exactly what
bitsandbytes computes), coded as any Adam moments, and after decoding they are put back into the
optimizer's own format (``absmax`` per block, nearest code-book entry), so ``load_state_dict`` of the
same optimizer takes the result. Requantising moments that were stored exactly (a keyframe) gives back
values within one code-book step of the original ones (bitsandbytes' own quantiser does not always map
a block's largest value onto the code book's 1.0, so a recomputed ``absmax`` can differ by that step).
Pure torch: reading or writing such a checkpoint does not need bitsandbytes.
"""

from __future__ import annotations

from typing import Any

import torch

QUANT_STATE_KEY = "__bnb_optimizer_quant_state__"
"""Where bitsandbytes (>= 0.45) wraps its quantisation tensors in an optimizer state dict."""

EXPANDED_MARK = "__excp_expanded_blocksizes__"
"""Added to a quant-state dict whose blockwise states were expanded: ``{"state1": blocksize, ...}``."""

_STATES = (("state1", "qmap1", "absmax1"), ("state2", "qmap2", "absmax2"))
_BLOCKSIZES = {64 << k for k in range(7)}
"""Block sizes bitsandbytes uses (64 ... 4096); a file naming another one is refused."""


def _blockwise(quant: dict[str, Any], state: str, qmap: str, absmax: str) -> bool:
    tensors = [quant.get(key) for key in (state, qmap, absmax)]
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return False
    indices, code, scales = tensors
    return (
        indices.dtype == torch.uint8
        and code.dtype == torch.float32
        and code.numel() == 256
        and scales.dtype == torch.float32
        and scales.ndim == 1
        and 0 < scales.numel()
        and -(-indices.numel() // _blocksize(indices.numel(), scales.numel())) == scales.numel()
    )


def _blocksize(numel: int, blocks: int) -> int:
    """The block size bitsandbytes used: the power of two that splits ``numel`` into ``blocks`` blocks."""
    size = 64
    while -(-numel // size) > blocks and size < max(_BLOCKSIZES):
        size *= 2
    return size


def dequantize(indices: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``code[index] * absmax[block]`` in fp32, shaped like ``indices``."""
    flat = code[indices.reshape(-1).long()]
    scales = absmax.repeat_interleave(blocksize)[: flat.numel()]
    return (flat * scales).reshape(indices.shape)


def quantize(values: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise: ``absmax`` per block, then the nearest code-book entry of ``value / absmax``."""
    flat = values.detach().reshape(-1).float()
    pad = -flat.numel() % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    normalised = (blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]).reshape(-1)
    normalised = normalised[: flat.numel()]
    sorted_code, order = code.sort()
    upper = torch.bucketize(normalised, sorted_code).clamp(1, sorted_code.numel() - 1)
    lower = upper - 1
    nearer_upper = (sorted_code[upper] - normalised).abs() < (normalised - sorted_code[lower]).abs()
    position = torch.where(nearer_upper, upper, lower)
    indices = order[position].to(torch.uint8).reshape(values.shape)
    return indices, absmax


def _quant_states(ckpt: Any) -> list[dict[str, Any]]:
    """Every optimizer slot's quant-state dict in a Lightning checkpoint (live objects, not copies)."""
    found = []
    optimizers = ckpt.get("optimizer_states") if isinstance(ckpt, dict) else None
    for optimizer in optimizers if isinstance(optimizers, list) else []:
        state = optimizer.get("state") if isinstance(optimizer, dict) else None
        for slot in state.values() if isinstance(state, dict) else []:
            quant = slot.get(QUANT_STATE_KEY) if isinstance(slot, dict) else None
            if isinstance(quant, dict):
                found.append(quant)
    return found


def expand_8bit_states(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``ckpt`` whose blockwise 8-bit moments are fp32 tensors (``ckpt`` is not modified).

    Only the dicts on the way to an expanded state are copied; every other value is shared.
    """
    if not any(_blockwise(q, *keys) for q in _quant_states(ckpt) for keys in _STATES):
        return ckpt
    out = dict(ckpt)
    out["optimizer_states"] = []
    for optimizer in ckpt["optimizer_states"]:
        if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)):
            out["optimizer_states"].append(optimizer)
            continue
        state = {}
        for slot_id, slot in optimizer["state"].items():
            quant = slot.get(QUANT_STATE_KEY) if isinstance(slot, dict) else None
            if isinstance(quant, dict):
                slot = {**slot, QUANT_STATE_KEY: _expanded(quant)}
            state[slot_id] = slot
        out["optimizer_states"].append({**optimizer, "state": state})
    return out


def _expanded(quant: dict[str, Any]) -> dict[str, Any]:
    expanded = dict(quant)
    sizes = {}
    for state, qmap, absmax in _STATES:
        if _blockwise(quant, state, qmap, absmax):
            size = _blocksize(quant[state].numel(), quant[absmax].numel())
            expanded[state] = dequantize(quant[state], quant[qmap], quant[absmax], size)
            del expanded[absmax]  # recomputed from the decoded moments
            sizes[state] = size
    if sizes:
        expanded[EXPANDED_MARK] = sizes
    return expanded


def restore_8bit_states(ckpt: dict[str, Any]) -> None:
    """Put expanded moments back into bitsandbytes' blockwise format, in place."""
    for quant in _quant_states(ckpt):
        sizes = quant.pop(EXPANDED_MARK, None)
        if not isinstance(sizes, dict):
            continue
        for state, qmap, absmax in _STATES:
            if state in sizes:
                size, values, code = sizes[state], quant.get(state), quant.get(qmap)
                if not (
                    type(size) is int and size in _BLOCKSIZES and isinstance(values, torch.Tensor)
                    and values.dtype == torch.float32 and isinstance(code, torch.Tensor) and code.numel() == 256
                ):
                    raise ValueError(f"8-bit optimizer state {state!r} cannot be restored (block size {size!r})")
                quant[state], quant[absmax] = quantize(values, code.float(), size)
