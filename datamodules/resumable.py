"""A training loader whose position Lightning saves in every checkpoint, so a resume continues the
exact batch sequence (mid-epoch included) instead of restarting the epoch's order.

Lightning saves ``state_dict()`` of every train loader that has ``state_dict``/``load_state_dict``
(``fit_loop.state_dict()["combined_loader"]``) and hands it back to the new loader before its first
``iter`` on resume. The order of epoch ``e`` is a seeded permutation of ``(seed, e)`` (as
``DistributedSampler`` does), so the state is just ``(epoch, samples consumed)``. The sampler is a
``DistributedSampler`` (one replica on a single device), so Lightning keeps it under DDP instead of
wrapping it, and calls its ``set_epoch`` each epoch. ``len()`` stays the whole epoch's (Lightning
sizes every epoch from it once); a resumed iteration simply ends early.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler
from typing_extensions import override

__all__ = ["ResumableDataLoader", "ResumableSampler"]


class ResumableSampler(DistributedSampler):
    """Seeded per-epoch shuffle of this rank's shard that can start part-way into an epoch."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self._skip = 0
        self._skip_epoch = -1

    def resume(self, epoch: int, consumed: int) -> None:
        """The next iteration over ``epoch`` starts after its first ``consumed`` indices."""
        self.set_epoch(epoch)
        self._skip, self._skip_epoch = consumed, epoch

    @property
    def pending_skip(self) -> int:
        """Indices of the current epoch that a resumed iteration leaves out."""
        return self._skip if self._skip_epoch == self.epoch else 0

    @override
    def __iter__(self) -> Iterator[int]:
        skip = self.pending_skip
        indices = list(super().__iter__())[skip:]
        self._skip_epoch = -1  # only the resumed epoch is shortened: the next one is whole
        yield from indices


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` that reports and restores its position.

    The position is counted in batches handed out, not indices drawn, so worker prefetching does
    not run it ahead of training.
    """

    def __init__(self, dataset: Dataset, *, sampler: ResumableSampler, batch_size: int, **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, batch_size=batch_size, **kwargs)
        self._consumed = 0

    @override
    def __iter__(self) -> Iterator[Any]:
        sampler = self.sampler
        assert isinstance(sampler, ResumableSampler) and self.batch_size is not None
        self._consumed = sampler.pending_skip
        for batch in super().__iter__():
            self._consumed += self.batch_size
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "consumed"}``: Lightning stores it in the checkpoint's loop state."""
        sampler = self.sampler
        assert isinstance(sampler, ResumableSampler)
        return {"epoch": int(sampler.epoch), "consumed": int(self._consumed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue after the batches the checkpointed run had already trained on."""
        sampler = self.sampler
        assert isinstance(sampler, ResumableSampler)
        sampler.resume(int(state["epoch"]), int(state["consumed"]))
        self._consumed = int(state["consumed"])
