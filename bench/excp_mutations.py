"""The mutations of bench/excp_safety.py's fuzz part: one clean ExCP chain, damaged one way per trial.

Each mutation changes the chain's files in place and returns ``(kind, path to read, repaired)``:
``repaired`` says the checksums were recomputed (a crafted file: only structural checks can stop it),
so a read that succeeds may return *some* checkpoint; a corrupted file (checksums left broken) must
give an error or the exact original tensors. :meth:`Campaign.restore` undoes every mutation.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Callable
from pathlib import Path

import zstandard

from callbacks.excp.fileformat import read_header
from tests.excp_crafting import (
    HEADER_FIELDS,
    HUGE_NUMBERS,
    ODD_VALUES,
    constant_stream,
    planted_skeleton,
    replace_record,
    rewrite,
    set_field,
    split_file,
    write_chain,
)

Mutation = Callable[[], tuple[str, Path, bool]]


class Campaign:
    """One clean chain (keyframe, two deltas of a ``size`` x ``size`` weight with Adam moments) and its mutations."""

    def __init__(self, folder: Path, seed: int, size: int = 256) -> None:
        self.folder = folder
        self.rng = random.Random(seed)
        self.paths = write_chain(folder, 3, size=size, first_step=1)  # a noisy keyframe: inspect reads ~1 MB
        self.originals = {p: p.read_bytes() for p in self.paths}
        self.chain_bytes = sum(len(b) for b in self.originals.values())
        self.marker = folder / "MARKER"
        self._zero_frames: dict[int, bytes] = {}

    def mutations(self) -> list[tuple[Mutation, int]]:
        """Every mutation with its weight in the random draw."""
        return [
            (self.flip, 30),
            (self.truncate, 15),
            (self.append, 8),
            (self.craft_header, 20),
            (self.craft_record, 15),
            (self.claim_size, 6),
            (self.claim_lossless, 4),
            (self.plant, 4),
            (self.cycle, 3),
            (self.header_length, 3),
            (self.special, 2),
        ]

    def restore(self) -> None:
        for path, data in self.originals.items():
            path.write_bytes(data)

    def flip(self) -> tuple[str, Path, bool]:
        target = self.rng.choice(self.paths)
        data = bytearray(target.read_bytes())
        for _ in range(self.rng.randint(1, 3)):
            data[self.rng.randrange(len(data))] ^= self.rng.randint(1, 255)
        target.write_bytes(bytes(data))
        return "byte_flip", self.paths[-1], False

    def truncate(self) -> tuple[str, Path, bool]:
        target = self.rng.choice(self.paths)
        data = target.read_bytes()
        target.write_bytes(data[: self.rng.randrange(len(data))])
        return "truncation", self.paths[-1], False

    def append(self) -> tuple[str, Path, bool]:
        target = self.rng.choice(self.paths)
        target.write_bytes(target.read_bytes() + os.urandom(self.rng.randint(1, 4096)))
        return "appended_bytes", self.paths[-1], False

    def craft_header(self) -> tuple[str, Path, bool]:
        target = self.rng.choice(self.paths)
        field, value = self.rng.choice(HEADER_FIELDS), self.rng.choice(HUGE_NUMBERS + ODD_VALUES)
        try:
            target.write_bytes(rewrite(target.read_bytes(), lambda h: set_field(h, field, value)))
        except (KeyError, IndexError, TypeError):  # the field is not in this file: claim a huge shape instead
            target.write_bytes(rewrite(target.read_bytes(), lambda h: set_field(h, ("entries", 0, "shape"), [2**28])))
        return "crafted_header", self.paths[-1], True

    def craft_record(self) -> tuple[str, Path, bool]:
        target = self.rng.choice(self.paths)
        data = target.read_bytes()
        header, _ = split_file(data)
        index = self.rng.randrange(len(header["records"]))
        blob = os.urandom(self.rng.randint(0, 256))
        if self.rng.random() < 0.5:  # a real record from elsewhere, with one byte changed (plausible framing)
            other, records = split_file(self.originals[self.rng.choice(self.paths)])
            record = self.rng.choice(other["records"])
            changed = bytearray(records[record["offset"] : record["offset"] + record["length"]])
            if changed:
                changed[self.rng.randrange(len(changed))] ^= self.rng.randint(1, 255)
            blob = bytes(changed)
        target.write_bytes(replace_record(data, index, blob))
        return "crafted_record", self.paths[-1], True

    def claim_size(self) -> tuple[str, Path, bool]:
        """A delta's weight stream replaced by 14 bytes that claim a huge tensor, in delta or absolute mode."""
        target = self.rng.choice(self.paths[1:])
        data = target.read_bytes()
        header, _ = split_file(data)
        index = self.rng.randrange(len(header["entries"]))
        count = self.rng.choice([2**20, 2**24, 2**28, 2**31 - 1])
        mode = self.rng.choice(["absolute", "delta"])
        data = replace_record(data, header["entries"][index]["rec_w"], constant_stream(count))
        target.write_bytes(rewrite(data, lambda h: h["entries"][index].update(w_mode=mode, shape=[count])))
        return "size_claim", self.paths[-1], True

    def claim_lossless(self) -> tuple[str, Path, bool]:
        """The last delta stores a tensor losslessly as zstd frames of zeros (a few KB) claiming a huge shape.

        zstd honestly expands such frames up to 32,768x, so only the size cap of callbacks/excp/bounds.py
        stands between the claim and the allocation (a crafted keyframe would fail its dependent's hash).
        """
        data = self.paths[-1].read_bytes()
        header, _ = split_file(data)
        index = self.rng.randrange(len(header["entries"]))
        count = self.rng.choice([2**16, 2**20, 2**22, 2**24])
        if count not in self._zero_frames:
            self._zero_frames[count] = zstandard.ZstdCompressor(level=19).compress(bytes(count))
        frame = self._zero_frames[count]
        record = struct.pack("<B4Q", 4, *[len(frame)] * 4) + frame * 4  # four fp32 byte planes
        data = replace_record(data, header["entries"][index]["rec_w"], record)
        lossless = {"w_mode": "lossless", "shape": [count], "dtype": "float32"}
        self.paths[-1].write_bytes(rewrite(data, lambda h: h["entries"][index].update(lossless)))
        return "lossless_claim", self.paths[-1], True

    def plant(self) -> tuple[str, Path, bool]:
        target = self.rng.choice(self.paths)
        data = target.read_bytes()
        header, _ = split_file(data)
        target.write_bytes(replace_record(data, header["skeleton"], planted_skeleton(self.marker)))
        return "planted_pickle", self.paths[-1], True

    def cycle(self) -> tuple[str, Path, bool]:
        later = read_header(self.paths[2])
        ref = {"file_id": later["file_id"], "sha256": "0" * 64, "name": self.paths[2].name}
        target = self.paths[self.rng.choice([0, 1])]
        target.write_bytes(rewrite(target.read_bytes(), lambda h: h.update(kind="delta", ref=ref)))
        return "reference_cycle", self.paths[-1], True

    def header_length(self) -> tuple[str, Path, bool]:
        target = self.rng.choice(self.paths)
        data = bytearray(target.read_bytes())
        data[12:16] = self.rng.choice([2**30 + 2**26, 2**32 - 1, len(data), 2**26 + 1]).to_bytes(4, "little")
        target.write_bytes(bytes(data))
        return "header_length", self.paths[-1], False

    def special(self) -> tuple[str, Path, bool]:
        choice = self.rng.choice(["fifo", "zero", "dir"])
        if choice == "fifo":
            fifo = self.folder / f"pipe{self.rng.randrange(10**9)}"
            os.mkfifo(fifo)
            return "fifo", fifo, True
        return ("dev_zero", Path("/dev/zero"), True) if choice == "zero" else ("directory", self.folder, True)

    def bytes_on_disk(self) -> int:
        """Total size of the chain's files as they are now (what a read of the last one may open)."""
        return sum(p.stat().st_size for p in self.paths if p.is_file())
