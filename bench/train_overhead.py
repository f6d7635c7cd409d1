"""Training throughput of CausalLMModule under Lightning's Trainer vs a plain PyTorch loop.

Both sides train the same model (same initial weights), on the same batches, with the same AdamW
parameter groups, warmup-cosine schedule and gradient clipping. Runs alternate (plain, Lightning,
plain, Lightning, ...) so that machine noise hits both alike; each side's figure is the median over
repeats of tokens per second over the timed steps (the first steps are warmup and not timed).

    python bench/train_overhead.py --quick     # tiny Llama, seconds
    python bench/train_overhead.py             # the shipped SmolLM2-135M

Writes bench/results/train_overhead.json with both figures and ``ratio`` (Lightning / plain).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.atomic import atomic_write_json  # noqa: E402
from common.hf_loading import tiny_llama_config  # noqa: E402
from lightning_modules.causal_lm import CausalLMModule  # noqa: E402
from lightning_modules.schedules import warmup_cosine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
QUICK_CONFIG = tiny_llama_config(vocab_size=2048, hidden_size=128, intermediate_size=384)


class _BatchDicts(torch.utils.data.Dataset):
    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


class _StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: float | None = None
        self.end: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.end = time.perf_counter()


def _module(args: argparse.Namespace) -> CausalLMModule:
    if args.quick:
        return CausalLMModule(model=None, model_config=QUICK_CONFIG, tokenizer="byt5", warmup_steps=2, seed=0)
    return CausalLMModule(model="smollm2-135m-instruct", warmup_steps=2)


def run_plain(module: CausalLMModule, tokens: torch.Tensor, args: argparse.Namespace) -> float:
    """Tokens/s of a hand-written loop: forward, backward, clip, step, schedule, zero_grad."""
    model = module.model
    model.train()
    optimizer = torch.optim.AdamW(module._parameter_groups(), lr=module.hparams.learning_rate,
                                  betas=tuple(module.hparams.betas))
    total = args.steps
    scheduler = LambdaLR(optimizer, lambda s: warmup_cosine(s, module.hparams.warmup_steps, total, 0.1))
    loader = DataLoader(_BatchDicts(tokens), batch_size=args.batch_size, shuffle=False)
    start = None
    for step, batch in enumerate(loader):
        if step == args.warmup:
            start = time.perf_counter()
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step + 1 == total:
            break
    elapsed = time.perf_counter() - start
    return (total - args.warmup) * args.batch_size * args.block_size / elapsed


def run_lightning(module: CausalLMModule, tokens: torch.Tensor, args: argparse.Namespace) -> float:
    """Tokens/s of the same work through ``Trainer.fit`` (no logger, no checkpoints, no validation)."""
    timer = _StepTimer(args.warmup)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, gradient_clip_val=1.0,
        callbacks=[timer], num_sanity_val_steps=0,
    )
    loader = DataLoader(_BatchDicts(tokens), batch_size=args.batch_size, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    return (args.steps - args.warmup) * args.batch_size * args.block_size / (timer.end - timer.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, a few seconds")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None,
                        help="default: bench/results/train_overhead.json (train_overhead_quick.json with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.output = args.output or RESULTS / ("train_overhead_quick.json" if args.quick else "train_overhead.json")
    args.repeats = args.repeats or (3 if args.quick else 3)
    args.steps = args.steps or (20 if args.quick else 12)
    args.warmup = 5 if args.quick else 2
    args.batch_size, args.block_size = (8, 64) if args.quick else (4, 128)

    L.seed_everything(0, verbose=False)
    template = _module(args)
    vocab = template.model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (args.steps * args.batch_size, args.block_size), generator=generator)
    initial_state = copy.deepcopy(template.state_dict())

    plain, lightning = [], []
    for repeat in range(args.repeats):
        for name, runner, figures in (("plain", run_plain, plain), ("lightning", run_lightning, lightning)):
            module = _module(args)
            module.load_state_dict(initial_state)
            figures.append(runner(module, tokens, args))
            print(f"repeat {repeat}: {name:9s} {figures[-1]:10.1f} tokens/s", flush=True)

    plain_tps, lightning_tps = statistics.median(plain), statistics.median(lightning)
    result = {
        "workload": {
            "model": "tiny llama (2 layers, hidden 128)" if args.quick else "smollm2-135m-instruct",
            "parameters": sum(p.numel() for p in template.parameters()),
            "batch_size": args.batch_size, "block_size": args.block_size, "steps": args.steps,
            "timed_steps": args.steps - args.warmup, "repeats": args.repeats, "quick": args.quick,
            "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        },
        "plain_tokens_per_s": plain_tps,
        "lightning_tokens_per_s": lightning_tps,
        "plain_runs": plain,
        "lightning_runs": lightning,
        "ratio": lightning_tps / plain_tps,
        "goal_ratio": 0.97,
    }
    atomic_write_json(args.output, result)
    print(f"plain {plain_tps:.1f} tokens/s, Lightning {lightning_tps:.1f} tokens/s, ratio {result['ratio']:.3f} "
          f"(goal >= 0.97) -> {args.output}")


if __name__ == "__main__":
    main()
