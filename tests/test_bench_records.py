"""A bench's replot and recompute modes read a record a person names: a missing, truncated or foreign
file is one line naming the bench that writes a usable one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from records import read_record  # noqa: E402


def test_a_record_is_read_back_as_written(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"mode": "quick", "seeds": [0, 1]}')
    assert read_record(path, "replot", "bench/x.py") == {"mode": "quick", "seeds": [0, 1]}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, r"cannot read the record to replot \(.*No such file.*\); run `python bench/x\.py` first$"),
        ('{"mode": "qu', r"cannot read the record to replot \(.*\); run `python bench/x\.py` first$"),
        ("[1, 2]", r"not a record of bench/x\.py; run `python bench/x\.py` first$"),
    ],
)
def test_an_unusable_record_is_one_line_naming_its_bench(tmp_path, content, expected):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit, match=expected) as caught:
        read_record(path, "replot", "bench/x.py")
    assert "\n" not in str(caught.value)
