"""OpenAI's request bodies (the fields we serve, with OpenAI's names and defaults) and the
translation of our protos into OpenAI's response objects. No I/O here.

Unknown fields are refused (400 naming the field), and so are known fields we cannot honour
(penalties other than 0, tools, multimodal content): silently ignoring them would hand back
tokens the caller did not ask for.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mintmesh.v1 import common_pb2

MAX_TOP_LOGPROBS = 20
FINISH = {
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_CANCELLED: "stop",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


def _zero_penalty(v: float | None, info) -> float | None:
    if v not in (None, 0, 0.0):
        raise ValueError(f"{info.field_name} other than 0 is not supported by this server")
    return v


class _Sampling(_Strict):
    model: str
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1)] = 1
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # An end-user id (OpenAI: for abuse monitoring); accepted, not used.
    user: str | None = None
    # Extensions the serving peers (vLLM, SGLang) accept too.
    top_k: Annotated[int, Field(ge=0)] | None = None
    ignore_eos: bool = False

    _penalties = field_validator("presence_penalty", "frequency_penalty")(_zero_penalty)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("a stop sequence is empty")
        return stops

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("model is empty: give the base model's id or an adapter ref")
        return v.strip()


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt is an empty list")
        return v

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None


# -- responses -----------------------------------------------------------------------------------


def token_bytes(piece: str) -> list[int]:
    """The bytes of a token string as TokenPieces writes it ("bytes:\\xNN..." or its text)."""
    if piece.startswith("bytes:\\x"):
        hexes = piece[len("bytes:") :].split("\\x")[1:]
        try:
            return [int(h, 16) for h in hexes]
        except ValueError:
            pass
    return list(piece.encode("utf-8"))


def _finite(x: float) -> float:
    # JSON has no -inf: OpenAI's convention for an impossible token is -9999.0.
    return x if math.isfinite(x) else -9999.0


def completion_logprobs(
    tokens: list[str],
    logprobs: list[float | None],
    tops: list[list[tuple[str, float]] | None] | None,
    start_offset: int = 0,
) -> dict[str, Any]:
    """OpenAI's legacy completions logprobs object."""
    offsets, off = [], start_offset
    for t in tokens:
        offsets.append(off)
        off += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [None if lp is None else _finite(lp) for lp in logprobs],
        "top_logprobs": None
        if tops is None
        else [None if t is None else {s: _finite(lp) for s, lp in t} for t in tops],
        "text_offset": offsets,
    }


def chat_logprobs(
    tokens: list[str], logprobs: list[float], tops: list[list[tuple[str, float]]] | None
) -> list[dict[str, Any]]:
    """OpenAI's chat logprobs.content entries."""
    out = []
    for i, (t, lp) in enumerate(zip(tokens, logprobs, strict=True)):
        alts = tops[i] if tops else []
        out.append(
            {
                "token": t,
                "logprob": _finite(lp),
                "bytes": token_bytes(t),
                "top_logprobs": [
                    {"token": s, "logprob": _finite(v), "bytes": token_bytes(s)} for s, v in alts
                ],
            }
        )
    return out


def top_pairs(chunk_tops) -> list[list[tuple[str, float]]]:
    return [list(zip(t.tokens, t.logprobs, strict=True)) for t in chunk_tops]
