"""A small training run that saves ExCP checkpoints the way ModelCheckpoint does, to be SIGKILLed.

Used by tests/test_excp_kill.py and bench/excp_safety.py. Plain torch (an MLP with AdamW on seeded
synthetic batches) driving :class:`callbacks.excp.store.ChainStore`, the code ExCPCheckpointIO
delegates every save and removal to, so a process starts in seconds. Per step it saves
``step=N.ckpt`` (keeping the newest two, like ``save_top_k=2``) and then ``last.ckpt``. It prints
``READY <step>`` once it can train, ``SAVING <path>`` before and ``SAVED <path>`` after each save,
``REMOVING``/``REMOVED <path>`` around each removal, and ``DONE <step>`` at the end.

    python tests/excp_kill_child.py FOLDER --max-steps 500 [--resume]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from callbacks.excp import ExCPSettings  # noqa: E402
from callbacks.excp.store import ChainStore  # noqa: E402


def build(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)
    )
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``step`` (a function of the step alone, so a resumed run sees the same data)."""
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(32, 64, generator=generator)
    return x, torch.tanh(x.flip(1))


def say(*words: object) -> None:
    print(*words, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--keyframe-interval", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    store = ChainStore(ExCPSettings(keyframe_interval=args.keyframe_interval, kmeans_sample=4096))
    model, optimizer = build()
    step = 0
    last = args.folder / "last.ckpt"
    if args.resume and last.exists():
        state = store.load(last)
        model.load_state_dict({k.removeprefix("model."): v for k, v in state["state_dict"].items()})
        optimizer.load_state_dict(state["optimizer_states"][0])
        step = state["global_step"]
    say("READY", step)
    kept: list[Path] = sorted(args.folder.glob("step=*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))
    while step < args.max_steps:
        x, y = batch(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        checkpoint = {
            "global_step": step,
            "epoch": 0,
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "optimizer_states": [optimizer.state_dict()],
            "loops": {"step": step, "loss": float(loss)},
        }
        for path in (args.folder / f"step={step}.ckpt", last):
            say("SAVING", path)
            store.save(checkpoint, path)
            say("SAVED", path)
            if path != last:
                kept = [p for p in kept if p != path] + [path]
                while len(kept) > 2:
                    old = kept.pop(0)
                    say("REMOVING", old)
                    store.remove(old)
                    say("REMOVED", old)
    say("DONE", step)


if __name__ == "__main__":
    main()
