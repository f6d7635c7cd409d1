"""Folders of ExCP checkpoints: save, remove and load in an order a kill can never hurt (no Lightning).

:class:`ChainStore` is what :class:`~callbacks.excp.checkpoint_io.ExCPCheckpointIO` does for the
Trainer, usable without Lightning (bench/excp_v_floor.py drives it from a plain training loop).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch

from callbacks.excp.bases import BaseSource
from callbacks.excp.codec import ExCPSettings
from callbacks.excp.decoder import load_checkpoint, load_checkpoint_and_head
from callbacks.excp.encoder import Encoded, ExCPEncoder
from callbacks.excp.fileformat import ExCPFormatError, is_excp_file
from callbacks.excp.references import (
    collect_garbage,
    link_chain_into,
    preserve_for_chain,
    remove_stale_temporaries,
    retire,
)
from callbacks.excp.safe_pickle import UnsafePickleError, load_metadata
from common.atomic import atomic_write_bytes

__all__ = ["ChainStore", "load_any_checkpoint"]

log = logging.getLogger(__name__)


class ChainStore:
    """One chain per folder; saves that never endanger the previous good state.

    A save encodes the checkpoint, hard-links the file it replaces into ``.excp_refs/`` (a later
    delta may need it), writes the new file complete and fsynced under a temporary name and renames
    it over the target in one step, then deletes only what no live checkpoint reaches. Temporary
    files a killed run left are deleted before the first save into a folder.
    """

    def __init__(self, settings: ExCPSettings | None = None) -> None:
        self.settings = settings or ExCPSettings()
        self._encoders: dict[str, ExCPEncoder] = {}
        self._cleaned: set[str] = set()
        self._base: tuple[dict[str, torch.Tensor], dict[str, Any] | None] | None = None
        self._loaded: tuple[str, dict[str, Any], str, dict[str, torch.Tensor]] | None = None

    def start_from_base(self, weights: dict[str, torch.Tensor], source: dict[str, Any] | None = None) -> None:
        """Chains started from now on begin with a delta against ``weights`` (see :mod:`callbacks.excp.bases`).

        ``weights`` are kept, not copied: pass tensors training does not modify (e.g. read from files).
        """
        self._base = (weights, source)
        self._loaded = None
        self._encoders.clear()

    def encoder_for(self, directory: str | os.PathLike) -> ExCPEncoder:
        """The chain encoder of ``directory``, created on first use to continue what this run started from.

        That is the chain of the checkpoint the run resumed from (linked into ``directory`` when it
        lives elsewhere), else the base weights the run started from, else nothing (a keyframe).
        """
        key = os.path.realpath(directory)
        if key not in self._encoders:
            encoder = ExCPEncoder(self.settings)
            if self._loaded is not None:
                loaded_path, header, sha256, weights = self._loaded
                if os.path.realpath(Path(loaded_path).parent) != key:
                    link_chain_into(loaded_path, directory)
                encoder.continue_from(loaded_path, header, sha256, weights)
            elif self._base is not None:
                encoder.start_from_base(*self._base, copy=False)
            self._encoders[key] = encoder
        return self._encoders[key]

    def clean_folder(self, directory: str | os.PathLike) -> None:
        """Delete temporary files a killed run left in ``directory`` (once per folder and store)."""
        key = os.path.realpath(directory)
        if key in self._cleaned:
            return
        self._cleaned.add(key)
        removed = remove_stale_temporaries(directory)
        if removed:
            log.info("ExCP: removed %d temporary file(s) left by an interrupted save in %s", len(removed), directory)

    def save(
        self,
        checkpoint: dict[str, Any],
        path: str | os.PathLike,
        param_names: Collection[str] | None = None,
        optimizer_param_names: Sequence[Sequence[str | None] | None] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Encoded:
        """Write ``checkpoint`` as the next file of its folder's chain at ``path``."""
        path = Path(path)
        self.clean_folder(path.parent)
        encoder = self.encoder_for(path.parent)
        encoded = encoder.encode(
            checkpoint, target=path, param_names=param_names, optimizer_param_names=optimizer_param_names, meta=meta
        )
        preserve_for_chain(path)  # an overwritten file (e.g. last.ckpt) may be a later delta's reference
        atomic_write_bytes(path, encoded.data)  # complete and fsynced, then one rename over the old file
        encoder.commit(encoded, path)
        self.collect(path.parent)
        return encoded

    def remove(self, path: str | os.PathLike) -> None:
        """Remove a checkpoint; a file a chain still needs moves to ``.excp_refs/`` in one rename."""
        path = Path(path)
        retire(path)
        self.collect(path.parent)

    def collect(self, directory: Path) -> None:
        """Delete chain files in ``directory`` that no live checkpoint (nor the next delta) needs."""
        head = self.encoder_for(directory).head
        deleted = collect_garbage(directory, keep_ids=[head["file_id"]] if head else [])
        if deleted:
            log.debug("ExCP: deleted %d checkpoint(s) no chain needs any more", len(deleted))

    def load(
        self, path: str | os.PathLike, weights_only: bool | None = True, base: BaseSource | None = None
    ) -> dict[str, Any]:
        """Load an ExCP or plain checkpoint (see :func:`load_any_checkpoint`).

        The next save into any folder continues the loaded file's chain (a delta against what was
        just decoded, however many resumes there were); after a plain checkpoint it starts a keyframe.
        """
        self._encoders.clear()
        self._base = None
        self._loaded = None
        if not is_excp_file(path):
            return load_any_checkpoint(path, weights_only, base)
        checkpoint, file = load_checkpoint_and_head(path, weights_only, base)
        names = [entry["name"] for entry in file.header["entries"]]
        state = checkpoint.get("state_dict", {})
        if all(isinstance(state.get(n), torch.Tensor) for n in names):
            # the header and hash only: the file's bytes (a keyframe's may be gigabytes) are not kept
            self._loaded = (os.fspath(path), file.header, file.sha256, {n: state[n] for n in names})
        return checkpoint


def load_any_checkpoint(
    path: str | os.PathLike, weights_only: bool | None = True, base: BaseSource | None = None
) -> dict[str, Any]:
    """An ExCP file through its chain, or a ``torch.save`` checkpoint; safe unless ``weights_only=False``.

    ``base``: for a chain started from the run's initial weights (see :func:`load_checkpoint`).

    Raises:
        ExCPFormatError: missing, not a regular file, corrupted, or not a loadable checkpoint.
    """
    if is_excp_file(path):
        return load_checkpoint(path, weights_only=weights_only, base=base)
    if not os.path.exists(path):
        raise ExCPFormatError(path, "file does not exist", "Check the path")
    if not os.path.isfile(path):
        raise ExCPFormatError(path, "is not a regular file", "Pass the checkpoint file itself")
    try:
        checkpoint = load_metadata(os.fspath(path), trust_pickles=weights_only is False)
    except UnsafePickleError as error:
        raise ExCPFormatError(path, f"is neither an ExCP file nor a loadable checkpoint: {error}") from None
    if not isinstance(checkpoint, dict):
        raise ExCPFormatError(path, f"holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint
