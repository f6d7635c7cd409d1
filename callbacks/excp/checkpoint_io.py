"""Lightning ``CheckpointIO`` that writes and reads ExCP chains (installed by the :class:`ExCP` callback)."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import CheckpointIO
from typing_extensions import override

from callbacks.excp.codec import ExCPSettings
from callbacks.excp.encoder import ExCPEncoder
from callbacks.excp.store import ChainStore

NameProvider = Callable[[], tuple[Collection[str] | None, Sequence[Sequence[str | None] | None] | None]]
WeightsProvider = Callable[[], Mapping[str, torch.Tensor]]
SaveListener = Callable[[Path, dict[str, float]], None]


class ExCPCheckpointIO(CheckpointIO):
    """Saves every checkpoint as an ExCP file (keyframe or delta) at the path Lightning asks for.

    Loading accepts ExCP files (replaying and verifying their chain) and ordinary ``torch.save``
    checkpoints, both with ``weights_only=True`` unless the caller passes ``weights_only=False``
    (which runs any code a crafted file holds). A save never endangers the previous good state: the
    new file is written and fsynced under a temporary name and renamed over the target in one step;
    an overwritten file that a later delta needs is first hard-linked into ``.excp_refs/``; a removed
    one is moved there; files there are deleted once no live checkpoint reaches them. Temporary files
    a killed run left behind are deleted before the first save into a folder. Lightning calls save
    and remove on global rank zero only and load on every rank.

    Args:
        settings: codec settings.
        names: returns ``(parameter names, per-optimizer slot names)`` from the live model, so
            optimizer state is matched to parameters by ``param_groups`` order (None: inferred).
        on_save: called after each successful write with the path and the encode statistics.
        initial_weights: returns the model's weights as built before a checkpoint is restored: a
            chain that starts from the run's pretrained weights (:meth:`start_from_base`) is
            decoded against them when their hash matches.
    """

    def __init__(
        self,
        settings: ExCPSettings | None = None,
        names: NameProvider | None = None,
        on_save: SaveListener | None = None,
        initial_weights: WeightsProvider | None = None,
    ) -> None:
        self._store = ChainStore(settings)  # one chain per folder (e.g. two ModelCheckpoints)
        self._last_dir: str | None = None
        self._names = names
        self._on_save = on_save
        self._initial_weights = initial_weights

    def start_from_base(self, weights: dict[str, torch.Tensor], source: dict[str, Any] | None = None) -> None:
        """Start every new chain with a delta against ``weights`` (kept, not copied) instead of a keyframe."""
        self._store.start_from_base(weights, source)

    @property
    def settings(self) -> ExCPSettings:
        """The codec settings."""
        return self._store.settings

    @property
    def encoder(self) -> ExCPEncoder:
        """The chain encoder of the folder written last (a fresh one before any save)."""
        return self._store.encoder_for(self._last_dir or ".")

    def clean_folder(self, directory: str | os.PathLike) -> None:
        """Delete temporary files a killed run left in ``directory`` (once per folder and run)."""
        self._store.clean_folder(directory)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("ExCPCheckpointIO does not take storage_options; drop them from save_checkpoint")
        path = Path(path)
        param_names, optimizer_param_names = self._names() if self._names is not None else (None, None)
        self._last_dir = str(path.parent)
        encoded = self._store.save(checkpoint, path, param_names, optimizer_param_names, meta={"format": "lightning"})
        if self._on_save is not None:
            self._on_save(path, encoded.stats)

    @override
    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if not os.path.exists(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return self._store.load(path, weights_only=weights_only, base=self._initial_weights)

    @override
    def remove_checkpoint(self, path: _PATH) -> None:
        self._store.remove(path)
