"""Reading a crafted ExCP file allocates no more than what its bytes can encode.

A crafted file with valid checksums gets past every integrity check, so only structural checks stand
between a size it claims and an allocation: these tests craft the claims the audit found (a quantized
stream claiming a 2^28-element tensor, a header that nests without end) and assert one error line and
a peak resident growth within twice the clean read of the same chain (measured per read, torch
tensors included: tests/peak_memory.py).
"""

from __future__ import annotations

import struct

import pytest
import zstandard

from callbacks.excp import ExCPFormatError, load_checkpoint
from tests import peak_memory
from tests.excp_crafting import assemble_compressed, constant_stream, replace_record, rewrite, split_file, write_chain

needs_meter = pytest.mark.skipif(not peak_memory.available(), reason="peak resident memory needs Linux with glibc")


def _clean_peak(path) -> int:
    load_checkpoint(path)  # warm: lazy imports are not the file's doing
    peaks = []
    for _ in range(3):
        with peak_memory.PeakResident() as meter:
            load_checkpoint(path)
        peaks.append(meter.bytes)
    return max(peaks)


@needs_meter
@pytest.mark.parametrize("mode", ["absolute", "delta"])
def test_a_quantized_stream_claiming_a_huge_tensor_is_refused_within_the_bound(tmp_path, mode):
    """Finding 3: a 370 KB delta claiming a 2^28-element tensor allocated 1 GiB (absolute mode still did)."""
    paths = write_chain(tmp_path, 2, size=128)
    bound = 2 * max(_clean_peak(paths[-1]), sum(p.stat().st_size for p in paths))
    data = paths[-1].read_bytes()
    header, _ = split_file(data)
    entry = next(e for e in header["entries"] if e["w_mode"] == "delta")
    crafted = replace_record(data, entry["rec_w"], constant_stream(1 << 28))

    def claim(h):
        target = next(e for e in h["entries"] if e["name"] == entry["name"])
        target.update(w_mode=mode, shape=[1 << 28])

    paths[-1].write_bytes(rewrite(crafted, claim))
    with peak_memory.PeakResident() as meter, pytest.raises(ExCPFormatError) as caught:
        load_checkpoint(paths[-1])
    assert meter.bytes <= bound, f"{meter.bytes} bytes allocated, bound {bound}"
    message = str(caught.value)
    assert "\n" not in message and entry["name"] in message and "reference" in message


def test_a_header_nested_without_end_is_one_error(tmp_path):
    """A few hundred bytes of zstd expand to a JSON array nested 500,000 deep: an error, not a RecursionError."""
    path = write_chain(tmp_path, 1)[0]
    _, records = split_file(path.read_bytes())
    bomb = zstandard.ZstdCompressor().compress(b"[" * 500_000 + b"]" * 500_000)
    path.write_bytes(assemble_compressed(bomb, records))
    with pytest.raises(ExCPFormatError, match="header is not valid JSON"):
        load_checkpoint(path)



@needs_meter
def test_the_meter_sees_torch_tensors_and_resets_per_block():
    """The bound above is only as good as the meter: a 64 MiB torch tensor is seen, an empty block is not."""
    import torch

    with peak_memory.PeakResident() as big:
        tensor = torch.ones(16 << 20)
        del tensor
    with peak_memory.PeakResident() as empty:
        pass
    # the kernel's resident counters lag by up to a few hundred KiB (per-thread batching)
    assert big.bytes >= 63 << 20 and empty.bytes < 1 << 20


def _zero_planes(count: int) -> bytes:
    """A lossless fp32 record: four zstd frames of ``count`` zero bytes each (a few KB for 16M elements)."""
    frame = zstandard.ZstdCompressor(level=19).compress(bytes(count))
    return struct.pack("<B4Q", 4, *[len(frame)] * 4) + frame * 4


@needs_meter
def test_a_keyframe_claiming_a_huge_constant_tensor_is_refused_unless_trusted(tmp_path):
    """zstd expands a frame up to 32,768x: a 4 KB keyframe of 16M zeros made the reader allocate 285 MB."""
    path = write_chain(tmp_path, 1, size=64)[0]
    bound = 2 * max(_clean_peak(path), path.stat().st_size)
    data = path.read_bytes()
    header, _ = split_file(data)
    index = next(i for i, e in enumerate(header["entries"]) if e["name"] == "b")
    data = replace_record(data, header["entries"][index]["rec_w"], _zero_planes(1 << 24))
    path.write_bytes(rewrite(data, lambda h: h["entries"][index].update(shape=[1 << 24])))
    with peak_memory.PeakResident() as meter, pytest.raises(ExCPFormatError) as caught:
        load_checkpoint(path)
    assert meter.bytes <= bound, f"{meter.bytes} bytes allocated, bound {bound}"
    assert "\n" not in str(caught.value) and "losslessly stored" in str(caught.value)
    # the caller who trusts the file gets what it encodes
    assert load_checkpoint(path, weights_only=False)["state_dict"]["b"].shape == (1 << 24,)
