"""ExCP safety campaign: thousands of corrupted or crafted files, SIGKILLs at random instants, and the
weight difference of a resumed run. Counts, not timings, are the result.

  * fuzz: a 3-file chain (keyframe, two deltas) is damaged in one of several ways per trial (byte flips,
    truncation, appended bytes: checksums left broken; crafted header fields, records and planted
    pickles with every checksum recomputed; reference cycles; header lengths past the cap; FIFO,
    /dev/zero, a folder) and read through ``load_checkpoint`` and ``python -m callbacks.excp inspect``.
    Each read ends as: an ExCPFormatError, the exact original tensors, a crafted file accepted as a
    valid checkpoint (checksums repaired, so only structure can be checked), *silent-wrong* (a broken
    checksum yet different tensors), a traceback (any other exception), a hang (> 10 s), a code
    execution (a planted pickle's marker file appeared). Python-heap peak (tracemalloc: bytes,
    numpy arrays, zstd output) is compared with 2x the larger of the clean decode's peak and the
    chain's size on disk.
  * kills: tests/excp_kill_child.py (AdamW training saving through ChainStore as ModelCheckpoint
    would: step=N.ckpt top-2 and last.ckpt every step) is SIGKILLed at random instants, half of them
    while a save is in flight; every checkpoint it had saved must load, and the next run resumes
    from last.ckpt.
  * resume: a tiny CausalLM run resumed from a plain mid-epoch checkpoint vs the uninterrupted run
    (max |weight difference|).

    python bench/excp_safety.py [--quick]       # writes bench/results/excp_safety.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import random
import resource
import signal
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from callbacks.excp import ExCPFormatError, load_checkpoint  # noqa: E402
from callbacks.excp.cli import main as cli_main  # noqa: E402
from callbacks.excp.fileformat import read_header  # noqa: E402
from common.atomic import atomic_write_json  # noqa: E402
from tests.excp_crafting import (  # noqa: E402
    checkpoints_equal,
    planted_skeleton,
    replace_record,
    rewrite,
    split_file,
    write_chain,
)
from tests.excp_kill_driver import finish, run_trial  # noqa: E402

HANG_SECONDS = 10
_HUGE = [0, 1, 7, 2**16, 2**28, 2**31 - 1, 2**32, 2**40, 2**62, -1, None, "x", [], {}, [2**20, 2**20], 1.5]
_FIELDS = [
    ("entries", 0, "shape"),
    ("entries", 0, "rec_w"),
    ("entries", 0, "m"),
    ("entries", 0, "m", "rec"),
    ("entries", 0, "dtype"),
    ("entries", 0, "w_mode"),
    ("entries", 1, "shape"),
    ("records", 0, "length"),
    ("records", 0, "offset"),
    ("records", -1, "length"),
    ("extras",),
    ("aliases",),
    ("skeleton",),
    ("kind",),
    ("ref",),
    ("ref", "name"),
    ("ref", "file_id"),
    ("chain_index",),
    ("entries",),
    ("records",),
]


@contextlib.contextmanager
def _watchdog(seconds: int) -> Iterator[None]:
    def fire(signum, frame):
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _set(header: dict, path: tuple, value: Any) -> None:
    target: Any = header
    for key in path[:-1]:
        target = target[key]
    if isinstance(target, dict):
        target[path[-1]] = value
    else:
        target[path[-1]] = value


class Campaign:
    """One clean chain and the mutations applied to it, trial by trial."""

    def __init__(self, folder: Path, seed: int) -> None:
        self.folder = folder
        self.rng = random.Random(seed)
        self.paths = write_chain(folder, 3, size=256)
        self.originals = {p: p.read_bytes() for p in self.paths}
        self.chain_bytes = sum(len(b) for b in self.originals.values())
        self.expected = load_checkpoint(self.paths[-1])
        tracemalloc.start()
        self.clean_peak = {}
        for name, reader in (("load", load_checkpoint), ("inspect", _inspect)):
            reader(self.paths[-1])  # warm: lazy imports and caches are not the file's doing
            gc.collect()
            tracemalloc.reset_peak()
            start = tracemalloc.get_traced_memory()[0]
            reader(self.paths[-1])
            self.clean_peak[name] = _allocated_since(start)
        self.marker = folder / "MARKER"

    def restore(self) -> None:
        for path, data in self.originals.items():
            path.write_bytes(data)

    # each mutation returns (kind, path to read, checksums repaired?)
    def flip(self) -> tuple[str, Path, bool]:
        target = self.rng.choice(self.paths)
        data = bytearray(target.read_bytes())
        for _ in range(self.rng.randint(1, 3)):
            data[self.rng.randrange(len(data))] ^= self.rng.randint(1, 255)
        target.write_bytes(bytes(data))
        return "byte_flip", self.paths[-1], False

    def truncate(self) -> tuple[str, Path, bool]:
        target = self.rng.choice(self.paths)
        data = target.read_bytes()
        target.write_bytes(data[: self.rng.randrange(len(data))])
        return "truncation", self.paths[-1], False

    def append(self) -> tuple[str, Path, bool]:
        target = self.rng.choice(self.paths)
        target.write_bytes(target.read_bytes() + os.urandom(self.rng.randint(1, 4096)))
        return "appended_bytes", self.paths[-1], False

    def craft_header(self) -> tuple[str, Path, bool]:
        target = self.rng.choice(self.paths)
        field, value = self.rng.choice(_FIELDS), self.rng.choice(_HUGE)
        try:
            target.write_bytes(rewrite(target.read_bytes(), lambda h: _set(h, field, value)))
        except (KeyError, IndexError, TypeError):
            target.write_bytes(rewrite(target.read_bytes(), lambda h: _set(h, ("entries", 0, "shape"), [2**28])))
        return "crafted_header", self.paths[-1], True

    def craft_record(self) -> tuple[str, Path, bool]:
        target = self.rng.choice(self.paths)
        data = target.read_bytes()
        header, _ = split_file(data)
        index = self.rng.randrange(len(header["records"]))
        blob = os.urandom(self.rng.randint(0, 256))
        if self.rng.random() < 0.5:  # a real record from elsewhere, with one byte changed (plausible framing)
            other, records = split_file(self.originals[self.rng.choice(self.paths)])
            record = self.rng.choice(other["records"])
            blob = bytearray(records[record["offset"] : record["offset"] + record["length"]])
            if blob:
                blob[self.rng.randrange(len(blob))] ^= self.rng.randint(1, 255)
            blob = bytes(blob)
        target.write_bytes(replace_record(data, index, blob))
        return "crafted_record", self.paths[-1], True

    def plant(self) -> tuple[str, Path, bool]:
        target = self.rng.choice(self.paths)
        data = target.read_bytes()
        header, _ = split_file(data)
        target.write_bytes(replace_record(data, header["skeleton"], planted_skeleton(self.marker)))
        return "planted_pickle", self.paths[-1], True

    def cycle(self) -> tuple[str, Path, bool]:
        later = read_header(self.paths[2])
        ref = {"file_id": later["file_id"], "sha256": "0" * 64, "name": self.paths[2].name}
        target = self.paths[self.rng.choice([0, 1])]
        target.write_bytes(rewrite(target.read_bytes(), lambda h: h.update(kind="delta", ref=ref)))
        return "reference_cycle", self.paths[-1], True

    def header_length(self) -> tuple[str, Path, bool]:
        target = self.rng.choice(self.paths)
        data = bytearray(target.read_bytes())
        data[12:16] = self.rng.choice([2**30 + 2**26, 2**32 - 1, len(data), 2**26 + 1]).to_bytes(4, "little")
        target.write_bytes(bytes(data))
        return "header_length", self.paths[-1], False

    def special(self) -> tuple[str, Path, bool]:
        choice = self.rng.choice(["fifo", "zero", "dir"])
        if choice == "fifo":
            fifo = self.folder / f"pipe{self.rng.randrange(10**9)}"
            os.mkfifo(fifo)
            return "fifo", fifo, True
        return ("dev_zero", Path("/dev/zero"), True) if choice == "zero" else ("directory", self.folder, True)


def _allocated_since(start: int) -> int:
    return tracemalloc.get_traced_memory()[1] - start


def _read(campaign: Campaign, path: Path, repaired: bool, reader: Callable[[Path], Any]) -> tuple[str, int]:
    """Outcome and bytes allocated at the peak of this read (above what was live when it started)."""
    gc.collect()  # earlier reads' exception cycles would otherwise count against this one
    tracemalloc.reset_peak()
    start = tracemalloc.get_traced_memory()[0]
    try:
        with _watchdog(HANG_SECONDS):
            got = reader(path)
    except TimeoutError:
        return "hang", _allocated_since(start)
    except ExCPFormatError:
        return "error", _allocated_since(start)
    except Exception as error:  # noqa: BLE001 - anything else is a traceback a user would see
        return f"traceback:{type(error).__name__}", _allocated_since(start)
    peak = _allocated_since(start)
    if got is None:  # the CLI path: exit code only
        return "error", peak
    if "inspect" in got:
        return ("inspect_ok" if repaired else "silent_wrong"), peak
    if checkpoints_equal(got, campaign.expected):
        return "exact", peak
    return ("accepted_crafted" if repaired else "silent_wrong"), peak


def _inspect(path: Path) -> Any:
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        code = cli_main(["inspect", str(path)])
    return None if code != 0 else {"inspect": code}


def fuzz(files: int, seed: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="excp-safety-") as tmp:
        campaign = Campaign(Path(tmp), seed)
        mutations = [
            campaign.flip,
            campaign.truncate,
            campaign.append,
            campaign.craft_header,
            campaign.craft_record,
            campaign.plant,
            campaign.cycle,
            campaign.header_length,
            campaign.special,
        ]
        weights = [30, 15, 8, 20, 15, 4, 3, 3, 2]
        outcomes: Counter = Counter()
        by_kind: dict[str, Counter] = {}
        # what a reader of this chain may hold: twice the larger of its clean decode and its size on disk
        limit = 2 * max(campaign.clean_peak["load"], campaign.chain_bytes)
        bound = {"load": limit, "inspect": limit}
        worst_vs_clean = dict.fromkeys(bound, 0.0)
        worst_peak = 0
        worst_ratio = 0.0
        over_bound = 0
        executions = 0
        slowest = 0.0
        started = time.perf_counter()
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(files):
            kind, path, repaired = campaign.rng.choices(mutations, weights)[0]()
            for reader_name, reader in (("load", load_checkpoint), ("inspect", _inspect)):
                t0 = time.perf_counter()
                outcome, peak = _read(campaign, path, repaired, reader)
                slowest = max(slowest, time.perf_counter() - t0)
                outcomes[outcome] += 1
                by_kind.setdefault(kind, Counter())[f"{reader_name}:{outcome}"] += 1
                worst_peak = max(worst_peak, peak)
                worst_vs_clean[reader_name] = max(worst_vs_clean[reader_name], peak / campaign.clean_peak[reader_name])
                if peak > bound[reader_name]:
                    over_bound += 1
                    by_kind[kind][f"{reader_name}:over_bound"] += 1
                    worst_ratio = max(worst_ratio, peak / bound[reader_name] * 2)
            if campaign.marker.exists():
                executions += 1
                campaign.marker.unlink()
            if path.name.startswith("pipe"):
                path.unlink()
            campaign.restore()
        tracemalloc.stop()
        return {
            "files": files,
            "reads": 2 * files,
            "outcomes": dict(outcomes),
            "by_mutation": {k: dict(v) for k, v in sorted(by_kind.items())},
            "silent_wrong": outcomes["silent_wrong"],
            "hangs": outcomes["hang"],
            "tracebacks": sum(v for k, v in outcomes.items() if k.startswith("traceback")),
            "code_executions": executions,
            "clean_decode_peak_bytes": campaign.clean_peak,
            "chain_bytes": campaign.chain_bytes,
            "allocation_bound_bytes": bound,
            "max_peak_bytes": worst_peak,
            "reads_over_bound": over_bound,
            "max_peak_over_limit_times_2": worst_ratio,
            "max_peak_over_the_same_readers_clean_peak": worst_vs_clean,
            "max_rss_growth_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before,
            "slowest_read_s": slowest,
            "seconds": time.perf_counter() - started,
        }


def kills(trials: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="excp-kill-") as tmp:
        folder = Path(tmp)
        saved: set[str] = set()
        results = [run_trial(folder, rng, inside_save=i % 2 == 0, saved=saved) for i in range(trials)]
        resumed_from, final = finish(folder)
    consistent = all(b.resumed_from == a.last_step for a, b in zip(results, results[1:], strict=False))
    return {
        "trials": trials,
        "killed_while_a_save_was_in_flight": sum(t.killed_during_save for t in results),
        "checkpoints_expected": sum(t.expected for t in results),
        "checkpoints_loadable": sum(t.loadable for t in results),
        "checkpoints_lost": sum(len(t.lost) for t in results),
        "lost": [line for t in results for line in t.lost][:10],
        "trials_with_last_ckpt": sum(t.last_step is not None for t in results),
        "each_run_resumed_from_previous_last_ckpt": consistent,
        "final_run_resumed_from": resumed_from,
        "final_run_reached": final,
        "stale_temporaries_seen_after_kills": sum(t.stale_temporaries for t in results),
    }


def resume_difference() -> dict[str, Any]:
    """Max |weight difference| between an uninterrupted tiny run and one resumed mid-epoch (plain .ckpt)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from common.hf_loading import tiny_llama_config
    from datamodules.text import TextDataModule
    from lightning_modules.causal_lm import CausalLMModule

    def run(root: Path, steps: int, callbacks: list, ckpt_path: Path | None = None) -> CausalLMModule:
        torch.manual_seed(0)
        module = CausalLMModule(
            model=None, model_config=tiny_llama_config(), learning_rate=1e-2, warmup_steps=0, min_lr_ratio=1.0
        )
        data = TextDataModule(block_size=32, batch_size=4, max_tokens=6_000, val_fraction=0.05)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=steps,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            default_root_dir=str(root),
            callbacks=callbacks,
        )
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return module

    with tempfile.TemporaryDirectory(prefix="excp-resume-") as tmp:
        root = Path(tmp)
        whole = run(root / "a", 50, [])
        saver = ModelCheckpoint(dirpath=root / "ck", filename="{step}", every_n_train_steps=10, save_top_k=-1)
        run(root / "b", 10, [saver])
        resumed = run(root / "b", 50, [], root / "ck" / "step=10.ckpt")
        difference = max(
            float((a - b).abs().max()) for a, b in zip(whole.parameters(), resumed.parameters(), strict=True)
        )
    return {
        "steps": 50,
        "resumed_at": 10,
        "epoch_batches": "about 44 (the resume is mid-epoch)",
        "max_abs_weight_difference": difference,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 files, 3 kills")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "excp_safety.json")
    parser.add_argument(
        "--parts", default="fuzz,kills,resume", help="comma-separated parts to (re)run; others are kept from --out"
    )
    args = parser.parse_args()
    files, trials = (200, 3) if args.quick else (2000, 20)
    parts = set(args.parts.split(","))
    started = time.perf_counter()
    result: dict[str, Any] = json.loads(args.out.read_text()) if parts != {"fuzz", "kills", "resume"} else {}
    result.update(
        mode="quick" if args.quick else "full",
        command="python bench/excp_safety.py" + (" --quick" if args.quick else ""),
    )
    if "fuzz" in parts:
        result["fuzz"] = fuzz(files, args.seed)
        print("fuzz", {k: v for k, v in result["fuzz"].items() if k != "by_mutation"}, flush=True)
    if "kills" in parts:
        result["kills"] = kills(trials, args.seed)
        print("kills", result["kills"], flush=True)
    if "resume" in parts:
        result["resume"] = resume_difference()
        print("resume", result["resume"], flush=True)
    result["machine"] = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()}
    result["wall_s"] = time.perf_counter() - started
    atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
