"""Per-request sampling: options, token choice (greedy, temperature, top-k, top-p with a
per-request generator) and incremental detokenization with stop strings."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mintmesh.errors import InvalidArgument
from mintmesh.model import _bytes_to_unicode


@dataclass(frozen=True)
class SamplingOptions:
    """Per-request sampling. temperature 0 = greedy; top_p 1 and top_k 0 = no filtering."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool = False
    ignore_eos: bool = False
    # With logprobs: the most likely tokens at each position too.
    top_logprobs: int = 0

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise InvalidArgument(f"max_tokens={self.max_tokens} must be >= 1")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument(f"temperature={self.temperature} must be a number >= 0")
        if not (0 < self.top_p <= 1):
            raise InvalidArgument(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k={self.top_k} must be >= 0")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise InvalidArgument(f"seed={self.seed} must be in [0, 2**64)")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidArgument(
                f"top_logprobs={self.top_logprobs} must be in [0, {MAX_TOP_LOGPROBS}]"
            )
        if self.top_logprobs and not self.logprobs:
            raise InvalidArgument("top_logprobs needs logprobs")


# OpenAI's bound on alternatives per position.
MAX_TOP_LOGPROBS = 20


# The byte-level BPE alphabet (GPT-2's), char -> byte.
_BYTE_LEVEL = {c: b for b, c in _bytes_to_unicode().items()}


class TokenPieces:
    """Each token's own text, as OpenAI's logprobs write it: the decoded string, or, for a token
    that is a piece of a UTF-8 sequence, "bytes:\\xNN..." of its bytes. Cached per id."""

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._piece(token_id)
        return hit

    def _piece(self, token_id: int) -> str:
        text = self._tok.decode([token_id], skip_special_tokens=False)
        if "\ufffd" not in text:
            return text
        raw = self._tok.convert_ids_to_tokens(token_id)
        if not isinstance(raw, str) or any(c not in _BYTE_LEVEL for c in raw):
            return text  # not a byte-level token: its decoded text is the best there is
        data = bytes(_BYTE_LEVEL[c] for c in raw)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


class IncrementalText:
    """Detokenize a growing token sequence: emit only complete UTF-8 text, and hold back text
    that may be the start of a stop string (the stop string itself is never emitted)."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self._tok = tokenizer
        self._stop = [s for s in stop if s]
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._held = ""

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> tuple[str, bool]:
        """(text to emit, whether a stop string ended the text)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        delta = ""
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)
        return self._filter(delta, final=False)

    def flush(self) -> str:
        """The rest of the text at the end of a generation (incomplete UTF-8 included)."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        delta = new_text[len(prefix_text) :]
        self._prefix = self._read = len(self._ids)
        return self._filter(delta, final=True)[0]

    def _filter(self, delta: str, *, final: bool) -> tuple[str, bool]:
        text = self._held + delta
        self._held = ""
        if not self._stop:
            return text, False
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if hits:
            return text[: min(hits)], True
        if final:
            return text, False
        hold = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        if hold:
            self._held = text[-hold:]
            text = text[:-hold]
        return text, False


def sample_token(
    logits: torch.Tensor, opts: SamplingOptions, generator: torch.Generator | None
) -> int:
    """One token from logits [vocab] under opts: greedy, or temperature + top-k + top-p."""
    if opts.temperature == 0:
        return int(torch.argmax(logits))
    scores = logits.float() / opts.temperature
    if 0 < opts.top_k < scores.numel():
        kth = torch.topk(scores, opts.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if opts.top_p < 1:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        cum = torch.cumsum(probs, dim=-1)
        # Drop a token when the tokens before it already reach top_p (keep at least one).
        drop = (cum - probs) >= opts.top_p
        drop[0] = False
        scores = scores.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
