"""What a result JSON records so a reader can trace it: versions, code revision, date, inputs and seeds.

Standard library only (no Lightning), so benchmarks and plain tools record the same fields as the probes.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

PACKAGES: tuple[str, ...] = (
    "torch",
    "lightning",
    "transformers",
    "numpy",
    "scipy",
    "torchmetrics",
    "staicc",
    "gguf",
    "peft",
    "bitsandbytes",
)
REPO_ROOT = Path(__file__).resolve().parents[2]


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each package (None when it is not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_revision(root: Path = REPO_ROOT) -> dict[str, Any]:
    """Commit of the checkout and whether it had uncommitted changes (None outside a git checkout)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(dirty)}


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def model_source_hash(source: str | Path | None) -> dict[str, Any]:
    """Where a model came from and a hash of it: the weights files of a local folder or file, else the name.

    A Hub id or alias resolves through the loader's cache, which the loader records; here a local path
    is hashed (its ``*.safetensors``/``*.bin``/``*.gguf`` files, sorted by name) so a result names the
    exact weights it used.
    """
    if source is None:
        return {"source": None, "sha256": None}
    path = Path(str(source)).expanduser()
    if path.is_file():
        return {"source": str(source), "sha256": file_sha256(path)}
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
        digest = hashlib.sha256()
        for f in files:
            digest.update(f.name.encode() + b"\0" + file_sha256(f).encode())
        return {"source": str(source), "sha256": digest.hexdigest() if files else None}
    return {"source": str(source), "sha256": None}


def provenance(**extra: Any) -> dict[str, Any]:
    """Versions, git revision, UTC date, Python and platform, plus the caller's data settings and seeds."""
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": git_revision(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        **extra,
    }
