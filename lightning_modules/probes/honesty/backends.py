"""Model backends for the honesty probe: a local Hugging Face causal LM and an OpenAI-compatible API.

A backend answers three questions about a conversation (system + user messages, optionally with
reasoning the model already produced):

* ``option_logprobs``: log-likelihood of each option's text as the answer (local models only: a
  chat-completions API cannot score given text);
* ``letter_logprobs``: log-probability of each option letter as the next token;
* ``generate``: free text (reasoning, or answers to parse).

The HTTP backend keeps every successful reply in an on-disk cache keyed by the request, so rerunning
a probe does not pay twice, and a failure never touches what is already cached.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch
import urllib3
from urllib3.util import Retry, Timeout

from common.atomic import atomic_write_json
from common.errors import UserFacingError
from common.paths import cache_root
from datamodules.honesty_prompts import render_prompt

RETRY_STATUSES: tuple[int, ...] = (429, 500, 502, 503, 504)
_ADVICE = "Check base_url and the server, or raise timeout_s / max_retries; cached replies are kept."


class _MalformedReply(Exception):
    """A 200 reply that is not a chat completion (counted against the retry budget like an error)."""


FOLLOWUP_AFTER_REASONING = "Now give only your final answer, in the format asked for above."


class BackendError(UserFacingError, RuntimeError):
    """A backend could not answer (unreachable, timed out, malformed reply, unsupported request).

    A ``UserFacingError``: ``train.py`` prints its message (what failed, what to do) as one line.
    """


class Backend(ABC):
    """What the probe needs from a model.

    Attributes:
        label: name of the model in results (e.g. "smollm2-chat").
        chat: whether prompts go through the chat template (chat models) or as plain text (base).
    """

    label: str
    chat: bool
    supports_option_logprobs: bool = True

    @abstractmethod
    def option_logprobs(
        self, messages: list[dict], options: list[str], reasoning: str | None = None
    ) -> np.ndarray:
        """Sum of token log-probabilities of each option text as the model's answer."""

    @abstractmethod
    def letter_logprobs(
        self, messages: list[dict], letters: list[str], reasoning: str | None = None
    ) -> np.ndarray:
        """Log-probability of each letter as the answer's first token (-inf where unavailable)."""

    @abstractmethod
    def generate(
        self,
        messages: list[dict],
        *,
        reasoning: str | None = None,
        for_reasoning: bool = False,
        max_new_tokens: int = 32,
        n: int = 1,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> list[str]:
        """``n`` continuations: the reasoning itself (``for_reasoning``) or an answer."""


# --------------------------------------------------------------------------------------------------
# Local Hugging Face causal LM
# --------------------------------------------------------------------------------------------------


class HFBackend(Backend):
    """Any local causal LM with its tokenizer; chat template for chat models, plain text for base.

    Args:
        model: a loaded ``transformers`` causal LM (the probe owns it, so it follows the device).
        tokenizer: its tokenizer.
        label: name in results.
        chat: render with the chat template (needs one) or as plain text.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, label: str, chat: bool) -> None:
        if chat and not getattr(tokenizer, "chat_template", None):
            raise UserFacingError(
                f"model {label!r}: chat: true but its tokenizer has no chat template; set chat: false"
            )
        self.model, self.tokenizer, self.label, self.chat = model, tokenizer, label, chat
        self._cache: dict[str, tuple[torch.Tensor, Any]] = {}
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    def prompt(self, messages: list[dict], reasoning: str | None = None, for_reasoning: bool = False) -> str:
        """The exact text the model continues (recorded per item)."""
        if for_reasoning:
            prefix = "" if self.chat else "Reasoning:"
        elif reasoning is not None:
            prefix = ("" if self.chat else "Reasoning:") + reasoning.rstrip() + "\nAnswer:"
        else:
            prefix = None
        return render_prompt(messages, self.tokenizer, self.chat, prefix)

    def _encode(self, text: str) -> list[int]:
        # the chat template already carries its special tokens; plain text gets the usual BOS (if any)
        return self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"]

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _prefix(self, prompt: str) -> tuple[torch.Tensor, Any]:
        """Token ids of ``prompt`` and a fresh copy of the KV cache of all but its last token.

        The prompt (a few hundred tokens) dominates the cost on CPU; options, the letter and the
        generated answer are a handful of tokens. So the prompt is run once and its cache reused by
        every method that continues it. The last prompt token is left out of the cache so that each
        use still has a token to feed (``generate`` needs at least one uncached input token).
        """
        if prompt not in self._cache:
            ids = torch.tensor([self._encode(prompt)], device=self._device)
            if ids.shape[1] < 2:
                raise UserFacingError(f"prompt too short to score ({ids.shape[1]} tokens): {prompt!r}")
            out = self.model(input_ids=ids[:, :-1], use_cache=True, logits_to_keep=1)
            if len(self._cache) >= 4:  # trials come one after another: keep only the latest few
                self._cache.pop(next(iter(self._cache)))
            self._cache[prompt] = (ids, out.cache)
        ids, past = self._cache[prompt]
        return ids, copy.deepcopy(past)

    @torch.no_grad()
    def option_logprobs(
        self, messages: list[dict], options: list[str], reasoning: str | None = None
    ) -> np.ndarray:
        prompt = self.prompt(messages, reasoning)
        sep = "" if prompt.endswith((" ", "\n")) or not prompt else " "
        ids, past = self._prefix(prompt)
        tails = [self.tokenizer(sep + o, add_special_tokens=False)["input_ids"] for o in options]
        if any(not t for t in tails):
            raise UserFacingError(f"an option tokenises to nothing: {options}")
        width = 1 + max(len(t) for t in tails)
        batch = torch.full((len(options), width), self.tokenizer.pad_token_id, dtype=torch.long)
        for i, t in enumerate(tails):
            batch[i, : 1 + len(t)] = torch.tensor([int(ids[0, -1])] + t)
        # Padding sits to the right of every real token, so causal attention never lets a real
        # position see it and no attention mask is needed.
        past.batch_repeat_interleave(len(options))
        logits = self.model(input_ids=batch.to(self._device), cache=past, use_cache=True).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        return np.array(
            [float(logp[i, torch.arange(len(t)), torch.tensor(t)].sum()) for i, t in enumerate(tails)]
        )

    @torch.no_grad()
    def letter_logprobs(
        self, messages: list[dict], letters: list[str], reasoning: str | None = None
    ) -> np.ndarray:
        ids, past = self._prefix(self.prompt(messages, reasoning))
        logits = self.model(input_ids=ids[:, -1:], cache=past, use_cache=True).logits
        logp = torch.log_softmax(logits[0, -1].float(), dim=-1)
        out = []
        for letter in letters:
            # "A" and " A" are different tokens; either spelling of the letter counts as choosing it
            variants = {
                self.tokenizer(v, add_special_tokens=False)["input_ids"][0] for v in (letter, " " + letter)
            }
            out.append(float(torch.logsumexp(logp[list(variants)], dim=0)))
        return np.array(out)

    @torch.no_grad()
    def generate(
        self,
        messages: list[dict],
        *,
        reasoning: str | None = None,
        for_reasoning: bool = False,
        max_new_tokens: int = 32,
        n: int = 1,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> list[str]:
        ids, past = self._prefix(self.prompt(messages, reasoning, for_reasoning))
        sample = temperature > 0
        if n > 1 and not sample:
            raise UserFacingError("n > 1 greedy generations would all be identical; set temperature > 0")
        kwargs: dict[str, Any] = {"do_sample": sample, "max_new_tokens": max_new_tokens}
        kwargs |= (
            {"temperature": temperature, "top_k": 0, "top_p": 1.0}
            if sample
            else {"temperature": None, "top_k": None, "top_p": None}
        )
        if n > 1:
            ids = ids.repeat(n, 1)
            past.batch_repeat_interleave(n)
        with torch.random.fork_rng(devices=[] if ids.device.type == "cpu" else [ids.device]):
            torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                cache=past,
                pad_token_id=self.tokenizer.pad_token_id,
                **kwargs,
            )
        return [self.tokenizer.decode(o[ids.shape[1] :], skip_special_tokens=True) for o in out]


# --------------------------------------------------------------------------------------------------
# OpenAI-compatible chat-completions API
# --------------------------------------------------------------------------------------------------


class ResponseCache:
    """One JSON file per request under ``root``, written atomically with a checksum of the reply.

    A file whose checksum does not match (a torn copy, a hand edit) is treated as a miss and
    refetched, never trusted.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @staticmethod
    def key(payload: dict) -> str:
        """sha256 of the canonical JSON of the request (URL, model, messages, sampling settings)."""
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            entry = json.loads(p.read_text())
            body = json.dumps(entry["response"], sort_keys=True)
            if hashlib.sha256(body.encode()).hexdigest() != entry["sha256"]:
                return None
            return entry["response"]
        except (ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, response: dict) -> None:
        body = json.dumps(response, sort_keys=True)
        atomic_write_json(
            self.path(key), {"sha256": hashlib.sha256(body.encode()).hexdigest(), "response": response}
        )

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.json")) if self.root.is_dir() else 0


class OpenAIChatBackend(Backend):
    """An OpenAI-compatible ``/chat/completions`` endpoint (OpenAI, vLLM, llama.cpp server, ...).

    Letters are scored from ``top_logprobs`` of the first answer token (servers without logprobs
    fall back to the letter the reply starts with); free text is generated and parsed by the probe.
    Option log-likelihoods are not available through chat completions.

    Args:
        model: model name sent to the server.
        base_url: e.g. ``https://api.openai.com/v1``; default from ``$OPENAI_BASE_URL``.
        api_key: the key itself; default from the environment variable ``api_key_env``. Never cached
            or logged. A local server may need none.
        api_key_env: environment variable holding the key.
        label: name in results (default: ``model``).
        timeout_s: per-request timeout.
        max_retries: extra attempts after a timeout, connection error, 429/5xx or malformed reply
            (urllib3's ``Retry``: a ``Retry-After`` header sets the wait).
        backoff_s: backoff factor: the n-th retry waits ``backoff_s * 2**(n-1)`` plus up to ``backoff_s``
            of random jitter.
        cache_dir: response cache folder (default ``$XDG_CACHE_HOME/lumenlm/honesty_http``).
        top_logprobs: how many alternatives to ask for when scoring letters.
    """

    supports_option_logprobs = False

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        label: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        cache_dir: str | os.PathLike | None = None,
        top_logprobs: int = 20,
    ) -> None:
        base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        if not base_url:
            raise UserFacingError(
                "OpenAI backend needs base_url (config) or $OPENAI_BASE_URL, e.g. https://api.openai.com/v1"
            )
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.label, self.chat = model, label or model, True
        self._api_key = api_key or os.environ.get(api_key_env)
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        self.top_logprobs = top_logprobs
        self.cache = ResponseCache(cache_dir or cache_root() / "honesty_http")
        self.n_requests = 0  # requests that reached the network (cache misses)
        self._pool = urllib3.PoolManager()

    # ---- transport -------------------------------------------------------------------------------

    def complete(self, payload: dict) -> dict:
        """POST ``payload`` (plus the model name); cached, retried, validated."""
        payload = {"model": self.model, **payload}
        key = ResponseCache.key({"url": self.url, **payload})
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        # urllib3 retries timeouts, connection errors and 429/5xx with exponential backoff plus jitter,
        # waiting as long as a Retry-After header asks; a malformed 200 reply spends the same budget.
        retry = Retry(
            total=self.max_retries,
            backoff_factor=self.backoff_s,
            backoff_jitter=self.backoff_s,
            status_forcelist=RETRY_STATUSES,
            allowed_methods=None,  # POST too: a chat completion has no side effect worth protecting
            respect_retry_after_header=True,
            raise_on_status=False,
        )
        attempts = f"failed after {self.max_retries + 1} attempts"
        while True:
            self.n_requests += 1
            try:
                resp = self._pool.request(
                    "POST", self.url, body=body, headers=headers, timeout=Timeout(total=self.timeout_s), retries=retry
                )
            except urllib3.exceptions.MaxRetryError as err:
                raise BackendError(f"POST {self.url} {attempts}: {self._reason(err.reason)}. {_ADVICE}") from None
            except urllib3.exceptions.HTTPError as err:
                raise BackendError(f"POST {self.url} {attempts}: {self._reason(err)}. {_ADVICE}") from None
            detail = f"HTTP {resp.status}: {resp.data[:300].decode(errors='replace')}"
            if resp.status in RETRY_STATUSES:  # retries used up on a busy or failing server
                raise BackendError(f"POST {self.url} {attempts}: {detail}. {_ADVICE}")
            if resp.status >= 400:
                raise BackendError(f"{self.url} refused the request ({detail}); check model name, key and payload")
            try:
                reply = json.loads(resp.data)
                _validate_reply(reply)
            except ValueError as err:
                problem = f"malformed reply ({err}); body starts {resp.data[:120]!r}"
                try:
                    retry = (resp.retries or retry).increment("POST", self.url, error=_MalformedReply(problem))
                except urllib3.exceptions.MaxRetryError:
                    raise BackendError(f"POST {self.url} {attempts}: {problem}. {_ADVICE}") from None
                retry.sleep()
                continue
            self.cache.put(key, reply)
            return reply

    def _reason(self, error: BaseException | None) -> str:
        if isinstance(error, urllib3.exceptions.TimeoutError):
            return f"timed out after {self.timeout_s} s"
        return repr(error)

    # ---- Backend ---------------------------------------------------------------------------------

    def _messages(self, messages: list[dict], reasoning: str | None) -> list[dict]:
        if reasoning is None:
            return list(messages)
        return [
            *messages,
            {"role": "assistant", "content": reasoning},
            {"role": "user", "content": FOLLOWUP_AFTER_REASONING},
        ]

    def option_logprobs(
        self, messages: list[dict], options: list[str], reasoning: str | None = None
    ) -> np.ndarray:
        raise BackendError(
            f"{self.label}: a chat-completions API cannot score given option text; use method 'letter' or 'generate'"
        )

    def letter_logprobs(
        self, messages: list[dict], letters: list[str], reasoning: str | None = None
    ) -> np.ndarray:
        reply = self.complete(
            {
                "messages": self._messages(messages, reasoning),
                "max_tokens": 1,
                "temperature": 0,
                "logprobs": True,
                "top_logprobs": self.top_logprobs,
            }
        )
        choice = reply["choices"][0]
        out = np.full(len(letters), -math.inf)
        content = (choice.get("logprobs") or {}).get("content") or []
        if content:
            for alt in content[0].get("top_logprobs") or []:
                tok = str(alt.get("token", "")).strip().upper()
                if tok in letters:
                    out[letters.index(tok)] = np.logaddexp(out[letters.index(tok)], float(alt["logprob"]))
        if np.isneginf(out).all():  # no logprobs from this server: take the letter it wrote
            text = (choice["message"].get("content") or "").strip().upper()
            if text[:1] in letters:
                out[letters.index(text[:1])] = 0.0
        return out

    def generate(
        self,
        messages: list[dict],
        *,
        reasoning: str | None = None,
        for_reasoning: bool = False,
        max_new_tokens: int = 32,
        n: int = 1,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> list[str]:
        reply = self.complete(
            {
                "messages": self._messages(messages, reasoning),
                "max_tokens": max_new_tokens,
                "temperature": temperature,
                "n": n,
                "seed": seed,
            }
        )
        return [c["message"].get("content") or "" for c in reply["choices"]]


def _validate_reply(reply: Any) -> None:
    """Raise ValueError unless ``reply`` looks like a chat-completions response."""
    if not isinstance(reply, dict) or not isinstance(reply.get("choices"), list) or not reply["choices"]:
        raise UserFacingError("no 'choices' list")
    for c in reply["choices"]:
        if not isinstance(c, dict) or not isinstance(c.get("message"), dict):
            raise UserFacingError("a choice has no 'message' object")
