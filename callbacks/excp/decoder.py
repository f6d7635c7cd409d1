"""Rebuild checkpoints from ExCP files: replay a chain from its keyframe, assemble the dict (no Lightning).

Every file of a chain is read whole and verified (magic, header checksum, length, whole-file
sha256) and every reference is checked against the id *and* sha256 its dependent recorded, on every
path (load, resume, inspect, decompress). The pickled metadata is loaded with
``weights_only=True`` unless the caller explicitly trusts the file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
import zstandard

from callbacks.excp.bases import BaseSource, resolve_base
from callbacks.excp.blockwise8bit import restore_8bit_states
from callbacks.excp.bounds import check_lossless_size
from callbacks.excp.dequantize import ParamStreams, read_param, rebuild
from callbacks.excp.fileformat import ExCPFile, ExCPFormatError, is_excp_file
from callbacks.excp.quantize import decode_lossless, dtype_from_name
from callbacks.excp.references import chain_paths, starts_chain
from callbacks.excp.safe_pickle import UnsafePickleError, load_metadata
from callbacks.excp.split import set_at
from callbacks.excp.threads import intra_op_threads

__all__ = ["decode_sequence", "load_checkpoint", "load_checkpoint_and_head", "open_chain", "read_hyperparameters"]

Weights = dict[str, torch.Tensor]
Moments = dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]
_T = TypeVar("_T")
_SKELETON_EXPANSION = 256
"""The metadata record may decompress to at most this many times its size (plus 1 MiB)."""


def _verify_reference(file: ExCPFile, reference: ExCPFile) -> None:
    wanted = file.header.get("ref") or {}
    if reference.header.get("file_id") != wanted.get("file_id") or reference.sha256 != wanted.get("sha256"):
        raise ExCPFormatError(
            file.path,
            f"its reference {reference.path} does not match the one it was made against "
            f"(sha256 {reference.sha256[:12]}..., expected {str(wanted.get('sha256'))[:12]}...)",
            "The reference was modified; restore it or use another checkpoint",
        )


def open_chain(path: str | os.PathLike) -> list[ExCPFile]:
    """Open and verify every file ``path`` needs, keyframe first, each reference checked by hash."""
    files = [ExCPFile.open(p) for p in chain_paths(path)]
    if not starts_chain(files[0].header):
        raise ExCPFormatError(files[0].path, "chain does not start with a keyframe (file is corrupted)")
    for reference, file in zip(files, files[1:], strict=False):
        _verify_reference(file, reference)
    return files


def _read_entry(file: ExCPFile, entry: dict[str, Any], reference: Weights | None, skip_moments: bool) -> ParamStreams:
    name = entry["name"]
    shape = tuple(int(d) for d in entry["shape"])
    base = None
    if entry["w_mode"] != "lossless":
        # a quantized stream holds one code per element of the shape the header claims: only the
        # reference (decoded earlier, bounded by its own bytes) can vouch for that shape. The encoder
        # writes "absolute" (no-residual) entries only where the reference has the tensor, too.
        base = (reference or {}).get(name)
        if base is None or tuple(base.shape) != shape:
            raise ExCPFormatError(
                file.path, f"tensor {name} is quantized against a reference that lacks it or has another shape"
            )
    first, second = entry.get("m"), entry.get("v")
    # a keyframe written with keyframe_moments="lossy" quantizes its moments as a delta does
    moments_kind = "delta" if entry.get("moments") == "quantized" else file.header["kind"]
    return read_param(
        kind=moments_kind,
        w_mode=entry["w_mode"],
        w_blob=file.record(entry["rec_w"]),
        m_blob=None if (first is None or skip_moments) else file.record(first["rec"]),
        v_blob=None if (second is None or skip_moments) else file.record(second["rec"]),
        ref=base,
        shape=shape,
        dtype=dtype_from_name(entry["dtype"]),
        m_dtype=None if first is None else dtype_from_name(first["dtype"]),
        v_dtype=None if second is None else dtype_from_name(second["dtype"]),
        weights_only=skip_moments,
        v_floor=_v_floor(file, second),
    )


def _v_floor(file: ExCPFile, second: dict[str, Any] | None) -> float:
    floor = 0.0 if second is None else second.get("floor", 0.0)
    if type(floor) not in (int, float) or not math.isfinite(floor) or floor < 0:
        raise ExCPFormatError(file.path, "a second-moment floor in the header is not a finite number >= 0")
    return float(floor)


def _threads(file: ExCPFile, threads: int | None) -> int:
    """Tensors rebuilt at once: ``threads``, or else the ``threads`` the file was written with (at most the CPUs)."""
    if threads is not None:
        return max(1, threads)
    recorded = file.header.get("settings", {}).get("threads", 1)
    return max(1, min(recorded if type(recorded) is int else 1, os.cpu_count() or 1))


def _decode_file(
    file: ExCPFile, reference: Weights | None, skip_moments: bool, threads: int | None = None
) -> tuple[Weights, Moments]:
    """Weights (and moments unless skipped) of one file; a twin holds none and returns its reference's.

    The code streams are entropy-decoded first, then with several threads the tensors are rebuilt in
    parallel, largest first; a corrupted file raises the error of its first bad tensor either way.
    """
    if file.header["kind"] == "twin":
        return dict(reference or {}), {}
    entries = file.header["entries"]

    def checked(step: Callable[[], _T], entry: dict[str, Any]) -> _T:
        try:
            return step()
        except ExCPFormatError:
            raise
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError, zstandard.ZstdError) as error:
            raise ExCPFormatError(
                file.path, f"tensor {entry.get('name')!r} cannot be decoded ({error}; file is corrupted)"
            ) from None

    # entropy decoding holds the GIL (constriction): one thread; rebuilding the tensors releases it
    streams = [checked(lambda e=e: _read_entry(file, e, reference, skip_moments), e) for e in entries]
    workers = min(_threads(file, threads), len(entries))
    if workers > 1:
        pool = ThreadPoolExecutor(workers)
        try:
            largest_first = sorted(range(len(entries)), key=lambda i: -math.prod(entries[i]["shape"]))
            futures = {i: pool.submit(checked, partial(rebuild, streams[i]), entries[i]) for i in largest_first}
            decoded = [futures[i].result() for i in range(len(entries))]
        finally:
            pool.shutdown(cancel_futures=True)
    else:
        decoded = [checked(partial(rebuild, s), e) for s, e in zip(streams, entries, strict=True)]
    del streams
    weights: Weights = {}
    moments: Moments = {}
    for entry, (weight, first, second) in zip(entries, decoded, strict=True):
        weights[entry["name"]] = weight
        moments[entry["name"]] = (first, second)
    return weights, moments


def _chain_start(file: ExCPFile, base: BaseSource | None) -> Weights | None:
    """The weights a chain's first file was coded against: its base (verified by hash), or None for a keyframe."""
    if file.header["kind"] == "keyframe":
        return None
    return resolve_base(file.path, file.header.get("base"), base)


def load_checkpoint(
    path: str | os.PathLike,
    weights_only: bool | None = True,
    base: BaseSource | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Rebuild the checkpoint dict stored at ``path``, replaying its chain from the keyframe (or base).

    Arguments and errors as in :func:`load_checkpoint_and_head`.
    """
    return load_checkpoint_and_head(path, weights_only, base, threads)[0]


def load_checkpoint_and_head(
    path: str | os.PathLike,
    weights_only: bool | None = True,
    base: BaseSource | None = None,
    threads: int | None = None,
) -> tuple[dict[str, Any], ExCPFile]:
    """:func:`load_checkpoint`, plus the verified file at ``path`` (a resume continues its chain from it).

    Args:
        path: an ExCP file.
        weights_only: True or None (default, safe) loads the pickled non-tensor state (hyperparameters,
            loops, ...) with ``torch.load(weights_only=True)`` and the types Lightning checkpoints
            hold, and refuses files declaring far more lossless tensor bytes than their size
            (:mod:`callbacks.excp.bounds`); False trusts the file completely: a crafted file then runs
            arbitrary code or allocates what it claims.
        base: the weights the run started from, for a chain whose first file was coded against them
            (see :mod:`callbacks.excp.bases`): a weights dict, a function returning one, or a
            safetensors folder or file; the folder recorded in the file is tried after it.
        threads: tensors decoded in parallel; None: the ``threads`` setting the file was written with
            (at most the number of CPUs).

    Raises:
        ExCPFormatError: a file is missing, truncated, corrupted, not the reference it should be, or
            its metadata needs a type that cannot be loaded safely, or its chain starts from base
            weights that ``base`` (nor the recorded source) does not provide.
    """
    with intra_op_threads():
        files = open_chain(path)
        _check_sizes(files, trusted=weights_only is False)
        kinds = [f.header["kind"] for f in files]
        weights: Weights | None = _chain_start(files[0], base)
        moments: Moments = {}
        for position, file in enumerate(files):
            # moments come from the last file that holds tensors (later files are its twins)
            need_moments = all(kind == "twin" for kind in kinds[position + 1 :])
            decoded, decoded_moments = _decode_file(file, weights, not need_moments, threads)
            weights = decoded
            if file.header["kind"] != "twin":
                moments = decoded_moments
        assert weights is not None
        return _assemble(files[-1], weights, moments, trust_pickles=weights_only is False), files[-1]


def _check_sizes(files: Sequence[ExCPFile], trusted: bool) -> None:
    """Refuse files declaring more lossless tensor bytes than their size allows, unless the caller trusts them."""
    if not trusted:
        for file in files:
            check_lossless_size(file)


def _metadata(file: ExCPFile, trust_pickles: bool) -> Any:
    record = file.record(file.header["skeleton"])
    bound = _SKELETON_EXPANSION * len(record) + (1 << 20)
    try:
        declared = zstandard.frame_content_size(record)
        if declared < 0 or declared > bound:
            raise ExCPFormatError(file.path, "its metadata record declares an impossible size (file is corrupted)")
        raw = zstandard.ZstdDecompressor().decompress(record, max_output_size=bound)
    except zstandard.ZstdError as error:
        raise ExCPFormatError(file.path, f"metadata record cannot be decompressed ({error})") from None
    try:
        return load_metadata(raw, trust_pickles=trust_pickles)
    except UnsafePickleError as error:
        raise ExCPFormatError(file.path, str(error)) from None


def _assemble(file: ExCPFile, weights: Weights, moments: Moments, trust_pickles: bool) -> dict[str, Any]:
    """Put the decoded tensors back into the file's metadata skeleton."""
    ckpt = _metadata(file, trust_pickles)
    if not isinstance(ckpt, dict):
        raise ExCPFormatError(file.path, "its metadata is not a checkpoint dict (file is corrupted)")
    header = file.header
    try:
        for entry in header["entries"]:
            set_at(ckpt, ("state_dict", entry["name"]), weights[entry["name"]])
            first, second = moments.get(entry["name"], (None, None))
            if entry.get("m") is not None:
                set_at(ckpt, entry["m"]["path"], first)
            if entry.get("v") is not None:
                set_at(ckpt, entry["v"]["path"], second)
        for alias in header["aliases"]:
            set_at(ckpt, alias["path"], weights[alias["of"]])
        for extra in header["extras"]:
            shape = tuple(int(d) for d in extra["shape"])
            set_at(
                ckpt, extra["path"], decode_lossless(file.record(extra["rec"]), dtype_from_name(extra["dtype"]), shape)
            )
        restore_8bit_states(ckpt)
    except ExCPFormatError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError, zstandard.ZstdError) as error:
        raise ExCPFormatError(
            file.path, f"its tensor index does not fit its metadata ({error}; file is corrupted)"
        ) from None
    return ckpt


def decode_sequence(
    paths: Sequence[str | os.PathLike],
    weights_only: bool | None = True,
    base: BaseSource | None = None,
    threads: int | None = None,
) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Decode a series of files of one chain in order, replaying each file once (not once per file).

    The first file's chain is replayed as in :func:`load_checkpoint`; each later file that
    references the previous one continues from it (after checking its sha256), any other file
    rebuilds its own chain. ``weights_only``, ``base`` and ``threads`` as in :func:`load_checkpoint_and_head`.
    """
    trust = weights_only is False
    previous: ExCPFile | None = None
    weights: Weights | None = None
    moments: Moments = {}
    for path in map(Path, paths):
        file = ExCPFile.open(path)
        _check_sizes([file], trust)
        kind = file.header["kind"]
        continues = (
            kind in ("delta", "twin")
            and previous is not None
            and previous.header["file_id"] == (file.header.get("ref") or {}).get("file_id")
        )
        if continues:
            assert previous is not None
            _verify_reference(file, previous)
        elif kind in ("delta", "twin"):
            chain = open_chain(path)
            _check_sizes(chain, trust)
            file = chain[-1]
            weights, moments = _chain_start(chain[0], base), {}
            holders = [i for i, earlier in enumerate(chain[:-1]) if earlier.header["kind"] != "twin"]
            for position, earlier in enumerate(chain[:-1]):
                need_moments = kind == "twin" and position == holders[-1]
                weights, decoded_moments = _decode_file(earlier, weights, not need_moments, threads)
                if need_moments:
                    moments = decoded_moments
        if kind == "twin":
            decoded, decoded_moments = dict(weights or {}), moments
        else:
            decoded, decoded_moments = _decode_file(file, weights if kind == "delta" else None, False, threads)
        yield path, _assemble(file, decoded, decoded_moments, trust)
        weights, moments, previous = decoded, decoded_moments, file


def read_hyperparameters(path: str | os.PathLike) -> dict[str, Any]:
    """The ``hyper_parameters`` of a checkpoint file, ExCP or ``torch.save``, read safely.

    Only the metadata is read (no tensors are decoded); an ExCP file is verified whole (checksums),
    its chain is checked when the checkpoint is loaded. Used by ``train.py`` before it builds the model.

    Raises:
        ExCPFormatError: the file is missing, not a regular file, corrupted, or not a checkpoint.
    """
    if is_excp_file(path):
        metadata = _metadata(ExCPFile.open(path), trust_pickles=False)
    else:
        ExCPFile.check_regular(path)
        try:
            metadata = load_metadata(os.fspath(path))
        except UnsafePickleError as error:
            raise ExCPFormatError(path, f"is neither an ExCP file nor a loadable checkpoint: {error}") from None
    if not isinstance(metadata, dict):
        raise ExCPFormatError(path, f"holds a {type(metadata).__name__}, not a checkpoint dict")
    hyperparameters = metadata.get("hyper_parameters", {})
    return dict(hyperparameters) if isinstance(hyperparameters, dict) else {}
