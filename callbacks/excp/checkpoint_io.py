"""Lightning ``CheckpointIO`` that writes and reads ExCP chains (installed by the :class:`ExCP` callback)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO
from typing_extensions import override

from callbacks.excp.chain import ExCPEncoder, collect_garbage, load_checkpoint, retire
from callbacks.excp.codec import ExCPSettings
from callbacks.excp.fileformat import atomic_write_bytes, is_excp_file

log = logging.getLogger(__name__)

NameProvider = Callable[[], tuple[Collection[str] | None, Sequence[Sequence[str | None] | None] | None]]
SaveListener = Callable[[Path, dict[str, float]], None]


class ExCPCheckpointIO(CheckpointIO):
    """Saves every checkpoint as an ExCP file (keyframe or delta) at the path Lightning asks for.

    Loading accepts ExCP files (replaying their chain) and, for convenience, ordinary ``torch.save``
    checkpoints. Removing or overwriting a file that a later delta still needs moves it into
    ``.excp_refs/`` instead of deleting it; files there are deleted once nothing depends on them.
    Lightning calls save and remove on global rank zero only and load on every rank.

    Args:
        settings: codec settings.
        names: returns ``(parameter names, per-optimizer slot names)`` from the live model, so
            optimizer state is matched to parameters by ``param_groups`` order (None: inferred).
        on_save: called after each successful write with the path and the encode statistics.
    """

    def __init__(
        self,
        settings: ExCPSettings | None = None,
        names: NameProvider | None = None,
        on_save: SaveListener | None = None,
    ) -> None:
        self._settings = settings or ExCPSettings()
        self._encoders: dict[str, ExCPEncoder] = {}  # one chain per folder (e.g. two ModelCheckpoints)
        self._last_dir: str | None = None
        self._names = names
        self._on_save = on_save
        self._fallback = TorchCheckpointIO()

    @property
    def settings(self) -> ExCPSettings:
        """The codec settings."""
        return self._settings

    @property
    def encoder(self) -> ExCPEncoder:
        """The chain encoder of the folder written last (a fresh one before any save)."""
        return self._encoder_for(self._last_dir or ".")

    def _encoder_for(self, directory: str) -> ExCPEncoder:
        key = os.path.realpath(directory)
        if key not in self._encoders:
            self._encoders[key] = ExCPEncoder(self._settings)
        return self._encoders[key]

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("ExCPCheckpointIO does not take storage_options; drop them from save_checkpoint")
        path = Path(path)
        param_names, opt_names = self._names() if self._names is not None else (None, None)
        self._last_dir = str(path.parent)
        encoder = self._encoder_for(self._last_dir)
        encoded = encoder.encode(
            checkpoint,
            target=path,
            param_names=param_names,
            optimizer_param_names=opt_names,
            meta={"format": "lightning"},
        )
        if path.exists() or path.is_symlink():
            retire(path)  # an overwritten file (e.g. last.ckpt) may be a later delta's reference
        atomic_write_bytes(path, encoded.data)
        encoder.commit(encoded, path)
        self._collect(path.parent)
        if self._on_save is not None:
            self._on_save(path, encoded.stats)

    @override
    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if not os.path.exists(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        if not is_excp_file(path):
            return self._fallback.load_checkpoint(path, weights_only=weights_only)
        # a chain never continues across a resume: the next save starts with a keyframe
        for encoder in self._encoders.values():
            encoder.reset()
        return load_checkpoint(path, weights_only=weights_only)

    @override
    def remove_checkpoint(self, path: _PATH) -> None:
        path = Path(path)
        retire(path)
        self._collect(path.parent)

    def _collect(self, directory: Path) -> None:
        head = self._encoder_for(str(directory)).head
        deleted = collect_garbage(directory, keep_ids=[head["file_id"]] if head else [])
        if deleted:
            log.debug("ExCP: deleted %d checkpoint(s) no chain needs any more", len(deleted))
