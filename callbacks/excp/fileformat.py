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
import stat
import struct
import uuid
import zlib
from dataclasses import dataclass
from typing import Any

import zstandard

from common.errors import UserFacingError

__all__ = [
    "FORMAT_VERSION",
    "ExCPFile",
    "ExCPFormatError",
    "build_file",
    "is_excp_file",
    "read_header",
]

MAGIC = b"EXCPv1\r\n"
END_MAGIC = b"EXCP-END"
FORMAT_VERSION = 2
"""2: code streams may be rANS-coded (index-stream mode 4). Version-1 files hold only the zstd
layouts, which this reader still decodes; a reader older than a file refuses it in one line."""
_PREFIX = struct.Struct("<8sII")
_CRC = struct.Struct("<I")
_TRAILER = 32 + len(END_MAGIC)
MAX_HEADER_BYTES = 64 << 20
"""Largest compressed header accepted (a 7B model's index is well under 1 MiB)."""
MAX_HEADER_JSON_BYTES = 256 << 20
_HEADER_EXPANSION = 64


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


def _open_regular(path: str | os.PathLike) -> tuple[int, int]:
    """Open ``path`` for reading only if it is a regular file; returns ``(fd, size)``.

    ``O_NONBLOCK`` keeps a FIFO from blocking the open; devices, FIFOs and folders are refused
    before a byte is read (``/dev/zero`` would otherwise grow a buffer without end).
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ExCPFormatError(path, "file does not exist", "Check the path") from None
    except IsADirectoryError:
        raise ExCPFormatError(path, "is a directory, not an ExCP file", "Pass the checkpoint file itself") from None
    except OSError as e:
        raise ExCPFormatError(path, f"cannot be read ({e.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        what = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file (a device, FIFO or socket)"
        raise ExCPFormatError(path, f"is {what}, not an ExCP file", "Pass the checkpoint file itself")
    return fd, info.st_size


_MAX_READ = 0x7FFFF000
"""Most bytes one ``read`` returns on Linux: a smaller file arrives in one buffer, never joined (copied)."""


def _read_fd(path: str | os.PathLike, fd: int, count: int) -> bytes:
    chunks = []
    remaining = count
    while remaining > 0:
        try:
            chunk = os.read(fd, min(remaining, _MAX_READ))
        except OSError as e:
            raise ExCPFormatError(path, f"cannot be read ({e.strerror})") from None
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def is_excp_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a regular file that starts with the ExCP magic."""
    try:
        fd, _ = _open_regular(path)
    except ExCPFormatError:
        return False
    try:
        return _read_fd(path, fd, len(MAGIC)) == MAGIC
    except ExCPFormatError:
        return False
    finally:
        os.close(fd)


def _check_prefix(path: str | os.PathLike, prefix: bytes, file_size: int) -> int:
    """Validate magic and version; returns the header length after checking it against the file."""
    if len(prefix) < _PREFIX.size:
        if MAGIC.startswith(prefix[: len(MAGIC)]) and prefix:
            raise ExCPFormatError(path, f"file is truncated ({file_size} bytes, shorter than the header)")
        raise ExCPFormatError(path, "not an ExCP file (too short)", "Pass a file written by ExCP")
    magic, version, header_length = _PREFIX.unpack_from(prefix, 0)
    if magic != MAGIC:
        raise ExCPFormatError(path, "not an ExCP file (bad magic bytes)", "Pass a file written by ExCP")
    if version > FORMAT_VERSION:
        raise ExCPFormatError(
            path, f"format version {version} is newer than this reader ({FORMAT_VERSION})", "Upgrade lumenlm"
        )
    if header_length > MAX_HEADER_BYTES:
        raise ExCPFormatError(
            path, f"header claims {header_length} bytes, more than the {MAX_HEADER_BYTES} allowed (file is corrupted)"
        )
    if _PREFIX.size + header_length + _CRC.size + _TRAILER > file_size:
        raise ExCPFormatError(
            path, "file is truncated inside its header (or its header length is corrupted)", "Re-copy the file"
        )
    return header_length


def _parse_header(path: str | os.PathLike, hbytes: bytes, crc_bytes: bytes) -> dict[str, Any]:
    (crc,) = _CRC.unpack_from(crc_bytes, 0)
    if zlib.crc32(hbytes) != crc:
        raise ExCPFormatError(path, "header checksum mismatch (file is corrupted)", "Re-copy the file")
    bound = min(MAX_HEADER_JSON_BYTES, _HEADER_EXPANSION * len(hbytes) + (1 << 20))
    try:
        declared = zstandard.frame_content_size(hbytes)
        if declared < 0 or declared > bound:
            raise ExCPFormatError(path, "header declares an impossible size (file is corrupted)")
        header = json.loads(zstandard.ZstdDecompressor().decompress(hbytes, max_output_size=bound))
    except (ValueError, RecursionError, zstandard.ZstdError) as e:  # RecursionError: nesting without end
        raise ExCPFormatError(path, f"header is not valid JSON ({e}; file is corrupted)") from None
    if not isinstance(header, dict):
        raise ExCPFormatError(path, "header is not a JSON object (file is corrupted)")
    problem = _header_problem(header)
    if problem is not None:
        raise ExCPFormatError(path, f"header is malformed: {problem} (file is corrupted)")
    return header


def _is_int(value: Any) -> bool:
    return type(value) is int and value >= 0


def _is_key_path(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(type(k) in (str, int) for k in value)


def _entry_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        return "a tensor entry has no name"
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        return f"tensor {entry['name']!r} has an invalid shape"
    if not isinstance(entry.get("dtype"), str) or not _is_int(entry.get("rec_w")):
        return f"tensor {entry['name']!r} has an invalid dtype or record"
    if entry.get("w_mode") not in ("delta", "absolute", "lossless"):
        return f"tensor {entry['name']!r} has an unknown weight mode"
    for key in ("m", "v"):
        stream = entry.get(key)
        if stream is not None and not (
            isinstance(stream, dict)
            and _is_key_path(stream.get("path"))
            and isinstance(stream.get("dtype"), str)
            and _is_int(stream.get("rec"))
        ):
            return f"tensor {entry['name']!r} has an invalid {key} stream"
    return None


def _header_problem(header: dict[str, Any]) -> str | None:
    """What is wrong with a header's structure, or None: readers then index it without surprises."""
    if header.get("kind") not in ("keyframe", "delta", "twin"):
        return "unknown file kind"
    if not isinstance(header.get("file_id"), str) or not _is_int(header.get("chain_index")):
        return "no file id or chain index"
    starts_from_base = header["kind"] == "delta" and header.get("ref") is None and isinstance(header.get("base"), dict)
    if header["kind"] != "keyframe" and not isinstance(header.get("ref"), dict) and not starts_from_base:
        return "a delta without a reference"
    for key in ("entries", "aliases", "extras"):
        if not isinstance(header.get(key), list):
            return f"no {key} list"
    for entry in header["entries"]:
        problem = _entry_problem(entry)
        if problem is not None:
            return problem
    for alias in header["aliases"]:
        if not (isinstance(alias, dict) and _is_key_path(alias.get("path")) and isinstance(alias.get("of"), str)):
            return "an invalid alias"
    for extra in header["extras"]:
        if not (
            isinstance(extra, dict)
            and _is_key_path(extra.get("path"))
            and isinstance(extra.get("dtype"), str)
            and isinstance(extra.get("shape"), list)
            and all(_is_int(d) for d in extra["shape"])
            and _is_int(extra.get("rec"))
        ):
            return "an invalid lossless tensor entry"
    if not _is_int(header.get("skeleton")):
        return "no metadata record"
    if not all(isinstance(header.get(key, {}), dict) for key in ("settings", "meta", "stats")):
        return "invalid settings, meta or stats"
    return None


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check only the header (cheap: used to walk chains and collect garbage)."""
    fd, size = _open_regular(path)
    try:
        prefix = _read_fd(path, fd, _PREFIX.size)
        header_length = _check_prefix(path, prefix, size)
        rest = _read_fd(path, fd, header_length + _CRC.size)
    finally:
        os.close(fd)
    if len(rest) < header_length + _CRC.size:
        raise ExCPFormatError(path, "file is truncated inside its header", "Re-copy the file")
    return _parse_header(path, rest[:header_length], rest[header_length:])


def _record_table(path: str | os.PathLike, header: dict[str, Any]) -> list[dict[str, Any]]:
    """The header's record table, checked to be contiguous non-negative integers."""
    records = header.get("records")
    if not isinstance(records, list):
        raise ExCPFormatError(path, "header has no record table (file is corrupted)")
    offset = 0
    for record in records:
        if (
            not isinstance(record, dict)
            or type(record.get("offset")) is not int
            or type(record.get("length")) is not int
            or type(record.get("crc32")) is not int
            or record["offset"] != offset
            or record["length"] < 0
        ):
            raise ExCPFormatError(path, "header's record table is malformed (file is corrupted)")
        offset += record["length"]
    return records


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
        """Read ``path`` and verify magic, version, header crc, length and the whole-file sha256.

        Only regular files are read, and no more bytes than their size; every length in the
        header is checked against the file's own length before it is used.
        """
        fd, size = _open_regular(path)
        try:
            data = _read_fd(path, fd, size)
        finally:
            os.close(fd)
        header_length = _check_prefix(path, data[: _PREFIX.size], len(data))
        end = _PREFIX.size + header_length
        header = _parse_header(path, data[_PREFIX.size : end], data[end : end + _CRC.size])
        base = end + _CRC.size
        records = _record_table(path, header)
        need = base + sum(r["length"] for r in records) + _TRAILER
        if len(data) < need:
            raise ExCPFormatError(
                path,
                f"file is truncated ({len(data)} bytes, expected {need})",
                "The write was interrupted or the copy is incomplete; use another checkpoint",
            )
        if len(data) > need:
            raise ExCPFormatError(
                path,
                f"file has {len(data) - need} unexpected extra bytes after its end (corrupted)",
                "Re-copy it or use another checkpoint",
            )
        if data[-len(END_MAGIC) :] != END_MAGIC:
            raise ExCPFormatError(path, "end marker is damaged (file is corrupted)", "Re-copy it")
        body = memoryview(data)[:-_TRAILER]
        digest = hashlib.sha256(body).digest()
        if digest != data[-_TRAILER : -len(END_MAGIC)]:
            bad = [
                r["name"]
                for r in records
                if zlib.crc32(body[base + r["offset"] : base + r["offset"] + r["length"]]) != r["crc32"]
            ]
            where = f"record(s) {', '.join(map(str, bad[:5]))}" if bad else "the trailer"
            raise ExCPFormatError(
                path,
                f"checksum mismatch in {where} (file is corrupted)",
                "Re-copy it or use another checkpoint",
            )
        return cls(str(path), header, digest.hex(), data, base)

    @staticmethod
    def check_regular(path: str | os.PathLike) -> None:
        """Raise :class:`ExCPFormatError` unless ``path`` is an existing regular file."""
        fd, _ = _open_regular(path)
        os.close(fd)

    def record(self, index: int) -> bytes:
        """Bytes of record ``index``, checked against its crc32."""
        records = self.header["records"]
        if type(index) is not int or not 0 <= index < len(records):
            raise ExCPFormatError(self.path, f"tensor index names record {index!r}, which does not exist (corrupted)")
        r = records[index]
        blob = self._data[self._base + r["offset"] : self._base + r["offset"] + r["length"]]
        if zlib.crc32(blob) != r["crc32"]:
            raise ExCPFormatError(self.path, f"checksum mismatch in record {r['name']} (file is corrupted)")
        return blob

    @property
    def size(self) -> int:
        """File size in bytes."""
        return len(self._data)
