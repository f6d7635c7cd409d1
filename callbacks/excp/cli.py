"""``python -m callbacks.excp compress|decompress|inspect``: ExCP on existing checkpoints, offline.

* ``compress INPUT... -o DIR``: Lightning ``.ckpt`` files and/or Hugging Face Trainer checkpoint
  folders, ordered by training step, coded as one chain (``DIR/<name>.excp``).
* ``decompress FILE.excp... -o DIR [--base FOLDER]``: writes each back in its original format (``.ckpt``
  or folder; ``--base``: the pretrained model a chain started from, when it is not where it was); a
  DeepSpeed checkpoint folder with ExCP files becomes the folder the engine wrote (``DIR/<name>``), which
  DeepSpeed's ``zero_to_fp32.py`` reads (needs the ``deepspeed`` package for its file types).
* ``inspect FILE.excp... [--json]``: sizes, ratio, bits/param per stream, sparsity, the tensors kept
  exactly besides W, m and v (buffers, AMSGrad's ``max_exp_avg_sq``, ...) and the chain (every file of
  the chain is verified; a corrupt ancestor is an error).

Existing outputs are never replaced, and nothing is written into an input's folder, unless ``--force``;
an input file is never overwritten. Pickles load with ``weights_only=True`` unless ``--trust-pickles``.
Exit code 0 only on success; a bad input prints one ``excp: error: ...`` line on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from callbacks.excp.bounds import tensor_bytes
from callbacks.excp.codec import CHOICES, ExCPSettings
from callbacks.excp.decoder import decode_sequence, open_chain
from callbacks.excp.encoder import ExCPEncoder
from callbacks.excp.fileformat import ExCPFile, ExCPFormatError, is_excp_file
from callbacks.excp.formats import (
    HF_TRAINER,
    LIGHTNING,
    FormatError,
    checkpoint_step,
    load_torch_file,
    read_any,
    write_any,
)
from common.atomic import atomic_write_bytes
from common.errors import UserFacingError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line instead of usage + message."""

    def error(self, message: str) -> NoReturn:
        print(
            f"excp: error: {message} (see `python -m callbacks.excp {self.prog.split()[-1]} --help`)",
            file=sys.stderr,
        )
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m callbacks.excp", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    c = sub.add_parser("compress", help="compress checkpoints into an ExCP chain")
    c.add_argument("inputs", nargs="+", type=Path, help=".ckpt files and/or HF Trainer checkpoint folders")
    c.add_argument("-o", "--output", type=Path, required=True, help="folder for the .excp files")
    defaults = ExCPSettings()
    for name in ("bits_w", "bits_m", "bits_v", "keyframe_interval", "threads", "zstd_level"):
        c.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("alpha", "beta", "cap"):
        c.add_argument(f"--{name}", type=float, default=getattr(defaults, name))
    c.add_argument(
        "--target-bits-per-param",
        type=float,
        default=None,
        help="bit budget of each delta's W+m+v per parameter (instead of --alpha, whatever the gradient scale)",
    )
    c.add_argument("--entropy-coder", choices=CHOICES["entropy_coder"], default=defaults.entropy_coder)
    c.add_argument("--quantizer", choices=CHOICES["quantizer"], default=defaults.quantizer)
    c.add_argument(
        "--weight-saliency",
        choices=CHOICES["weight_saliency"],
        default=defaults.weight_saliency,
        help="what the weight mask ranks: |dW| (the paper) or |dW| * sqrt(v / mean(v))",
    )
    c.add_argument(
        "--budget-allocation",
        choices=CHOICES["budget_allocation"],
        default=defaults.budget_allocation,
        help="how --target-bits-per-param is split across tensors: the same for each, or by |dW| * sqrt(v)",
    )
    d = sub.add_parser("decompress", help="write ExCP files back as .ckpt files / HF folders")
    d.add_argument("inputs", nargs="+", type=Path, help=".excp files and/or DeepSpeed checkpoint folders")
    d.add_argument("-o", "--output", type=Path, required=True, help="folder to write into")
    d.add_argument(
        "--base",
        type=Path,
        default=None,
        help="safetensors folder or file of the pretrained model a chain started from (default: the folder "
        "recorded in the file); verified by sha256",
    )
    for command in (c, d):
        command.add_argument(
            "--force", action="store_true", help="replace existing outputs and allow writing into an input's folder"
        )
        command.add_argument(
            "--trust-pickles",
            action="store_true",
            help="load pickles with weights_only=False: a crafted file can then run code; only for your own files",
        )
    i = sub.add_parser("inspect", help="summarise ExCP files")
    i.add_argument("inputs", nargs="+", type=Path, help=".excp files and/or DeepSpeed checkpoint folders")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def _peek_step(path: Path, trust_pickles: bool) -> int:
    if path.is_dir():
        state = path / "trainer_state.json"
        ckpt = (
            {"hf": {"files": {"trainer_state.json": state.read_bytes()}}} if state.is_file() else {"hf": {"files": {}}}
        )
        return checkpoint_step(path, ckpt, HF_TRAINER)
    ckpt = load_torch_file(path, trust_pickles=trust_pickles, mmap=True)
    return checkpoint_step(path, ckpt if isinstance(ckpt, dict) else {}, LIGHTNING)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _check_outputs(
    inputs: list[Path], outputs: list[Path], output_dir: Path, force: bool, keep_excp: bool = False
) -> None:
    """Refuse, before anything is written, every output that would destroy or shadow something.

    Two inputs with one output name are always refused, and so is an output that is an input (the
    same path or the same file under another name, or inside an input folder) and, with
    ``keep_excp``, any existing ExCP file: replacing a chain file breaks every later delta.
    Existing outputs and writing into an input's own folder need ``--force``.
    """
    if len({p.resolve() for p in outputs}) != len(outputs):
        raise FormatError("two inputs would get the same output name; rename one of them or run them separately")
    resolved_inputs = [p.resolve() for p in inputs]
    for out in outputs:
        target = out.resolve()
        for source in resolved_inputs:
            if target == source or source in target.parents or target in source.parents or _same_file(out, source):
                raise FormatError(f"{out} would overwrite the input {source}; choose another --output folder")
        if keep_excp and is_excp_file(out):
            raise FormatError(f"{out} is an ExCP file (part of a chain); choose another --output folder")
    if force:
        return
    existing = [str(p) for p in outputs if p.exists() or p.is_symlink()]
    if existing:
        raise FormatError(f"{existing[0]} already exists ({len(existing)} output(s) do); pass --force to replace")
    folder = output_dir.resolve()
    if any(source.parent == folder for source in resolved_inputs):
        raise FormatError(f"--output {output_dir} is an input's own folder; choose another folder or pass --force")


def _compress(args: argparse.Namespace) -> None:
    settings = ExCPSettings(
        bits_w=args.bits_w,
        bits_m=args.bits_m,
        bits_v=args.bits_v,
        keyframe_interval=args.keyframe_interval,
        threads=args.threads,
        zstd_level=args.zstd_level,
        alpha=args.alpha,
        target_bits_per_param=args.target_bits_per_param,
        entropy_coder=args.entropy_coder,
        beta=args.beta,
        cap=args.cap,
        quantizer=args.quantizer,
        weight_saliency=args.weight_saliency,
        budget_allocation=args.budget_allocation,
    )
    for p in args.inputs:
        if not p.exists():
            raise FormatError(f"{p}: does not exist")
    ordered = sorted(args.inputs, key=lambda p: _peek_step(p, args.trust_pickles))
    targets = [args.output / ((p.stem if p.is_file() else p.name) + ".excp") for p in ordered]
    _check_outputs(ordered, targets, args.output, args.force)
    encoder = ExCPEncoder(settings)
    for src, target in zip(ordered, targets, strict=True):
        t0 = time.perf_counter()
        ckpt, fmt = read_any(src, trust_pickles=args.trust_pickles)
        enc = encoder.encode(ckpt, target=target, meta={"format": fmt, "source": src.name})
        atomic_write_bytes(target, enc.data)
        encoder.commit(enc, target)
        s = enc.stats
        print(
            f"{src} -> {target}: {'keyframe' if s['keyframe'] else 'delta'}, {s['file_bytes'] / 2**20:.2f} MB, "
            f"{s['ratio']:.1f}x vs fp32 W+m+v, {time.perf_counter() - t0:.1f} s"
        )


def _output_name(path: Path) -> Path:
    header_meta = ExCPFile.open(path).header.get("meta", {})
    fmt = header_meta.get("format", LIGHTNING) if isinstance(header_meta, dict) else LIGHTNING
    return Path(path.stem if fmt == HF_TRAINER else path.stem + ".ckpt")


def _decompress_deepspeed(folder: Path, output: Path, force: bool) -> None:
    import importlib
    import shutil

    from callbacks.excp.deepspeed_files import has_excp_files, restore_files
    from common.atomic import atomic_directory

    if not has_excp_files(folder):
        raise UserFacingError(f"{folder} is a folder without ExCP-coded DeepSpeed files (*/*_states.pt)")
    target = output / folder.name
    if target.exists() and not force:
        raise UserFacingError(f"{target} exists; pass --force to replace it")
    for attempt in range(2):
        try:
            with atomic_directory(target) as staging:
                restore_files(folder, staging, rank=0, world_size=1)
                for extra in folder.iterdir():  # zero_to_fp32.py and other top-level files the engine wrote
                    if extra.is_file() and not (staging / extra.name).exists():
                        shutil.copy2(extra, staging / extra.name)
            break
        except ExCPFormatError as error:
            if attempt or "needs deepspeed." not in str(error):
                raise
            try:  # DeepSpeed's loss-scaler and stage records are allowed once it is imported (slow: only now)
                importlib.import_module("deepspeed")
            except ImportError:
                raise UserFacingError(
                    f"{folder} holds DeepSpeed's own types: decoding it needs the deepspeed package"
                ) from None
    print(f"{folder} -> {target}")


def _decompress(args: argparse.Namespace) -> None:
    for folder in [p for p in args.inputs if p.is_dir()]:
        _decompress_deepspeed(folder, args.output, args.force)
    args.inputs = [p for p in args.inputs if not p.is_dir()]
    if not args.inputs:
        return
    outputs = {src: args.output / _output_name(src) for src in args.inputs}
    _check_outputs(list(args.inputs), list(outputs.values()), args.output, args.force, keep_excp=True)
    weights_only = not args.trust_pickles
    for src, ckpt in decode_sequence(args.inputs, weights_only=weights_only, base=args.base):
        fmt = ExCPFile.open(src).header.get("meta", {}).get("format", LIGHTNING)
        write_any(ckpt, fmt, outputs[src])
        print(f"{src} -> {outputs[src]}")


def _stat(stats: dict[str, Any], key: str) -> float | None:
    """A header statistic as a number, or None when absent or not a finite number (a crafted header)."""
    value = stats.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _summary(path: Path) -> dict[str, Any]:
    chain = open_chain(path)  # every ancestor read and verified by hash: a corrupt one is an error
    f = chain[-1]
    h = f.header
    st = h.get("stats", {})
    raw, raw_tensors = _stat(st, "raw_wmv_bytes"), _stat(st, "raw_tensor_bytes")
    try:
        kept_exactly = _kept_exactly(h)
    except ValueError as error:  # an unknown dtype name, refused as loading refuses it
        raise ExCPFormatError(f.path, f"{error} (file is corrupted)") from None
    return {
        "file": str(path),
        "kind": h["kind"],
        "format": h.get("meta", {}).get("format"),
        "source": h.get("meta", {}).get("source"),
        "chain_index": h["chain_index"],
        "chain": [c.path for c in chain],
        "bytes": f.size,
        "raw_wmv_bytes": raw,
        "raw_tensor_bytes": raw_tensors,
        "ratio": raw / f.size if raw is not None and f.size else None,
        "params": _stat(st, "params"),
        "bits_per_param": {k: _stat(st, f"bits_per_param_{k}") for k in ("w", "m", "v")},
        "sparsity": {k: _stat(st, f"sparsity_{k}") for k in ("w", "m")},
        "tensors": len(h["entries"]),
        "kept_exactly": kept_exactly,
        "ratio_vs_raw_tensors": raw_tensors / f.size if raw_tensors is not None and f.size else None,
        "settings": h["settings"],
    }


def _kept_exactly(header: dict[str, Any]) -> dict[str, Any]:
    """The tensors a file stores losslessly besides W, m and v: count, raw bytes and the largest.

    They are outside the ratio against fp32 W+m+v, yet can dominate a file (AMSGrad's
    ``max_exp_avg_sq`` is as large as v), so inspect names them instead of leaving a low ratio unexplained.
    Raises ValueError on an unknown dtype name.
    """
    sized = sorted(
        (
            (tensor_bytes(extra["shape"], extra["dtype"]), "/".join(map(str, extra["path"])))
            for extra in header["extras"]
        ),
        reverse=True,
    )
    return {"tensors": len(sized), "raw_bytes": sum(size for size, _ in sized), "largest": [p for _, p in sized[:3]]}


def _shown(value: float | None, spec: str, unit: str = "", scale: float = 1.0) -> str:
    """``value / scale`` formatted with ``spec`` and ``unit``, or "n/a" where the header did not give the number."""
    return "n/a" if value is None else format(value / scale, spec) + unit


def _inspect_paths(inputs: list[Path]) -> list[Path]:
    """Files as given; a DeepSpeed checkpoint folder becomes its ExCP-coded engine files (one row each)."""
    from callbacks.excp.deepspeed_files import engine_files

    paths = []
    for path in inputs:
        if not path.is_dir():
            paths.append(path)
            continue
        coded = [f for f in engine_files(path) if is_excp_file(f)]
        if not coded:
            raise UserFacingError(f"{path} is a folder without ExCP-coded DeepSpeed files (*/*_states.pt)")
        paths.extend(coded)
    return paths


def _inspect(args: argparse.Namespace) -> None:
    rows = [_summary(p) for p in _inspect_paths(args.inputs)]
    if args.json:
        print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2))
        return
    for r in rows:
        if r["kind"] == "twin":
            print(
                f"{r['file']}: twin ({r['format']}), {r['bytes'] / 2**20:.3f} MB: the same training state as "
                f"{Path(r['chain'][-2]).name}, stored without tensors\n"
                f"  chain: {' -> '.join(Path(c).name for c in r['chain'])}"
            )
            continue
        bpp = ", ".join(f"{k} {v:.2f}" for k, v in r["bits_per_param"].items() if v)
        print(
            f"{r['file']}: {r['kind']} #{r['chain_index']} ({r['format']}), {r['bytes'] / 2**20:.3f} MB, "
            f"{_shown(r['ratio'], '.1f', 'x')} vs fp32 W+m+v ({_shown(r['raw_wmv_bytes'], '.2f', ' MB', 2**20)}), "
            f"{_shown(r['params'], '.0f')} params\n"
            f"  bits/param: {bpp}; sparsity w {_shown(r['sparsity']['w'], '.3f')}, "
            f"m {_shown(r['sparsity']['m'], '.3f')}\n"
            f"  chain: {' -> '.join(Path(c).name for c in r['chain'])}"
        )
        exact = r["kept_exactly"]
        if exact["tensors"]:
            print(
                f"  kept exactly besides W, m, v: {exact['tensors']} tensor(s), {exact['raw_bytes'] / 2**20:.2f} MB "
                f"raw (largest: {', '.join(exact['largest'])}); {_shown(r['ratio_vs_raw_tensors'], '.1f', 'x')} vs "
                f"every raw tensor ({_shown(r['raw_tensor_bytes'], '.2f', ' MB', 2**20)})"
            )


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 only on success)."""
    args = _parser().parse_args(argv)
    try:
        {"compress": _compress, "decompress": _decompress, "inspect": _inspect}[args.command](args)
    except UserFacingError as e:
        print(f"excp: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"excp: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0
