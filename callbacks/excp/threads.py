"""Thread settings shared by the encoder and the decoder (no Lightning)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["intra_op_threads"]


@contextlib.contextmanager
def intra_op_threads(count: int = 1) -> Iterator[None]:
    """Run the codec with ``count`` intra-op threads per tensor job.

    Its ops are small and memory-bound; OpenMP fan-out on every one of them costs far more than it
    saves, and on a busy machine it stalls (parallelism comes from ``settings.threads`` instead).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
