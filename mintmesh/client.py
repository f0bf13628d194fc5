"""A thin typed client over the mintmesh.v1 stubs, for other services, the CLI and the tests.

One address (the router's) serves both mintmesh.v1.Router and mintmesh.v1.AdapterStore. Every
call carries a deadline; idempotent unary calls are retried with backoff on UNAVAILABLE.
Failures raise grpc.RpcError unchanged (code(), details()), so callers see the real status.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from mintmesh.peft_io import read_peft_dir
from mintmesh.v1 import common_pb2, router_pb2, router_pb2_grpc, store_pb2, store_pb2_grpc

logger = logging.getLogger(__name__)
CHUNK_BYTES = 64 * 1024
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


@dataclass
class GenerateResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    adapter: str
    digest: str
    executor: str
    logprobs: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_json(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "adapter": self.adapter,
            "digest": self.digest,
            "executor": self.executor,
            "logprobs": self.logprobs,
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
            },
        }


def sampling_params(
    *,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    logprobs: bool = False,
    ignore_eos: bool = False,
) -> common_pb2.SamplingParams:
    sp = common_pb2.SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop=stop or [],
        stop_token_ids=stop_token_ids or [],
        logprobs=logprobs,
        ignore_eos=ignore_eos,
    )
    if seed is not None:
        sp.seed = seed
    return sp


class MintClient:
    """Client of a MinT mesh router (or, for the store methods, of a store directly)."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        channel: grpc.Channel | None = None,
        metadata: list[tuple[str, str]] | None = None,
    ):
        self.address = address
        self.timeout = timeout
        self.retries = retries
        self.metadata = list(metadata or [])
        self._own_channel = channel is None
        self.channel = channel or grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_receive_message_length", 4 * 1024 * 1024),
                ("grpc.max_send_message_length", 4 * 1024 * 1024),
            ],
        )
        self.store = store_pb2_grpc.AdapterStoreStub(self.channel)
        self.router = router_pb2_grpc.RouterStub(self.channel)

    def close(self) -> None:
        if self._own_channel:
            self.channel.close()

    def __enter__(self) -> MintClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _unary(self, fn, request, timeout: float | None = None):
        delay = 0.1
        for attempt in range(self.retries + 1):
            try:
                return fn(request, timeout=timeout or self.timeout, metadata=self.metadata)
            except grpc.RpcError as err:
                if err.code() not in RETRYABLE or attempt == self.retries:
                    raise
                logger.info("retrying after %s: %s", err.code().name, err.details())
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    def wait_ready(self, timeout: float = 30.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    # -- store ------------------------------------------------------------------------------

    def push_adapter_bytes(
        self,
        name: str,
        config_json: str,
        weights: bytes,
        *,
        labels: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> common_pb2.AdapterRevision:
        header = store_pb2.PushHeader(
            name=name,
            adapter_config_json=config_json,
            sha256=hashlib.sha256(weights).hexdigest(),
            size_bytes=len(weights),
            labels=labels or {},
        )

        def requests():
            yield store_pb2.PushAdapterRequest(header=header)
            for i in range(0, len(weights), CHUNK_BYTES):
                yield store_pb2.PushAdapterRequest(chunk=weights[i : i + CHUNK_BYTES])

        resp = self.store.PushAdapter(
            requests(), timeout=timeout or self.timeout, metadata=self.metadata
        )
        return resp.revision

    def push_adapter(
        self, path: Path | str, name: str, *, labels: dict[str, str] | None = None
    ) -> common_pb2.AdapterRevision:
        cfg, weights = read_peft_dir(path)
        return self.push_adapter_bytes(name, cfg, weights, labels=labels)

    def resolve(self, ref: str) -> common_pb2.AdapterRevision:
        return self._unary(
            self.store.ResolveAdapter, store_pb2.ResolveAdapterRequest(ref=ref)
        ).revision

    def fetch(self, *, digest: str = "", ref: str = "") -> bytes:
        parts, header = [], None
        stream = self.store.FetchAdapter(
            store_pb2.FetchAdapterRequest(digest=digest, ref=ref),
            timeout=self.timeout,
            metadata=self.metadata,
        )
        for msg in stream:
            if msg.HasField("header"):
                header = msg.header
            else:
                parts.append(msg.chunk)
        data = b"".join(parts)
        if header is not None and hashlib.sha256(data).hexdigest() != header.digest:
            raise ValueError(f"fetched bytes do not match digest {header.digest}")
        return data

    def list_adapters(
        self, tenant: str = "", *, page_size: int = 100
    ) -> Iterator[store_pb2.AdapterSummary]:
        token = ""
        while True:
            resp = self._unary(
                self.store.ListAdapters,
                store_pb2.ListAdaptersRequest(tenant=tenant, page_size=page_size, page_token=token),
            )
            yield from resp.adapters
            token = resp.next_page_token
            if not token:
                return

    def delete(self, ref: str) -> list[common_pb2.AdapterRevision]:
        return list(
            self._unary(self.store.DeleteAdapter, store_pb2.DeleteAdapterRequest(ref=ref)).deleted
        )

    def base_model(self) -> store_pb2.GetBaseModelResponse:
        return self._unary(self.store.GetBaseModel, store_pb2.GetBaseModelRequest())

    # -- router -----------------------------------------------------------------------------

    def generate_stream(
        self,
        prompt: str = "",
        *,
        adapter: str = "",
        prompt_token_ids: list[int] | None = None,
        sampling: common_pb2.SamplingParams | None = None,
        request_id: str = "",
        timeout: float | None = None,
    ) -> Iterator[common_pb2.GenerationChunk]:
        req = router_pb2.GenerateRequest(
            adapter=adapter,
            prompt=prompt,
            prompt_token_ids=prompt_token_ids or [],
            sampling=sampling or sampling_params(),
            request_id=request_id,
        )
        for resp in self.router.Generate(
            req, timeout=timeout or self.timeout, metadata=self.metadata
        ):
            yield resp.chunk

    def generate(self, prompt: str = "", **kw) -> GenerateResult:
        texts, ids, lps = [], [], []
        res = GenerateResult("", [], "", "", "", "")
        for ch in self.generate_stream(prompt, **kw):
            if ch.HasField("adapter") and ch.adapter.digest:
                res.adapter, res.digest = ch.adapter.ref, ch.adapter.digest
            if ch.executor:
                res.executor = ch.executor
            texts.append(ch.text)
            ids.extend(ch.token_ids)
            lps.extend(ch.logprobs)
            if ch.finish_reason:
                res.finish_reason = common_pb2.FinishReason.Name(ch.finish_reason).removeprefix(
                    "FINISH_REASON_"
                ).lower()
            if ch.HasField("usage"):
                res.prompt_tokens = ch.usage.prompt_tokens
                res.completion_tokens = ch.usage.completion_tokens
        res.text, res.token_ids, res.logprobs = "".join(texts), ids, lps
        return res

    def status(self) -> router_pb2.RouterStatusResponse:
        return self._unary(self.router.Status, router_pb2.RouterStatusRequest())
