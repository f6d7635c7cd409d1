"""Lightning ``CheckpointIO`` that writes and reads ExCP chains (installed by the :class:`ExCP` callback)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import CheckpointIO
from typing_extensions import override

from callbacks.excp.codec import ExCPSettings
from callbacks.excp.decoder import load_checkpoint
from callbacks.excp.encoder import ExCPEncoder
from callbacks.excp.fileformat import ExCPFormatError, is_excp_file
from callbacks.excp.references import collect_garbage, preserve_for_chain, remove_stale_temporaries, retire
from callbacks.excp.safe_pickle import UnsafePickleError, load_metadata
from common.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

NameProvider = Callable[[], tuple[Collection[str] | None, Sequence[Sequence[str | None] | None] | None]]
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
        self._cleaned: set[str] = set()

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
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("ExCPCheckpointIO does not take storage_options; drop them from save_checkpoint")
        path = Path(path)
        param_names, opt_names = self._names() if self._names is not None else (None, None)
        self._last_dir = str(path.parent)
        self.clean_folder(path.parent)
        encoder = self._encoder_for(self._last_dir)
        encoded = encoder.encode(
            checkpoint,
            target=path,
            param_names=param_names,
            optimizer_param_names=opt_names,
            meta={"format": "lightning"},
        )
        preserve_for_chain(path)  # an overwritten file (e.g. last.ckpt) may be a later delta's reference
        atomic_write_bytes(path, encoded.data)  # complete and fsynced, then one rename over the old file
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
            return _load_plain(path, trust_pickles=weights_only is False)
        # a chain never continues across a resume: the next save starts with a keyframe
        for encoder in self._encoders.values():
            encoder.reset()
        return load_checkpoint(path, weights_only=weights_only)

    def clean_folder(self, directory: str | os.PathLike) -> None:
        """Delete temporary files a killed run left in ``directory`` (once per folder and run)."""
        key = os.path.realpath(directory)
        if key in self._cleaned:
            return
        self._cleaned.add(key)
        removed = remove_stale_temporaries(directory)
        if removed:
            log.info("ExCP: removed %d temporary file(s) left by an interrupted save in %s", len(removed), directory)

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


def _load_plain(path: _PATH, trust_pickles: bool) -> dict[str, Any]:
    """A ``torch.save`` checkpoint, loaded safely unless trusted (see :func:`load_metadata`)."""
    if not os.path.isfile(path):
        raise ExCPFormatError(path, "is not a regular file", "Pass the checkpoint file itself")
    try:
        checkpoint = load_metadata(os.fspath(path), trust_pickles=trust_pickles)
    except UnsafePickleError as error:
        raise ExCPFormatError(path, f"is neither an ExCP file nor a loadable checkpoint: {error}") from None
    if not isinstance(checkpoint, dict):
        raise ExCPFormatError(path, f"holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint
