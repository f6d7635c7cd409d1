"""Checkpoint safety: a save never loses the previous state, reading runs no code and allocates only
what the file justifies, errors say what happened. Each test reproduces one finding of the audit."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from callbacks.excp import ExCPCheckpointIO, ExCPFormatError, chain_paths, load_checkpoint
from callbacks.excp.cli import main as cli_main
from callbacks.excp.fileformat import ExCPFile, read_header
from callbacks.excp.references import collect_garbage, live_checkpoints
from tests.excp_crafting import checkpoint, planted_skeleton, replace_record, rewrite, split_file, write_chain


class _Killed(BaseException):
    """Stands in for SIGKILL at one instant of a save (nothing after it runs)."""


def _io_with_last(folder, steps):
    io = ExCPCheckpointIO()
    for step in steps:
        io.save_checkpoint(checkpoint(step), folder / f"step{step}.ckpt")
        io.save_checkpoint(checkpoint(step), folder / "last.ckpt")
    return io


@pytest.mark.parametrize("instant", ["before_rename", "after_preserve"])
def test_last_ckpt_survives_a_kill_inside_its_save(tmp_path, monkeypatch, instant):
    """Finding 1: the old last.ckpt used to be moved away before the new one was written."""
    io = _io_with_last(tmp_path, [1, 2])
    import callbacks.excp.store as store_module

    def kill(*args, **kwargs):
        raise _Killed

    target = "atomic_write_bytes" if instant == "after_preserve" else "preserve_for_chain"
    if instant == "before_rename":
        monkeypatch.setattr("common.atomic.os.replace", kill)
    else:
        monkeypatch.setattr(store_module, target, kill)
    with pytest.raises(_Killed):
        io.save_checkpoint(checkpoint(3), tmp_path / "last.ckpt")
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 2
    for path in live_checkpoints(tmp_path):
        load_checkpoint(path)
    # the next run cleans the temporary file and keeps every chain file a live checkpoint needs
    fresh = ExCPCheckpointIO()
    fresh.save_checkpoint(checkpoint(4), tmp_path / "step4.ckpt")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 2


def test_only_copy_of_a_state_is_never_collected(tmp_path):
    """Finding 1: with save_top_k=1 the only copy survived in .excp_refs and the next run deleted it."""
    io = ExCPCheckpointIO()
    for step in (1, 2, 3):
        io.save_checkpoint(checkpoint(step), tmp_path / f"step{step}.ckpt")
        io.save_checkpoint(checkpoint(step), tmp_path / "last.ckpt")
        if step > 1:
            io.remove_checkpoint(tmp_path / f"step{step - 1}.ckpt")
    assert collect_garbage(tmp_path) == []  # a second collection (the next run's) deletes nothing needed
    assert load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 3
    assert load_checkpoint(tmp_path / "step3.ckpt")["global_step"] == 3


def test_stale_temporaries_are_not_checkpoints_and_are_removed_at_setup(tmp_path):
    paths = write_chain(tmp_path, 2)
    stale = tmp_path / ".last.ckpt.x1y2.tmp"
    stale.write_bytes(paths[-1].read_bytes())
    assert stale not in live_checkpoints(tmp_path)
    io = ExCPCheckpointIO()
    io.clean_folder(tmp_path)
    assert not stale.exists() and all(p.exists() for p in paths)


def test_a_planted_pickle_never_runs(tmp_path):
    """Finding 2: the metadata record was unpickled with weights_only=False by default."""
    path = write_chain(tmp_path, 1)[0]
    header, _ = split_file(path.read_bytes())
    marker = tmp_path / "MARKER"
    path.write_bytes(replace_record(path.read_bytes(), header["skeleton"], planted_skeleton(marker)))
    with pytest.raises(ExCPFormatError, match="weights_only=False would run"):
        load_checkpoint(path)
    assert cli_main(["decompress", str(path), "-o", str(tmp_path / "out")]) == 1
    assert not marker.exists()
    with pytest.raises(ExCPFormatError):  # the crafted metadata then fails, but only after running its code
        load_checkpoint(path, weights_only=False)
    assert marker.exists()


def test_compress_of_a_planted_ckpt_runs_no_code(tmp_path, capsys):
    from tests.excp_crafting import Planted

    marker = tmp_path / "MARKER"
    torch.save({"global_step": 1, "state_dict": {"w": torch.ones(3)}, "x": Planted(str(marker))}, tmp_path / "a.ckpt")
    assert cli_main(["compress", str(tmp_path / "a.ckpt"), "-o", str(tmp_path / "out")]) == 1
    assert "--trust-pickles" in capsys.readouterr().err and not marker.exists()


def test_sizes_in_a_crafted_header_are_checked_before_allocating(tmp_path):
    """Finding 3: a delta claiming a 2^28-element tensor allocated 1 GiB."""
    keyframe, delta = write_chain(tmp_path, 2)

    def huge(header):
        header["entries"][0]["shape"] = [1 << 28]

    for path in (keyframe, delta):
        original = path.read_bytes()
        path.write_bytes(rewrite(original, huge))
        started = time.perf_counter()
        with pytest.raises(ExCPFormatError):
            load_checkpoint(delta)
        assert time.perf_counter() - started < 5
        path.write_bytes(original)


def test_header_length_is_capped_and_checked_against_the_file(tmp_path):
    path = write_chain(tmp_path, 1)[0]
    data = bytearray(path.read_bytes())
    data[12:16] = (int(1.06 * 2**30)).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ExCPFormatError, match="more than the .* allowed"):
        read_header(path)
    data[12:16] = (len(data)).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ExCPFormatError, match="truncated inside its header"):
        ExCPFile.open(path)


def test_non_regular_files_are_refused_without_reading(tmp_path):
    """Finding 3: `inspect /dev/zero` grew to 23 GB; a FIFO blocked."""
    fifo = tmp_path / "pipe.ckpt"
    os.mkfifo(fifo)
    results = {}

    def read(name, path):
        try:
            load_checkpoint(path)
        except ExCPFormatError as error:
            results[name] = str(error)

    threads = [
        threading.Thread(target=read, args=(n, p), daemon=True)
        for n, p in (("fifo", fifo), ("zero", "/dev/zero"), ("dir", tmp_path))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert "not a regular file" in results["fifo"] and "not a regular file" in results["zero"]
    assert "directory" in results["dir"]


def test_reference_cycles_are_an_error_not_a_hang(tmp_path):
    """Finding 4: a cycle hung the reader for over a minute."""
    _, first, second = write_chain(tmp_path, 3)
    second_header = read_header(second)

    def point_at_second(header):
        header["ref"] = {"file_id": second_header["file_id"], "sha256": "0" * 64, "name": second.name}

    first.write_bytes(rewrite(first.read_bytes(), point_at_second))
    started = time.perf_counter()
    with pytest.raises(ExCPFormatError, match="loops back"):
        chain_paths(second)
    with pytest.raises(ExCPFormatError):
        load_checkpoint(second)
    assert time.perf_counter() - started < 5


def test_decompress_verifies_the_reference_hash(tmp_path, capsys):
    """Finding 5: a crafted reference with the right id gave wrong tensors and exit 0."""
    keyframe, delta = write_chain(tmp_path, 2)
    other_folder = tmp_path / "other"
    other_folder.mkdir()
    impostor = write_chain(other_folder, 1)[0]
    wanted_id = read_header(keyframe)["file_id"]
    keyframe.write_bytes(rewrite(impostor.read_bytes(), lambda h: h.update(file_id=wanted_id)))
    for argv in (["decompress", str(delta), "-o", str(tmp_path / "out")], ["inspect", str(delta)]):
        assert cli_main(argv) == 1
        assert "does not match the one it was made against" in capsys.readouterr().err
    with pytest.raises(ExCPFormatError, match="does not match"):
        load_checkpoint(delta)


def test_cli_refuses_to_overwrite_without_force(tmp_path, capsys):
    """Finding 5: decompress replaced files, including its own input, without asking."""
    keyframe, delta = write_chain(tmp_path, 2)
    out = tmp_path / "out"
    assert cli_main(["decompress", str(delta), "-o", str(out)]) == 0
    assert cli_main(["decompress", str(delta), "-o", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["decompress", str(delta), "-o", str(out), "--force"]) == 0
    # into the input folder: refused without --force; onto the input itself: refused always
    renamed = tmp_path / "step1"
    os.link(delta, renamed)
    for extra in ([], ["--force"]):
        assert cli_main(["decompress", str(renamed), "-o", str(tmp_path), *extra]) == 1
    assert "would overwrite the input" in capsys.readouterr().err
    (tmp_path / "step0").write_bytes(keyframe.read_bytes())  # another chain file under the output name
    assert cli_main(["decompress", str(tmp_path / "step0"), "-o", str(tmp_path), "--force"]) == 1
    assert "is an ExCP file" in capsys.readouterr().err
    other = tmp_path / "sub"
    other.mkdir()
    (other / "step1.ckpt").write_bytes(delta.read_bytes())
    assert cli_main(["decompress", str(delta), str(other / "step1.ckpt"), "-o", str(tmp_path / "o2")]) == 1
    assert "same output name" in capsys.readouterr().err
    assert load_checkpoint(delta)["global_step"] == 1  # the chain is intact


def test_messages_say_what_happened(tmp_path, capsys):
    """Finding 6: extra bytes were called truncated, a corrupt reference missing; inspect exited 0."""
    keyframe, delta = write_chain(tmp_path, 2)
    original = delta.read_bytes()
    delta.write_bytes(original + b"junk")
    with pytest.raises(ExCPFormatError, match="extra bytes") as info:
        load_checkpoint(delta)
    assert "truncated" not in str(info.value)
    delta.write_bytes(original[:-10])
    with pytest.raises(ExCPFormatError, match="truncated"):
        load_checkpoint(delta)
    delta.write_bytes(original)
    damaged = bytearray(keyframe.read_bytes())
    damaged[20] ^= 0xFF
    keyframe.write_bytes(bytes(damaged))
    with pytest.raises(ExCPFormatError, match="corrupt") as info:
        load_checkpoint(delta)
    assert "missing" not in str(info.value)
    assert cli_main(["inspect", str(delta)]) == 1
    assert "corrupt" in capsys.readouterr().err
    keyframe.unlink()
    with pytest.raises(ExCPFormatError, match="missing"):
        load_checkpoint(delta)


def test_cli_errors_are_one_line(tmp_path, capsys):
    path = write_chain(tmp_path, 1)[0]
    (tmp_path / "random.ckpt").write_bytes(os.urandom(3000))
    (tmp_path / "trunc.ckpt").write_bytes(path.read_bytes()[:50])
    cases = [
        ["inspect", str(tmp_path / "missing.ckpt")],
        ["inspect", str(tmp_path)],
        ["inspect", str(tmp_path / "trunc.ckpt")],
        ["inspect", str(tmp_path / "random.ckpt")],
        ["decompress", str(tmp_path / "random.ckpt"), "-o", str(tmp_path / "o")],
        ["compress", str(tmp_path / "random.ckpt"), "-o", str(tmp_path / "o")],
        ["compress", str(tmp_path / "missing.ckpt"), "-o", str(tmp_path / "o")],
        ["compress", "/dev/zero", "-o", str(tmp_path / "o")],
    ]
    for argv in cases:
        assert cli_main(argv) == 1, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("excp: error: "), (argv, err)


def test_excp_setup_removes_stale_temporaries_before_any_save(tiny_model_config, cpu_trainer_kwargs, tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from callbacks.excp import ExCP
    from datamodules.text import TextDataModule
    from lightning_modules.causal_lm import CausalLMModule

    folder = tmp_path / "ckpts"
    folder.mkdir()
    stale = folder / ".last.ckpt.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    saver = ModelCheckpoint(dirpath=folder, every_n_train_steps=1000, save_last=False)
    kwargs = dict(cpu_trainer_kwargs, enable_checkpointing=True, logger=False, limit_val_batches=0, max_steps=1)
    trainer = pl.Trainer(callbacks=[ExCP(print_summary=False), saver], **kwargs)
    module = CausalLMModule(model=None, model_config=tiny_model_config, learning_rate=1e-2, warmup_steps=0)
    trainer.fit(module, datamodule=TextDataModule(block_size=32, batch_size=4, max_tokens=20_000))
    assert not stale.exists() and not list(folder.iterdir())  # cleaned, and no checkpoint was written
