"""Chains on disk: finding a delta's reference, keeping what a chain needs, dropping what it does not.

Files form chains: a keyframe (lossless) followed by deltas, each naming the id, file name and
sha256 of the file it was coded against. A file that a live checkpoint still needs is never lost:

* before a checkpoint is overwritten (``last.ckpt``), :func:`preserve_for_chain` hard-links (or
  copies) it into ``.excp_refs/<id>.excp``; the new file then replaces it in one rename, so a kill
  at any instant leaves either the old file or the new one, and the old content stays reachable;
* a removed checkpoint (top-k rotation) is moved into ``.excp_refs/`` in one rename by :func:`retire`;
* :func:`collect_garbage` deletes a file in ``.excp_refs/`` only when no live checkpoint reaches it,
  and deletes nothing when a live checkpoint cannot be read (its needs are unknown).

Temporary files left by a kill (``.<name>.<random>.tmp``) never count as checkpoints and are removed
by :func:`remove_stale_temporaries`. No Lightning is imported here.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Collection
from pathlib import Path
from typing import Any

from callbacks.excp.fileformat import ExCPFormatError, is_excp_file, read_header
from common.atomic import TEMP_SUFFIX, atomic_write_stream

__all__ = [
    "MAX_CHAIN_LENGTH",
    "MissingReferenceError",
    "REFS_DIR",
    "chain_paths",
    "collect_garbage",
    "is_temporary",
    "live_checkpoints",
    "preserve_for_chain",
    "reference_available",
    "remove_stale_temporaries",
    "link_chain_into",
    "resolve_reference",
    "retire",
    "starts_chain",
]

REFS_DIR = ".excp_refs"
MAX_CHAIN_LENGTH = 10_000
"""Longest chain a reader follows; a longer one (or a cycle) is an error, never a hang."""


class MissingReferenceError(ExCPFormatError):
    """The file a delta was made against is nowhere to be found (as opposed to found but corrupt)."""


def is_temporary(path: Path) -> bool:
    """True for the staging files of an atomic write (``.<name>.<random>.tmp``), never checkpoints."""
    return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)


def live_checkpoints(directory: Path) -> list[Path]:
    """ExCP files directly in ``directory`` (regular files, no temporaries, not ``.excp_refs/``)."""
    if not directory.is_dir():
        return []
    found = []
    for path in sorted(directory.iterdir()):
        if is_temporary(path) or path.is_symlink():
            continue
        try:
            regular = stat.S_ISREG(path.stat().st_mode)
        except OSError:
            continue
        if regular and is_excp_file(path):
            found.append(path)
    return found


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete staging files a killed writer left in ``directory`` and its ``.excp_refs/``.

    Call it only when no other process writes into the folder (at setup, before the first save).
    """
    removed = []
    for folder in (Path(directory), Path(directory) / REFS_DIR):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if is_temporary(path) and path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _candidates(from_path: Path, ref: dict[str, Any]) -> list[Path]:
    directory = from_path.parent
    if directory.name == REFS_DIR:  # a retired file: its references live next to the live checkpoints
        directory = directory.parent
    return [directory / str(ref["name"]), directory / REFS_DIR / f"{ref['file_id']}.excp"]


def reference_available(target: Path, head: dict[str, Any]) -> bool:
    """True when a delta written at ``target`` could find ``head`` (the file it would reference)."""
    for candidate in _candidates(target, head):
        try:
            if candidate.is_file() and read_header(candidate).get("file_id") == head["file_id"]:
                return True
        except ExCPFormatError:
            continue
    return False


def _reference_record(path: Path, header: dict[str, Any]) -> dict[str, Any]:
    ref = header.get("ref")
    if not isinstance(ref, dict) or not all(isinstance(ref.get(k), str) for k in ("file_id", "sha256", "name")):
        raise ExCPFormatError(path, "its header names no valid reference (file is corrupted)")
    if "/" in ref["name"] or "\\" in ref["name"] or ref["name"] in ("", ".", ".."):
        raise ExCPFormatError(path, f"its reference name {ref['name']!r} is not a file name (file is corrupted)")
    return ref


def resolve_reference(path: str | os.PathLike, header: dict[str, Any]) -> Path:
    """Locate the file a delta was made against (by name, else in ``.excp_refs/`` by id).

    Only the id is checked here; readers verify the reference's sha256 before using it.
    """
    path = Path(path)
    ref = _reference_record(path, header)
    wrong_id = None
    unreadable = None
    for candidate in _candidates(path, ref):
        if not candidate.exists():
            continue
        try:
            file_id = read_header(candidate).get("file_id")
        except ExCPFormatError as error:
            unreadable = unreadable or error
            continue
        if file_id == ref["file_id"]:
            return candidate
        wrong_id = wrong_id or (candidate, file_id)
    if unreadable is not None:
        raise ExCPFormatError(
            path,
            f"its reference is corrupt ({unreadable.problem}: {unreadable.path})",
            "Restore that file from a copy or use another checkpoint",
        )
    if wrong_id is not None:
        raise ExCPFormatError(
            path,
            f"its reference {wrong_id[0]} is a different checkpoint (id {wrong_id[1]}) than the one it was made "
            f"against (id {ref['file_id']})",
            "The chain was broken by overwriting a file; restore the original or use a keyframe",
        )
    raise MissingReferenceError(
        path,
        f"its reference {ref['name']} (id {ref['file_id']}) is missing",
        f"Keep every checkpoint of the chain and the {REFS_DIR}/ folder next to it",
    )


def chain_paths(path: str | os.PathLike) -> list[Path]:
    """Files needed to rebuild ``path``: its keyframe first, ``path`` last (headers only).

    Raises:
        ExCPFormatError: a reference is missing or corrupt, the chain loops back on itself, or it
            is longer than :data:`MAX_CHAIN_LENGTH`.
    """
    chain = [Path(path)]
    header = read_header(path)
    seen_ids = {header.get("file_id")}
    while not starts_chain(header):
        if len(chain) > MAX_CHAIN_LENGTH:
            raise ExCPFormatError(path, f"its reference chain is longer than {MAX_CHAIN_LENGTH} files")
        ref_path = resolve_reference(chain[-1], header)
        header = read_header(ref_path)
        if header.get("file_id") in seen_ids:
            raise ExCPFormatError(path, "its reference chain loops back on itself (a cycle; file is corrupted)")
        seen_ids.add(header.get("file_id"))
        chain.append(ref_path)
    return chain[::-1]


def starts_chain(header: dict[str, Any]) -> bool:
    """True for a chain's first file: a keyframe, or a delta coded against base weights (no file reference)."""
    kind = header.get("kind")
    return kind not in ("delta", "twin") or (
        kind == "delta" and header.get("ref") is None and isinstance(header.get("base"), dict)
    )


def link_chain_into(path: str | os.PathLike, directory: str | os.PathLike) -> None:
    """Make ``path`` and every file its chain needs reachable from ``directory`` (``.excp_refs/<id>.excp``).

    A resumed run that saves into another folder continues the chain it loaded: its first delta
    references a file of the old folder, which must survive that folder's deletion. Hard links cost
    no space (copies where the filesystem has none); garbage collection drops them once no live
    checkpoint of ``directory`` needs them.
    """
    refs = Path(directory) / REFS_DIR
    for file in chain_paths(path):
        file_id = read_header(file).get("file_id")
        if not isinstance(file_id, str):
            raise ExCPFormatError(file, "its header has no file id (file is corrupted)")
        refs.mkdir(parents=True, exist_ok=True)
        target = refs / f"{file_id}.excp"
        if not target.exists():
            _link_or_copy(Path(file), target)


def _link_or_copy(source: Path, target: Path) -> None:
    """Give ``source``'s content a second name ``target`` without ever exposing a partial file."""
    try:
        os.link(source, target)
        return
    except FileExistsError:
        return
    except OSError:
        pass  # no hard links on this filesystem: copy through a temporary file and one rename
    with open(source, "rb") as reader:
        atomic_write_stream(target, lambda writer: shutil.copyfileobj(reader, writer))


def preserve_for_chain(path: str | os.PathLike) -> None:
    """Keep the ExCP file at ``path`` reachable as ``.excp_refs/<id>.excp`` before it is overwritten.

    The file itself is not moved: the caller then replaces it in one rename, so the old version is
    at ``path`` or in ``.excp_refs/`` (or both) at every instant. Files that are not readable ExCP
    files are left alone (nothing can reference them).
    """
    path = Path(path)
    if path.is_symlink() or not path.is_file() or not is_excp_file(path):
        return
    try:
        file_id = read_header(path)["file_id"]
    except (ExCPFormatError, KeyError):
        return
    refs = path.parent / REFS_DIR
    refs.mkdir(exist_ok=True)
    target = refs / f"{file_id}.excp"
    if not target.exists():
        _link_or_copy(path, target)


def retire(path: str | os.PathLike) -> None:
    """Remove a checkpoint the way a chain survives it: ExCP files move to ``.excp_refs/<id>.excp``.

    The move is one rename, so the file exists under one of its two names at every instant. Other
    files are deleted. Call :func:`collect_garbage` afterwards to drop what nothing needs.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_file() or not is_excp_file(path):
        path.unlink()
        return
    try:
        file_id = read_header(path)["file_id"]
    except (ExCPFormatError, KeyError):
        path.unlink()
        return
    refs = path.parent / REFS_DIR
    refs.mkdir(exist_ok=True)
    os.replace(path, refs / f"{file_id}.excp")


def _reachable(start: Path) -> list[Path]:
    """``start`` and the files its chain resolves to, up to a missing reference (a broken chain)."""
    reached = [start.resolve()]
    header = read_header(start)
    while not starts_chain(header) and len(reached) <= MAX_CHAIN_LENGTH:
        try:
            ref_path = resolve_reference(start, header)
        except MissingReferenceError:
            break
        if ref_path.resolve() in reached:
            break
        reached.append(ref_path.resolve())
        start, header = ref_path, read_header(ref_path)
    return reached


def collect_garbage(directory: str | os.PathLike, keep_ids: Collection[str] = ()) -> list[Path]:
    """Delete files in ``<directory>/.excp_refs`` that no live checkpoint (or ``keep_ids``) reaches.

    A file there is kept when a live checkpoint's chain resolves to it. When a live checkpoint or a
    reference on the way is corrupt, nothing is deleted: what it needs is unknown. A missing
    reference only ends that chain's walk (what is gone cannot be kept).

    Returns:
        The deleted paths.
    """
    directory = Path(directory)
    refs = directory / REFS_DIR
    if not refs.is_dir():
        return []
    reached: set[Path] = set()
    starts = list(live_checkpoints(directory))
    starts += [refs / f"{file_id}.excp" for file_id in keep_ids if (refs / f"{file_id}.excp").is_file()]
    for start in starts:
        try:
            reached.update(_reachable(start))
        except ExCPFormatError:
            return []
    for file_id in keep_ids:
        reached.add((refs / f"{file_id}.excp").resolve())
    deleted = []
    for path in refs.iterdir():
        if path.suffix == ".excp" and not is_temporary(path) and path.resolve() not in reached:
            path.unlink()
            deleted.append(path)
    if not any(refs.iterdir()):
        refs.rmdir()
    return deleted
