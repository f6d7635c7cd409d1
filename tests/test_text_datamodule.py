"""TextDataModule: offline corpus, local files, caching, splits and DDP sharding."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.hf_loading import load_tokenizer
from datamodules.text import DataSourceError, TextDataModule, shakespeare_files, strip_markdown

REPO = Path(__file__).resolve().parent.parent


def test_strip_markdown_keeps_the_words() -> None:
    text = "# Play\n\n### SCENE I.\n\n_Enter HAMLET_\n\n**HAMLET**  \nTo be, or not to be  \n"
    plain = strip_markdown(text)
    assert "#" not in plain and "**" not in plain and "_Enter" not in plain
    assert "HAMLET\nTo be, or not to be\n" in plain and "Enter HAMLET" in plain


def test_offline_corpus_ships_38_plays() -> None:
    files = shakespeare_files()
    assert len(files) == 38
    assert any("hamlet" in f.name.lower() for f in files)


def test_local_file_blocks_split_and_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abcdefghij" * 100)  # 1000 bytes -> 1001 tokens with EOS
    data = TextDataModule(source=str(corpus), tokenizer="byt5", block_size=50, batch_size=2, val_fraction=0.1)
    data.prepare_data()
    assert data.cache_path().is_file()
    data.setup("fit")
    assert len(data.train_set) + len(data.val_set) == 20 and len(data.val_set) == 2
    train_starts = set(data.train_set.block_indices.tolist())
    assert not train_starts & set(data.val_set.block_indices.tolist())
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (2, 50)
    assert (batch["input_ids"] == batch["labels"]).all()
    # a changed file invalidates the cache
    old_cache = data.cache_path()
    corpus.write_text("zyxwvutsrq" * 120)
    assert TextDataModule(source=str(corpus), tokenizer="byt5").cache_path() != old_cache


def test_missing_source_and_tiny_corpus_errors(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="does not exist"):
        TextDataModule(source=str(tmp_path / "nope.txt"), tokenizer="byt5").prepare_data()
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hi")
    data = TextDataModule(source=str(tiny), tokenizer="byt5", block_size=64)
    with pytest.raises(DataSourceError, match="fewer than two blocks"):
        data.setup("fit")


def test_shakespeare_with_real_tokenizer_reads_english(tmp_path: Path) -> None:
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    data = TextDataModule(source="shakespeare", tokenizer="smollm2-135m-instruct", block_size=64, max_tokens=20_000)
    data.prepare_data()
    data.setup("fit")
    text = tokenizer.decode(data.train_set[0]["input_ids"])
    assert len(text.split()) > 20
    assert "**" not in text


DDP_SHARD_SCRIPT = r"""
import sys, json, torch, lightning as L
from datamodules.text import TextDataModule
from lightning_modules.causal_lm import CausalLMModule
from common.hf_loading import TINY_LLAMA_CONFIG

class Record(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        seen = module.__dict__.setdefault("seen", [])
        seen.append(batch["input_ids"][:, :8].tolist())
    def on_train_end(self, trainer, module):
        from common.run_outputs import gather_objects
        everything = gather_objects(trainer, module.seen)
        if trainer.is_global_zero:
            print("SEEN" + json.dumps(everything), flush=True)

L.seed_everything(0)
corpus = sys.argv[1]
module = CausalLMModule(model=None, model_config=TINY_LLAMA_CONFIG)
data = TextDataModule(source=corpus, block_size=16, batch_size=2, val_fraction=0.0)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False,
                    enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                    limit_val_batches=0, callbacks=[Record()])
trainer.fit(module, datamodule=data)
from common.process_group import release_process_group
release_process_group()  # without it, gloo's threads sometimes abort the exit after a finished fit
"""


def test_ddp_ranks_get_different_data(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"sentence number {i} of the corpus.\n" for i in range(300)))
    script = tmp_path / "ddp_shard.py"
    script.write_text(DDP_SHARD_SCRIPT)
    env = {"PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, str(script), str(corpus)], capture_output=True, text=True, cwd=tmp_path,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next((line for line in result.stdout.splitlines() if line.startswith("SEEN")), None)
    assert line is not None, result.stdout[-2000:] + result.stderr[-3000:]
    import json

    rank0, rank1 = json.loads(line[4:])
    assert len(rank0) == len(rank1) == 3
    flat0 = {tuple(row) for batch in rank0 for row in batch}
    flat1 = {tuple(row) for batch in rank1 for row in batch}
    assert not flat0 & flat1, "both ranks trained on the same blocks"


def test_cache_follows_content_not_names_or_times(tmp_path: Path, monkeypatch) -> None:
    """Same name and mtime with new bytes, or a different tokenizer: never the stale cache."""
    import os

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abc " * 400)
    stat = corpus.stat()
    first = TextDataModule(source=str(corpus), tokenizer="byt5", block_size=8)
    first.prepare_data()
    corpus.write_text("xyz " * 400)  # same size
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same modification time
    second = TextDataModule(source=str(corpus), tokenizer="byt5", block_size=8)
    assert second.cache_path() != first.cache_path()
    second.prepare_data()
    second.setup("fit")
    text = bytes(int(t) - 3 for t in second.train_set.tokens[:8] if int(t) >= 3).decode()
    assert "xyz" in text
    # another copy of the same bytes elsewhere shares the cache
    copy = tmp_path / "elsewhere" / "corpus.txt"
    copy.parent.mkdir()
    copy.write_bytes(corpus.read_bytes())
    assert TextDataModule(source=str(copy), tokenizer="byt5").cache_path() == second.cache_path()


def test_cache_key_changes_with_the_tokenizer_files(tmp_path: Path, monkeypatch) -> None:
    from datamodules.text import tokenizer_fingerprint

    byte_tokenizer = load_tokenizer("byt5")
    extended = load_tokenizer("byt5")
    extended.add_tokens(["<new>"])
    assert tokenizer_fingerprint(byte_tokenizer) == tokenizer_fingerprint(load_tokenizer("byt5"))
    assert tokenizer_fingerprint(byte_tokenizer) != tokenizer_fingerprint(extended)
