"""``python -m callbacks.excp compress|decompress|inspect``: ExCP on existing checkpoints, offline.

* ``compress INPUT... -o DIR``: Lightning ``.ckpt`` files and/or Hugging Face Trainer checkpoint
  folders, ordered by training step, coded as one chain (``DIR/<name>.excp``).
* ``decompress FILE.excp... -o DIR``: writes each back in its original format (``.ckpt`` or folder).
* ``inspect FILE.excp... [--json]``: sizes, ratio, bits/param per stream, sparsity and the chain.

Exit code 0 only on success; a bad input prints one ``excp: error: ...`` line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import torch

from callbacks.excp.chain import ExCPEncoder, chain_paths, decode_sequence
from callbacks.excp.codec import ExCPSettings
from callbacks.excp.fileformat import ExCPFile, ExCPFormatError, atomic_write_bytes
from callbacks.excp.formats import HF_TRAINER, LIGHTNING, FormatError, checkpoint_step, read_any, write_any

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
    c.add_argument("--quantizer", choices=["kmeans", "uniform"], default=defaults.quantizer)
    d = sub.add_parser("decompress", help="write ExCP files back as .ckpt files / HF folders")
    d.add_argument("inputs", nargs="+", type=Path, help=".excp files")
    d.add_argument("-o", "--output", type=Path, required=True, help="folder to write into")
    i = sub.add_parser("inspect", help="summarise ExCP files")
    i.add_argument("inputs", nargs="+", type=Path, help=".excp files")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def _peek_step(path: Path) -> int:
    if path.is_dir():
        state = path / "trainer_state.json"
        ckpt = (
            {"hf": {"files": {"trainer_state.json": state.read_bytes()}}}
            if state.is_file()
            else {"hf": {"files": {}}}
        )
        return checkpoint_step(path, ckpt, HF_TRAINER)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - report as a bad input
        raise FormatError(f"{path}: cannot be read as a torch checkpoint ({type(e).__name__}: {e})") from None
    return checkpoint_step(path, ckpt if isinstance(ckpt, dict) else {}, LIGHTNING)


def _compress(args: argparse.Namespace) -> None:
    settings = ExCPSettings(
        bits_w=args.bits_w,
        bits_m=args.bits_m,
        bits_v=args.bits_v,
        keyframe_interval=args.keyframe_interval,
        threads=args.threads,
        zstd_level=args.zstd_level,
        alpha=args.alpha,
        beta=args.beta,
        cap=args.cap,
        quantizer=args.quantizer,
    )
    for p in args.inputs:
        if not p.exists():
            raise FormatError(f"{p}: does not exist")
    ordered = sorted(args.inputs, key=_peek_step)
    names = [(p.stem if p.is_file() else p.name) + ".excp" for p in ordered]
    if len(set(names)) != len(names):
        raise FormatError("two inputs would get the same output name; rename one of them")
    encoder = ExCPEncoder(settings)
    args.output.mkdir(parents=True, exist_ok=True)
    for src, name in zip(ordered, names, strict=True):
        t0 = time.perf_counter()
        ckpt, fmt = read_any(src)
        target = args.output / name
        enc = encoder.encode(ckpt, target=target, meta={"format": fmt, "source": src.name})
        atomic_write_bytes(target, enc.data)
        encoder.commit(enc, target)
        s = enc.stats
        print(
            f"{src} -> {target}: {'keyframe' if s['keyframe'] else 'delta'}, {s['file_bytes'] / 2**20:.2f} MB, "
            f"{s['ratio']:.1f}x vs fp32 W+m+v, {time.perf_counter() - t0:.1f} s"
        )


def _decompress(args: argparse.Namespace) -> None:
    args.output.mkdir(parents=True, exist_ok=True)
    for src, ckpt in decode_sequence(args.inputs):
        fmt = ExCPFile.open(src).header.get("meta", {}).get("format", LIGHTNING)
        out = args.output / (src.stem if fmt == HF_TRAINER else src.stem + ".ckpt")
        write_any(ckpt, fmt, out)
        print(f"{src} -> {out}")


def _summary(path: Path) -> dict[str, Any]:
    f = ExCPFile.open(path)
    h = f.header
    st = h.get("stats", {})
    raw = st.get("raw_wmv_bytes", 0.0)
    return {
        "file": str(path),
        "kind": h["kind"],
        "format": h.get("meta", {}).get("format"),
        "source": h.get("meta", {}).get("source"),
        "chain_index": h["chain_index"],
        "chain": [str(p) for p in chain_paths(path)],
        "bytes": f.size,
        "raw_wmv_bytes": raw,
        "raw_tensor_bytes": st.get("raw_tensor_bytes"),
        "ratio": raw / f.size if f.size else None,
        "params": st.get("params"),
        "bits_per_param": {k: st.get(f"bits_per_param_{k}") for k in ("w", "m", "v")},
        "sparsity": {k: st.get(f"sparsity_{k}") for k in ("w", "m")},
        "tensors": len(h["entries"]),
        "settings": h["settings"],
    }


def _inspect(args: argparse.Namespace) -> None:
    rows = [_summary(p) for p in args.inputs]
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
            f"{r['ratio']:.1f}x vs fp32 W+m+v ({r['raw_wmv_bytes'] / 2**20:.2f} MB), {r['params']:.0f} params\n"
            f"  bits/param: {bpp}; sparsity w {r['sparsity']['w']:.3f}, m {r['sparsity']['m']:.3f}\n"
            f"  chain: {' -> '.join(Path(c).name for c in r['chain'])}"
        )


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 only on success)."""
    args = _parser().parse_args(argv)
    try:
        {"compress": _compress, "decompress": _decompress, "inspect": _inspect}[args.command](args)
    except (ExCPFormatError, FormatError) as e:
        print(f"excp: error: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        print(f"excp: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0
