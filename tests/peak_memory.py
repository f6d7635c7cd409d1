"""Peak resident memory of one block of code, reset per block (Linux): what a read really allocates.

``tracemalloc`` sees Python objects and numpy buffers but not torch's CPU allocator, and
``ru_maxrss`` can never be reset, so neither measures one read among thousands. Linux can reset a
process's resident high-water mark (``echo 5 > /proc/self/clear_refs``); with glibc told to serve
every large allocation by ``mmap`` (so a freed buffer goes back to the kernel instead of being
reused unseen by the next read), the growth of ``VmHWM`` over the resident size at the start is
the most memory the block held at once, torch tensors included. Untouched pages are not counted, and
the kernel's counters are batched per thread, so figures are accurate to a few hundred KiB.

Used by bench/excp_safety.py (thousands of crafted files) and tests/test_excp_bounds.py.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from pathlib import Path

__all__ = ["PeakResident", "available", "prepare_process"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_configured = False


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def available() -> bool:
    """True where the high-water mark can be reset and read (Linux with glibc)."""
    try:
        with _CLEAR_REFS.open("w") as handle:
            handle.write("5")
    except OSError:
        return False
    return _libc() is not None and "VmHWM" in _STATUS.read_text()


def _kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from {_STATUS}")


def prepare_process() -> None:
    """For thousands of small reads in one process (the bench): precise and fast, at a cost to everything else.

    Allocations >= 64 KiB are served by mmap (returned to the kernel on free, so a later block cannot
    reuse them unseen; glibc otherwise raises its threshold up to 32 MiB), the heap is trimmed eagerly,
    and the objects alive now are frozen out of garbage collection (each block's collection then
    walks only new objects). Not for a test process: other tests would run with these settings.
    """
    global _configured
    if _configured:
        return
    libc = _libc()
    if libc is None or not available():
        raise RuntimeError("peak resident memory needs Linux with glibc (/proc/self/clear_refs and mallopt)")
    libc.mallopt(_M_MMAP_THRESHOLD, 64 << 10)  # a fixed threshold also stops glibc from raising it
    libc.mallopt(_M_TRIM_THRESHOLD, 128 << 10)
    gc.collect()
    gc.freeze()
    _configured = True


class PeakResident:
    """``with PeakResident() as meter: ...`` then ``meter.bytes``: the block's peak resident growth.

    Garbage of earlier blocks is collected and the heap trimmed before the mark is reset, so memory
    freed before the block can hardly be reused by it unseen (allocations above 32 MiB are always
    mapped afresh; :func:`prepare_process` makes that hold from 64 KiB).
    """

    def __init__(self) -> None:
        if not available():
            raise RuntimeError("peak resident memory needs Linux with glibc (/proc/self/clear_refs and mallopt)")
        self.bytes = 0
        self._start = 0

    def __enter__(self) -> PeakResident:
        gc.collect()
        _libc().malloc_trim(0)
        with _CLEAR_REFS.open("w") as handle:
            handle.write("5")
        self._start = _kib("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.bytes = max(0, _kib("VmHWM") - self._start) * 1024
