"""Label-word log-likelihood scoring for any Hugging Face causal LM (no Lightning).

A request is a context plus one continuation per class. Tokenisation follows lm-evaluation-harness
exactly (trailing context whitespace moves into the continuation; the continuation's tokens are
``encode(context + continuation)[len(encode(context)):]``) so the scores are comparable one to one.

Speed comes from three things, none of which changes the result beyond float rounding:

- rows are deduplicated: a continuation whose input is a prefix of another row's input is read off
  that row (single-token label words cost one row per request, not one per class);
- rows are sorted by length and batched with right padding (no position shifts);
- the longest token prefix shared by every row (the demonstrations, in ICL) is run once and its KV
  cache is reused by every batch;
- the LM head and the softmax run only at positions that predict a continuation token
  (``logits_to_keep``), not at every prompt position.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class EncodedRequest:
    """Token ids of one request: the context and one continuation per choice."""

    context: list[int]
    continuations: list[list[int]]


@dataclass
class ScoreResult:
    """Scores of a list of requests.

    Attributes:
        loglik: ``[n_requests, n_choices]`` float64 summed log-probabilities of each continuation.
        next_token_logprobs: ``[n_requests, vocab]`` float32 log-probabilities of the token after the
            context (the full-vocabulary output distribution), or None when not requested.
    """

    loglik: torch.Tensor
    next_token_logprobs: torch.Tensor | None


def leading_special_tokens(tokenizer) -> list[int]:
    """Ids the tokenizer adds in front of a text (a BOS), ignoring any it appends (ByT5's EOS).

    A token appended after the context would sit between the context and the continuation, so only
    leading special tokens are kept; for tokenizers that only prepend this is lm-eval's behaviour.
    """
    probe = "a"
    with_special = tokenizer.encode(probe, add_special_tokens=True)
    plain = tokenizer.encode(probe, add_special_tokens=False)
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return list(with_special[:start])
    return []


def encode_pair(tokenizer, context: str, continuation: str, add_special_tokens: bool = True):
    """lm-evaluation-harness's context/continuation split for causal models."""
    if not context:
        raise ValueError("context must be non-empty (lm-eval semantics need a context to condition on)")
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    lead = leading_special_tokens(tokenizer) if add_special_tokens else []
    whole = lead + tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = lead + tokenizer.encode(context, add_special_tokens=False)
    cont = whole[len(ctx) :]
    if not cont:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens after context")
    return ctx, cont


def encode_requests(
    tokenizer, contexts: Sequence[str], choices: Sequence[str], add_special_tokens: bool = True
) -> list[EncodedRequest]:
    """Encode every context with the same list of choices (a classification prompt set)."""
    out = []
    for context in contexts:
        pairs = [encode_pair(tokenizer, context, c, add_special_tokens) for c in choices]
        out.append(EncodedRequest(pairs[0][0], [cont for _, cont in pairs]))
    return out


def _cache_kwarg(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_out(outputs):
    return outputs.get("cache", None) if "cache" in outputs else outputs.get("past_key_values", None)


@dataclass
class _Row:
    tokens: list[int]
    needs: list[tuple[int, int, int, list[int]]]  # (request, choice, start position, target tokens)
    full_vocab_for: int | None = None  # request whose next-token distribution is read at its context end


def _plan_rows(requests: Sequence[EncodedRequest]) -> list[_Row]:
    rows: list[_Row] = []
    for r, req in enumerate(requests):
        seqs = [(c, (req.context + cont)[:-1], cont) for c, cont in enumerate(req.continuations)]
        seqs.sort(key=lambda s: -len(s[1]))
        mine: list[_Row] = []
        for c, inp, cont in seqs:
            host = next((row for row in mine if row.tokens[: len(inp)] == inp), None)
            if host is None:
                host = _Row(list(inp), [])
                mine.append(host)
            host.needs.append((r, c, len(req.context) - 1, cont))
        mine[0].full_vocab_for = r
        rows.extend(mine)
    return rows


def _common_prefix_len(rows: Sequence[_Row], requests: Sequence[EncodedRequest]) -> int:
    first = rows[0].tokens
    n = min(len(req.context) for req in requests) - 1  # every needed position stays in the suffix
    for row in rows[1:]:
        n = min(n, len(row.tokens))
        i = 0
        while i < n and row.tokens[i] == first[i]:
            i += 1
        n = i
        if n == 0:
            break
    return max(n, 0)


@torch.no_grad()
def score_requests(
    model,
    requests: Sequence[EncodedRequest],
    batch_size: int = 16,
    reuse_prefix: bool = True,
    min_prefix: int = 8,
    full_vocab: bool = False,
    pad_token_id: int = 0,
) -> ScoreResult:
    """Log-likelihood of every continuation of every request, batched, with shared-prefix KV reuse.

    Args:
        model: A Hugging Face causal LM (in eval mode; its dtype decides the precision).
        requests: From ``encode_requests``.
        batch_size: Rows per forward pass.
        reuse_prefix: Run the token prefix that all rows share once and reuse its KV cache. Exact up to
            float rounding; worth it when the shared prefix (the demonstrations) dominates the prompt.
        min_prefix: Shorter shared prefixes are not worth a cache copy per batch.
        full_vocab: Also return the full next-token log-distribution after each context.
        pad_token_id: Any valid id; padded positions are masked and never read.
    """
    if not requests:
        raise ValueError("no requests to score")
    n_choices = len(requests[0].continuations)
    device = next(model.parameters()).device
    loglik = torch.zeros(len(requests), n_choices, dtype=torch.float64)
    vocab_lp: torch.Tensor | None = None
    rows = _plan_rows(requests)
    prefix = _common_prefix_len(rows, requests) if reuse_prefix else 0
    cache_kw = _cache_kwarg(model)
    keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    prefix_cache = None
    if prefix >= min_prefix:
        out = model(input_ids=torch.tensor([rows[0].tokens[:prefix]], device=device), use_cache=True)
        prefix_cache = _cache_out(out)
    else:
        prefix = 0
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].tokens))
    for start in range(0, len(order), batch_size):
        batch = [rows[i] for i in order[start : start + batch_size]]
        width = max(len(r.tokens) for r in batch) - prefix
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(batch), prefix + width, dtype=torch.long)
        mask[:, :prefix] = 1
        for b, row in enumerate(batch):
            suffix = row.tokens[prefix:]
            ids[b, : len(suffix)] = torch.tensor(suffix)
            mask[b, prefix : prefix + len(suffix)] = 1
        kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(batch))
            kwargs[cache_kw] = cache
            kwargs["position_ids"] = (torch.arange(width) + prefix).expand(len(batch), -1).to(device)
            kwargs["use_cache"] = True
        # Only the positions that predict a continuation token go through the LM head.
        keep = sorted({p - prefix + k for row in batch for _, _, p, t in row.needs for k in range(len(t))})
        if keep_logits:
            kwargs["logits_to_keep"] = torch.tensor(keep, device=device)
            column = {p: i for i, p in enumerate(keep)}
        else:
            column = {p: p for p in keep}
        logits = model(**kwargs).logits
        for b, row in enumerate(batch):
            for r, c, pos, target in row.needs:
                cols = [column[pos - prefix + k] for k in range(len(target))]
                sl = logits[b, cols].float().log_softmax(-1)
                loglik[r, c] = (
                    sl.gather(-1, torch.tensor(target, device=sl.device)[:, None]).double().sum().cpu()
                )
            if full_vocab and row.full_vocab_for is not None:
                r = row.full_vocab_for
                lp = logits[b, column[len(requests[r].context) - 1 - prefix]].float().log_softmax(-1).cpu()
                if vocab_lp is None:
                    vocab_lp = torch.empty(len(requests), lp.numel(), dtype=torch.float32)
                vocab_lp[r] = lp
    return ScoreResult(loglik, vocab_lp)


@torch.no_grad()
def score_requests_unbatched(model, requests: Sequence[EncodedRequest]) -> torch.Tensor:
    """Reference scorer: one plain forward per (request, choice), no padding, no cache."""
    device = next(model.parameters()).device
    out = torch.zeros(len(requests), len(requests[0].continuations), dtype=torch.float64)
    for r, req in enumerate(requests):
        for c, cont in enumerate(req.continuations):
            ids = torch.tensor([(req.context + cont)[:-1]], device=device)
            lp = model(input_ids=ids).logits[0, len(req.context) - 1 :].float().log_softmax(-1)
            out[r, c] = lp.gather(-1, torch.tensor(cont, device=device)[:, None]).double().sum().cpu()
    return out
