"""DeepSpeed ZeRO-2 and ZeRO-3 checkpoint folders as ExCP files (no Lightning): what each rank compresses and restores.

The DeepSpeed engine writes one folder per checkpoint (``<dir>/latest``, ``<dir>/<tag>/...``):

* ``[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` (rank ``r``): the flat fp32 master partitions and Adam's
  ``exp_avg``/``exp_avg_sq`` of the same partitions (ZeRO-2: ``single_partition_of_fp32_groups`` and
  ``base_optimizer_state``; ZeRO-3: ``fp32_flat_groups`` and the base optimizer's own state dict, see
  :data:`_PARTITION_LAYOUTS`). They become the codec's W, m and v, one entry per parameter group (ZeRO-3:
  per sub-group), so weight-momentum joint pruning applies exactly as for a Lightning checkpoint.
* the module states: ZeRO-2 writes ``mp_rank_00_model_states.pt`` on rank 0 with the module weights (W
  without moments, chained like the partitions; they hold the same values as the fp32 partitions, are
  decoded separately, serve the first forward after a resume, and the engine's next step overwrites them
  from the partitions). ZeRO-3 writes ``zero_pp_rank_<r>_mp_rank_00_model_states.pt`` on every rank, whose
  module entries are empty placeholders (the weights live only in the partitions). Both carry Lightning's
  client state (loops, schedulers, callbacks, hyperparameters), kept exactly.

Everything that is not one of those tensors stays where it was (the "skeleton", safe pickle types only).
Each checkpoint folder is self-contained: the files a delta's chain needs are hard-linked into its
``<tag>/.excp_refs/``, so deleting any other checkpoint folder never breaks it.
"""

from __future__ import annotations

import ctypes
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from typing_extensions import override

from callbacks.excp.codec import ExCPSettings
from callbacks.excp.decoder import load_checkpoint
from callbacks.excp.encoder import Encoded, ExCPEncoder
from callbacks.excp.fileformat import ExCPFormatError, is_excp_file, read_header
from callbacks.excp.references import REFS_DIR, chain_paths, reference_available
from callbacks.excp.safe_pickle import load_metadata
from callbacks.excp.split import _hollow, get_at, set_at
from common.atomic import TEMP_SUFFIX, _fsync_directory, atomic_write_bytes

__all__ = [
    "DeepSpeedChains",
    "engine_files",
    "has_excp_files",
    "new_staging_dir",
    "remove_folder",
    "restore_files",
    "swap_in",
]

_OPTIM_SUFFIX = "_optim_states.pt"
# Where each ZeRO optimizer keeps its fp32 master partitions and their Adam state (keyed by group index)
# in the dict the engine saves: ZeRO-1/2 (``DeepSpeedZeroOptimizer.state_dict``) and ZeRO-3
# (``DeepSpeedZeroOptimizer_Stage3._rigid_state_dict``).
_PARTITION_LAYOUTS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("optimizer_state_dict", "single_partition_of_fp32_groups"),
     ("optimizer_state_dict", "base_optimizer_state", "state")),
    (("optimizer_state_dict", "fp32_flat_groups"), ("optimizer_state_dict", "optimizer_state_dict", "state")),
)
_MODEL_SUFFIX = "_model_states.pt"


def engine_files(folder: Path) -> list[Path]:
    """The engine's state files in a checkpoint folder (``<tag>/*_states.pt``), sorted by name."""
    return sorted(
        p
        for p in folder.glob("*/*.pt")
        if p.is_file() and p.parent.name != REFS_DIR and p.name.endswith((_OPTIM_SUFFIX, _MODEL_SUFFIX))
    )


def owned_files(folder: Path, rank: int) -> list[Path]:
    """The files rank ``rank`` wrote: its ZeRO partition, and on rank 0 the module states too.

    With bf16 enabled the engine prefixes the partition files with ``bf16_`` (``_get_zero_ckpt_prefix``):
    those hold the same fp32 master partitions and moments, and must not be left uncompressed.
    """
    partition_prefixes = (f"zero_pp_rank_{rank}_", f"bf16_zero_pp_rank_{rank}_")
    return [
        p
        for p in engine_files(folder)
        if p.name.startswith(partition_prefixes) or (rank == 0 and p.name.startswith("mp_rank_"))
    ]


def has_excp_files(folder: Path) -> bool:
    """True when a checkpoint folder holds at least one ExCP-coded engine file."""
    return folder.is_dir() and any(is_excp_file(p) for p in engine_files(folder))


def _get_or_none(obj: Any, path: tuple[str | int, ...]) -> Any:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def _wrap(obj: dict[str, Any], step: int | None, epoch: int | None) -> tuple[dict[str, Any], list[list[str]]]:
    """An engine file as a codec checkpoint (``state_dict``/``optimizer_states``), with the way back."""
    weights: dict[str, torch.Tensor] = {}
    leaves: dict[str, list[str | int]] = {}
    moments: dict[str, list[list[str | int]]] = {}
    module = obj.get("module")
    if isinstance(module, dict):
        for name, tensor in module.items():
            if isinstance(name, str) and isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and (
                tensor.numel() > 0  # ZeRO-3 placeholders stay in the skeleton: the partitions hold the weights
            ):
                weights[f"module/{name}"] = tensor
                leaves[f"module/{name}"] = ["module", name]
    for partitions_path, state_path in _PARTITION_LAYOUTS:
        partitions, state = _get_or_none(obj, partitions_path), _get_or_none(obj, state_path)
        if not isinstance(partitions, list):
            continue
        for group, tensor in enumerate(partitions):
            if not isinstance(tensor, torch.Tensor):
                continue
            name = f"fp32_group_{group}"
            weights[name] = tensor
            leaves[name] = [*partitions_path, group]
            slot = state.get(group) if isinstance(state, dict) else None
            keys = ("exp_avg", "exp_avg_sq")
            if isinstance(slot, dict) and all(
                isinstance(slot.get(k), torch.Tensor) and slot[k].shape == tensor.shape for k in keys
            ):
                moments[name] = [[*state_path, group, "exp_avg"], [*state_path, group, "exp_avg_sq"]]
    names = list(weights)
    taken = {tuple(p) for p in leaves.values()} | {tuple(p) for pair in moments.values() for p in pair}
    optimizer = {
        "state": {i: {"exp_avg": get_at(obj, moments[n][0]), "exp_avg_sq": get_at(obj, moments[n][1]),
                      "step": _adam_step(obj, moments[n][1])}
                  for i, n in enumerate(names) if n in moments},
        "param_groups": [{"params": list(range(len(names))), "betas": _shared_betas(obj)}],
    }
    wrapped = {
        "state_dict": weights,
        "optimizer_states": [optimizer],
        "global_step": step,
        "epoch": epoch,
        "deepspeed": _hollow(obj, taken),
        "deepspeed_leaves": leaves,
        "deepspeed_moments": moments,
    }
    return wrapped, [[n if n in moments else None for n in names]]


def _adam_step(obj: dict[str, Any], v_path: list[str | int]) -> Any:
    """The Adam step count kept beside a partition's ``exp_avg_sq`` (None where there is none)."""
    slot = _get_or_none(obj, tuple(v_path[:-1]))
    return slot.get("step") if isinstance(slot, dict) else None


def _shared_betas(obj: dict[str, Any]) -> Any:
    """The ZeRO optimizer's Adam betas when all its groups share them (None otherwise), so the weight rule
    can bias-correct v as for a Lightning checkpoint (``ExCPSettings.v_bias_correction``)."""
    for _, state_path in _PARTITION_LAYOUTS:
        groups = _get_or_none(obj, (*state_path[:-1], "param_groups"))
        if isinstance(groups, list) and groups and all(isinstance(g, dict) for g in groups):
            betas = {tuple(g.get("betas") or ()) for g in groups}
            return list(betas.pop()) if len(betas) == 1 else None
    return None


def _unwrap(wrapped: dict[str, Any]) -> dict[str, Any]:
    """The engine file's dict back from a decoded codec checkpoint (every leaf where it was)."""
    obj = wrapped["deepspeed"]
    names = list(wrapped["state_dict"])
    for name, path in wrapped["deepspeed_leaves"].items():
        set_at(obj, path, wrapped["state_dict"][name])
    state = wrapped["optimizer_states"][0]["state"]
    for name, (m_path, v_path) in wrapped["deepspeed_moments"].items():
        slot = state[names.index(name)]
        set_at(obj, m_path, slot["exp_avg"])
        set_at(obj, v_path, slot["exp_avg_sq"])
    return obj


class _FolderChainEncoder(ExCPEncoder):
    """A chain whose files live in different checkpoint folders, each carrying its chain in ``.excp_refs/``."""

    @override
    def _continues_head(self, target: Path) -> bool:
        return self._head is not None and reference_available(target, self._head)


def _link_chain(head: Path, target: Path) -> None:
    """Hard-link (or copy) every file of ``head``'s chain into ``target``'s ``.excp_refs/`` (skips when broken)."""
    try:
        chain = chain_paths(head)
    except (ExCPFormatError, OSError):
        return  # the head is gone or unreadable: the encoder then writes a keyframe
    refs = target.parent / REFS_DIR
    refs.mkdir(exist_ok=True)
    for path in chain:
        link = refs / f"{read_header(path)['file_id']}.excp"
        if link.exists():
            continue
        try:
            os.link(path, link)
        except OSError:
            with open(path, "rb") as reader:
                atomic_write_bytes(link, reader.read())


class DeepSpeedChains:
    """One ExCP chain per (checkpoint parent folder, engine file name) on this rank.

    Args:
        settings: codec settings.
    """

    def __init__(self, settings: ExCPSettings) -> None:
        self.settings = settings
        self._encoders: dict[tuple[str, str], _FolderChainEncoder] = {}
        self._pending: list[tuple[_FolderChainEncoder, Encoded, str]] = []

    def reset(self) -> None:
        """Forget every chain (after a resume the next checkpoint starts with keyframes)."""
        for encoder in self._encoders.values():
            encoder.reset()

    def compress(self, staging: Path, target: Path, rank: int, step: int | None, epoch: int | None) -> list[dict]:
        """Replace this rank's engine files in ``staging`` by ExCP files (atomic per file); returns their stats.

        ``target`` is where ``staging`` will be swapped in: the chains are keyed by its parent folder.
        """
        stats = []
        for plain in owned_files(staging, rank):
            key = (os.path.realpath(target.parent), plain.name)
            encoder = self._encoders.setdefault(key, _FolderChainEncoder(self.settings))
            if encoder.head is not None:
                _link_chain(Path(encoder.head["dir"]) / encoder.head["name"], plain)
            obj = torch.load(plain, map_location="cpu", weights_only=False)  # written by this process just now
            wrapped, optimizer_names = _wrap(obj, step, epoch)
            encoded = encoder.encode(
                wrapped,
                target=plain,
                param_names=set(wrapped["state_dict"]),
                optimizer_param_names=optimizer_names,
                meta={"format": "deepspeed", "file": plain.name},
            )
            raw_bytes = plain.stat().st_size
            atomic_write_bytes(plain, encoded.data)  # complete and fsynced, then renamed over the plain file
            final = target / plain.relative_to(staging)
            self._pending.append((encoder, encoded, str(final)))
            stats.append({**encoded.stats, "engine_file_bytes": float(raw_bytes), "file": plain.name})
        return stats

    def commit(self) -> None:
        """The files of the last :meth:`compress` are in place: they become the next deltas' references."""
        for encoder, encoded, final in self._pending:
            encoder.commit(encoded, final)
        self._pending.clear()

    def abandon(self) -> None:
        """The last :meth:`compress` never reached its target (the save failed): keep the old heads."""
        self._pending.clear()


def restore_files(source: Path, destination: Path, rank: int, world_size: int) -> None:
    """Decode this rank's share of ``source``'s ExCP files into ordinary engine files under ``destination``.

    Files are shared out by position (any world size), each decoded through its chain with safe
    unpickling. Plain engine files are hard-linked. Rank 0 also copies ``latest``.
    """
    destination.mkdir(parents=True, exist_ok=True)
    if rank == 0 and (source / "latest").is_file():
        shutil.copyfile(source / "latest", destination / "latest")
    for index, path in enumerate(engine_files(source)):
        if index % world_size != rank:
            continue
        out = destination / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        if not is_excp_file(path):
            os.link(path, out)
            continue
        wrapped = load_checkpoint(path, weights_only=True)
        buffer = io.BytesIO()
        torch.save(_unwrap(wrapped), buffer)
        out.write_bytes(buffer.getvalue())


def new_staging_dir(target: Path) -> Path:
    """A fresh hidden folder beside ``target`` (a temporary name: ``.<name>.<random>.tmp``)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent))


def remove_stale_staging(directory: Path) -> list[Path]:
    """Delete staging folders a killed save or load left in ``directory`` (call before the first save)."""
    removed = []
    for path in directory.glob(f".*{TEMP_SUFFIX}") if directory.is_dir() else []:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return result == 0


def swap_in(staging: Path, target: Path) -> None:
    """Make the complete, fsynced ``staging`` folder the checkpoint at ``target`` in one rename.

    An existing ``target`` (``last.ckpt``) is exchanged with it atomically where the OS allows, so a
    kill leaves the old or the new folder at ``target``, never neither; it is deleted afterwards.
    """
    for file in staging.rglob("*"):
        if file.is_file() and not file.is_symlink():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    for folder in [staging, *(p for p in staging.rglob("*") if p.is_dir())]:
        _fsync_directory(folder)
    if target.exists() and _exchange(staging, target):
        _fsync_directory(target.parent)
        shutil.rmtree(staging, ignore_errors=True)  # now the old folder
        return
    old = None
    if target.exists():  # no atomic exchange here: the old folder is renamed aside first
        old = new_staging_dir(target)
        os.replace(target, old / target.name)
    os.replace(staging, target)
    _fsync_directory(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_folder(path: Path) -> None:
    """Remove a checkpoint folder: renamed to a temporary name in one step, then deleted.

    Later checkpoints hold their own hard links to every file they need, so nothing else is touched.
    """
    if not path.exists():
        return
    if not path.is_dir():
        path.unlink()
        return
    doomed = new_staging_dir(path)
    os.replace(path, doomed / path.name)
    _fsync_directory(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def read_engine_file(path: Path) -> dict[str, Any]:
    """One engine file as a dict: decoded through its chain when ExCP, else loaded with safe unpickling."""
    if is_excp_file(path):
        return _unwrap(load_checkpoint(path, weights_only=True))
    return load_metadata(path)


def folder_hyperparameters(folder: Path) -> dict[str, Any]:
    """The ``hyper_parameters`` Lightning stored in a DeepSpeed checkpoint folder (metadata only, read safely).

    Raises:
        ExCPFormatError: the folder holds no module states file, or it cannot be read safely.
    """
    from callbacks.excp.decoder import _metadata
    from callbacks.excp.fileformat import ExCPFile

    states = [p for p in engine_files(folder) if p.name.endswith(_MODEL_SUFFIX)]
    if not states:
        raise ExCPFormatError(
            folder, "is a directory but not a DeepSpeed checkpoint folder (no */*_model_states.pt in it)",
            "Pass a checkpoint file, or a folder the DeepSpeed strategy wrote",
        )
    path = states[0]
    if is_excp_file(path):
        wrapped = _metadata(ExCPFile.open(path), trust_pickles=False)
        metadata = wrapped.get("deepspeed") if isinstance(wrapped, dict) else None
    else:
        metadata = load_metadata(path, mmap=True)
    hyperparameters = metadata.get("hyper_parameters", {}) if isinstance(metadata, dict) else {}
    return dict(hyperparameters) if isinstance(hyperparameters, dict) else {}
