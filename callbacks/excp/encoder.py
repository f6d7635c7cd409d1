"""The chain encoder: codes each checkpoint as a keyframe, a delta or a same-step twin (no Lightning).

It keeps the reconstruction a reader will hold (closed loop), so every delta is coded against what
a decoder gets, never against the exact previous weights.
"""

from __future__ import annotations

import copy
import io
import os
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import zstandard

from callbacks.excp.allocation import split_budget
from callbacks.excp.bases import base_record
from callbacks.excp.blockwise8bit import expand_8bit_states
from callbacks.excp.codec import ExCPSettings, ParamCode, encode_param_delta, encode_param_keyframe, tensor_generator
from callbacks.excp.fileformat import build_file
from callbacks.excp.quantize import dtype_name, encode_lossless
from callbacks.excp.rate import SMALL_NUMEL
from callbacks.excp.references import reference_available
from callbacks.excp.split import (
    CheckpointSplit,
    ParamEntry,
    raw_tensor_bytes,
    same_state_fingerprint,
    split_checkpoint,
)
from callbacks.excp.threads import intra_op_threads

__all__ = ["Encoded", "ExCPEncoder"]

_STAT_KEYS = ("numel", "kept_w", "kept_m", "numel_m", "numel_v", "bytes_w", "bytes_m", "bytes_v")


@dataclass
class Encoded:
    """A coded checkpoint ready to be written, plus what the encoder must remember once it is."""

    data: bytes
    file_id: str
    sha256: str
    header: dict[str, Any]
    stats: dict[str, float]
    recon: dict[str, torch.Tensor] = field(repr=False)
    twin: dict[str, Any] | None = field(default=None, repr=False)


@dataclass
class _CodedTensors:
    """The tensor part of one file: records, the index that finds them, counts and reconstruction."""

    kind: str
    chain_index: int
    records: list[tuple[str, bytes]]
    entries: list[dict[str, Any]]
    counts: dict[str, int]
    recon: dict[str, torch.Tensor]
    reference: dict[str, str] | None
    base: dict[str, Any] | None = None


class ExCPEncoder:
    """Stateful chain encoder: keeps the reconstruction a reader will hold (closed loop).

    Call :meth:`encode`, write :attr:`Encoded.data`, then :meth:`commit` with the path written, so a
    failed write never advances the chain. :meth:`reset` starts a new chain (next file a keyframe),
    :meth:`start_from_base` a chain whose first file is a delta against the weights the run began with,
    :meth:`continue_from` continues a chain a resumed run loaded (no new keyframe).
    """

    def __init__(self, settings: ExCPSettings | None = None) -> None:
        self.settings = settings or ExCPSettings()
        self.reset()

    def reset(self) -> None:
        """Forget the chain: the next checkpoint becomes a keyframe."""
        self._reference_weights: dict[str, torch.Tensor] | None = None
        self._head: dict[str, Any] | None = None
        self._base: dict[str, Any] | None = None
        self._chain_index = -1
        self._last_saved: dict[str, Any] | None = None

    def start_from_base(
        self, weights: dict[str, torch.Tensor], source: dict[str, Any] | None = None, copy: bool = True
    ) -> str:
        """Code the next checkpoint as a delta against ``weights`` (the model the run started from).

        The file names them by content hash (:func:`~callbacks.excp.bases.base_record`) instead of
        storing a keyframe, so a reader must be given the same weights again. Returns their sha256.

        Args:
            weights: keyed like the checkpoints' ``state_dict``.
            source: where a reader finds them again, e.g. ``{"path": folder, "prefix": "model."}`` for
                safetensors files whose keys lack the module's prefix; None when only the caller knows.
            copy: copy ``weights`` (True unless the caller guarantees nothing modifies them, e.g.
                tensors read from files: a module's ``state_dict()`` shares storage with training).
        """
        self.reset()
        record = base_record(weights, source)
        kept = {n: weights[n].detach().cpu() for n in record["names"]}
        self._reference_weights = {n: t.clone() for n, t in kept.items()} if copy else kept
        self._base = record
        self._chain_index = 0
        return record["sha256"]

    def continue_from(
        self, path: str | os.PathLike, header: dict[str, Any], sha256: str, weights: dict[str, torch.Tensor]
    ) -> None:
        """Continue the chain of the file at ``path`` (just loaded by a resume) instead of starting a keyframe.

        Args:
            path: the loaded file; a delta written into another folder finds it there or in that
                folder's ``.excp_refs/`` (the caller links the chain in, see
                :func:`~callbacks.excp.references.link_chain_into`).
            header: its header (id and chain index).
            sha256: its whole-file hash (:attr:`ExCPFile.sha256`).
            weights: the weights a reader decodes from it (the closed loop continues from them); kept,
                not copied: pass decoded tensors nothing modifies.
        """
        self.reset()
        self._reference_weights = {n: t.detach().cpu() for n, t in weights.items()}
        self._head = _head_record(header["file_id"], sha256, Path(path))
        self._chain_index = int(header["chain_index"])

    @property
    def head(self) -> dict[str, Any] | None:
        """``{"file_id", "sha256", "name", "dir"}`` of the last committed file, or None."""
        return self._head

    def encode(
        self,
        ckpt: dict[str, Any],
        *,
        target: str | os.PathLike,
        param_names: Collection[str] | None = None,
        optimizer_param_names: Sequence[Sequence[str | None] | None] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Encoded:
        """Code ``ckpt`` as the next file of the chain, to be written at ``target``.

        Args:
            ckpt: the checkpoint dict (not modified).
            target: where it will be written; a chain never spans folders, so a new folder (or a
                missing reference) starts a keyframe.
            param_names: names in ``ckpt["state_dict"]`` that are trainable parameters (others,
                such as buffers, are stored losslessly). None: every float tensor there.
            optimizer_param_names: per optimizer, the parameter name of each slot in
                ``param_groups`` order; None entries are inferred by shape.
            meta: JSON-able extra header fields (e.g. ``{"format": "lightning"}``).
        """
        with intra_op_threads():
            started = time.perf_counter()
            target = Path(target)
            expanded = expand_8bit_states(ckpt)
            split = split_checkpoint(expanded, param_names, optimizer_param_names)
            fingerprint = same_state_fingerprint(expanded, split)
            if self._is_twin_of_last_save(fingerprint, target):
                coded = self._twin_of_last_save()
            else:
                coded = self._code_tensors(split, keyframe=self._needs_keyframe(target))
            last_saved = {"fingerprint": fingerprint, "entries": copy.deepcopy(coded.entries), "counts": coded.counts}
            header = self._header(coded, split, meta)
            header["stats"] = _statistics(coded, ckpt)
            data, file_id, sha256 = build_file(header, coded.records)
            return Encoded(
                data,
                file_id,
                sha256,
                header,
                _file_statistics(header["stats"], len(data), time.perf_counter() - started),
                coded.recon,
                last_saved,
            )

    def _continues_head(self, target: Path) -> bool:
        if self._base is not None and self._head is None:
            return True  # the base is found by hash, wherever the file goes
        return self._head is not None and reference_available(target, self._head)

    def _needs_keyframe(self, target: Path) -> bool:
        return (
            self._reference_weights is None
            or self._chain_index + 1 >= self.settings.keyframe_interval
            or not self._continues_head(target)
        )

    def _is_twin_of_last_save(self, fingerprint: tuple | None, target: Path) -> bool:
        """Same step, same weights as the file just written (ModelCheckpoint's top-k file, then last.ckpt)."""
        return (
            self._last_saved is not None
            and fingerprint is not None
            and fingerprint == self._last_saved["fingerprint"]
            and self._continues_head(target)
        )

    def _twin_of_last_save(self) -> _CodedTensors:
        """A twin stores no tensors, only a reference plus its own metadata; readers take W, m, v from there."""
        assert self._last_saved is not None and self._head is not None
        return _CodedTensors(
            kind="twin",
            chain_index=self._chain_index,
            records=[],
            entries=copy.deepcopy(self._last_saved["entries"]),
            counts=dict(self._last_saved["counts"]),
            recon=self._reference_weights or {},
            reference=self._reference_record(),
        )

    def _reference_record(self) -> dict[str, str]:
        assert self._head is not None
        return {k: self._head[k] for k in ("file_id", "sha256", "name")}

    def _code_tensors(self, split: CheckpointSplit, keyframe: bool) -> _CodedTensors:
        codes = self._code_params(split.entries, keyframe)
        records: list[tuple[str, bytes]] = []
        counts = dict.fromkeys(_STAT_KEYS, 0)
        entries = [_index_entry(entry, code, records, counts) for entry, code in zip(split.entries, codes, strict=True)]
        if keyframe and self.settings.keyframe_moments == "lossy":
            for index in entries:
                if index["m"] is not None:
                    index["moments"] = "quantized"
        return _CodedTensors(
            kind="keyframe" if keyframe else "delta",
            chain_index=0 if keyframe else self._chain_index + 1,
            records=records,
            entries=entries,
            counts=counts,
            recon={entry.name: code.recon_w for entry, code in zip(split.entries, codes, strict=True)},
            reference=None if keyframe or self._head is None else self._reference_record(),
            base=self._base if not keyframe and self._head is None else None,
        )

    def _code_params(self, entries: list[ParamEntry], keyframe: bool) -> list[ParamCode]:
        settings = self.settings

        def reference(entry: ParamEntry) -> torch.Tensor | None:
            previous = self._reference_weights.get(entry.name) if self._reference_weights is not None else None
            if previous is not None and (previous.shape != entry.weight.shape or previous.dtype != entry.weight.dtype):
                return None
            return previous

        def code(position: int, entry: ParamEntry, s: ExCPSettings) -> ParamCode:
            generator = tensor_generator(s, position)
            moments = (entry.first_moment, entry.second_moment)
            if keyframe and s.keyframe_moments == "lossy" and entry.first_moment is not None:
                # exact weights (no reference), moments quantized, none pruned but exact zeros
                return encode_param_delta(entry.weight, None, *moments, replace(s, beta=0.0), generator)
            if keyframe:
                return encode_param_keyframe(entry.weight, *moments, s)
            return encode_param_delta(
                entry.weight, reference(entry), *moments, s, generator, v_bias=entry.second_moment_bias
            )

        def code_all(positions: list[int], setting: Callable[[int], ExCPSettings]) -> list[ParamCode]:
            if settings.threads > 1 and len(positions) > 1:
                with ThreadPoolExecutor(settings.threads) as pool:
                    return list(pool.map(lambda i: code(i, entries[i], setting(i)), positions))
            return [code(i, entries[i], setting(i)) for i in positions]

        everything = list(range(len(entries)))
        if keyframe or settings.target_bits_per_param is None:
            return code_all(everything, lambda _: settings)
        # bit budget: tensors whose cost the budget does not set (small ones keep every residual,
        # new ones are stored losslessly) go first; the rest share what the delta's budget has left
        fixed = [i for i in everything if entries[i].weight.numel() <= SMALL_NUMEL or reference(entries[i]) is None]
        scaled = sorted(set(everything) - set(fixed))
        codes = dict(zip(fixed, code_all(fixed, lambda _: settings), strict=True))
        spent = sum(8 * (len(c.w) + len(c.m or b"") + len(c.v or b"")) for c in codes.values())
        budget = settings.target_bits_per_param * sum(entries[i].weight.numel() for i in everything)
        references = [reference(entries[i]) for i in scaled]
        split = split_budget([entries[i] for i in scaled], references, scaled, budget - spent, settings)
        shares = dict(zip(scaled, split, strict=True))
        coded = code_all(scaled, lambda i: replace(settings, target_bits_per_param=shares[i]))
        codes.update(zip(scaled, coded, strict=True))
        return [codes[i] for i in everything]

    def _header(self, coded: _CodedTensors, split: CheckpointSplit, meta: dict[str, Any] | None) -> dict[str, Any]:
        """The file's index; appends the extras and the skeleton to ``coded.records``."""
        extras = []
        for path, tensor in split.extras:
            extras.append(
                {
                    "path": list(path),
                    "dtype": dtype_name(tensor.dtype),
                    "shape": list(tensor.shape),
                    "rec": len(coded.records),
                }
            )
            coded.records.append(
                (f"x:{'/'.join(map(str, path))}", encode_lossless(tensor, level=self.settings.lossless_level))
            )
        pickled = io.BytesIO()
        torch.save(split.skeleton, pickled)
        skeleton_record = len(coded.records)
        coded.records.append(
            ("skeleton", zstandard.ZstdCompressor(level=self.settings.zstd_level).compress(pickled.getvalue()))
        )
        return {
            "kind": coded.kind,
            "chain_index": coded.chain_index,
            "ref": coded.reference,
            **({"base": coded.base} if coded.base is not None else {}),
            "settings": self.settings.to_dict(),
            "entries": coded.entries,
            "aliases": [{"path": list(path), "of": name} for path, name in split.aliases],
            "extras": extras,
            "skeleton": skeleton_record,
            "meta": meta or {},
        }

    def commit(self, encoded: Encoded, path: str | os.PathLike) -> None:
        """Record that ``encoded`` now lives at ``path``: it becomes the next delta's reference."""
        self._reference_weights = encoded.recon
        self._head = _head_record(encoded.file_id, encoded.sha256, Path(path))
        self._chain_index = encoded.header["chain_index"]
        self._last_saved = encoded.twin
        self._base = None  # later files reference this one


def _head_record(file_id: str, sha256: str, path: Path) -> dict[str, Any]:
    """What the next delta names as its reference: the file's id, hash, name and folder."""
    return {"file_id": file_id, "sha256": sha256, "name": path.name, "dir": str(path.parent)}


def _index_entry(
    entry: ParamEntry, code: ParamCode, records: list[tuple[str, bytes]], counts: dict[str, int]
) -> dict[str, Any]:
    """Append one parameter's streams to ``records`` and return its header entry (counts updated)."""
    index: dict[str, Any] = {
        "name": entry.name,
        "shape": list(entry.weight.shape),
        "dtype": dtype_name(entry.weight.dtype),
        "w_mode": code.w_mode,
        "rec_w": len(records),
    }
    records.append((f"w:{entry.name}", code.w))
    counts["numel"] += code.numel
    counts["kept_w"] += code.kept_w
    counts["bytes_w"] += len(code.w)
    streams = (
        ("m", entry.first_moment, entry.first_moment_path, code.m),
        ("v", entry.second_moment, entry.second_moment_path, code.v),
    )
    for key, tensor, path, blob in streams:
        if tensor is None or path is None or blob is None:
            index[key] = None
            continue
        index[key] = {"path": list(path), "dtype": dtype_name(tensor.dtype), "rec": len(records)}
        if key == "v" and code.v_floor:
            index[key]["floor"] = code.v_floor
        records.append((f"{key}:{entry.name}", blob))
        counts[f"numel_{key}"] += code.numel
        counts[f"bytes_{key}"] += len(blob)
    if entry.first_moment is not None:
        counts["kept_m"] += code.kept_m
    return index


def _statistics(coded: _CodedTensors, ckpt: dict[str, Any]) -> dict[str, float]:
    """Size and sparsity figures stored in the header (``inspect`` prints them)."""
    counts = coded.counts
    params = max(counts["numel"], 1)
    return {
        "keyframe": float(coded.kind == "keyframe"),
        "twin": float(coded.kind == "twin"),
        "chain_index": float(coded.chain_index),
        "raw_wmv_bytes": float(4 * (counts["numel"] + counts["numel_m"] + counts["numel_v"])),
        "raw_tensor_bytes": float(raw_tensor_bytes(ckpt)),
        "params": float(counts["numel"]),
        "bits_per_param_w": 8 * counts["bytes_w"] / params,
        "bits_per_param_m": 8 * counts["bytes_m"] / max(counts["numel_m"], 1),
        "bits_per_param_v": 8 * counts["bytes_v"] / max(counts["numel_v"], 1),
        "sparsity_w": 1 - counts["kept_w"] / params,
        "sparsity_m": 1 - counts["kept_m"] / max(counts["numel_m"], 1),
    }


def _file_statistics(header_stats: dict[str, float], file_bytes: int, encode_seconds: float) -> dict[str, float]:
    """Header statistics plus what is known once the file's bytes exist (its size and ratios)."""
    stats = dict(header_stats)
    stats["file_bytes"] = float(file_bytes)
    stats["ratio"] = stats["raw_wmv_bytes"] / file_bytes if stats["raw_wmv_bytes"] else 0.0
    stats["ratio_vs_raw_tensors"] = stats["raw_tensor_bytes"] / file_bytes
    stats["encode_s"] = encode_seconds
    return stats
