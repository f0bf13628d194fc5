"""The HTTP front door: OpenAI's /v1 API over the router's gRPC API (grpc.aio), and nothing more.

Every request is translated into Router.Generate / Router.Score calls (one per prompt and
choice) and the store API the router proxies (models); the caller's `Authorization: Bearer`
key goes along as is, and the router authenticates it. Errors come back in OpenAI's body shape
with the status the router's code maps to. A client that goes away mid-stream cancels its
calls, and so its sequences on the executors. No torch here, no model files, no business rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from google.rpc import error_details_pb2, status_pb2
from opentelemetry import propagate, trace

from mintmesh.services.gateway.config import GatewayConfig, TinkerConfig
from mintmesh.services.gateway.openai_api import (
    FINISH,
    ChatRequest,
    CompletionRequest,
    chat_logprobs,
    completion_logprobs,
    top_pairs,
)
from mintmesh.v1 import common_pb2, router_pb2, router_pb2_grpc, store_pb2, store_pb2_grpc

logger = logging.getLogger(__name__)

# gRPC code -> (HTTP status, OpenAI error type).
_HTTP: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "invalid_request_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _rich(err: grpc.aio.AioRpcError) -> tuple[str, float | None]:
    """(ErrorInfo reason, RetryInfo seconds) from a failed call's trailers."""
    reason, retry = "", None
    for key, value in err.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        st = status_pb2.Status.FromString(value)
        for d in st.details:
            if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                d.Unpack(info)
                reason = info.reason
            elif d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                ri = error_details_pb2.RetryInfo()
                d.Unpack(ri)
                retry = ri.retry_delay.seconds + ri.retry_delay.nanos / 1e9
    return reason, retry


def from_grpc(err: grpc.aio.AioRpcError, *, model_param: bool = False) -> APIError:
    code = err.code()
    status, type_ = _HTTP.get(code, (500, "server_error"))
    reason, retry = _rich(err)
    headers = {}
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        headers["Retry-After"] = str(max(1, math.ceil(retry if retry is not None else 1.0)))
    param = None
    ecode = reason.lower() or code.name.lower()
    if model_param and code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED):
        param = "model"
        if code == grpc.StatusCode.NOT_FOUND:
            ecode = "model_not_found"
    return APIError(
        status, err.details() or code.name, type_, param=param, code=ecode, headers=headers
    )


class Upstream:
    """The router, over one grpc.aio channel (created in the app's event loop)."""

    def __init__(self, address: str):
        self.address = address
        self.channel: grpc.aio.Channel | None = None
        self.router: router_pb2_grpc.RouterStub | None = None
        self.store: store_pb2_grpc.AdapterStoreStub | None = None

    async def open(self) -> None:
        from mintmesh.client import client_tls_credentials

        creds = client_tls_credentials()  # MINT_TLS_CA: the router's client port speaks TLS
        if creds is not None:
            self.channel = grpc.aio.secure_channel(self.address, creds)
        else:
            self.channel = grpc.aio.insecure_channel(self.address)
        self.router = router_pb2_grpc.RouterStub(self.channel)
        self.store = store_pb2_grpc.AdapterStoreStub(self.channel)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close(grace=1.0)


def _metadata(request: Request) -> list[tuple[str, str]]:
    """What goes to the router: the caller's key and the current trace context."""
    md: list[tuple[str, str]] = []
    auth = request.headers.get("authorization")
    if auth:
        md.append(("authorization", auth))
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    md += list(carrier.items())
    return md


@contextlib.contextmanager
def _server_span(request: Request, name: str):
    tracer = trace.get_tracer(__name__)
    ctx = propagate.extract(dict(request.headers))
    with tracer.start_as_current_span(
        name,
        context=ctx,
        kind=trace.SpanKind.SERVER,
        attributes={"http.request.method": request.method, "url.path": request.url.path},
    ) as span:
        yield span


def _event(rid: str, obj: str, created: int, model: str, choices: list, **extra) -> dict:
    """One OpenAI response object (a whole answer, or one streamed chunk)."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices,
            **extra}  # fmt: skip


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class _Choice:
    """One Generate call's output, gathered (non-streaming) or read piece by piece."""

    def __init__(self, index: int, prompt_index: int, call):
        self.index, self.prompt_index, self.call = index, prompt_index, call
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.tokens: list[str] = []
        self.tops: list[list[tuple[str, float]]] = []
        self.finish: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def add(self, chunk: common_pb2.GenerationChunk) -> None:
        self.text.append(chunk.text)
        self.token_ids += chunk.token_ids
        self.logprobs += chunk.logprobs
        self.tokens += chunk.tokens
        self.tops += top_pairs(chunk.top_logprobs)
        if chunk.finish_reason:
            self.finish = FINISH.get(chunk.finish_reason, "stop")
        if chunk.HasField("usage"):
            self.prompt_tokens = chunk.usage.prompt_tokens
            self.completion_tokens = chunk.usage.completion_tokens


async def _next_chunk(call) -> common_pb2.GenerationChunk | None:
    resp = await call.read()
    if resp is grpc.aio.EOF:
        return None
    return resp.chunk


def create_app(
    config: GatewayConfig,
    upstream: Upstream | None = None,
    registry=None,
    tinker: TinkerConfig | None = None,
) -> FastAPI:
    """The app; its Prometheus registry (HTTP counts and latencies by route, method and
    status) is app.state.registry. tinker: the Tinker API's config (None = from
    MINT_GATEWAY_TINKER_* and defaults)."""
    from mintmesh.services.common import metrics

    up = upstream or Upstream(config.router_address)
    registry = registry if registry is not None else metrics.new_registry()
    http_requests, http_latency = metrics.http_metrics(registry)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await up.open()
        try:
            yield
        finally:
            await up.close()

    app = FastAPI(title="MinT mesh OpenAI-compatible gateway", lifespan=lifespan)
    app.state.upstream = up
    app.state.registry = registry

    # A plain ASGI middleware (starlette's BaseHTTPMiddleware re-streams every response body
    # through a memory channel): counts each request when its response ends, by the route's
    # template, method and status.
    inner_app = app.build_middleware_stack

    def build_middleware_stack():
        inner = inner_app()

        async def counted(scope, receive, send):
            if scope["type"] != "http":
                return await inner(scope, receive, send)
            t0 = time.perf_counter()
            status = [500]

            async def send_(msg):
                if msg["type"] == "http.response.start":
                    status[0] = msg["status"]
                await send(msg)

            try:
                await inner(scope, receive, send_)
            finally:
                route = getattr(scope.get("route"), "path", "unmatched")
                http_requests.labels(route, scope["method"], str(status[0])).inc()
                http_latency.labels(route, scope["method"]).observe(time.perf_counter() - t0)

        return counted

    app.build_middleware_stack = build_middleware_stack

    base_cache: dict[str, store_pb2.GetBaseModelResponse] = {}

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        kind = first.get("type", "")
        if kind == "json_invalid":
            msg = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
            param = None
        elif kind == "extra_forbidden":
            msg = f"unknown parameter {param!r}: this server does not accept it"
        elif kind == "missing":
            msg = f"missing required parameter {param!r}"
        else:
            msg = f"invalid value for {param!r}: {first.get('msg', 'invalid')}"
        return APIError(400, msg, param=param, code=kind or None).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        logger.exception("unexpected error serving %s", request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}", "server_error").response()

    async def base_model(md) -> store_pb2.GetBaseModelResponse:
        if "base" not in base_cache:
            try:
                base_cache["base"] = await up.store.GetBaseModel(
                    store_pb2.GetBaseModelRequest(), metadata=md, timeout=10.0
                )
            except grpc.aio.AioRpcError as err:
                raise from_grpc(err) from None
        return base_cache["base"]

    # The Tinker API (/api/v1, the tinker SDK's protocol): services/gateway/tinker_api.py.
    from mintmesh.services.gateway.tinker_api import tinker_router

    app.include_router(
        tinker_router(
            up,
            base_model,
            request_timeout_s=config.request_timeout_s,
            default_max_tokens=config.default_max_tokens,
            config=tinker,
        )
    )

    async def adapter_for(model: str, md) -> str:
        """The adapter ref `model` names; "" for the base model."""
        base = await base_model(md)
        return "" if model == base.name else model

    # -- models ----------------------------------------------------------------------------------

    def _model_obj(mid: str, owner: str, created_ms: int, base: str | None) -> dict:
        return {
            "id": mid,
            "object": "model",
            "created": int(created_ms // 1000),
            "owned_by": owner,
            "root": base or mid,
            "parent": base,
        }

    @app.get("/v1/models")
    async def list_models(request: Request):
        with _server_span(request, "GET /v1/models"):
            md = _metadata(request)
            base = await base_model(md)
            try:
                who = await up.store.Authenticate(
                    store_pb2.AuthenticateRequest(), metadata=md, timeout=10.0
                )
                tenant = "" if who.is_admin else who.tenant
            except grpc.aio.AioRpcError as err:
                raise from_grpc(err) from None
            data = [_model_obj(base.name, "mint", 0, None)]
            token = ""
            while True:
                try:
                    resp = await up.store.ListAdapters(
                        store_pb2.ListAdaptersRequest(
                            tenant=tenant, page_size=500, page_token=token
                        ),
                        metadata=md,
                        timeout=30.0,
                    )
                except grpc.aio.AioRpcError as err:
                    raise from_grpc(err) from None
                for a in resp.adapters:
                    name = f"{a.tenant}/{a.name}"
                    created = a.latest.created_at_unix_ms
                    data.append(_model_obj(name, a.tenant, created, base.name))
                    for alias in sorted(a.aliases):
                        if alias != "latest":
                            data.append(_model_obj(f"{name}@{alias}", a.tenant, created, base.name))
                token = resp.next_page_token
                if not token:
                    break
            return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        with _server_span(request, "GET /v1/models/{model}"):
            md = _metadata(request)
            base = await base_model(md)
            if model_id == base.name:
                return _model_obj(base.name, "mint", 0, None)
            try:
                resp = await up.store.ResolveAdapter(
                    store_pb2.ResolveAdapterRequest(ref=model_id), metadata=md, timeout=10.0
                )
            except grpc.aio.AioRpcError as err:
                raise from_grpc(err, model_param=True) from None
            rev = resp.revision
            return _model_obj(model_id, rev.tenant, rev.created_at_unix_ms, base.name)

    # -- generation ------------------------------------------------------------------------------

    async def start_choices(reqs: list[tuple[int, int, router_pb2.GenerateRequest]], md, t):
        """Start every Generate and wait for each one's first chunk, so that a refusal (unknown
        model, bad key, full queues) is an HTTP status, not an error inside a 200 stream."""
        choices = [_Choice(i, p, up.router.Generate(r, metadata=md, timeout=t)) for i, p, r in reqs]
        try:
            firsts = await asyncio.gather(*(_next_chunk(c.call) for c in choices))
        except grpc.aio.AioRpcError as err:
            for c in choices:
                c.call.cancel()
            raise from_grpc(err, model_param=True) from None
        except BaseException:
            for c in choices:
                c.call.cancel()
            raise
        return choices, firsts

    async def collect(choices, firsts) -> None:
        async def one(c: _Choice, first):
            chunk = first
            while chunk is not None:
                c.add(chunk)
                chunk = await _next_chunk(c.call)

        try:
            await asyncio.gather(*(one(c, f) for c, f in zip(choices, firsts, strict=True)))
        except grpc.aio.AioRpcError as err:
            raise from_grpc(err, model_param=True) from None
        finally:
            for c in choices:
                c.call.cancel()

    async def merged(choices, firsts) -> AsyncIterator[tuple[_Choice, Any]]:
        """(choice, chunk) from every call as they arrive; chunk None = that choice ended."""
        q: asyncio.Queue = asyncio.Queue()

        async def pump(c: _Choice, first):
            try:
                chunk = first
                while chunk is not None:
                    await q.put((c, chunk))
                    chunk = await _next_chunk(c.call)
                await q.put((c, None))
            except BaseException as e:  # handed to the reader, which decides
                await q.put((c, e))

        tasks = [asyncio.ensure_future(pump(c, f)) for c, f in zip(choices, firsts, strict=True)]
        try:
            live = len(choices)
            while live:
                c, item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    live -= 1
                yield c, item
        finally:
            for c in choices:
                c.call.cancel()
            for task in tasks:
                task.cancel()

    def sampling(body, max_tokens: int, choice: int, logprobs: bool, top: int):
        seed = None if body.seed is None else (body.seed + choice) % 2**63
        temperature = 1.0 if body.temperature is None else body.temperature
        return common_pb2.SamplingParams(
            temperature=temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            max_tokens=max_tokens,
            seed=seed,
            stop=body.stop or [],
            logprobs=logprobs,
            top_logprobs=top,
            ignore_eos=body.ignore_eos,
        )

    def check_n(body, prompts: int) -> None:
        if body.n > config.max_choices:
            raise APIError(400, f"n={body.n}; at most {config.max_choices}", param="n")
        if prompts > config.max_prompts:
            raise APIError(400, f"{prompts} prompts; at most {config.max_prompts}", param="prompt")

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        with _server_span(request, "POST /v1/completions") as span:
            md = _metadata(request)
            adapter = await adapter_for(body.model, md)
            span.set_attribute("mint.model", body.model)
            prompts = body.prompts()
            check_n(body, len(prompts))
            if body.max_tokens == 0 and not body.echo:
                raise APIError(400, "max_tokens=0 needs echo=true", param="max_tokens")
            want_lp = body.logprobs is not None
            top = body.logprobs or 0
            rid = f"cmpl-{uuid.uuid4().hex}"
            created = int(time.time())
            t = config.request_timeout_s

            def prompt_fields(p):
                return {"prompt": p} if isinstance(p, str) else {"prompt_token_ids": p}

            echoes: list[common_pb2.ScoreResult | None] = [None] * len(prompts)
            if body.echo:
                try:
                    scored = await asyncio.gather(
                        *(
                            up.router.Score(
                                router_pb2.ScoreRequest(
                                    adapter=adapter, top_logprobs=top, **prompt_fields(p)
                                ),
                                metadata=md,
                                timeout=t,
                            )
                            for p in prompts
                        )
                    )
                except grpc.aio.AioRpcError as err:
                    raise from_grpc(err, model_param=True) from None
                echoes = [s.result for s in scored]

            def echo_text(pi: int) -> str:
                p = prompts[pi]
                return p if isinstance(p, str) else "".join(echoes[pi].tokens)

            def echo_logprobs(pi: int) -> tuple[list, list, list | None]:
                r = echoes[pi]
                lps: list[float | None] = [None, *r.logprobs]
                tops = [None, *top_pairs(r.top_logprobs)] if top else None
                return list(r.tokens), lps, tops

            reqs = []
            if body.max_tokens:
                for pi, p in enumerate(prompts):
                    for j in range(body.n):
                        reqs.append(
                            (
                                pi * body.n + j,
                                pi,
                                router_pb2.GenerateRequest(
                                    adapter=adapter,
                                    sampling=sampling(body, body.max_tokens, j, want_lp, top),
                                    request_id=f"{rid}-{pi * body.n + j}",
                                    **prompt_fields(p),
                                ),
                            )
                        )
            choices, firsts = await start_choices(reqs, md, t) if reqs else ([], [])

            def lp_obj(c: _Choice | None, pi: int):
                """The choice's logprobs object: the echoed prompt's, then c's (None: none)."""
                if not want_lp:
                    return None
                toks, lps, tops = [], [], [] if top else None
                if body.echo:
                    toks, lps, tops = echo_logprobs(pi)
                if c is not None:
                    toks = toks + c.tokens
                    lps = lps + list(c.logprobs)
                    if tops is not None:
                        tops = tops + _with_chosen_all(c.tops, c.tokens, c.logprobs)
                return completion_logprobs(toks, lps, tops)

            def prompt_usage() -> int:
                n = 0
                for pi in range(len(prompts)):
                    if echoes[pi] is not None:
                        n += len(echoes[pi].token_ids)
                    else:
                        c = next(c for c in choices if c.prompt_index == pi)
                        n += c.prompt_tokens
                return n

            if not body.stream:
                await collect(choices, firsts)
                out = []
                if choices:
                    for c in sorted(choices, key=lambda c: c.index):
                        pre = echo_text(c.prompt_index) if body.echo else ""
                        out.append(
                            {
                                "index": c.index,
                                "text": pre + "".join(c.text),
                                "logprobs": lp_obj(c, c.prompt_index),
                                "finish_reason": c.finish,
                            }
                        )
                else:  # echo with max_tokens 0: the prompts alone
                    for pi in range(len(prompts)):
                        for j in range(body.n):
                            out.append(
                                {
                                    "index": pi * body.n + j,
                                    "text": echo_text(pi),
                                    "logprobs": lp_obj(None, pi),
                                    "finish_reason": "length",
                                }
                            )
                done = sum(c.completion_tokens for c in choices)
                return _event(
                    rid,
                    "text_completion",
                    created,
                    body.model,
                    out,
                    usage=usage(prompt_usage(), done),
                )

            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk_obj(index: int, text: str, lp, finish, **extra) -> dict:
                choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}
                return _event(rid, "text_completion", created, body.model, [choice], **extra)

            async def events() -> AsyncIterator[bytes]:
                try:
                    if body.echo:
                        for pi in range(len(prompts)):
                            for j in range(body.n):
                                lp = lp_obj(None, pi)
                                yield _sse(chunk_obj(pi * body.n + j, echo_text(pi), lp, None))
                    async for c, ch in merged(choices, firsts):
                        if ch is None:
                            continue
                        c.add(ch)
                        lp = None
                        if want_lp:
                            tops = None
                            if top:
                                tops = _with_chosen_all(
                                    top_pairs(ch.top_logprobs), ch.tokens, ch.logprobs
                                )
                            lp = completion_logprobs(list(ch.tokens), list(ch.logprobs), tops)
                        finish = FINISH.get(ch.finish_reason) if ch.finish_reason else None
                        yield _sse(chunk_obj(c.index, ch.text, lp, finish))
                    if include_usage:
                        done = sum(c.completion_tokens for c in choices)
                        yield _sse(
                            _event(rid, "text_completion", created, body.model, [],
                                   usage=usage(prompt_usage(), done))
                        )  # fmt: skip
                except grpc.aio.AioRpcError as err:
                    yield _sse(from_grpc(err).body())
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        with _server_span(request, "POST /v1/chat/completions") as span:
            md = _metadata(request)
            adapter = await adapter_for(body.model, md)
            span.set_attribute("mint.model", body.model)
            check_n(body, 1)
            if body.top_logprobs and not body.logprobs:
                raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
            max_tokens = body.max_completion_tokens or body.max_tokens or config.default_max_tokens
            top = body.top_logprobs or 0
            rid = f"chatcmpl-{uuid.uuid4().hex}"
            created = int(time.time())
            messages = [
                common_pb2.ChatMessage(role=m.role, content=m.text()) for m in body.messages
            ]
            reqs = [
                (
                    j,
                    0,
                    router_pb2.GenerateRequest(
                        adapter=adapter,
                        messages=messages,
                        sampling=sampling(body, max_tokens, j, body.logprobs, top),
                        request_id=f"{rid}-{j}",
                    ),
                )
                for j in range(body.n)
            ]
            choices, firsts = await start_choices(reqs, md, config.request_timeout_s)

            if not body.stream:
                await collect(choices, firsts)
                out = []
                for c in choices:
                    out.append(
                        {
                            "index": c.index,
                            "message": {"role": "assistant", "content": "".join(c.text)},
                            "logprobs": {
                                "content": chat_logprobs(
                                    c.tokens, c.logprobs, c.tops if top else None
                                ),
                                "refusal": None,
                            }
                            if body.logprobs
                            else None,
                            "finish_reason": c.finish,
                        }
                    )
                done = sum(c.completion_tokens for c in choices)
                return _event(
                    rid,
                    "chat.completion",
                    created,
                    body.model,
                    out,
                    usage=usage(choices[0].prompt_tokens, done),
                )

            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk_obj(index: int, delta: dict, lp, finish) -> dict:
                choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
                return _event(rid, "chat.completion.chunk", created, body.model, [choice])

            async def events() -> AsyncIterator[bytes]:
                try:
                    for c in choices:
                        yield _sse(
                            chunk_obj(c.index, {"role": "assistant", "content": ""}, None, None)
                        )
                    async for c, ch in merged(choices, firsts):
                        if ch is None:
                            continue
                        c.add(ch)
                        lp = None
                        if body.logprobs:
                            tops = top_pairs(ch.top_logprobs) if top else None
                            lp = {
                                "content": chat_logprobs(list(ch.tokens), list(ch.logprobs), tops),
                                "refusal": None,
                            }
                        finish = FINISH.get(ch.finish_reason) if ch.finish_reason else None
                        delta = {"content": ch.text} if ch.text or not finish else {}
                        yield _sse(chunk_obj(c.index, delta, lp, finish))
                    if include_usage:
                        done = sum(c.completion_tokens for c in choices)
                        yield _sse(
                            _event(rid, "chat.completion.chunk", created, body.model, [],
                                   usage=usage(choices[0].prompt_tokens, done))
                        )  # fmt: skip
                except grpc.aio.AioRpcError as err:
                    yield _sse(from_grpc(err).body())
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app


def _with_chosen(alts: list[tuple[str, float]], token: str, lp: float) -> list[tuple[str, float]]:
    """OpenAI's completions top_logprobs always hold the sampled token (up to logprobs+1)."""
    if any(s == token for s, _ in alts):
        return alts
    return [*alts, (token, lp)]


def _with_chosen_all(tops, tokens, logprobs) -> list[list[tuple[str, float]]]:
    return [_with_chosen(a, t, lp) for a, t, lp in zip(tops, tokens, logprobs, strict=True)]
