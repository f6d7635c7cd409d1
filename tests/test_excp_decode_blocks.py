"""The reader's fast paths decode exactly what a direct expansion of the streams gives.

The reader rebuilds tensors block by block (:data:`callbacks.excp.dequantize._BLOCK` elements) and
on several threads; tiny test models never cross a block, so these tests use tensors that do.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from callbacks.excp import load_checkpoint
from callbacks.excp.codec import ExCPSettings, decode_param, encode_param_delta
from callbacks.excp.dequantize import _BLOCK, read_stream
from callbacks.excp.fileformat import ExCPFormatError, read_header
from tests.excp_crafting import checkpoints_equal, constant_stream, replace_record, write_chain


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.detach().reshape(-1).contiguous().view(torch.int32).numpy()


def _direct(code, n: int) -> tuple[np.ndarray, np.ndarray]:
    """m and v expanded with whole-tensor boolean masks, the plainest reading of the nested streams."""
    if code.w_mode == "lossless":
        wmask = np.ones(n, bool)
    else:
        wmask = read_stream(code.w, n)[1] != 0
    cb_m, codes_m = read_stream(code.m, int(wmask.sum()))
    m = np.zeros(n, np.float32)
    m[wmask] = np.concatenate([[0.0], cb_m]).astype(np.float32)[codes_m]
    mmask = np.zeros(n, bool)
    mmask[wmask] = codes_m != 0
    cb_v, codes_v = read_stream(code.v, int(mmask.sum()))
    levels = np.concatenate([[code.v_floor], cb_v]).astype(np.float32)
    v = np.full(n, levels[0], np.float32)
    v[mmask] = levels[codes_v]
    return m, v


@pytest.mark.parametrize("residual", [True, False], ids=["delta", "lossless-weights"])
def test_blockwise_rebuild_matches_a_direct_expansion(residual):
    shape = (3, _BLOCK + 1234)  # several blocks, the last one partial
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(shape, generator=g)
    w1 = w0 + 1e-3 * torch.randn(shape, generator=g)
    m = 1e-3 * torch.randn(shape, generator=g)
    v = 1e-6 * torch.rand(shape, generator=g) + 1e-8 * m**2
    code = encode_param_delta(w1, w0 if residual else None, m, v, ExCPSettings(kmeans_sample=4096), g)
    assert code.w_mode == ("delta" if residual else "lossless")
    assert 0 < code.kept_m < code.kept_w <= w1.numel()  # the masks prune something in every block
    assert (code.kept_w < w1.numel()) == residual
    w, m_hat, v_hat = decode_param(
        kind="delta",
        w_mode=code.w_mode,
        w_blob=code.w,
        m_blob=code.m,
        v_blob=code.v,
        ref=w0 if residual else None,
        shape=shape,
        dtype=torch.float32,
        m_dtype=torch.float32,
        v_dtype=torch.float32,
        v_floor=code.v_floor,
    )
    assert np.array_equal(_bits(w), _bits(code.recon_w))  # what the encoder's closed loop holds
    m_direct, v_direct = _direct(code, w1.numel())
    assert np.array_equal(_bits(m_hat), m_direct.view(np.int32))
    assert np.array_equal(_bits(v_hat), v_direct.view(np.int32))
    assert m_hat.shape == v_hat.shape == shape


def test_threads_give_the_same_checkpoint_and_the_same_error(tmp_path):
    paths = write_chain(tmp_path, count=3, size=300)
    one = load_checkpoint(paths[-1], threads=1)
    assert checkpoints_equal(one, load_checkpoint(paths[-1], threads=2))
    # both tensors' weight streams claim a wrong count (valid checksums): the first tensor is named
    header = read_header(paths[-1])
    data = paths[-1].read_bytes()
    for entry in header["entries"]:
        data = replace_record(data, entry["rec_w"], constant_stream(7))
    paths[-1].write_bytes(data)
    errors = []
    for threads in (1, 2):
        with pytest.raises(ExCPFormatError) as caught:
            load_checkpoint(paths[-1], threads=threads)
        errors.append(str(caught.value))
    assert errors[0] == errors[1] and repr(header["entries"][0]["name"]) in errors[0]
