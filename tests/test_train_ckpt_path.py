"""``train.py --ckpt_path``: ExCP and plain files are read through the codec, bad files are one line.

Also guards the one private LightningCLI hook ``train.py`` overrides (``_parse_ckpt_path``): if
Lightning renames it or changes what it does, the first test fails and names what to re-check.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch.cli import LightningCLI

import train
from callbacks.excp import ExCPEncoder
from common.atomic import atomic_write_bytes
from tests.conftest import REPO_ROOT

QUICKSTART = str(REPO_ROOT / "configs/quickstart.yaml")


def test_lightning_cli_still_has_the_hook_train_py_overrides():
    """LumenCLI._parse_ckpt_path replaces Lightning's; both must still exist and do the same merge."""
    assert "self._parse_ckpt_path()" in inspect.getsource(LightningCLI.__init__), (
        "LightningCLI no longer calls _parse_ckpt_path: move train.py's --ckpt_path reading to the new hook"
    )
    lightning_source = inspect.getsource(LightningCLI._parse_ckpt_path)
    for fragment in ('hparams.pop("_instantiator"', '"_class_path" in hparams', '"dict_kwargs"', "parse_object"):
        assert fragment in lightning_source, f"Lightning's _parse_ckpt_path changed ({fragment}); update train.py"
    assert train.LumenCLI._parse_ckpt_path is not LightningCLI._parse_ckpt_path


class _Planted:
    """A pickle that would create a file when unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    encoder = ExCPEncoder()
    excp = tmp_path / "good.ckpt"
    encoded = encoder.encode({"global_step": 1, "state_dict": {"w": torch.ones(300)}}, target=excp)
    atomic_write_bytes(excp, encoded.data)
    files = {
        "missing": tmp_path / "nope.ckpt",
        "directory": tmp_path,
        "truncated": tmp_path / "truncated.ckpt",
        "random": tmp_path / "random.ckpt",
        "garbage_ckpt": tmp_path / "garbage.ckpt",
        "planted": tmp_path / "planted.ckpt",
    }
    files["truncated"].write_bytes(excp.read_bytes()[:-100])
    files["random"].write_bytes(os.urandom(5000))
    files["garbage_ckpt"].write_bytes(b"this is not a checkpoint\n" * 10)
    torch.save({"hyper_parameters": {"x": _Planted(tmp_path / "MARKER")}, "state_dict": {}}, files["planted"])
    return files


@pytest.mark.parametrize("case", ["missing", "directory", "truncated", "random", "garbage_ckpt", "planted"])
def test_bad_ckpt_path_is_one_line_and_runs_no_code(case, tmp_path, capsys):
    path = _bad_files(tmp_path)[case]
    with pytest.raises(SystemExit) as exit_info:
        train.main(["fit", "--config", QUICKSTART, "--ckpt_path", str(path)])
    assert exit_info.value.code != 0
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(path) in errors[0] and "Traceback" not in stderr, stderr
    err = errors[0]
    assert not (tmp_path / "MARKER").exists()
    expected = {
        "missing": "does not exist",
        "directory": "directory",
        "truncated": "truncated",
        "random": "neither an ExCP file nor a loadable checkpoint",
        "garbage_ckpt": "neither an ExCP file nor a loadable checkpoint",
        "planted": "weights_only=False would run",
    }[case]
    assert expected in err, err


def test_excp_file_without_the_excp_callback_is_one_line(tmp_path, capsys):
    path = _bad_files(tmp_path)["truncated"].with_name("good.ckpt")
    with pytest.raises(SystemExit):
        train.main(["fit", "--config", QUICKSTART, "--trainer.callbacks=[]", "--ckpt_path", str(path)])
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "add the callbacks.excp.ExCP callback" in errors[0] and "Traceback" not in stderr
