"""Tiny models shared by the Flextron tests (built from configs: no downloads)."""

from __future__ import annotations

import torch

from common.hf_loading import load_causal_lm, tiny_llama_config


def tiny_llama(seed: int = 0, **overrides) -> torch.nn.Module:
    """The shared tiny Llama with GQA widened to 8 query heads over 4 KV groups, so group-wise slicing is exercised."""
    config = tiny_llama_config(**{"num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 256,
                                  **overrides})
    return load_causal_lm(model_config=config, seed=seed).eval()


def tiny_neox(seed: int = 0, **overrides) -> torch.nn.Module:
    """The shared tiny config as GPT-NeoX (partial rotary, parallel residual): the second supported family."""
    config = tiny_llama_config(**{"model_type": "gpt_neox", "num_attention_heads": 4, "max_position_embeddings": 256,
                                  "rotary_pct": 0.5, "use_parallel_residual": True, **overrides})
    config.pop("num_key_value_heads")  # GPT-NeoX has no grouped-query attention
    return load_causal_lm(model_config=config, seed=seed).eval()


def calib_batches(n: int = 4, batch: int = 2, seq: int = 32, vocab: int = 384, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=gen) for _ in range(n)]

