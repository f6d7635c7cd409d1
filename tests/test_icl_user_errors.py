"""Mistakes a user can make in an ICL probe config end in one line through ``train.py test``."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from datamodules.icl_tasks import TaskLoadError, get_task, load_examples

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = "configs/probes/icl_gd_tiny.yaml"


def test_task_mistakes_list_what_exists():
    with pytest.raises(TaskLoadError, match="known: agnews, cb, mr"):
        get_task("sst3")
    with pytest.raises(TaskLoadError, match=r"missing fields \['label_words'\].*required: name, source"):
        get_task({"name": "x", "source": "staicc:sst2"})
    with pytest.raises(TaskLoadError, match=r"unknown fields \['labels'\].*optional: input_fields"):
        get_task({"name": "x", "source": "staicc:sst2", "label_words": ["a", "b"], "labels": 1})
    with pytest.raises(TaskLoadError, match="available: agnews, .*sst2"):
        load_examples(get_task({"name": "x", "source": "staicc:sst3", "label_words": ["a", "b"]}))


@pytest.mark.parametrize("get_data", [None, ModuleNotFoundError], ids=["namespace_folder", "not_installed"])
def test_a_missing_data_package_says_what_to_install(monkeypatch, get_data):
    """Not installed, or shadowed by a bare ``StaICC`` folder on the path (``get_data`` then returns None)."""
    import pkgutil

    def fake_get_data(package: str, resource: str) -> bytes | None:
        if get_data is ModuleNotFoundError:
            raise ModuleNotFoundError(package)
        return None

    monkeypatch.setattr(pkgutil, "get_data", fake_get_data)
    task = get_task({"name": f"no_package_{get_data}", "source": "staicc:sst2", "label_words": ["a", "b"]})
    with pytest.raises(TaskLoadError, match=r"offline ICL data package is missing: run `pip install staicc`"):
        load_examples(task)


def test_train_py_prints_one_line_from_the_shell():
    """One real process: what a user's terminal shows (the other mistakes run in-process, below)."""
    run = subprocess.run(
        [sys.executable, "train.py", "test", "--config", TINY, "--data.init_args.tasks=[sst3]"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WANDB_MODE": "disabled", "MPLBACKEND": "Agg"},
    )
    assert run.returncode != 0
    lines = [line for line in run.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "unknown ICL task 'sst3'" in lines[0], run.stderr[-2000:]
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("--data.init_args.tasks=[{name: x, source: 'staicc:sst2'}]", "missing fields ['label_words']"),
        ("--model.init_args.gd_mode=adam", "GD mode must be 'full_batch' or 'sgd'"),
        ("--model.init_args.quantization=4bit", "full GD cannot update a 4bit quantized model's weights"),
    ],
)
def test_train_py_prints_one_line(override, expected, capsys, monkeypatch):
    import train

    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with pytest.raises(SystemExit) as exited:
        train.main(["test", "--config", TINY, override])
    assert exited.value.code not in (0, None)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], err[-2000:]
    assert "Traceback" not in err
