"""ExCP file format: checksums, truncation, wrong references, atomic writes, chain retirement."""

from __future__ import annotations

import shutil

import pytest
import torch

from callbacks.excp.codec import ExCPSettings
from callbacks.excp.decoder import decode_sequence, load_checkpoint
from callbacks.excp.encoder import ExCPEncoder
from callbacks.excp.fileformat import FORMAT_VERSION, ExCPFile, ExCPFormatError, read_header
from callbacks.excp.references import REFS_DIR, chain_paths, collect_garbage, retire
from common.atomic import atomic_write_bytes


def _ckpt(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    w = torch.randn(64, 32, generator=g)
    return {
        "global_step": step,
        "state_dict": {"w": torch.ones(64, 32) + 1e-3 * step * w, "b": torch.full((32,), float(step))},
        "optimizer_states": [
            {
                "state": {
                    0: {"step": torch.tensor(float(step)), "exp_avg": 1e-3 * w, "exp_avg_sq": 1e-7 * w**2},
                },
                "param_groups": [{"lr": 0.1, "params": [0, 1]}],
            }
        ],
    }


def _write(tmp_path, n, interval=10):
    enc = ExCPEncoder(ExCPSettings(keyframe_interval=interval))
    paths = []
    for i in range(n):
        p = tmp_path / f"step{i}.ckpt"
        e = enc.encode(_ckpt(i), target=p, optimizer_param_names=[["w", "b"]])
        atomic_write_bytes(p, e.data)
        enc.commit(e, p)
        paths.append(p)
    return enc, paths


def test_header_carries_settings_index_and_reference(tmp_path):
    _, paths = _write(tmp_path, 2)
    h0, h1 = read_header(paths[0]), read_header(paths[1])
    assert h0["format_version"] == FORMAT_VERSION == 2 and h0["kind"] == "keyframe" and h0["ref"] is None
    assert h1["kind"] == "delta" and h1["ref"]["file_id"] == h0["file_id"]
    assert h1["ref"]["sha256"] == ExCPFile.open(paths[0]).sha256
    assert h1["settings"]["bits_w"] == 4 and [e["name"] for e in h1["entries"]] == ["w", "b"]
    assert all("crc32" in r for r in h1["records"])
    assert chain_paths(paths[1]) == paths


def test_truncated_file_raises_clear_error(tmp_path):
    _, paths = _write(tmp_path, 2)
    data = paths[1].read_bytes()
    for cut in (5, 30, len(data) // 2, len(data) - 1):
        paths[1].write_bytes(data[:cut])
        with pytest.raises(ExCPFormatError, match=r"step1\.ckpt: .*truncated") as err:
            load_checkpoint(paths[1])
        assert str(paths[1]) in str(err.value)


def test_corrupted_record_is_named(tmp_path):
    _, paths = _write(tmp_path, 2)
    data = bytearray(paths[1].read_bytes())
    data[len(data) - 100] ^= 0xFF  # inside the last records
    paths[1].write_bytes(bytes(data))
    with pytest.raises(ExCPFormatError, match=r"step1\.ckpt: checksum mismatch in record"):
        load_checkpoint(paths[1])
    data = bytearray(paths[0].read_bytes())
    data[20] ^= 0x01  # inside the header
    paths[0].write_bytes(bytes(data))
    with pytest.raises(ExCPFormatError, match=r"step0\.ckpt: header checksum mismatch"):
        load_checkpoint(paths[0])


def test_corrupted_reference_is_detected_through_the_chain(tmp_path):
    _, paths = _write(tmp_path, 3)
    data = bytearray(paths[0].read_bytes())
    data[-50] ^= 0x10
    paths[0].write_bytes(bytes(data))
    with pytest.raises(ExCPFormatError, match=r"step0\.ckpt: checksum mismatch"):
        load_checkpoint(paths[2])


def test_missing_and_wrong_reference(tmp_path):
    _, paths = _write(tmp_path, 3)
    other = tmp_path / "other"
    other.mkdir()
    _, other_paths = _write(other, 2)
    # a different checkpoint under the reference's name
    shutil.copy(other_paths[1], paths[1])
    with pytest.raises(
        ExCPFormatError, match=r"step2\.ckpt: its reference .*step1\.ckpt is a different checkpoint"
    ):
        load_checkpoint(paths[2])
    paths[1].unlink()
    with pytest.raises(ExCPFormatError, match=r"step2\.ckpt: its reference step1\.ckpt .* is missing"):
        load_checkpoint(paths[2])


def test_not_an_excp_file(tmp_path):
    p = tmp_path / "x.ckpt"
    torch.save({"a": 1}, p)
    with pytest.raises(ExCPFormatError, match="not an ExCP file"):
        load_checkpoint(p)
    with pytest.raises(ExCPFormatError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"1")
    atomic_write_bytes(tmp_path / "a.bin", b"22")
    assert (tmp_path / "a.bin").read_bytes() == b"22"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_retire_keeps_chain_readable_and_gc_drops_unneeded(tmp_path):
    enc, paths = _write(tmp_path, 4, interval=3)  # keyframe, delta, delta, keyframe
    want = load_checkpoint(paths[2])["state_dict"]["w"]
    retire(paths[0])
    retire(paths[1])
    assert not paths[0].exists() and not paths[1].exists()
    collect_garbage(tmp_path, keep_ids=[enc.head["file_id"]])
    assert len(list((tmp_path / REFS_DIR).iterdir())) == 2  # step2 still needs both
    assert torch.equal(load_checkpoint(paths[2])["state_dict"]["w"], want)
    retire(paths[2])
    deleted = collect_garbage(tmp_path, keep_ids=[enc.head["file_id"]])
    assert len(deleted) == 3 and not (tmp_path / REFS_DIR).exists()
    assert load_checkpoint(paths[3])["global_step"] == 3


def test_overwrite_of_a_reference_is_survived_by_retiring_first(tmp_path):
    enc = ExCPEncoder()
    last = tmp_path / "last.ckpt"
    e = enc.encode(_ckpt(0), target=last)
    atomic_write_bytes(last, e.data)
    enc.commit(e, last)
    p1 = tmp_path / "step1.ckpt"
    e = enc.encode(_ckpt(1), target=p1)
    atomic_write_bytes(p1, e.data)
    enc.commit(e, p1)
    retire(last)  # what the CheckpointIO does before overwriting last.ckpt
    e = enc.encode(_ckpt(2), target=last)
    atomic_write_bytes(last, e.data)
    enc.commit(e, last)
    assert load_checkpoint(p1)["global_step"] == 1
    assert load_checkpoint(last)["global_step"] == 2


def test_same_step_saved_twice_is_a_tiny_twin(tmp_path):
    """ModelCheckpoint writes a top-k file and last.ckpt at the same step: the second is a twin that
    stores no tensors, for a keyframe and for a delta alike."""
    enc = ExCPEncoder()
    paths = []
    for name, step in (("a", 0), ("last0", 0), ("b", 1), ("last", 1), ("c", 2)):
        p = tmp_path / f"{name}.ckpt"
        e = enc.encode(_ckpt(step), target=p, optimizer_param_names=[["w", "b"]])
        atomic_write_bytes(p, e.data)
        enc.commit(e, p)
        paths.append(p)
    ha, ht0, hb, ht, hc = (read_header(p) for p in paths)
    assert ht0["kind"] == ht["kind"] == "twin"
    assert ht0["ref"]["file_id"] == ha["file_id"] and ht["ref"]["file_id"] == hb["file_id"]
    assert hb["ref"]["name"] == "last0.ckpt" and hb["chain_index"] == ht["chain_index"] == 1
    assert hc["ref"]["name"] == "last.ckpt" and hc["chain_index"] == 2
    assert paths[1].stat().st_size < paths[0].stat().st_size / 5
    for orig, twin in ((paths[0], paths[1]), (paths[2], paths[3])):
        x, y = load_checkpoint(orig), load_checkpoint(twin)
        assert torch.equal(x["state_dict"]["w"], y["state_dict"]["w"])
        sx, sy = x["optimizer_states"][0]["state"][0], y["optimizer_states"][0]["state"][0]
        assert torch.equal(sx["exp_avg"], sy["exp_avg"]) and torch.equal(sx["exp_avg_sq"], sy["exp_avg_sq"])
        assert x["global_step"] == y["global_step"]
    assert load_checkpoint(paths[4])["global_step"] == 2
    seq = [ck["global_step"] for _, ck in decode_sequence(paths)]
    assert seq == [0, 0, 1, 1, 2]
