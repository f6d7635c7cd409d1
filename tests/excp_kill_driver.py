"""SIGKILL a Lightning training subprocess (tests/excp_kill_child.py) at random instants and audit what is left.

Shared by tests/test_excp_kill.py (a few trials) and bench/excp_safety.py (>= 20 trials).
"""

from __future__ import annotations

import queue
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from callbacks.excp import ExCPFormatError, load_checkpoint
from callbacks.excp.references import live_checkpoints

CHILD = Path(__file__).with_name("excp_kill_child.py")


@dataclass
class KillTrial:
    """What one kill left: which saved checkpoints still load and where the next run resumes."""

    mode: str
    killed_during_save: bool
    expected: int = 0
    loadable: int = 0
    lost: list[str] = field(default_factory=list)
    last_step: int | None = None
    last_expected: bool = False
    resumed_from: int | None = None
    stale_temporaries: int = 0


def _reader(stream, lines: queue.Queue) -> None:
    for line in stream:
        if line.endswith("\n"):  # an unterminated last line is one a kill cut short: not an event
            lines.put(line.strip())
    lines.put(None)


def _start(folder: Path, max_steps: int) -> tuple[subprocess.Popen, queue.Queue]:
    process = subprocess.Popen(
        [sys.executable, str(CHILD), str(folder), "--max-steps", str(max_steps)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(process.stdout, lines), daemon=True).start()
    return process, lines


def _until(lines: queue.Queue, prefix: str, events: list[str], timeout: float = 120) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            return None
        events.append(line)
        if line.startswith(prefix):
            return line
    return None


def run_trial(
    folder: Path, rng: random.Random, inside_save: bool, saved: set[str], max_steps: int = 100_000, min_saves: int = 1
) -> KillTrial:
    """Start (resuming from last.ckpt), kill at a random instant, audit; ``saved`` carries live files across trials.

    ``inside_save``: the kill comes inside the ``min_saves``-th to 12th save of this run, within the
    first half of the shortest save seen so far, else 0.05-1.5 s after training started.
    """
    process, lines = _start(folder, max_steps)
    events: list[str] = []
    ready = _until(lines, "READY", events)
    assert ready is not None, "the training child did not start"
    trial = KillTrial(mode="inside_save" if inside_save else "random", killed_during_save=False)
    trial.resumed_from = int(ready.split()[1])
    if inside_save:
        # some saves in, then during one: the kill lands in the first half of a save, timed from this
        # run's own earlier saves (a fixed delay misses fast saves on a quiet machine)
        durations = []
        for _ in range(rng.randint(min_saves, 12) - 1):
            _until(lines, "SAVING", events)
            started = time.monotonic()
            _until(lines, "SAVED", events)
            durations.append(time.monotonic() - started)
        _until(lines, "SAVING", events)
        time.sleep(rng.uniform(0, 0.5 * min(durations, default=0.002)))
    else:
        time.sleep(rng.uniform(0.05, 1.5))
    process.send_signal(signal.SIGKILL)
    process.wait()
    while (line := lines.get()) is not None:
        events.append(line)
    in_flight = None
    for line in events:
        word, _, path = line.partition(" ")
        if word == "SAVING":
            in_flight = path
        elif word == "SAVED":
            saved.add(path)
            in_flight = None
        elif word == "REMOVING":  # asked to go: gone or not, it is no longer a checkpoint the run keeps
            saved.discard(path)
    trial.killed_during_save = in_flight is not None
    trial.expected = len(saved)
    trial.last_expected = str(folder / "last.ckpt") in saved  # once a save of last.ckpt finished, it must stay
    for path in sorted(saved):
        try:
            load_checkpoint(path)
            trial.loadable += 1
        except ExCPFormatError as error:
            trial.lost.append(f"{path}: {error}")
    last = folder / "last.ckpt"
    if last.exists():
        trial.last_step = load_checkpoint(last)["global_step"]
    trial.stale_temporaries = sum(1 for p in folder.iterdir() if p.name.endswith(".tmp"))
    assert all(p.exists() for p in map(Path, saved)) or trial.lost
    for path in live_checkpoints(folder):  # everything that looks like a checkpoint must load too
        try:
            load_checkpoint(path)
        except ExCPFormatError as error:
            trial.lost.append(f"{path}: {error}")
    return trial


def finish(folder: Path, extra_steps: int = 3) -> tuple[int, int]:
    """Run to completion from last.ckpt; returns (step resumed from, final step)."""
    start = load_checkpoint(folder / "last.ckpt")["global_step"]
    process, lines = _start(folder, start + extra_steps)
    events: list[str] = []
    ready = _until(lines, "READY", events)
    done = _until(lines, "DONE", events)
    process.wait(timeout=120)
    assert ready is not None and done is not None, events[-5:]
    return int(ready.split()[1]), int(done.split()[1])
