"""AdamW checkpoint series of small regressions, for ExCP tests that need real optimizer state."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch


def adam_checkpoints(
    net: torch.nn.Module, inputs: int, outputs: int, steps: int, every: int, loss_scale: float = 1.0
) -> tuple[list[dict[str, Any]], list[str]]:
    """Train ``net`` with AdamW (lr 1e-2) on fixed random data and keep a checkpoint every ``every`` steps.

    Returns the checkpoints (Lightning's ``global_step``/``state_dict``/``optimizer_states`` keys) and the
    parameter names in the optimizer's order. ``loss_scale`` scales the loss, hence the gradients.
    """
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, inputs, generator=g), torch.randn(256, outputs, generator=g)
    out = []
    for step in range(1, steps + 1):
        loss = loss_scale * torch.nn.functional.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            state = {"global_step": step, "state_dict": net.state_dict(), "optimizer_states": [opt.state_dict()]}
            out.append(copy.deepcopy(state))
    return out, [name for name, _ in net.named_parameters()]


def save_as_ckpt_files(series: list[dict[str, Any]], folder: Path) -> list[str]:
    """Each checkpoint as ``folder/step=N.ckpt`` (what ModelCheckpoint names), for the CLI's inputs."""
    paths = []
    for ckpt in series:
        path = folder / f"step={ckpt['global_step']}.ckpt"
        torch.save(ckpt, path)
        paths.append(str(path))
    return paths
