"""ExCP safety campaign: thousands of corrupted or crafted files, SIGKILLs at random instants, and the
weight difference of a resumed run. Counts, not timings, are the result.

  * fuzz: a 3-file chain (keyframe, two deltas) is damaged in one of several ways per trial (byte flips,
    truncation, appended bytes: checksums left broken; crafted header fields, records and planted
    pickles with every checksum recomputed; reference cycles; header lengths past the cap; FIFO,
    /dev/zero, a folder) and read through ``load_checkpoint`` and ``python -m callbacks.excp inspect``.
    Each read ends as: an ExCPFormatError, the exact original tensors, a crafted file accepted as a
    valid checkpoint (checksums repaired, so only structure can be checked), *silent-wrong* (a broken
    checksum yet different tensors), a traceback (any other exception), a hang (> 10 s), a code
    execution (a planted pickle's marker file appeared). Each read's peak resident growth (reset per
    read, torch tensors included: tests/peak_memory.py) is compared with 2x the larger of the same
    reader's peak on the clean chain and the chain's size on disk. Mutations: bench/excp_mutations.py.
  * kills: tests/excp_kill_child.py (a Lightning Trainer with the ExCP callback; ModelCheckpoint saves
    step=N.ckpt top-2 and last.ckpt every step) is SIGKILLed at random instants, half of them
    while a save is in flight; every checkpoint it had saved must load, last.ckpt must exist once
    its first save finished, and the next run resumes from it.
  * resume: a tiny CausalLM run resumed from a plain mid-epoch checkpoint vs the uninterrupted run
    (max |weight difference|).

    python bench/excp_safety.py [--quick]       # writes bench/results/excp_safety.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.excp_mutations import Campaign  # noqa: E402
from bench.records import read_record  # noqa: E402
from callbacks.excp import ExCPFormatError, load_checkpoint  # noqa: E402
from callbacks.excp.cli import main as cli_main  # noqa: E402
from common.atomic import atomic_write_json  # noqa: E402
from tests.excp_crafting import checkpoints_equal  # noqa: E402
from tests.excp_kill_driver import finish, run_trial  # noqa: E402
from tests.peak_memory import PeakResident, prepare_process  # noqa: E402

HANG_SECONDS = 10
CLEAN_READS = 5


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


def _read(expected: dict, path: Path, repaired: bool, reader: Callable[[Path], Any]) -> tuple[str, int]:
    """Outcome and the peak resident growth of this read (reset before it: this read's own peak)."""
    meter = PeakResident()
    outcome = None
    try:
        with meter, _watchdog(HANG_SECONDS):
            got = reader(path)
    except TimeoutError:
        outcome = "hang"
    except ExCPFormatError:
        outcome = "error"
    except Exception as error:  # noqa: BLE001 - anything else is a traceback a user would see
        outcome = f"traceback:{type(error).__name__}"
    if outcome is not None:
        return outcome, meter.bytes
    if got is None:  # the CLI path: exit code only
        return "error", meter.bytes
    if "inspect" in got:
        return ("inspect_ok" if repaired else "silent_wrong"), meter.bytes
    if checkpoints_equal(got, expected):
        return "exact", meter.bytes
    return ("accepted_crafted" if repaired else "silent_wrong"), meter.bytes


def _inspect(path: Path) -> Any:
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        code = cli_main(["inspect", str(path)])
    return None if code != 0 else {"inspect": code}


READERS: dict[str, Callable[[Path], Any]] = {"load": load_checkpoint, "inspect": _inspect}


def _clean_peaks(campaign: Campaign) -> dict[str, list[int]]:
    """Each reader's peak on the unmutated chain, :data:`CLEAN_READS` times (after one warm read)."""
    prepare_process()
    peaks: dict[str, list[int]] = {}
    for name, reader in READERS.items():
        reader(campaign.paths[-1])  # warm: lazy imports and caches are not the file's doing
        peaks[name] = []
        for _ in range(CLEAN_READS):
            with PeakResident() as meter:
                reader(campaign.paths[-1])
            peaks[name].append(meter.bytes)
    return peaks


def fuzz(files: int, seed: int) -> dict[str, Any]:
    """Read ``files`` mutated chains with both readers; count outcomes and compare every read's peak memory.

    The bound of a read is twice the larger of the same reader's median clean peak on the unmutated chain and
    the chain's bytes on disk: a crafted file may make a reader allocate no more than it would for the
    real checkpoint. Every read's peak is also divided by the bytes the mutated chain has on disk (the
    issue's "2x the file's size", which a decoder cannot meet: a delta decodes to ~10-40x its size).
    """
    with tempfile.TemporaryDirectory(prefix="excp-safety-") as tmp:
        campaign = Campaign(Path(tmp), seed)
        expected = load_checkpoint(campaign.paths[-1])
        mutations, weights = zip(*campaign.mutations(), strict=True)
        clean = _clean_peaks(campaign)
        typical = {name: int(statistics.median(peaks)) for name, peaks in clean.items()}
        bound = {name: 2 * max(typical[name], campaign.chain_bytes) for name in READERS}
        outcomes: Counter = Counter()
        by_kind: dict[str, Counter] = {}
        worst: dict[str, dict[str, list]] = {
            name: {"peak_bytes": [0, None], "over_clean_peak": [0.0, None], "over_bytes_on_disk": [0.0, None]}
            for name in READERS
        }
        over_bound: list[dict[str, Any]] = []
        executions = 0
        slowest = 0.0
        started = time.perf_counter()
        for _ in range(files):
            kind, path, repaired = campaign.rng.choices(mutations, weights)[0]()
            on_disk = campaign.bytes_on_disk()
            for name, reader in READERS.items():
                t0 = time.perf_counter()
                outcome, peak = _read(expected, path, repaired, reader)
                slowest = max(slowest, time.perf_counter() - t0)
                outcomes[outcome] += 1
                by_kind.setdefault(kind, Counter())[f"{name}:{outcome}"] += 1
                figures = {"peak_bytes": peak, "over_clean_peak": peak / typical[name]}
                if path in campaign.paths and on_disk:
                    figures["over_bytes_on_disk"] = peak / on_disk
                for figure, value in figures.items():  # the largest value and the mutation that gave it
                    worst[name][figure] = max(worst[name][figure], [value, kind], key=lambda pair: pair[0])
                if peak > bound[name]:
                    by_kind[kind][f"{name}:over_bound"] += 1
                    over_bound.append({"mutation": kind, "reader": name, "outcome": outcome, "peak_bytes": peak})
            if campaign.marker.exists():
                executions += 1
                campaign.marker.unlink()
            if path.name.startswith("pipe"):
                path.unlink()
            campaign.restore()
        return {
            "files": files,
            "reads": len(READERS) * files,
            "outcomes": dict(outcomes),
            "by_mutation": {k: dict(v) for k, v in sorted(by_kind.items())},
            "silent_wrong": outcomes["silent_wrong"],
            "hangs": outcomes["hang"],
            "tracebacks": sum(v for k, v in outcomes.items() if k.startswith("traceback")),
            "code_executions": executions,
            "memory": {
                "measure": "peak resident growth of each read, high-water mark reset per read (tests/peak_memory.py)",
                "bound": "2 x max(the reader's median peak on the clean chain, the chain's bytes on disk)",
                "chain_bytes_on_disk": campaign.chain_bytes,
                "clean_peak_bytes": clean,
                "bound_bytes": bound,
                "reads_over_bound": len(over_bound),
                "over_bound": over_bound[:20],
                "worst": worst,
            },
            "slowest_read_s": slowest,
            "seconds": time.perf_counter() - started,
        }


def kills(trials: int, seed: int) -> dict[str, Any]:
    """SIGKILL a Trainer run with the ExCP callback ``trials`` times (even trials inside a save); audit each."""
    rng = random.Random(seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="excp-kill-") as tmp:
        folder = Path(tmp)
        saved: set[str] = set()
        results = [run_trial(folder, rng, inside_save=i % 2 == 0, saved=saved) for i in range(trials)]
        resumed_from, final = finish(folder)
    consistent = all(b.resumed_from == a.last_step for a, b in zip(results, results[1:], strict=False))
    return {
        "child": "tests/excp_kill_child.py: Lightning Trainer + ExCP callback, ModelCheckpoint every step "
        "(save_top_k=2 on the step, save_last=True), MLP with AdamW, resumed from last.ckpt by trainer.fit",
        "trials": trials,
        "killed_while_a_save_was_in_flight": sum(t.killed_during_save for t in results),
        "checkpoints_expected": sum(t.expected for t in results),
        "checkpoints_loadable": sum(t.loadable for t in results),
        "checkpoints_lost": sum(len(t.lost) for t in results),
        "lost": [line for t in results for line in t.lost][:10],
        "trials_with_last_ckpt": sum(t.last_step is not None for t in results),
        "trials_after_a_finished_last_ckpt_save": sum(t.last_expected for t in results),
        "trials_missing_last_ckpt_after_its_first_save": sum(t.last_expected and t.last_step is None for t in results),
        "each_run_resumed_from_previous_last_ckpt": consistent,
        "final_run_resumed_from": resumed_from,
        "final_run_reached": final,
        "stale_temporaries_seen_after_kills": sum(t.stale_temporaries for t in results),
        "seconds": time.perf_counter() - started,
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
    parser.add_argument("--out", type=Path, help="default: bench/results/excp_safety.json (_quick.json with --quick)")
    parser.add_argument(
        "--parts", default="fuzz,kills,resume", help="comma-separated parts to (re)run; others are kept from --out"
    )
    args = parser.parse_args()
    if args.out is None:
        args.out = ROOT / "bench" / "results" / ("excp_safety_quick.json" if args.quick else "excp_safety.json")
    files, trials = (200, 3) if args.quick else (2000, 20)
    parts = set(args.parts.split(","))
    started = time.perf_counter()
    keep = parts != {"fuzz", "kills", "resume"} and args.out.exists()
    result: dict[str, Any] = read_record(args.out, "keep its other parts", "bench/excp_safety.py") if keep else {}
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
    if keep:  # the other parts' figures (and wall time) are from the run that wrote --out before
        result.setdefault("reruns", []).append({"parts": sorted(parts), "wall_s": time.perf_counter() - started})
    else:
        result["wall_s"] = time.perf_counter() - started
    atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
