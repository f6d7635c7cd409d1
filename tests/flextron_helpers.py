"""Tiny models shared by the Flextron tests (built from configs: no downloads)."""

from __future__ import annotations

import torch

from common.hf_loading import load_causal_lm


def tiny_llama(seed: int = 0, **overrides) -> torch.nn.Module:
    """Llama with GQA (8 query heads over 4 KV groups) so group-wise slicing is exercised."""
    cfg = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
               num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False)
    cfg.update(overrides)
    return load_causal_lm(model_config={"model_type": "llama", **cfg}, seed=seed).eval()


def tiny_neox(seed: int = 0, **overrides) -> torch.nn.Module:
    cfg = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=256, rotary_pct=0.5, use_parallel_residual=True)
    cfg.update(overrides)
    return load_causal_lm(model_config={"model_type": "gpt_neox", **cfg}, seed=seed).eval()


def calib_batches(n: int = 4, batch: int = 2, seq: int = 32, vocab: int = 384, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=gen) for _ in range(n)]

