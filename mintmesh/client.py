"""A thin typed client over the mintmesh.v1 stubs, for other services, the CLI and the tests.

One address (the router's) serves both mintmesh.v1.Router and mintmesh.v1.AdapterStore. Every
call carries a deadline; idempotent unary calls are retried with backoff on UNAVAILABLE.
Failures raise grpc.RpcError unchanged (code(), details()), so callers see the real status. An
API key or metadata value that gRPC could not send raises InvalidApiKey / InvalidMetadata
(ValueErrors) when the client is made, before anything is sent.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from mintmesh.v1 import (
    common_pb2,
    router_pb2,
    router_pb2_grpc,
    store_pb2,
    store_pb2_grpc,
    training_pb2,
)
from mintmesh.wire import STORAGE_TO_PROTO

logger = logging.getLogger(__name__)
CHUNK_BYTES = 64 * 1024


def push_requests(header: store_pb2.PushHeader, weights: bytes, state: bytes = b""):
    """The PushAdapter stream of one adapter: its header, then its bytes (and its training
    state's, if any) in chunks."""
    yield store_pb2.PushAdapterRequest(header=header)
    for data in (weights, state):
        for i in range(0, len(data), CHUNK_BYTES):
            yield store_pb2.PushAdapterRequest(chunk=data[i : i + CHUNK_BYTES])


def fetched_bytes(stream) -> bytes:
    """The bytes of a FetchAdapter stream (its header, then chunks), checked against the
    header's digest (ValueError if they differ; the router uses it too)."""
    parts, header = [], None
    for msg in stream:
        if msg.HasField("header"):
            header = msg.header
        else:
            parts.append(msg.chunk)
    data = b"".join(parts)
    if header is None or hashlib.sha256(data).hexdigest() != header.digest:
        raise ValueError(f"fetched bytes do not match digest {header.digest if header else '?'}")
    return data


def push_header(
    name: str,
    config_json: str,
    weights: bytes,
    labels: dict[str, str] | None = None,
    storage_format: str = "",
    source: str = "",
    parents: list[str] | None = None,
    data_digest: str = "",
    state: bytes = b"",
) -> store_pb2.PushHeader:
    """The header of one push (the router uses it too, to save a training run, with its
    training state)."""
    return store_pb2.PushHeader(
        state_sha256=hashlib.sha256(state).hexdigest() if state else "",
        state_size_bytes=len(state),
        name=name,
        adapter_config_json=config_json,
        sha256=hashlib.sha256(weights).hexdigest(),
        size_bytes=len(weights),
        labels=labels or {},
        storage_format=storage_enum(storage_format),
        source=SOURCES[source] if source else 0,
        parents=parents or [],
        data_digest=data_digest,
    )


RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)
SOURCES = {
    "upload": common_pb2.REVISION_SOURCE_UPLOAD,
    "training": common_pb2.REVISION_SOURCE_TRAINING,
}
GATE_DIRECTIONS = {
    "at_least": store_pb2.GATE_DIRECTION_AT_LEAST,
    ">=": store_pb2.GATE_DIRECTION_AT_LEAST,
    "at_most": store_pb2.GATE_DIRECTION_AT_MOST,
    "<=": store_pb2.GATE_DIRECTION_AT_MOST,
}


class InvalidMetadata(ValueError):
    """A metadata (header) value gRPC cannot send: only printable ASCII (space to '~') may go
    in a text header. `reason` is the message without the name of the value."""

    def __init__(self, what: str, reason: str):
        self.what, self.reason = what, reason
        super().__init__(f"{what} {reason}")


class InvalidApiKey(InvalidMetadata):
    """An API key that cannot travel in the authorization header."""


def header_value_problem(value: str) -> str:
    """Why value cannot be a gRPC text header value ("" when it can)."""
    for i, ch in enumerate(value):
        if not " " <= ch <= "~":
            return (
                f"has {ch!r} at position {i}: only printable ASCII (space to '~') can be sent "
                "as a gRPC header value"
            )
    return ""


def check_api_key(api_key: str, what: str = "api_key") -> None:
    """Raise InvalidApiKey (naming `what`, e.g. "MINT_API_KEY") unless api_key can be sent."""
    problem = header_value_problem(api_key)
    if problem:
        raise InvalidApiKey(what, f"is not a usable API key: it {problem}")


def storage_enum(name: str | None) -> int:
    """ "bf16", "int8", ... -> common_pb2.StorageFormat ("" or None = UNSPECIFIED)."""
    if not name:
        return 0
    from mintmesh.packed import storage_format  # torch: imported when needed (CLI start-up)

    return STORAGE_TO_PROTO[storage_format(name)]


@dataclass
class AdapterRevisions:
    """Every revision of one adapter (oldest first), its aliases and gates."""

    revisions: list[common_pb2.AdapterRevision]
    aliases: dict[str, int]
    gates: list[store_pb2.AliasGate]


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


def client_tls_credentials(tls_ca: str | None = None) -> grpc.ChannelCredentials | None:
    """TLS credentials for a router's (or gateway's) client port: tls_ca, else env MINT_TLS_CA,
    a CA certificate file ("system": the system's roots); None = plaintext."""
    import os

    ca = tls_ca if tls_ca is not None else os.environ.get("MINT_TLS_CA", "")
    if not ca:
        return None
    if ca == "system":
        return grpc.ssl_channel_credentials()
    try:
        with open(ca, "rb") as f:
            return grpc.ssl_channel_credentials(root_certificates=f.read())
    except OSError as e:
        raise ValueError(f"cannot read the TLS CA file {ca!r} (MINT_TLS_CA): {e}") from None


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
        api_key: str | None = None,
        channel_options: list[tuple[str, int | str]] | None = None,
        tls_ca: str | None = None,
    ):
        """api_key: sent as "authorization: Bearer <key>" on every call (the CLI passes env
        MINT_API_KEY). A key or metadata value gRPC cannot send raises InvalidApiKey /
        InvalidMetadata here, before a channel exists. channel_options: extra gRPC channel
        arguments (e.g. reconnect backoff) for the channel made here. tls_ca: the router's
        client port speaks TLS; a CA file to trust ("system": the system's roots; default: env
        MINT_TLS_CA, else plaintext)."""
        self.address = address
        self.timeout = timeout
        self.retries = retries
        self.metadata = list(metadata or [])
        for key, value in self.metadata:
            text = isinstance(value, str) and not key.endswith("-bin")
            problem = header_value_problem(value) if text else ""
            if problem:
                raise InvalidMetadata(f"metadata {key!r}", f"value {problem}")
        if api_key:
            check_api_key(api_key)
            self.metadata.append(("authorization", f"Bearer {api_key}"))
        self._own_channel = channel is None
        options = [
            ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            ("grpc.max_send_message_length", 4 * 1024 * 1024),
            *(channel_options or []),
        ]
        creds = client_tls_credentials(tls_ca)
        if channel is not None:
            self.channel = channel
        elif creds is not None:
            self.channel = grpc.secure_channel(address, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.store = store_pb2_grpc.AdapterStoreStub(self.channel)
        self.router = router_pb2_grpc.RouterStub(self.channel)

    def close(self) -> None:
        if self._own_channel:
            self.channel.close()

    def __enter__(self) -> MintClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _unary(self, fn, request, timeout: float | None = None, *, retry: bool = True):
        """One unary call; retry=False for calls that are not idempotent (merge, new keys)."""
        delay = 0.1
        retries = self.retries if retry else 0
        for attempt in range(retries + 1):
            try:
                return fn(request, timeout=timeout or self.timeout, metadata=self.metadata)
            except grpc.RpcError as err:
                if err.code() not in RETRYABLE or attempt == retries:
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
        storage_format: str = "",
        source: str = "",
        parents: list[str] | None = None,
        data_digest: str = "",
    ) -> common_pb2.AdapterRevision:
        """Push one adapter; storage_format fp32|bf16|fp16|int8 ("" keeps the upload's dtype),
        source "upload" or "training", parents/data_digest: provenance."""
        header = push_header(
            name, config_json, weights, labels, storage_format, source, parents, data_digest
        )
        resp = self.store.PushAdapter(
            push_requests(header, weights), timeout=timeout or self.timeout, metadata=self.metadata
        )
        return resp.revision

    def push_adapter(
        self,
        path: Path | str,
        name: str,
        *,
        labels: dict[str, str] | None = None,
        storage_format: str = "",
    ) -> common_pb2.AdapterRevision:
        from mintmesh.peft_io import read_peft_dir  # torch, as above

        cfg, weights = read_peft_dir(path)
        return self.push_adapter_bytes(
            name, cfg, weights, labels=labels, storage_format=storage_format
        )

    def push_many(
        self,
        items: Iterable[tuple[str, str, bytes]],
        *,
        labels: dict[str, str] | None = None,
        storage_format: str = "",
        timeout: float | None = None,
    ) -> Iterator[store_pb2.PushResult]:
        """Push (name, adapter_config_json, safetensors bytes) items in one PushAdapters
        stream (group commit on the store; small adapters travel several to a message);
        yields one result per item (revision or error, with the item's index) as groups
        commit. timeout covers the whole stream."""

        def requests():
            batch: list[store_pb2.InlineAdapter] = []
            size = 0
            for name, cfg, weights in items:
                header = push_header(name, cfg, weights, labels, storage_format)
                if len(weights) > CHUNK_BYTES // 4:
                    if batch:
                        yield store_pb2.PushAdaptersRequest(
                            inline=store_pb2.InlineAdapters(adapters=batch)
                        )
                        batch, size = [], 0
                    yield store_pb2.PushAdaptersRequest(header=header)
                    for i in range(0, len(weights), CHUNK_BYTES):
                        yield store_pb2.PushAdaptersRequest(chunk=weights[i : i + CHUNK_BYTES])
                    continue
                if size + len(weights) > CHUNK_BYTES:
                    yield store_pb2.PushAdaptersRequest(
                        inline=store_pb2.InlineAdapters(adapters=batch)
                    )
                    batch, size = [], 0
                batch.append(store_pb2.InlineAdapter(header=header, data=weights))
                size += len(weights)
            if batch:
                yield store_pb2.PushAdaptersRequest(inline=store_pb2.InlineAdapters(adapters=batch))

        for resp in self.store.PushAdapters(
            requests(), timeout=timeout or self.timeout, metadata=self.metadata
        ):
            yield from resp.results

    def resolve(self, ref: str) -> common_pb2.AdapterRevision:
        return self._unary(
            self.store.ResolveAdapter, store_pb2.ResolveAdapterRequest(ref=ref)
        ).revision

    def fetch(self, *, digest: str = "", ref: str = "", state: bool = False) -> bytes:
        """A revision's packed bytes (by digest or ref), or with state its training state."""
        stream = self.store.FetchAdapter(
            store_pb2.FetchAdapterRequest(digest=digest, ref=ref, state=state),
            timeout=self.timeout,
            metadata=self.metadata,
        )
        return fetched_bytes(stream)

    def list_adapters(
        self, tenant: str = "", *, page_size: int = 100, name_prefix: str = "", label: str = ""
    ) -> Iterator[store_pb2.AdapterSummary]:
        token = ""
        while True:
            resp = self._unary(
                self.store.ListAdapters,
                store_pb2.ListAdaptersRequest(
                    tenant=tenant,
                    page_size=page_size,
                    page_token=token,
                    name_prefix=name_prefix,
                    label=label,
                ),
            )
            yield from resp.adapters
            token = resp.next_page_token
            if not token:
                return

    def delete(self, ref: str) -> list[common_pb2.AdapterRevision]:
        return list(
            self._unary(self.store.DeleteAdapter, store_pb2.DeleteAdapterRequest(ref=ref)).deleted
        )

    def delete_adapter(self, ref: str) -> store_pb2.DeleteAdapterResponse:
        """Like delete, with the digests whose blobs went (deleted_digests)."""
        return self._unary(self.store.DeleteAdapter, store_pb2.DeleteAdapterRequest(ref=ref))

    def base_model(self) -> store_pb2.GetBaseModelResponse:
        return self._unary(self.store.GetBaseModel, store_pb2.GetBaseModelRequest())

    # -- lifecycle --------------------------------------------------------------------------

    def revisions(
        self, name: str, *, label: str = "", state: int = 0, page_size: int = 100
    ) -> AdapterRevisions:
        """Every revision of name (all pages), with its aliases and gates."""
        out = AdapterRevisions([], {}, [])
        token = ""
        while True:
            resp = self._unary(
                self.store.ListRevisions,
                store_pb2.ListRevisionsRequest(
                    name=name, page_size=page_size, page_token=token, label=label, state=state
                ),
            )
            out.revisions.extend(resp.revisions)
            out.aliases, out.gates = dict(resp.aliases), list(resp.gates)
            token = resp.next_page_token
            if not token:
                return out

    def set_alias(self, name: str, alias: str, revision: int) -> store_pb2.SetAliasResponse:
        return self._unary(
            self.store.SetAlias,
            store_pb2.SetAliasRequest(name=name, alias=alias, revision=revision),
        )

    def rollback(self, name: str, alias: str, revision: int = 0) -> store_pb2.SetAliasResponse:
        """Re-point alias to an earlier revision (0 = the one it pointed at before)."""
        return self._unary(
            self.store.SetAlias,
            store_pb2.SetAliasRequest(name=name, alias=alias, revision=revision, rollback=True),
        )

    def delete_alias(self, name: str, alias: str) -> int:
        return self._unary(
            self.store.DeleteAlias, store_pb2.DeleteAliasRequest(name=name, alias=alias)
        ).revision

    def set_gate(
        self,
        name: str,
        alias: str,
        metric: str = "",
        threshold: float = 0.0,
        direction: str = "at_least",
        *,
        clear: bool = False,
    ) -> store_pb2.AliasGate:
        req = store_pb2.SetAliasGateRequest(
            name=name,
            alias=alias,
            metric=metric,
            threshold=threshold,
            direction=0 if clear else GATE_DIRECTIONS[direction],
            clear=clear,
        )
        return self._unary(self.store.SetAliasGate, req).gate

    def add_evaluation(
        self, ref: str, metric: str, value: float, evaluator: str = "", dataset_digest: str = ""
    ) -> common_pb2.AdapterRevision:
        """Record metric = value for the revision ref resolves to; dataset_digest: the sha256
        (hex) of the data it was measured on, when there is one."""
        req = store_pb2.AddEvaluationRequest(
            ref=ref, metric=metric, value=value, evaluator=evaluator, dataset_digest=dataset_digest
        )
        return self._unary(self.store.AddEvaluation, req, retry=False).revision

    def deprecate(self, ref: str, *, undo: bool = False) -> common_pb2.AdapterRevision:
        return self._unary(
            self.store.DeprecateRevision, store_pb2.DeprecateRevisionRequest(ref=ref, undo=undo)
        ).revision

    def merge(
        self,
        name: str,
        sources: list[tuple[str, float]],
        *,
        storage_format: str = "",
        labels: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> common_pb2.AdapterRevision:
        req = store_pb2.MergeAdaptersRequest(
            name=name,
            sources=[store_pb2.MergeSource(ref=r, weight=w) for r, w in sources],
            method=store_pb2.MERGE_METHOD_LINEAR,
            storage_format=storage_enum(storage_format),
            labels=labels or {},
        )
        return self._unary(self.store.MergeAdapters, req, timeout=timeout, retry=False).revision

    # -- tenants ----------------------------------------------------------------------------

    def create_tenant(self, tenant: str) -> store_pb2.CreateTenantResponse:
        return self._unary(
            self.store.CreateTenant, store_pb2.CreateTenantRequest(tenant=tenant), retry=False
        )

    def create_api_key(self, tenant: str = "", *, admin: bool = False):
        return self._unary(
            self.store.CreateApiKey,
            store_pb2.CreateApiKeyRequest(tenant=tenant, admin=admin),
            retry=False,
        )

    def revoke_api_key(self, key_id: str) -> None:
        self._unary(self.store.RevokeApiKey, store_pb2.RevokeApiKeyRequest(key_id=key_id))

    def list_tenants(self, *, page_size: int = 100) -> Iterator[store_pb2.TenantInfo]:
        token = ""
        while True:
            resp = self._unary(
                self.store.ListTenants,
                store_pb2.ListTenantsRequest(page_size=page_size, page_token=token),
            )
            yield from resp.tenants
            token = resp.next_page_token
            if not token:
                return

    def authenticate(self, api_key: str = "") -> store_pb2.AuthenticateResponse:
        """Who api_key (or, if empty, this client's own key) stands for."""
        return self._unary(self.store.Authenticate, store_pb2.AuthenticateRequest(api_key=api_key))

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
        call = self.router.Generate(req, timeout=timeout or self.timeout, metadata=self.metadata)
        try:
            for resp in call:
                yield resp.chunk
        finally:
            call.cancel()  # a caller that stops reading ends the generation, not just the loop

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
                res.finish_reason = (
                    common_pb2.FinishReason.Name(ch.finish_reason)
                    .removeprefix("FINISH_REASON_")
                    .lower()
                )
            if ch.HasField("usage"):
                res.prompt_tokens = ch.usage.prompt_tokens
                res.completion_tokens = ch.usage.completion_tokens
        res.text, res.token_ids, res.logprobs = "".join(texts), ids, lps
        return res

    def score(
        self,
        prompt: str = "",
        *,
        adapter: str = "",
        prompt_token_ids: list[int] | None = None,
        top_logprobs: int = 0,
        timeout: float | None = None,
    ) -> common_pb2.ScoreResult:
        """The prompt's tokens (tokenized by the executor, BOS included, unless given as ids)
        and log p(token[t] | token[:t]) for t >= 1, under adapter (empty: the base model)."""
        req = router_pb2.ScoreRequest(
            adapter=adapter,
            prompt=prompt,
            prompt_token_ids=prompt_token_ids or [],
            top_logprobs=top_logprobs,
        )
        return self._unary(self.router.Score, req, timeout).result

    # -- training -----------------------------------------------------------------------------

    def create_training_run(
        self, *, rank: int = 8, alpha: float | None = None, targets=("q_proj", "v_proj"),
        seed: int = 0, run_id: str = "", from_ref: str = "", with_optimizer: bool = False,
        replace: bool = False,
    ) -> training_pb2.CreateTrainingRunResponse:  # fmt: skip
        """A training run on the executor the router picks: a fresh LoRA of `rank` on
        `targets`, or (from_ref) one that starts from a revision's LoRA (its rank, alpha and
        targets; with_optimizer: its saved AdamW state too, an exact resume). replace: load
        into the live run run_id (load_state)."""
        lora = training_pb2.LoraConfig(
            rank=rank, alpha=float(alpha if alpha is not None else 2 * rank),
            target_modules=list(targets),
        )  # fmt: skip
        req = training_pb2.CreateTrainingRunRequest(
            run_id=run_id, lora=lora, seed=seed, from_ref=from_ref,
            with_optimizer=with_optimizer, replace=replace,
        )  # fmt: skip
        return self._unary(self.router.CreateTrainingRun, req, retry=False)

    def forward_backward(
        self, run_id: str, data: list[dict], loss_fn: str = "cross_entropy",
        config: dict[str, float] | None = None, *, forward_only: bool = False,
    ) -> training_pb2.ForwardBackwardResponse:  # fmt: skip
        """data: dicts with input_ids, target_tokens and the loss's inputs (weights, or
        logprobs + advantages)."""
        req = training_pb2.ForwardBackwardRequest(
            run_id=run_id, loss_fn=loss_fn, loss_fn_config=config or {},
            forward_only=forward_only, data=[training_pb2.TrainingDatum(**d) for d in data],
        )  # fmt: skip
        return self._unary(self.router.ForwardBackward, req, retry=False)

    def optim_step(self, run_id: str, **adam: float) -> training_pb2.OptimStepResponse:
        """adam: learning_rate, beta1, beta2, eps, weight_decay, grad_clip_norm (unset: Tinker's
        defaults)."""
        req = training_pb2.OptimStepRequest(run_id=run_id, adam=training_pb2.AdamParams(**adam))
        return self._unary(self.router.OptimStep, req, retry=False)

    def save_run(
        self, run_id: str, name: str, labels: dict[str, str] | None = None, *,
        with_state: bool = False,
    ) -> training_pb2.SaveRunWeightsResponse:  # fmt: skip
        """The run's LoRA as a new revision of `name` (its ref and digest in the answer);
        with_state: its optimizer state kept with it (save_state), to resume from exactly."""
        req = training_pb2.SaveRunWeightsRequest(
            run_id=run_id, name=name, labels=labels or {}, with_state=with_state
        )
        return self._unary(self.router.SaveRunWeights, req, retry=False)

    def drop_run(self, run_id: str) -> None:
        req = training_pb2.DropTrainingRunRequest(run_id=run_id)
        self._unary(self.router.DropTrainingRun, req)

    def status(self) -> router_pb2.RouterStatusResponse:
        return self._unary(self.router.Status, router_pb2.RouterStatusRequest())

    def prefetch(self, *adapters: str) -> list[router_pb2.PrefetchPlacement]:
        """Warm adapters before their requests (a hint: returns once it is sent)."""
        resp = self._unary(
            self.router.Prefetch, router_pb2.RouterPrefetchRequest(adapters=list(adapters))
        )
        return list(resp.placements)
