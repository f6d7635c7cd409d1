"""One-line messages for configuration mistakes, read from the exception chain rather than its wording.

jsonargparse reports a bad config as a tower of exceptions, each raised ``from`` the one below: the
outer ones name where the problem is (``Parser key "model"``, ``Problem with given class_path 'X'``),
the innermost says what it is (``Option 'learning_rat' is not accepted``). Walking ``__cause__`` gives
both without depending on how the outer messages are laid out, so a rewording upstream changes at
most the location prefix, never whether the user gets one line. Errors raised while a class from the
config is built (a ``ValueError`` in a module's ``__init__``, Lightning's ``MisconfigurationException``)
are named after that class, taken from the traceback.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from common.errors import UserFacingError

_PARSER_KEY = re.compile(r'^Parser key "([^"]+)"')
_CLASS_PATH = re.compile(r"^Problem with given class_path '([^']+)'")
_MAX_CHAIN = 32
_MAX_PROBLEM_CHARS = 400


@dataclass(frozen=True)
class ConfigProblem:
    """Where a config problem is (``model.init_args.seed``) and what it is."""

    location: str
    problem: str
    owner: str | None = None

    def __str__(self) -> str:
        where = f"{self.location}: " if self.location else ""
        owner = f" (in {self.owner})" if self.owner else ""
        return f"{where}{self.problem}{owner}"


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the exceptions it was raised from, outermost first (cycles cut)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen and len(seen) < _MAX_CHAIN:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def user_facing_cause(error: BaseException) -> UserFacingError | None:
    """The outermost project error in the chain: its message already says what to do."""
    return next((e for e in exception_chain(error) if isinstance(e, UserFacingError)), None)


def first_line(error: BaseException) -> str:
    text = str(error.args[0] if isinstance(error, KeyError) and error.args else error).strip()  # KeyError quotes
    line = " ".join(text.splitlines()[0].split()) if text else type(error).__name__
    return line if len(line) <= _MAX_PROBLEM_CHARS else line[: _MAX_PROBLEM_CHARS - 3] + "..."


def _raising_class(error: BaseException) -> str | None:
    """The outermost class whose ``__init__`` is on ``error``'s traceback: the one the config named.

    (The innermost would be a helper it built, such as Lightning's private accelerator connector.)
    """
    traceback = error.__traceback__
    while traceback is not None:
        frame = traceback.tb_frame
        instance = frame.f_locals.get("self")
        if frame.f_code.co_name == "__init__" and instance is not None:
            return f"{type(instance).__module__}.{type(instance).__qualname__}"
        traceback = traceback.tb_next
    return None


def config_problem(error: BaseException) -> ConfigProblem:
    """Locate and describe a config mistake from its exception chain.

    The location is the chain of ``Parser key`` names (``model`` then ``seed`` become
    ``model.init_args.seed`` when a class path sits between them), the problem is the innermost
    message, and the owner is the class path or the class whose constructor raised.
    """
    chain = list(exception_chain(error))
    keys: list[str] = []
    owner: str | None = None
    for link in chain:
        text = str(link).strip()
        if match := _PARSER_KEY.match(text):
            if not keys or keys[-1] != match.group(1):
                if keys and owner is not None and "init_args" not in keys[-1]:
                    keys.append("init_args")
                keys.append(match.group(1))
        elif match := _CLASS_PATH.match(text):
            owner = match.group(1)
    innermost = chain[-1]
    if owner is None and not keys:  # not a parse error: something named in the config refused its arguments
        owner = _raising_class(innermost)
    return ConfigProblem(".".join(keys), first_line(innermost), owner)
