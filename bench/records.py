"""Reading back a JSON record a bench wrote, for the modes that redraw or recompute from it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_record(path: Path, purpose: str, producer: str) -> dict[str, Any]:
    """The record at ``path``, or one line saying why it cannot be used for ``purpose``.

    A replot or recompute runs on a file a person names, so a missing, truncated or foreign file must
    end in one line that says which bench writes a usable one (``producer``, e.g. ``bench/excp.py``),
    not in a JSON or key traceback.
    """
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        message = f"{path}: cannot read the record to {purpose} ({err}); run `python {producer}` first"
        raise SystemExit(message) from None
    if not isinstance(result, dict):
        raise SystemExit(f"{path}: not a record of {producer}; run `python {producer}` first")
    return result
