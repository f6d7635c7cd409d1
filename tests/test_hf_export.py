"""`train.py export` turns a run's checkpoint (ExCP or plain) into a folder stock transformers loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from lightning_modules.hf_export import rebuild_on_meta, trained_model
from tests.conftest import REPO_ROOT
from tests.shrink import shrunk_config_file

RELOAD_AND_SCORE = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
ids = torch.tensor([tokenizer("To be, or not to be")["input_ids"]])
with torch.no_grad():
    torch.save({"ids": ids, "logits": model(ids).logits}, sys.argv[2])
"""


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """The quickstart (tiny model, ExCP checkpoints kept) trained for a few steps."""
    root = tmp_path_factory.mktemp("run")
    shrunk = shrunk_config_file("configs/quickstart.yaml", root=root)
    train.main(["fit", "--config", str(shrunk), "--trainer.max_steps=4"])
    return root / "checkpoints" / "last.ckpt"


def test_exported_folder_reloads_with_stock_transformers_and_matches_the_module(trained_run: Path,
                                                                               tmp_path: Path) -> None:
    from callbacks.excp import is_excp_file

    assert is_excp_file(trained_run), "the quickstart writes ExCP checkpoints: export must read them"
    out = tmp_path / "hf"
    train.main(["export", "--checkpoint", str(trained_run), "--out", str(out)])
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    scored = tmp_path / "scored.pt"
    subprocess.run([sys.executable, "-c", RELOAD_AND_SCORE, str(out), str(scored)], check=True, cwd=REPO_ROOT,
                   timeout=300)
    reloaded = torch.load(scored)
    checkpoint = train.read_checkpoint(trained_run)
    module = rebuild_on_meta(checkpoint)
    module.model = trained_model(checkpoint, module)
    with torch.no_grad():
        expected = module(input_ids=reloaded["ids"]).logits
    assert (expected - reloaded["logits"]).abs().max().item() <= 1e-5


def test_export_refuses_an_existing_folder_without_force(trained_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exited:
        train.main(["export", "--checkpoint", str(trained_run), "--out", str(out)])
    assert exited.value.code == 2 and "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    train.main(["export", "--checkpoint", str(trained_run), "--out", str(out), "--force"])
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"\x80\x04K\x01."])
def test_a_file_that_is_no_checkpoint_is_one_line(content: bytes, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    with pytest.raises(SystemExit) as exited:
        train.main(["export", "--checkpoint", str(bad), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("error:") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()
