"""Property-based fuzzing of the ExCP reader (bounded: ~20 s): every damaged or crafted chain yields
one ExCPFormatError or exactly the right tensors; nothing else escapes, nothing hangs, no code runs.

Corrupted files (checksums not repaired) must give an error or the exact original checkpoint; crafted
files (checksums recomputed, so only structural checks can stop them) must give an error or *some*
checkpoint dict. bench/excp_safety.py runs the same mutations over thousands of files and measures
memory and time as well.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from callbacks.excp import ExCPFormatError, load_checkpoint
from tests.excp_crafting import (
    HEADER_FIELDS,
    HUGE_NUMBERS,
    checkpoints_equal,
    planted_skeleton,
    replace_record,
    rewrite,
    set_field,
    split_file,
    write_chain,
)

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def chain_dir():
    folder = Path(tempfile.mkdtemp(prefix="excp-fuzz-"))
    paths = write_chain(folder, 3)
    expected = load_checkpoint(paths[-1])
    originals = {p.name: p.read_bytes() for p in paths}
    yield folder, paths, originals, expected
    shutil.rmtree(folder, ignore_errors=True)


def _restore(paths, originals):
    for path in paths:
        path.write_bytes(originals[path.name])


_CORRUPTIONS = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 2), st.floats(0, 1, exclude_max=True), st.just(0)),
    st.tuples(st.just("append"), st.integers(0, 2), st.just(0.0), st.integers(1, 64)),
)


@FUZZ
@given(mutations=st.lists(_CORRUPTIONS, min_size=1, max_size=3))
def test_corrupted_chains_give_one_error_or_exact_tensors(chain_dir, mutations):
    _, paths, originals, expected = chain_dir
    try:
        for kind, which, where, value in mutations:
            data = bytearray(paths[which].read_bytes())
            position = int(where * len(data))
            if kind == "flip":
                if not data:  # an earlier mutation truncated the file to nothing: nothing left to flip
                    continue
                data[position] ^= value
            elif kind == "truncate":
                del data[position:]
            else:
                data += bytes(range(value))
            paths[which].write_bytes(bytes(data))
        try:
            got = load_checkpoint(paths[-1])
        except ExCPFormatError:
            return
        assert checkpoints_equal(got, expected), "a damaged chain decoded to different values without an error"
    finally:
        _restore(paths, originals)


_HUGE = st.sampled_from(HUGE_NUMBERS)
_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), _HUGE, st.floats(allow_nan=False), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=6,
)


def _crafts():
    values = st.one_of(_JSON, st.lists(_HUGE, min_size=1, max_size=3))
    return st.tuples(st.sampled_from(HEADER_FIELDS), values).map(
        lambda fv: lambda header: set_field(header, fv[0], fv[1])
    )


@FUZZ
@given(which=st.integers(0, 2), crafts=st.lists(_crafts(), min_size=1, max_size=2))
def test_crafted_headers_with_valid_checksums_give_one_error_or_a_checkpoint(chain_dir, which, crafts):
    _, paths, originals, _ = chain_dir
    try:
        data = paths[which].read_bytes()
        for craft in crafts:
            try:
                data = rewrite(data, craft)
            except (KeyError, IndexError, TypeError):
                return  # the mutation does not apply to this file's header
        paths[which].write_bytes(data)
        try:
            assert isinstance(load_checkpoint(paths[-1]), dict)
        except ExCPFormatError:
            pass
    finally:
        _restore(paths, originals)


@FUZZ
@given(which=st.integers(0, 2), record=st.integers(0, 40), blob=st.binary(max_size=64))
def test_crafted_records_and_planted_pickles_run_no_code(chain_dir, which, record, blob):
    folder, paths, originals, _ = chain_dir
    marker = folder / "MARKER"
    try:
        data = paths[which].read_bytes()
        header, _ = split_file(data)
        count = len(header["records"])
        if count == 0:
            return
        index = record % count
        payload = planted_skeleton(marker) if index == header["skeleton"] else blob
        paths[which].write_bytes(replace_record(data, index, payload))
        try:
            assert isinstance(load_checkpoint(paths[-1]), dict)
        except ExCPFormatError:
            pass
        assert not marker.exists(), "a crafted file ran code"
    finally:
        _restore(paths, originals)
