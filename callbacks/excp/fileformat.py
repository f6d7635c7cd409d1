"""The ExCP file: a versioned header, checksummed records and a whole-file checksum (no Lightning).

Layout (little endian)::

    b"EXCPv1\\r\\n" | u32 format_version | u32 header_len | header (zstd'd UTF-8 JSON) | u32 crc32(header)
    | records (concatenated) | sha256 of every preceding byte (32 bytes) | b"EXCP-END"

The header holds the codec settings, the tensor index, the record table (offset, length, crc32 per
record, offsets relative to the first record byte) and, for delta files, the id, file name and
sha256 of the reference file they were made against. Every read problem raises
:class:`ExCPFormatError`, one message that names the file, the problem and what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from common.atomic import atomic_write_bytes  # re-exported: temp file + fsync + rename
from common.errors import UserFacingError

__all__ = [
    "FORMAT_VERSION",
    "ExCPFile",
    "ExCPFormatError",
    "atomic_write_bytes",
    "build_file",
    "is_excp_file",
    "read_header",
]

MAGIC = b"EXCPv1\r\n"
END_MAGIC = b"EXCP-END"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sII")
_CRC = struct.Struct("<I")
_TRAILER = 32 + len(END_MAGIC)


class ExCPFormatError(UserFacingError):
    """A compressed checkpoint cannot be read correctly; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str, hint: str | None = None) -> None:
        self.path = str(path)
        self.problem = problem
        msg = f"ExCP checkpoint {self.path}: {problem}"
        if hint:
            msg += f". {hint}"
        super().__init__(msg)


def build_file(header: dict[str, Any], records: list[tuple[str, bytes]]) -> tuple[bytes, str, str]:
    """Serialise a header and named records into file bytes.

    Returns:
        ``(data, file_id, sha256_hex)``: the id is a fresh UUID written into the header; the hash is
        the whole-file checksum that dependent files record as their reference hash.
    """
    table = []
    offset = 0
    for name, blob in records:
        table.append({"name": name, "offset": offset, "length": len(blob), "crc32": zlib.crc32(blob)})
        offset += len(blob)
    file_id = uuid.uuid4().hex
    header = dict(header, format_version=FORMAT_VERSION, file_id=file_id, records=table)
    hbytes = zstandard.ZstdCompressor(level=9).compress(json.dumps(header, separators=(",", ":")).encode())
    parts = [_PREFIX.pack(MAGIC, FORMAT_VERSION, len(hbytes)), hbytes, _CRC.pack(zlib.crc32(hbytes))]
    parts.extend(blob for _, blob in records)
    body = b"".join(parts)
    digest = hashlib.sha256(body).digest()
    return body + digest + END_MAGIC, file_id, digest.hex()


def is_excp_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a regular file that starts with the ExCP magic."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except (OSError, IsADirectoryError):
        return False


def _parse_header(path: str | os.PathLike, data: bytes) -> tuple[dict[str, Any], int]:
    if len(data) < _PREFIX.size:
        raise ExCPFormatError(path, f"file is truncated ({len(data)} bytes, shorter than the header)")
    magic, version, hlen = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise ExCPFormatError(path, "not an ExCP file (bad magic bytes)", "Pass a file written by ExCP")
    if version > FORMAT_VERSION:
        raise ExCPFormatError(
            path, f"format version {version} is newer than this reader ({FORMAT_VERSION})", "Upgrade lumenlm"
        )
    end = _PREFIX.size + hlen
    if len(data) < end + _CRC.size:
        raise ExCPFormatError(path, "file is truncated inside its header", "Re-copy the file")
    hbytes = data[_PREFIX.size : end]
    (crc,) = _CRC.unpack_from(data, end)
    if zlib.crc32(hbytes) != crc:
        raise ExCPFormatError(path, "header checksum mismatch (file is corrupted)", "Re-copy the file")
    try:
        header = json.loads(zstandard.ZstdDecompressor().decompress(hbytes, max_output_size=1 << 30))
    except (ValueError, zstandard.ZstdError) as e:
        raise ExCPFormatError(path, f"header is not valid JSON ({e})") from None
    return header, end + _CRC.size


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check only the header (cheap: used to walk chains and collect garbage)."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(_PREFIX.size)
            if len(prefix) == _PREFIX.size and prefix[:8] == MAGIC:
                (hlen,) = struct.unpack_from("<I", prefix, 12)
                prefix += f.read(hlen + _CRC.size)
    except FileNotFoundError:
        raise ExCPFormatError(path, "file does not exist") from None
    except OSError as e:
        raise ExCPFormatError(path, f"cannot be read ({e.strerror})") from None
    return _parse_header(path, prefix)[0]


@dataclass
class ExCPFile:
    """A fully verified ExCP file held in memory (compressed files are small by design)."""

    path: str
    header: dict[str, Any]
    sha256: str
    _data: bytes
    _base: int

    @classmethod
    def open(cls, path: str | os.PathLike) -> ExCPFile:
        """Read ``path`` and verify magic, version, header crc, length and the whole-file sha256."""
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise ExCPFormatError(path, "file does not exist") from None
        except IsADirectoryError:
            raise ExCPFormatError(path, "is a directory, not an ExCP file") from None
        except OSError as e:
            raise ExCPFormatError(path, f"cannot be read ({e.strerror})") from None
        header, base = _parse_header(path, data)
        records = header.get("records", [])
        need = base + sum(r["length"] for r in records) + _TRAILER
        if len(data) < need or data[-len(END_MAGIC) :] != END_MAGIC:
            raise ExCPFormatError(
                path,
                f"file is truncated ({len(data)} bytes, expected {need})",
                "The write was interrupted or the copy is incomplete; use another checkpoint",
            )
        if len(data) != need:
            raise ExCPFormatError(path, f"file has {len(data) - need} unexpected extra bytes (corrupted)")
        body = memoryview(data)[:-_TRAILER]
        digest = hashlib.sha256(body).digest()
        if digest != data[-_TRAILER : -len(END_MAGIC)]:
            bad = [
                r["name"]
                for r in records
                if zlib.crc32(body[base + r["offset"] : base + r["offset"] + r["length"]]) != r["crc32"]
            ]
            where = f"record(s) {', '.join(bad[:5])}" if bad else "the trailer"
            raise ExCPFormatError(
                path,
                f"checksum mismatch in {where} (file is corrupted)",
                "Re-copy it or use another checkpoint",
            )
        return cls(str(path), header, digest.hex(), data, base)

    def record(self, index: int) -> bytes:
        """Bytes of record ``index``, checked against its crc32."""
        r = self.header["records"][index]
        blob = self._data[self._base + r["offset"] : self._base + r["offset"] + r["length"]]
        if zlib.crc32(blob) != r["crc32"]:
            raise ExCPFormatError(self.path, f"checksum mismatch in record {r['name']} (file is corrupted)")
        return blob

    @property
    def size(self) -> int:
        """File size in bytes."""
        return len(self._data)
