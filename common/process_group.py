"""Ending a multi-process run cleanly."""

from __future__ import annotations

import torch.distributed as dist


def release_process_group() -> None:
    """Destroy this process's default process group, if one is up, before the interpreter exits.

    Lightning leaves the group alive after ``fit`` (a later Trainer in the same process reuses it), and a
    gloo or NCCL group destroyed only by interpreter shutdown can abort the process ("terminate called
    without an active exception", exit code -6) after the run itself succeeded: a scheduler then marks a
    finished job failed. Call it once, on the clean exit path only: after an error, other ranks may still
    be inside a collective, and the exception should surface unchanged.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
