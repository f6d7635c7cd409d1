"""Config mistakes become one line built from the exception chain, one test per message shape."""

from __future__ import annotations

from pathlib import Path

import pytest

import train
from common.cli_errors import ConfigProblem, config_problem
from common.errors import UserFacingError
from tests.shrink import shrunk_config_file


def _chain(*errors: BaseException) -> BaseException:
    """Link ``errors`` so that each is raised from the next, as jsonargparse does."""
    for outer, inner in zip(errors, errors[1:], strict=False):
        outer.__cause__ = inner
    return errors[0]


class _Refuses:
    def __init__(self) -> None:
        raise ValueError("rate must be positive")


def test_nested_parser_keys_become_a_dotted_location() -> None:
    error = _chain(TypeError('Parser key "model":\n  Does not validate'),
                   ValueError("Problem with given class_path 'pkg.Module':\n  Parser key \"seed\": ..."),
                   TypeError('Parser key "seed":\n  Expected int'),
                   ValueError("Expected a <class 'int'>. Got value: abc"))
    assert config_problem(error) == ConfigProblem("model.init_args.seed", "Expected a <class 'int'>. Got value: abc",
                                                  "pkg.Module")


def test_unknown_option_names_the_class() -> None:
    error = _chain(TypeError('Parser key "model": ...'), ValueError("Problem with given class_path 'pkg.M':\n ..."),
                   KeyError("Option 'learning_rat' is not accepted"))
    assert str(config_problem(error)) == "model: Option 'learning_rat' is not accepted (in pkg.M)"


def test_a_refusing_constructor_is_named_from_the_traceback() -> None:
    try:
        try:
            _Refuses()
        except ValueError as inner:
            raise ValueError("Does not validate against any of the Union subtypes\n...") from inner
    except ValueError as outer:
        problem = config_problem(outer)
    assert problem.problem == "rate must be positive" and problem.owner.endswith("_Refuses") and not problem.location


def test_a_message_without_structure_falls_back_to_its_first_line() -> None:
    problem = config_problem(RuntimeError("something odd\nsecond line"))
    assert str(problem) == "something odd"


def test_long_problems_are_cut_to_one_readable_line() -> None:
    assert len(config_problem(ValueError("x" * 5000)).problem) == 400


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.init_args.learning_rat=0.1"], "model: Option 'learning_rat' is not accepted (in "
                                                 "lightning_modules.causal_lm.CausalLMModule)"),
        (["--trainer.max_steps=abc"], "trainer.max_steps: Expected a <class 'int'>. Got value: abc"),
        (["--model.class_path=nowhere.Model"], "model: No module named 'nowhere' (in nowhere.Model)"),
        (["--model.init_args.seed=abc"], "model.init_args.seed: Expected a <class 'int'>. Got value: abc (in "
                                         "lightning_modules.causal_lm.CausalLMModule)"),
        (["--model.init_args.optimizer=sgd"], "optimizer must be one of ('adamw', 'adamw8bit'), got 'sgd'"),
        (["--data.init_args.block_size=1"], "block_size must be at least 2, got 1"),
        (["--trainer.devices=abc"], "`devices` selected with `CPUAccelerator` should be an int > 0. (in "
                                    "lightning.pytorch.trainer.trainer.Trainer)"),
        (["--config", "nope.yaml"], "config: File does not exist:"),
        (["--data.init_args.source=/nope/corpus.txt"], "text source '/nope/corpus.txt' does not exist"),
    ],
)
def test_train_py_prints_one_line_and_exits_2(args: list[str], expected: str, tmp_path: Path, capsys) -> None:
    shrunk = shrunk_config_file("configs/quickstart.yaml", root=tmp_path)
    with pytest.raises(SystemExit) as exited:
        train.main(["fit", "--config", str(shrunk), *args])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], err[-2000:]
    assert "Traceback" not in err


def test_a_bug_keeps_its_traceback(monkeypatch) -> None:
    """Only user-fixable problems are shortened; a programming error must still show where it is."""

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(train, "build_cli", broken)
    with pytest.raises(ZeroDivisionError):
        train.main(["fit"])


def test_user_facing_errors_deep_in_the_chain_win() -> None:
    error = _chain(ValueError("wrapper"), UserFacingError("model file missing: check the path"), OSError("errno 2"))
    assert train.one_line_error(error) == "model file missing: check the path"
