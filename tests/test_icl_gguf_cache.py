"""A .gguf model path is converted once per file content and reused from the cache afterwards."""

import json

import pytest
import torch

from common import hf_loading


def test_gguf_conversion_is_cached_by_content(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_loading, "cache_root", lambda: tmp_path / "cache")
    converted = []

    def fake_convert(gguf_path, target):
        converted.append(gguf_path.name)
        target.mkdir(parents=True)
        (target / "config.json").write_text(json.dumps({"from": gguf_path.name}))

    monkeypatch.setattr(hf_loading, "_convert_gguf", fake_convert)
    first, copy, other = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    first.write_bytes(b"GGUF same weights")
    copy.write_bytes(b"GGUF same weights")
    other.write_bytes(b"GGUF other weights")

    a = hf_loading._source_kwargs(str(first))[0]
    assert hf_loading._source_kwargs(str(first))[0] == a  # second use: from the cache
    assert hf_loading._source_kwargs(str(copy))[0] == a  # same bytes elsewhere: same entry
    assert hf_loading._source_kwargs(str(other))[0] != a
    assert converted == ["a.gguf", "c.gguf"]
    first.write_bytes(b"GGUF replaced in place")
    assert hf_loading._source_kwargs(str(first))[0] not in (a,)
    assert converted == ["a.gguf", "c.gguf", "a.gguf"]


def test_gguf_conversion_reads_weights_on_cpu_under_a_meta_default(tmp_path, monkeypatch):
    """A config check on a fresh machine (``with torch.device("meta")``) still converts real weights.

    transformers refuses ``from_pretrained`` under a meta default device, and the cache must hold
    weights for the runs that follow, so the conversion escapes the caller's meta device.
    """
    seen: list[str] = []

    def record_device(*args, **kwargs):
        seen.append(torch.get_default_device().type)
        raise RuntimeError("stop after the first read")

    monkeypatch.setattr(hf_loading.AutoModelForCausalLM, "from_pretrained", record_device)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with torch.device("meta"), pytest.raises(RuntimeError, match="first read"):
        hf_loading._convert_gguf(gguf, tmp_path / "converted")
    assert seen == ["cpu"]
    assert not (tmp_path / "converted").exists()
