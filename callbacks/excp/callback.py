"""The user-facing ExCP callback: one line in ``Trainer(callbacks=[...])`` compresses every checkpoint."""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch.distributed.fsdp._common_utils import clean_tensor_name
from typing_extensions import override

from callbacks.excp.bases import find_pretrained_base
from callbacks.excp.checkpoint_io import ExCPCheckpointIO
from callbacks.excp.codec import ExCPSettings
from callbacks.excp.deepspeed_files import has_excp_files
from callbacks.excp.fileformat import ExCPFormatError, is_excp_file, read_header
from callbacks.excp.references import REFS_DIR, is_temporary, live_checkpoints
from callbacks.excp.sharded import prepare_strategy
from common.errors import UserFacingError

_LOGGED = (
    "ratio",
    "bits_per_param_w",
    "bits_per_param_m",
    "bits_per_param_v",
    "sparsity_w",
    "sparsity_m",
    "encode_s",
    "keyframe",
    "twin",
)


class ExCP(Callback):
    """Extreme checkpoint compression (ExCP, ICML 2024) for every checkpoint the Trainer writes.

    At ``setup`` it installs an :class:`ExCPCheckpointIO` on the strategy, so checkpoints written by
    ``ModelCheckpoint`` (any ``every_n_train_steps``/``save_top_k``/``save_last``/``monitor``) or
    ``trainer.save_checkpoint`` become ExCP files, and ``trainer.fit(ckpt_path=<ExCP file>)``
    resumes through the chain (Lightning restores checkpoints after callbacks' setup). A resumed
    run continues the chain it loaded (its first save is a delta, also into another folder, whose
    ``.excp_refs/`` then links the files it needs). Deltas are lossy by design: weights and Adam
    moments are pruned and quantized; everything else (steps, schedulers, loops, RNG, ...) is exact.

    Args:
        codec: the codec settings (:class:`~callbacks.excp.codec.ExCPSettings`: bits per stream,
            ``alpha``/``beta``/``cap`` pruning or a ``target_bits_per_param`` budget (with
            ``alpha: null``), ``keyframe_interval``, quantizer, ``entropy_coder``, threads, ...);
            in YAML a nested mapping ``codec: {bits_w: 4, keyframe_interval: 20}``. None: defaults.
        log_stats: log ``excp/ratio``, ``excp/bits_per_param_{w,m,v}``, ``excp/sparsity_{w,m}``,
            ``excp/encode_s`` and ``excp/keyframe`` to the Trainer's loggers after each save (not
            after a same-step twin, which stores no tensors and already has its step's row).
        upload_artifacts: at the end of ``fit``, upload the compressed checkpoints (with the chain
            files they need) as one W&B artifact when a ``WandbLogger`` is attached.
        print_summary: print where the checkpoints are and the ratio achieved at the end of ``fit``.
        start_from: ``"auto"``: a fresh run whose model holds exactly the weights of the safetensors
            it was loaded from (``from_pretrained``: continued pretraining, fine-tuning) codes its
            first checkpoint as a delta against them, named by sha256, instead of a lossless keyframe
            (~1.2x); a resume with the same model config, or ``--base``/``base=`` for standalone
            readers, supplies them again. A model built from scratch (or changed before training)
            starts with a keyframe. ``"keyframe"``: always start with a keyframe (self-contained files).

    Raises:
        UserFacingError: at ``setup``, when the strategy bypasses the CheckpointIO, another
            CheckpointIO plugin is installed, or a second ExCP callback has other codec settings
            (an identical one shares the first one's CheckpointIO; only the first logs statistics).
    """

    def __init__(
        self,
        codec: ExCPSettings | None = None,
        log_stats: bool = True,
        upload_artifacts: bool = False,
        print_summary: bool = True,
        start_from: str = "auto",
    ) -> None:
        super().__init__()
        if start_from not in ("auto", "keyframe"):
            raise UserFacingError(f"ExCP start_from={start_from!r} is invalid: use 'auto' or 'keyframe'")
        self.start_from = start_from
        if codec is not None and not isinstance(codec, ExCPSettings):
            raise UserFacingError(
                f"ExCP codec must be ExCPSettings (in YAML a mapping such as {{bits_w: 4}}), got {type(codec).__name__}"
            )
        self.settings = codec or ExCPSettings()
        self.log_stats = log_stats
        self.upload_artifacts = upload_artifacts
        self.print_summary = print_summary
        self.history: list[dict[str, Any]] = []
        self._trainer: pl.Trainer | None = None
        self._io: ExCPCheckpointIO | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(**self.settings.to_dict())

    @property
    def checkpoint_io(self) -> ExCPCheckpointIO | None:
        """The installed CheckpointIO (None before ``setup``)."""
        return self._io

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        # refuses strategies ExCP cannot serve; routes FSDP2 loading and DeepSpeed's checkpoint folders
        prepare_strategy(strategy, self.settings, self._on_save)
        current = strategy.checkpoint_io  # the public property: a TorchCheckpointIO unless a plugin is set
        if isinstance(current, ExCPCheckpointIO) and current is not self._io:
            if current.settings != self.settings:
                raise UserFacingError(
                    "Two ExCP callbacks with different codec settings are attached to one Trainer, which has one "
                    "CheckpointIO: keep one ExCP callback (its settings apply to every ModelCheckpoint)"
                )
            self._io = current  # an identical second callback shares the first one's chains
        elif isinstance(current, ExCPCheckpointIO):
            pass  # setup runs again for another stage (fit, then test): keep the chains
        elif type(current) is TorchCheckpointIO:
            self._io = ExCPCheckpointIO(
                self.settings, names=self._names, on_save=self._on_save, initial_weights=self._initial_weights
            )
            strategy.checkpoint_io = self._io
        else:
            raise UserFacingError(
                f"ExCP replaces the Trainer's CheckpointIO, but {type(current).__name__} is already installed. "
                "Remove that plugin or the ExCP callback."
            )
        self._trainer = trainer

    def _initial_weights(self) -> dict[str, Any]:
        """The module's weights when a checkpoint is restored (as built, before the restore)."""
        assert self._trainer is not None
        return self._trainer.lightning_module.state_dict()

    def _start_from_pretrained(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """On a fresh run, start chains from the pretrained weights the module was loaded from, if any."""
        if self.start_from != "auto" or trainer.ckpt_path is not None or self._io is None:
            return
        if any(type(p.data) is not torch.Tensor or not p.is_floating_point() for p in pl_module.parameters()):
            return  # sharded (DTensor, flat) or quantized parameters: no process holds the files' tensors
        if isinstance(trainer.strategy, FSDPStrategy):
            return  # FSDP1 shards hide behind plain-tensor views; its state_dict() is a collective (rank 0 only here)
        found = find_pretrained_base(pl_module)
        if found is None:
            return
        weights, source = found
        self._io.start_from_base(weights, source)
        rank_zero_info(
            f"ExCP: checkpoints are coded against the pretrained weights in {source['path']} "
            f"({len(weights)} tensors), which a reader needs again; ExCP(start_from='keyframe') writes "
            "self-contained files"
        )

    def _names(self) -> tuple[set[str], list[list[str | None]]]:
        trainer = self._trainer
        assert trainer is not None
        module = trainer.lightning_module
        # FSDP1 inserts wrapper modules into the names ("_fsdp_wrapped_module."); its state dicts use the clean names
        named = [(clean_tensor_name(n), p) for n, p in module.named_parameters(remove_duplicate=False)]
        id2name: dict[int, str] = {}
        for n, p in named:
            id2name.setdefault(id(p), n)
        opt_names = [[id2name.get(id(p)) for g in opt.param_groups for p in g["params"]] for opt in trainer.optimizers]
        return {n for n, _ in named}, opt_names

    def _on_save(self, path: Path, stats: dict[str, float]) -> None:
        trainer = self._trainer
        step = trainer.global_step if trainer is not None else 0
        self.history.append({"path": str(path), "step": step, **stats})
        # a twin (last.ckpt right after the top-k file of the same step) stores no tensors: its "ratio"
        # (raw W+m+v over a few KB) would spike the chart at a step that already has its row
        if self.log_stats and trainer is not None and not stats.get("twin"):
            metrics = {f"excp/{k}": float(stats[k]) for k in _LOGGED}
            metrics["excp/file_mb"] = stats["file_bytes"] / 2**20
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def summary(self) -> dict[str, Any]:
        """Aggregate of this process's saves: counts, sizes and the median delta ratio.

        ``overall_ratio`` is the raw fp32 W+m+v of every training state saved (a same-step twin is the
        state of the file before it, so it adds no raw bytes) over the bytes of every file written.
        """
        deltas = [h for h in self.history if not h["keyframe"] and not h.get("twin")]
        states = [h for h in self.history if not h.get("twin")]
        return {
            "checkpoints": len(self.history),
            "keyframes": sum(1 for h in self.history if h["keyframe"]),
            "deltas": len(deltas),
            "twins": sum(1 for h in self.history if h.get("twin")),
            "compressed_bytes": sum(h["file_bytes"] for h in self.history),
            "raw_wmv_bytes": sum(h["raw_wmv_bytes"] for h in states),
            "delta_ratio_median": statistics.median(h["ratio"] for h in deltas) if deltas else None,
            "overall_ratio": (
                sum(h["raw_wmv_bytes"] for h in states) / sum(h["file_bytes"] for h in self.history)
                if self.history
                else None
            ),
            "directories": sorted({str(Path(h["path"]).parent) for h in self.history}),
            **on_disk(sorted({str(Path(h["path"]).parent) for h in self.history})),
        }

    def run_summary(self) -> list[str]:
        """Lines for the CLI's end-of-run summary (ratio achieved and where the checkpoints are)."""
        return [_summary_line(self.summary())] if self.history else ["ExCP: no checkpoint was written"]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # before any save: temporary files a killed run left in the checkpoint folders are removed
        # (ModelCheckpoint resolves its folder in its own setup, so this runs after every setup)
        if self._io is None or not trainer.is_global_zero:
            return
        self._start_from_pretrained(trainer, pl_module)
        for callback in trainer.checkpoint_callbacks:
            folder = getattr(callback, "dirpath", None)
            if folder and os.path.isdir(folder):
                self._io.clean_folder(folder)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not self.history:
            return
        s = self.summary()
        if self.print_summary:
            _print_summary(s)
        if self.upload_artifacts:
            self._upload(trainer, s)

    @rank_zero_only
    def _upload(self, trainer: pl.Trainer, summary: dict[str, Any]) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        import wandb

        run = loggers[0].experiment
        art = wandb.Artifact(f"excp-checkpoints-{run.id}", type="model", metadata=summary)
        for path, name in artifact_entries(summary["directories"]):
            if path.is_dir():
                art.add_dir(str(path), name=name)
            else:
                art.add_file(str(path), name=name)
        run.log_artifact(art)


def artifact_entries(directories: list[str]) -> list[tuple[Path, str]]:
    """What an artifact of the checkpoints in ``directories`` holds: ExCP files, DeepSpeed folders of ExCP
    files (each carries its chain in ``checkpoint/.excp_refs/``) and the ``.excp_refs/`` chain files."""
    entries = []
    for d in map(Path, directories):
        for f in sorted(d.iterdir()):
            if (f.is_file() and is_excp_file(f)) or (f.is_dir() and has_excp_files(f)):
                entries.append((f, f.name))
        if (d / REFS_DIR).is_dir():
            entries.append((d / REFS_DIR, REFS_DIR))
    return entries


def on_disk(directories: list[str]) -> dict[str, Any]:
    """What the folders hold now: the live checkpoints' raw fp32 W+m+v against every ExCP byte there.

    Counts the live files and ``.excp_refs/`` (files top-k removed but a chain needs), so a folder
    whose survivors each need their own keyframe shows the ratio a user actually gets, not the run's.
    A twin (``last.ckpt`` beside the top-k file of its step) adds raw bytes only when that file is gone.
    """
    live = stored = 0
    raw = 0.0
    for directory in map(Path, directories):
        headers = {}
        for path in live_checkpoints(directory):
            try:
                headers[path] = read_header(path)
            except ExCPFormatError:
                continue  # not this run's to judge; loading it says what is wrong
        live_ids = {header.get("file_id") for header in headers.values()}
        for path, header in headers.items():
            live += 1
            stored += path.stat().st_size
            stats = header.get("stats")
            twin_of_live = header.get("kind") == "twin" and (header.get("ref") or {}).get("file_id") in live_ids
            if isinstance(stats, dict) and not twin_of_live:
                raw += float(stats.get("raw_wmv_bytes", 0.0))
        refs = directory / REFS_DIR
        if refs.is_dir():
            stored += sum(p.stat().st_size for p in refs.iterdir() if p.is_file() and not is_temporary(p))
    return {"live_checkpoints": live, "bytes_on_disk": stored, "ratio_on_disk": raw / stored if stored else None}


def _print_summary(s: dict[str, Any]) -> None:
    print(_summary_line(s), flush=True)


def _summary_line(s: dict[str, Any]) -> str:
    dirs = ", ".join(s["directories"])
    mb = s["compressed_bytes"] / 2**20
    raw = s["raw_wmv_bytes"] / 2**20
    line = (
        f"ExCP: {s['checkpoints']} checkpoint(s) ({s['keyframes']} keyframe, {s['deltas']} delta, "
        f"{s['twins']} same-step twin) in {dirs}: "
    )
    states = s["checkpoints"] - s["twins"]
    line += f"{mb:.2f} MB written for {states} training state(s) of {raw:.2f} MB raw fp32 W+m+v "
    line += f"({s['overall_ratio']:.1f}x overall"
    if s["delta_ratio_median"] is not None:
        line += f", median delta {s['delta_ratio_median']:.1f}x"
    line += ")"
    if s.get("ratio_on_disk") is not None:
        line += (
            f"; on disk now {s['bytes_on_disk'] / 2**20:.2f} MB for {s['live_checkpoints']} live checkpoint(s) "
            f"and the chain files they need ({s['ratio_on_disk']:.1f}x their raw W+m+v)"
        )
    return line
