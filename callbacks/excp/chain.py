"""Checkpoint-level ExCP: split a training checkpoint, code it against the chain, rebuild it (no Lightning).

A checkpoint is any nested dict. Two places get lossy coding, everything else is kept exactly:

* ``ckpt["state_dict"]``: floating-point parameters (W), delta-coded against the reconstructed
  previous checkpoint;
* ``ckpt["optimizer_states"][i]["state"][idx]``: Adam/AdamW ``exp_avg``/``exp_avg_sq`` (m, v) or SGD
  ``momentum_buffer`` (m), matched to parameter *names* through the order of ``param_groups``.

Large tensors anywhere else (buffers, other optimizers' state, AMSGrad's ``max_exp_avg_sq``) are
stored losslessly (byte-grouped + zstd); the rest of the structure (step counts, param_groups,
schedulers, loops, RNG, callbacks, hyperparameters, small tensors) is pickled with ``torch.save``
and zstd-compressed, so it round-trips exactly.

Files form chains: a keyframe (lossless) followed by deltas, each naming the id and sha256 of the
file it was coded against. Files that a chain still needs are never deleted: :func:`retire` moves
them into a ``.excp_refs/`` folder next to the checkpoints and :func:`collect_garbage` deletes them
once no live checkpoint depends on them.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import time
import zlib
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import zstandard

from callbacks.excp.codec import (
    ExCPSettings,
    ParamCode,
    decode_param,
    encode_param_delta,
    encode_param_keyframe,
)
from callbacks.excp.fileformat import ExCPFile, ExCPFormatError, build_file, is_excp_file, read_header
from callbacks.excp.quantize import decode_lossless, dtype_from_name, dtype_name, encode_lossless

__all__ = [
    "REFS_DIR",
    "Encoded",
    "ExCPEncoder",
    "chain_paths",
    "collect_garbage",
    "infer_optimizer_param_names",
    "load_checkpoint",
    "resolve_reference",
    "retire",
]

REFS_DIR = ".excp_refs"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_EXTRA_MIN_NUMEL = 256
_MAX_CHAIN = 100_000
Path_ = tuple[str | int, ...]


@contextlib.contextmanager
def _intra_op_threads(n: int = 1) -> Iterator[None]:
    """Run the codec with one intra-op thread per tensor job.

    Its ops are small and memory-bound; OpenMP fan-out on every one of them costs far more than it
    saves, and on a busy machine it stalls (parallelism comes from ``settings.threads`` instead).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# Splitting a checkpoint
# ----------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    name: str
    w: torch.Tensor
    m: torch.Tensor | None = None
    v: torch.Tensor | None = None
    m_path: Path_ | None = None
    v_path: Path_ | None = None


@dataclass
class _Split:
    entries: list[_Entry]
    aliases: list[tuple[Path_, str]]
    extras: list[tuple[Path_, torch.Tensor]]
    skeleton: Any


def _moment_keys(state: dict[str, Any], shape: torch.Size) -> tuple[str | None, str | None]:
    """Which keys of one parameter's optimizer state are coded as (m, v); others stay lossless."""

    def ok(key: str) -> bool:
        t = state.get(key)
        return isinstance(t, torch.Tensor) and t.dtype in _FLOATS and t.shape == shape

    if ok("exp_avg") and ok("exp_avg_sq"):
        return "exp_avg", "exp_avg_sq"
    if ok("momentum_buffer"):
        return "momentum_buffer", None
    return None, None


def _state_shape(state: dict[str, Any]) -> torch.Size | None:
    for key in ("exp_avg", "momentum_buffer"):
        t = state.get(key)
        if isinstance(t, torch.Tensor):
            return t.shape
    return None


def infer_optimizer_param_names(
    state_dict: dict[str, Any], optimizer_state: dict[str, Any]
) -> list[str | None]:
    """Guess the parameter name of each optimizer slot when the live model is not available (CLI).

    Optimizers number parameters in ``param_groups`` order, and within a group parameters keep the
    model's order, so each group is matched as an in-order subsequence of the state dict's float
    tensors, by shape. A wrong guess only costs compression (masks use another tensor's statistics),
    never correctness: every stream is reconstructed from what was stored.
    """
    names = [k for k, t in state_dict.items() if isinstance(t, torch.Tensor) and t.dtype in _FLOATS]
    state = optimizer_state.get("state", {})
    claimed: set[str] = set()
    out: list[str | None] = []
    for group in optimizer_state.get("param_groups", []):
        pos = 0
        for idx in group.get("params", []):
            shape = _state_shape(state.get(idx, {}))
            found = None
            if shape is not None:
                for j in range(pos, len(names)):
                    if names[j] not in claimed and state_dict[names[j]].shape == shape:
                        found = j
                        break
            if found is None:
                out.append(None)
                continue
            claimed.add(names[found])
            out.append(names[found])
            pos = found + 1
    return out


def _is_container(obj: Any) -> bool:
    return isinstance(obj, (dict, list)) and not isinstance(obj, tuple)


def _walk_tensors(obj: Any, prefix: Path_ = ()) -> Iterator[tuple[Path_, torch.Tensor]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if type(k) not in (str, int):
                continue
            if isinstance(v, torch.Tensor):
                yield prefix + (k,), v
            elif _is_container(v):
                yield from _walk_tensors(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            if isinstance(v, torch.Tensor):
                yield prefix + (i,), v
            elif _is_container(v):
                yield from _walk_tensors(v, prefix + (i,))


def _hollow(obj: Any, leaves: set[Path_], prefix: Path_ = ()) -> Any:
    """Shallow-copy the containers of ``obj``, replacing the leaves at ``leaves`` with None."""
    if isinstance(obj, dict):
        new = copy.copy(obj)
        for k, v in obj.items():
            p = prefix + (k,)
            if p in leaves:
                new[k] = None
            elif _is_container(v):
                new[k] = _hollow(v, leaves, p)
        return new
    if isinstance(obj, list):
        return [
            None
            if prefix + (i,) in leaves
            else (_hollow(v, leaves, prefix + (i,)) if _is_container(v) else v)
            for i, v in enumerate(obj)
        ]
    return obj


def _set(obj: Any, path: Sequence[str | int], value: Any) -> None:
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def _split(
    ckpt: dict[str, Any],
    param_names: Collection[str] | None,
    optimizer_param_names: Sequence[Sequence[str | None] | None] | None,
) -> _Split:
    sd = ckpt.get("state_dict")
    sd = sd if isinstance(sd, dict) else {}
    opts = ckpt.get("optimizer_states")
    opts = opts if isinstance(opts, list) else []
    # parameter name -> (path of m, path of v), first optimizer that holds it wins
    moments: dict[str, tuple[Path_ | None, Path_ | None]] = {}
    for i, opt in enumerate(opts):
        if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict):
            continue
        names = optimizer_param_names[i] if optimizer_param_names and i < len(optimizer_param_names) else None
        if names is None:
            names = infer_optimizer_param_names(sd, opt)
        order = [idx for g in opt.get("param_groups", []) for idx in g.get("params", [])]
        for pos, idx in enumerate(order):
            name = names[pos] if pos < len(names) else None
            st = opt["state"].get(idx)
            if name is None or name in moments or not isinstance(st, dict) or name not in sd:
                continue
            mk, vk = _moment_keys(st, sd[name].shape)
            if mk is not None:
                base: Path_ = ("optimizer_states", i, "state", idx)
                moments[name] = (base + (mk,), None if vk is None else base + (vk,))

    entries: list[_Entry] = []
    aliases: list[tuple[Path_, str]] = []
    leaves: set[Path_] = set()
    seen: dict[tuple, str] = {}
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor) or t.dtype not in _FLOATS or t.is_sparse or type(name) is not str:
            continue
        if param_names is not None and name not in param_names:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() > 0 and key in seen:
            aliases.append((("state_dict", name), seen[key]))
            leaves.add(("state_dict", name))
            continue
        seen[key] = name
        e = _Entry(name, t)
        if name in moments:
            mp, vp = moments[name]
            e.m_path, e.v_path = mp, vp
            e.m = _get(ckpt, mp)
            e.v = None if vp is None else _get(ckpt, vp)
            leaves.add(mp)
            if vp is not None:
                leaves.add(vp)
        leaves.add(("state_dict", name))
        entries.append(e)
    extras = [
        (p, t)
        for p, t in _walk_tensors(ckpt)
        if p not in leaves and t.numel() >= _EXTRA_MIN_NUMEL and not t.is_sparse and _encodable(t)
    ]
    leaves.update(p for p, _ in extras)
    return _Split(entries, aliases, extras, _hollow(ckpt, leaves))


def _encodable(t: torch.Tensor) -> bool:
    try:
        dtype_name(t.dtype)
    except ValueError:
        return False
    return t.layout == torch.strided


def _get(obj: Any, path: Sequence[str | int]) -> Any:
    for k in path:
        obj = obj[k]
    return obj


def _fingerprint(ckpt: dict[str, Any], split: _Split) -> tuple | None:
    """(step, crc32 of every weight): equal fingerprints mean the same training state was saved twice."""
    step = ckpt.get("global_step")
    if not isinstance(step, int):
        return None
    crcs = []
    for e in split.entries:
        t = e.w.detach().cpu().contiguous()
        crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else 0
        crcs.append((e.name, crc, e.m_path, e.v_path))
    return (step, ckpt.get("epoch"), tuple(crcs))


def _raw_bytes(ckpt: Any) -> int:
    return sum(t.numel() * t.element_size() for _, t in _walk_tensors(ckpt))


# ----------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------


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


class ExCPEncoder:
    """Stateful chain encoder: keeps the reconstruction a reader will hold (closed loop).

    Call :meth:`encode`, write :attr:`Encoded.data`, then :meth:`commit` with the path written, so a
    failed write never advances the chain. :meth:`reset` starts a new chain (next file a keyframe).
    """

    def __init__(self, settings: ExCPSettings | None = None) -> None:
        self.settings = settings or ExCPSettings()
        self.reset()

    def reset(self) -> None:
        """Forget the chain: the next checkpoint becomes a keyframe."""
        self._ref: dict[str, torch.Tensor] | None = None
        self._head: dict[str, Any] | None = None
        self._chain_index = -1
        self._twin: dict[str, Any] | None = None

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
        with _intra_op_threads():
            return self._encode(ckpt, target, param_names, optimizer_param_names, meta)

    def _encode(
        self,
        ckpt: dict[str, Any],
        target: str | os.PathLike,
        param_names: Collection[str] | None,
        optimizer_param_names: Sequence[Sequence[str | None] | None] | None,
        meta: dict[str, Any] | None,
    ) -> Encoded:
        t0 = time.perf_counter()
        s = self.settings
        target = Path(target)
        keyframe = (
            self._ref is None
            or self._head is None
            or self._chain_index + 1 >= s.keyframe_interval
            or Path(self._head["dir"]).resolve() != target.parent.resolve()
            or not _reference_available(target, self._head)
        )
        split = _split(ckpt, param_names, optimizer_param_names)
        fingerprint = _fingerprint(ckpt, split)
        twin = self._twin
        if (
            twin is not None
            and fingerprint is not None
            and fingerprint == twin["fingerprint"]
            and self._head is not None
            and Path(self._head["dir"]).resolve() == target.parent.resolve()
            and _reference_available(target, self._head)
        ):
            # Same step, same weights as the file just written (ModelCheckpoint's top-k file followed by
            # last.ckpt): a "twin" stores no tensors, only a reference to that file plus this save's own
            # metadata; readers take W, m and v from the referenced file.
            kind = "twin"
            records = []
            entries_h = copy.deepcopy(twin["entries"])
            stats = dict(twin["stats"])
            chain_index = self._chain_index
            ref_h = {k: self._head[k] for k in ("file_id", "sha256", "name")}
            recon = self._ref or {}
        else:
            records, entries_h, stats, recon = self._code_params(split, keyframe)
            kind = "keyframe" if keyframe else "delta"
            chain_index = 0 if keyframe else self._chain_index + 1
            ref_h = None
            if not keyframe:
                assert self._head is not None
                ref_h = {k: self._head[k] for k in ("file_id", "sha256", "name")}
        twin_payload = {"fingerprint": fingerprint, "entries": copy.deepcopy(entries_h), "stats": dict(stats)}
        extras_h = []
        for p, t in split.extras:
            extras_h.append(
                {"path": list(p), "dtype": dtype_name(t.dtype), "shape": list(t.shape), "rec": len(records)}
            )
            records.append((f"x:{'/'.join(map(str, p))}", encode_lossless(t, level=s.lossless_level)))
        buf = io.BytesIO()
        torch.save(split.skeleton, buf)
        skeleton_rec = len(records)
        records.append(("skeleton", zstandard.ZstdCompressor(level=s.zstd_level).compress(buf.getvalue())))

        header = {
            "kind": kind,
            "chain_index": chain_index,
            "ref": ref_h,
            "settings": s.to_dict(),
            "entries": entries_h,
            "aliases": [{"path": list(p), "of": n} for p, n in split.aliases],
            "extras": extras_h,
            "skeleton": skeleton_rec,
            "meta": meta or {},
        }
        raw_wmv = 4 * (stats["numel"] + stats["numel_m"] + stats["numel_v"])
        data_probe_stats = {
            "keyframe": float(kind == "keyframe"),
            "twin": float(kind == "twin"),
            "chain_index": float(chain_index),
            "raw_wmv_bytes": float(raw_wmv),
            "raw_tensor_bytes": float(_raw_bytes(ckpt)),
            "params": float(stats["numel"]),
            "bits_per_param_w": 8 * stats["bytes_w"] / max(stats["numel"], 1),
            "bits_per_param_m": 8 * stats["bytes_m"] / max(stats["numel_m"], 1),
            "bits_per_param_v": 8 * stats["bytes_v"] / max(stats["numel_v"], 1),
            "sparsity_w": 1 - stats["kept_w"] / max(stats["numel"], 1),
            "sparsity_m": 1 - stats["kept_m"] / max(stats["numel_m"], 1),
        }
        header["stats"] = data_probe_stats
        data, file_id, sha = build_file(header, records)
        stats_out = dict(data_probe_stats)
        stats_out["file_bytes"] = float(len(data))
        stats_out["ratio"] = raw_wmv / len(data) if raw_wmv else 0.0
        stats_out["ratio_vs_raw_tensors"] = stats_out["raw_tensor_bytes"] / len(data)
        stats_out["encode_s"] = time.perf_counter() - t0
        return Encoded(data, file_id, sha, header, stats_out, recon, twin_payload)

    def _code_params(
        self, split: _Split, keyframe: bool
    ) -> tuple[list[tuple[str, bytes]], list[dict[str, Any]], dict[str, int], dict[str, torch.Tensor]]:
        s = self.settings
        records: list[tuple[str, bytes]] = []

        def code(i: int, e: _Entry) -> ParamCode:
            if keyframe:
                return encode_param_keyframe(e.w, e.m, e.v, s)
            ref = self._ref.get(e.name) if self._ref is not None else None
            if ref is not None and (ref.shape != e.w.shape or ref.dtype != e.w.dtype):
                ref = None
            gen = torch.Generator().manual_seed(s.seed * 1_000_003 + i)
            return encode_param_delta(e.w, ref, e.m, e.v, s, gen)

        if s.threads > 1 and len(split.entries) > 1:
            with ThreadPoolExecutor(s.threads) as pool:
                codes = list(pool.map(code, range(len(split.entries)), split.entries))
        else:
            codes = [code(i, e) for i, e in enumerate(split.entries)]

        stats = {
            k: 0 for k in ("numel", "kept_w", "kept_m", "numel_m", "numel_v", "bytes_w", "bytes_m", "bytes_v")
        }
        entries_h = []
        for e, c in zip(split.entries, codes, strict=True):
            h: dict[str, Any] = {
                "name": e.name,
                "shape": list(e.w.shape),
                "dtype": dtype_name(e.w.dtype),
                "w_mode": c.w_mode,
                "rec_w": len(records),
            }
            records.append((f"w:{e.name}", c.w))
            stats["numel"] += c.numel
            stats["kept_w"] += c.kept_w
            stats["bytes_w"] += len(c.w)
            for key, t, p, blob in (("m", e.m, e.m_path, c.m), ("v", e.v, e.v_path, c.v)):
                if t is None:
                    h[key] = None
                    continue
                h[key] = {"path": list(p), "dtype": dtype_name(t.dtype), "rec": len(records)}
                records.append((f"{key}:{e.name}", blob))
                stats[f"numel_{key}"] += c.numel
                stats[f"bytes_{key}"] += len(blob)
            if e.m is not None:
                stats["kept_m"] += c.kept_m
            entries_h.append(h)
        recon = {e.name: c.recon_w for e, c in zip(split.entries, codes, strict=True)}
        return records, entries_h, stats, recon

    def commit(self, encoded: Encoded, path: str | os.PathLike) -> None:
        """Record that ``encoded`` now lives at ``path``: it becomes the next delta's reference."""
        path = Path(path)
        self._ref = encoded.recon
        self._head = {
            "file_id": encoded.file_id,
            "sha256": encoded.sha256,
            "name": path.name,
            "dir": str(path.parent),
        }
        self._chain_index = encoded.header["chain_index"]
        self._twin = encoded.twin


# ----------------------------------------------------------------------------------------------
# References, retirement and garbage collection
# ----------------------------------------------------------------------------------------------


def _candidates(from_path: Path, ref: dict[str, Any]) -> list[Path]:
    d = from_path.parent
    if d.name == REFS_DIR:  # a retired file: its references live next to the live checkpoints
        d = d.parent
    return [d / ref["name"], d / REFS_DIR / f"{ref['file_id']}.excp"]


def _reference_available(target: Path, head: dict[str, Any]) -> bool:
    for c in _candidates(target, head):
        try:
            if c.is_file() and read_header(c).get("file_id") == head["file_id"]:
                return True
        except ExCPFormatError:
            continue
    return False


def resolve_reference(path: str | os.PathLike, header: dict[str, Any]) -> Path:
    """Locate the file a delta was made against (by name, else in ``.excp_refs/`` by id)."""
    path = Path(path)
    ref = header["ref"]
    other = None
    for c in _candidates(path, ref):
        if not c.is_file():
            continue
        try:
            fid = read_header(c).get("file_id")
        except ExCPFormatError:
            continue
        if fid == ref["file_id"]:
            return c
        other = other or (c, fid)
    if other is not None:
        raise ExCPFormatError(
            path,
            f"its reference {other[0]} is a different checkpoint (id {other[1]}) than the one it was made "
            f"against (id {ref['file_id']})",
            "The chain was broken by overwriting a file; restore the original or use a keyframe",
        )
    raise ExCPFormatError(
        path,
        f"its reference {ref['name']} (id {ref['file_id']}) is missing",
        f"Keep every checkpoint of the chain and the {REFS_DIR}/ folder next to it",
    )


def chain_paths(path: str | os.PathLike) -> list[Path]:
    """Files needed to rebuild ``path``: its keyframe first, ``path`` last (headers only)."""
    out = [Path(path)]
    header = read_header(path)
    while header.get("kind") in ("delta", "twin"):
        if len(out) > _MAX_CHAIN:
            raise ExCPFormatError(path, "reference chain does not end in a keyframe (cycle)")
        ref_path = resolve_reference(out[-1], header)
        out.append(ref_path)
        header = read_header(ref_path)
    return out[::-1]


def retire(path: str | os.PathLike) -> None:
    """Remove a checkpoint the way a chain survives it: ExCP files move to ``.excp_refs/<id>.excp``.

    Other files are deleted. Call :func:`collect_garbage` afterwards to drop what nothing needs.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not is_excp_file(path):
        path.unlink()
        return
    try:
        fid = read_header(path)["file_id"]
    except (ExCPFormatError, KeyError):
        path.unlink()
        return
    refs = path.parent / REFS_DIR
    refs.mkdir(exist_ok=True)
    os.replace(path, refs / f"{fid}.excp")


def collect_garbage(directory: str | os.PathLike, keep_ids: Collection[str] = ()) -> list[Path]:
    """Delete files in ``<directory>/.excp_refs`` that no live checkpoint (or ``keep_ids``) needs.

    Returns:
        The deleted paths.
    """
    directory = Path(directory)
    refs = directory / REFS_DIR
    if not refs.is_dir():
        return []
    needed: set[str] = set(keep_ids)
    frontier: list[tuple[Path, dict[str, Any]]] = []
    for f in directory.iterdir():
        if f.is_file() and is_excp_file(f):
            try:
                h = read_header(f)
            except ExCPFormatError:
                continue
            needed.add(h.get("file_id", ""))
            frontier.append((f, h))
    for fid in list(needed):
        rp = refs / f"{fid}.excp"
        if rp.is_file():
            try:
                frontier.append((rp, read_header(rp)))
            except ExCPFormatError:
                pass
    steps = 0
    while frontier and steps < _MAX_CHAIN:
        steps += 1
        f, h = frontier.pop()
        if h.get("kind") not in ("delta", "twin") or not h.get("ref"):
            continue
        rid = h["ref"]["file_id"]
        if rid in needed and rid not in keep_ids:
            continue
        needed.add(rid)
        try:
            rp = resolve_reference(f, h)
            frontier.append((rp, read_header(rp)))
        except ExCPFormatError:
            continue
    deleted = []
    for f in refs.iterdir():
        if f.suffix == ".excp" and f.stem not in needed:
            f.unlink()
            deleted.append(f)
    if not any(refs.iterdir()):
        refs.rmdir()
    return deleted


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


def _decode_file(
    f: ExCPFile, ref: dict[str, torch.Tensor] | None, skip_moments: bool
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]]:
    h = f.header
    kind = h["kind"]
    if kind == "twin":  # no tensors of its own: the referenced file's W (m, v are carried by the caller)
        return dict(ref or {}), {}
    weights: dict[str, torch.Tensor] = {}
    moments: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
    for e in h["entries"]:
        name = e["name"]
        shape = tuple(e["shape"])
        base = None
        if e["w_mode"] == "delta":
            base = (ref or {}).get(name)
            if base is None or tuple(base.shape) != shape:
                raise ExCPFormatError(f.path, f"tensor {name} is a delta but its reference lacks it")
        mh, vh = e.get("m"), e.get("v")
        try:
            w, m, v = decode_param(
                kind=kind,
                w_mode=e["w_mode"],
                w_blob=f.record(e["rec_w"]),
                m_blob=None if (mh is None or skip_moments) else f.record(mh["rec"]),
                v_blob=None if (vh is None or skip_moments) else f.record(vh["rec"]),
                ref=base,
                shape=shape,
                dtype=dtype_from_name(e["dtype"]),
                m_dtype=None if mh is None else dtype_from_name(mh["dtype"]),
                v_dtype=None if vh is None else dtype_from_name(vh["dtype"]),
                weights_only=skip_moments,
            )
        except ExCPFormatError:
            raise
        except (ValueError, KeyError, RuntimeError) as err:
            raise ExCPFormatError(f.path, f"tensor {name} cannot be decoded ({err})") from None
        weights[name] = w
        moments[name] = (m, v)
    return weights, moments


def load_checkpoint(path: str | os.PathLike, weights_only: bool | None = False) -> dict[str, Any]:
    """Rebuild the checkpoint dict stored at ``path``, replaying its chain from the keyframe.

    Every file of the chain is verified (checksums, reference ids and hashes) before use.

    Args:
        path: an ExCP file.
        weights_only: passed to ``torch.load`` for the pickled non-tensor state (hyperparameters,
            loops, ...); False (default) trusts the file like ``torch.load`` of a ``.ckpt`` does,
            None uses torch's default, as Lightning does.

    Raises:
        ExCPFormatError: a file is missing, truncated, corrupted, or not the reference it should be.
    """
    with _intra_op_threads():
        return _load_checkpoint(path, weights_only)


def _load_checkpoint(path: str | os.PathLike, weights_only: bool | None) -> dict[str, Any]:
    paths = chain_paths(path)
    kinds = [read_header(p).get("kind") for p in paths]
    ref: dict[str, torch.Tensor] | None = None
    prev: ExCPFile | None = None
    moments: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
    for i, p in enumerate(paths):
        f = ExCPFile.open(p)
        h = f.header
        if i == 0 and h.get("kind") != "keyframe":
            raise ExCPFormatError(p, "chain does not start with a keyframe")
        if prev is not None:
            want = h["ref"]
            if prev.header["file_id"] != want["file_id"] or prev.sha256 != want["sha256"]:
                raise ExCPFormatError(
                    p,
                    f"its reference {prev.path} does not match the one it was made against "
                    f"(sha256 {prev.sha256[:12]}..., expected {want['sha256'][:12]}...)",
                    "The reference was modified; use another checkpoint",
                )
        if h["kind"] == "twin":
            weights = dict(ref or {})
        else:
            # moments are needed from the last file that holds tensors (later files are its twins)
            need_moments = all(k == "twin" for k in kinds[i + 1 :])
            weights, moments = _decode_file(f, ref, skip_moments=not need_moments)
        ref = weights
        prev = f
    assert prev is not None and ref is not None
    return _assemble(prev, ref, moments, weights_only)


def _assemble(
    f: ExCPFile,
    weights: dict[str, torch.Tensor],
    moments: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]],
    weights_only: bool | None,
) -> dict[str, Any]:
    h = f.header
    try:
        raw = zstandard.ZstdDecompressor().decompress(f.record(h["skeleton"]))
    except zstandard.ZstdError as err:
        raise ExCPFormatError(f.path, f"metadata record cannot be decompressed ({err})") from None
    ckpt = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=weights_only)
    for e in h["entries"]:
        _set(ckpt, ("state_dict", e["name"]), weights[e["name"]])
        m, v = moments[e["name"]]
        if e.get("m") is not None:
            _set(ckpt, e["m"]["path"], m)
        if e.get("v") is not None:
            _set(ckpt, e["v"]["path"], v)
    for a in h["aliases"]:
        _set(ckpt, a["path"], weights[a["of"]])
    for x in h["extras"]:
        t = decode_lossless(f.record(x["rec"]), dtype_from_name(x["dtype"]), tuple(x["shape"]))
        _set(ckpt, x["path"], t)
    return ckpt


def decode_sequence(
    paths: Sequence[str | os.PathLike], weights_only: bool | None = False
) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Decode a series of files of one chain in order, replaying each file once (not once per file).

    The first file's chain is replayed as in :func:`load_checkpoint`; each later file must reference
    the previous one (or be a keyframe), so a whole series costs one pass.
    """
    prev: ExCPFile | None = None
    ref: dict[str, torch.Tensor] | None = None
    for p in paths:
        p = Path(p)
        f = ExCPFile.open(p)
        h = f.header
        if h["kind"] == "twin" and (prev is None or prev.header["file_id"] != h["ref"]["file_id"]):
            yield p, load_checkpoint(p, weights_only)
            prev, ref = None, None
            continue
        if h["kind"] in ("delta", "twin"):
            if prev is None or prev.header["file_id"] != h["ref"]["file_id"]:
                # not a continuation of what we hold: rebuild its reference from its own chain
                ref = None
                for q in chain_paths(p)[:-1]:
                    g = ExCPFile.open(q)
                    ref, _ = _decode_file(g, ref, skip_moments=True)
            elif prev.sha256 != h["ref"]["sha256"]:
                raise ExCPFormatError(
                    p, f"its reference {prev.path} does not match the one it was made against"
                )
        if h["kind"] == "twin":
            weights = dict(ref or {})
        else:
            weights, moments = _decode_file(f, ref if h["kind"] == "delta" else None, skip_moments=False)
        yield p, _assemble(f, weights, moments, weights_only)
        ref, prev = weights, f
