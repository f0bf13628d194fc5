"""The Tinker API under /api/v1: what the unmodified tinker SDK (0.38.0) sends, over the router.

Point the SDK at the gateway's root (`ServiceClient(base_url="http://HOST:PORT")`) with the API
key `tml-<mesh key>`: the SDK insists on the `tml-` prefix, which is stripped here; the rest goes
to the router as `authorization: Bearer <key>` and the router authenticates it as for every call.

What maps to what (the wire format: ../shared/reference/tinker-protocol.md):

* create_model -> Router.CreateTrainingRun (rank; train_attn -> q/k/v/o_proj, train_mlp ->
  gate/up/down_proj; the unembedding (lm_head) is never trained here: train_unembed, which the
  SDK sends true by default, is ignored, and a model with neither attn nor mlp is a 400). The
  model id the SDK gets back, `<session>:train:<n>` (the form the SDK assumes), names the run
  `<session>-train-<n>`.
* forward_backward (0.38's protobuf body, or 0.22's JSON) and forward -> Router.ForwardBackward;
  optim_step -> Router.OptimStep; save_weights_for_sampler(name) -> Router.SaveRunWeights as a
  new revision of `<tenant>/<name>`, answered as the path `tinker://<tenant>/<name>@<rev>`.
* A sampling client on such a path (any `tinker://<adapter ref>` the caller may read, pinned to
  the revision it resolves to when the client is made) or on the base model: asample ->
  Router.Generate, one call per sample; its prompt logprobs (compute_logprobs) -> Router.Score.

Futures: each submit answers a future id at once (create_model after its run exists);
retrieve_future holds the poll open up to `poll_s` and then answers try_again. The calls of one
model run in seq_id order (the SDK numbers them and pipelines them; a missing seq_id is waited
for up to `gap_s`), and a call submitted twice (an HTTP retry with the same X-Idempotency-Key,
or the same (model, seq_id)) runs once. A router refusal of the caller's input
(INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, FAILED_PRECONDITION, OUT_OF_RANGE...) fails
the future with category "user", which the SDK raises at once as RequestFailedError and never
retries; a synchronous call refused that way is a 4xx with a JSON body and
`x-should-retry: false`. RESOURCE_EXHAUSTED is a 429 with Retry-After where the call is still
answerable (create_model, asample: the SDK backs off and resubmits); a training call already
accepted is retried here after the router's delay (its polls say "paused_capacity") for up to
`capacity_retry_s`.

State (sessions, models, samplers, futures) lives in this gateway's memory: one gateway per
mesh serves the Tinker API (a restart forgets the sessions; saved revisions are in the store).
A session that sends nothing for `session_ttl_s` (the SDK heartbeats every 10 s), or that the
SDK finishes, has its runs dropped on their executors.

The protobuf schema is the SDK's own `tinker/proto/tinker_public_pb2.py` (Apache-2.0), loaded
from the installed wheel without importing the SDK: the gateway's environment needs the tinker
wheel for the protobuf calls (forward_backward, sample); the rest works without it.
"""

from __future__ import annotations

import array
import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import importlib.util
import json
import logging
import math
import secrets
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from opentelemetry import propagate

from mintmesh.client import header_value_problem
from mintmesh.errors import InvalidArgument
from mintmesh.identity import check_part, parse_ref
from mintmesh.services.gateway.app import from_grpc
from mintmesh.services.gateway.config import TinkerConfig
from mintmesh.v1 import common_pb2, router_pb2, store_pb2, training_pb2

logger = logging.getLogger(__name__)

KEY_PREFIX = "tml-"
# MinT's keys (mindlab-toolkit), taken where the SDK sends them (/auth/token, with pjwt on).
SK_PREFIX = "sk-"
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# The router's refusals of what the caller sent: a user error, never worth a retry.
USER_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)
PROTOBUF = "application/x-protobuf"
_UINT32 = 2**32


# -- the SDK's wire schema -------------------------------------------------------------------


@functools.cache
def schema():
    """tinker_public_pb2 from the installed tinker wheel, loaded as a file (the SDK's package
    itself is not imported: it pulls in its HTTP stack). Raises _HTTPError without it."""
    mod = sys.modules.get("tinker.proto.tinker_public_pb2")
    if mod is not None:
        return mod
    spec = importlib.util.find_spec("tinker")
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        path = Path(root) / "proto" / "tinker_public_pb2.py"
        if path.is_file():
            s = importlib.util.spec_from_file_location("_mint_tinker_public_pb2", path)
            mod = importlib.util.module_from_spec(s)
            s.loader.exec_module(mod)
            return mod
    raise _HTTPError(
        400,
        "this gateway cannot read the tinker SDK's protobuf messages: install the tinker "
        "wheel in the gateway's environment (pip install 'mintmesh[tinker]')",
        "schema_missing",
    )


# -- errors ------------------------------------------------------------------------------------


# Fields that name something (a dict key on our side): their JSON type is checked up front.
_ID_FIELDS = {
    "session_id": str,
    "model_id": str,
    "sampling_session_id": str,
    "request_id": str,
    "path": str,
    "base_model": str,
    "model_path": str,
    "seq_id": int,
    "model_seq_id": int,
    "sampling_session_seq_id": int,
}


class _HTTPError(Exception):
    """A synchronous refusal: status + JSON body (never empty: the SDK retries a bodiless 400
    as a proxy reset)."""

    def __init__(self, status: int, detail: str, code: str = "", headers=None, category=""):
        super().__init__(detail)
        self.status, self.detail, self.code = status, detail, code
        self.headers = dict(headers or {})
        self.category = category or ("user" if 400 <= status < 500 else "server")

    def response(self) -> JSONResponse:
        headers = dict(self.headers)
        if 400 <= self.status < 500 and self.status not in (408, 409, 429):
            headers["x-should-retry"] = "false"
        body = {"detail": self.detail, "code": self.code, "category": self.category}
        return JSONResponse(body, status_code=self.status, headers=headers)


def _grpc_http(err: grpc.aio.AioRpcError, *, hide_other_tenants: bool = False) -> _HTTPError:
    e = from_grpc(err)
    status, detail = e.status, e.message
    if hide_other_tenants and err.code() == grpc.StatusCode.PERMISSION_DENIED:
        # Another tenant's adapter reads as one that does not exist (nothing about its owner).
        status, detail, code = 404, "not found for this key", "model_not_found"
        return _HTTPError(status, detail, code, e.headers)
    if status == 499:  # CANCELLED: not the caller's doing
        status = 503
    return _HTTPError(status, detail, e.code or "", e.headers)


class _UserError(Exception):
    """Bad input found while running a call: the future fails with category user."""


def _failure(err: BaseException) -> dict:
    """A failed future's JSON (the SDK raises RequestFailedError with its category)."""
    if isinstance(err, _UserError):
        return {"error": str(err), "category": "user"}
    if isinstance(err, grpc.aio.AioRpcError):
        code = err.code()
        category = "user" if code in USER_CODES else "server"
        return {"error": err.details() or code.name, "category": category, "code": code.name}
    if isinstance(err, _HTTPError):
        return {"error": err.detail, "category": err.category, "code": err.code}
    return {"error": f"internal error: {type(err).__name__}", "category": "server"}


# -- state ---------------------------------------------------------------------------------------


@dataclass
class Caller:
    key: str
    key_hash: str
    tenant: str
    is_admin: bool
    expires: float = 0.0

    @property
    def owner(self) -> str:
        return self.tenant if self.tenant else f"admin:{self.key_hash[:16]}"

    def md(self) -> list[tuple[str, str]]:
        md = [("authorization", f"Bearer {self.key}")]
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        return md + list(carrier.items())

    def may(self, owner: str) -> bool:
        return self.is_admin or owner == self.owner


class _Result:
    """A future's outcome: JSON for most calls; protobuf too for forward_backward and sample."""

    def __init__(self, data: dict, proto: Callable[[], bytes] | None = None):
        self.data, self._proto = data, proto

    def response(self, accept: str):
        if self._proto is not None and PROTOBUF in accept:
            return Response(self._proto(), media_type=PROTOBUF)
        return JSONResponse(self.data)


@dataclass
class _Future:
    id: str
    owner: str
    done: asyncio.Event = field(default_factory=asyncio.Event)
    result: _Result | None = None
    error: dict | None = None
    exc: BaseException | None = None
    queue_state: str = "active"
    finished_at: float = 0.0
    task: asyncio.Task | None = None
    session_id: str = ""

    def finish(self, result: _Result | None = None, exc: BaseException | None = None) -> None:
        self.result = result
        if exc is not None:
            self.exc, self.error = exc, _failure(exc)
        self.queue_state = "active"
        self.finished_at = time.monotonic()
        self.done.set()


@dataclass
class _Session:
    id: str
    owner: str
    caller: Caller
    last_seen: float
    models: list[str] = field(default_factory=list)
    samplers: list[str] = field(default_factory=list)


@dataclass
class _Model:
    model_id: str
    run_id: str
    session_id: str
    owner: str
    rank: int
    caller: Caller
    next_seq: int = 1
    pending: dict[int, tuple[_Future, Callable[[], Awaitable[_Result]]]] = field(
        default_factory=dict
    )
    by_seq: dict[int, str] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    worker: asyncio.Task | None = None


@dataclass
class _Sampler:
    id: str
    owner: str
    adapter: str  # "" = the base model; else a pinned "tenant/name@rev"
    base_model: str
    model_path: str | None
    by_seq: dict[int, str] = field(default_factory=dict)


# -- tensors -------------------------------------------------------------------------------------


def _unpack(data: bytes, code: str, what: str) -> list:
    a = array.array(code)
    if len(data) % a.itemsize:
        raise _UserError(f"{what}: {len(data)} bytes is not a whole number of {code!r} values")
    a.frombytes(data)
    if sys.byteorder == "big":
        a.byteswap()
    return a.tolist()


def _pack(values, code: str) -> bytes:
    a = array.array(code, values)
    if sys.byteorder == "big":
        a.byteswap()
    return a.tobytes()


def _shape_check(shape: list[int], n: int, what: str) -> None:
    if len(shape) > 1:
        raise _UserError(
            f"{what} has shape {shape}: only 1-D (one value per position) inputs are supported"
        )
    if shape and shape[0] != n:
        raise _UserError(f"{what} has shape {shape} but {n} values")


def _proto_tensor(pb, t, what: str) -> list:
    if t.WhichOneof("encoding") == "sparse_csr":
        raise _UserError(f"{what} is sparse: only dense tensors are supported")
    codes = {pb.DTYPE_FLOAT32: "f", pb.DTYPE_INT64: "q", pb.DTYPE_INT32: "i"}
    if t.dtype not in codes:
        raise _UserError(f"{what} has dtype {pb.DType.Name(t.dtype)}: float32 or int64 only")
    values = _unpack(t.dense, codes[t.dtype], what)
    _shape_check(list(t.shape), len(values), what)
    return values


def _json_tensor(t: Any, what: str) -> list:
    if isinstance(t, list):
        return t
    if not isinstance(t, dict) or not isinstance(t.get("data"), list):
        raise _UserError(f"{what} is not a tensor ({{'data': [...], 'dtype': ...}})")
    if t.get("sparse_crow_indices") is not None:
        raise _UserError(f"{what} is sparse: only dense tensors are supported")
    values = t["data"]
    _shape_check(list(t.get("shape") or []), len(values), what)
    return values


def _tokens(values: list, what: str) -> list[int]:
    out = []
    for v in values:
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise _UserError(f"{what} has {v!r}: token ids are integers")
        if not 0 <= v < _UINT32:
            raise _UserError(f"{what} has token id {v}, outside the vocabulary")
        out.append(v)
    return out


def _floats(values: list, what: str) -> list[float]:
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise _UserError(f"{what} holds a value that is not a number") from None


_FLOAT_INPUTS = ("weights", "logprobs", "advantages")


def _datum(i: int, ids: list[int], inputs: dict[str, list]) -> training_pb2.TrainingDatum:
    where = f"data[{i}].loss_fn_inputs"
    unknown = sorted(set(inputs) - {"target_tokens", *_FLOAT_INPUTS})
    if unknown:
        raise _UserError(
            f"{where} has {unknown}: this server takes target_tokens, weights, logprobs and "
            "advantages"
        )
    if "target_tokens" not in inputs:
        raise _UserError(f"{where}.target_tokens is missing")
    d = training_pb2.TrainingDatum(
        input_ids=_tokens(ids, f"data[{i}].model_input"),
        target_tokens=_tokens(inputs["target_tokens"], f"{where}.target_tokens"),
    )
    for name in _FLOAT_INPUTS:
        if name in inputs:
            getattr(d, name).extend(_floats(inputs[name], f"{where}.{name}"))
    return d


def _proto_datums(pb, msg) -> list[training_pb2.TrainingDatum]:
    out = []
    for i, d in enumerate(msg.data):
        ids: list[int] = []
        for c in d.model_input:
            kind = c.WhichOneof("chunk")
            if kind != "encoded_text":
                raise _UserError(
                    f"data[{i}].model_input has a {kind} chunk: only token chunks are supported"
                )
            ids += _unpack(c.encoded_text.tokens, "i", f"data[{i}].model_input")
        inputs = {
            name: _proto_tensor(pb, t, f"data[{i}].loss_fn_inputs.{name}")
            for name, t in d.loss_fn_inputs.items()
        }
        out.append(_datum(i, ids, inputs))
    return out


def _chunk_tokens(model_input: Any, what: str) -> list[int]:
    if not isinstance(model_input, dict) or not isinstance(model_input.get("chunks"), list):
        raise _UserError(f"{what} is not a ModelInput ({{'chunks': [...]}})")
    ids: list = []
    for c in model_input["chunks"]:
        kind = c.get("type", "encoded_text") if isinstance(c, dict) else None
        if kind != "encoded_text" or not isinstance(c.get("tokens"), list):
            raise _UserError(f"{what} has a {kind} chunk: only token chunks are supported")
        ids += c["tokens"]
    return _tokens(ids, what)


def _json_datums(data: Any) -> list[training_pb2.TrainingDatum]:
    if not isinstance(data, list):
        raise _UserError("data is not a list of datums")
    out = []
    for i, d in enumerate(data):
        if not isinstance(d, dict):
            raise _UserError(f"data[{i}] is not a datum")
        ids = _chunk_tokens(d.get("model_input"), f"data[{i}].model_input")
        raw = d.get("loss_fn_inputs") or {}
        if not isinstance(raw, dict):
            raise _UserError(f"data[{i}].loss_fn_inputs is not a mapping")
        inputs = {k: _json_tensor(v, f"data[{i}].loss_fn_inputs.{k}") for k, v in raw.items()}
        out.append(_datum(i, ids, inputs))
    return out


def _loss_config(raw: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in raw.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise _UserError(f"loss_fn_config[{k!r}]={v!r}: only numbers are supported")
        out[k] = float(v)
    return out


def _fwdbwd_result(resp: training_pb2.ForwardBackwardResponse) -> _Result:
    lps = [list(o.logprobs) for o in resp.outputs]
    metrics = dict(resp.metrics)
    data = {
        "loss_fn_output_type": "ArrayRecord",
        "loss_fn_outputs": [
            {"logprobs": {"data": lp, "dtype": "float32", "shape": [len(lp)]}} for lp in lps
        ],
        "metrics": metrics,
    }

    def proto() -> bytes:
        pb = schema()
        out = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
        rec = out.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(lps))
        bt = rec.fields["logprobs"]
        bt.dtype = pb.DTYPE_FLOAT32
        bt.data = _pack([x for lp in lps for x in lp], "f")
        offsets = [0]
        for lp in lps:
            offsets.append(offsets[-1] + 4 * len(lp))
        bt.offsets = _pack(offsets, "q")
        out.metrics.update(metrics)
        return out.SerializeToString()

    return _Result(data, proto)


def _sample_result(seqs: list[tuple[list[int], list[float], str]], prompt_lp) -> _Result:
    data: dict[str, Any] = {
        "type": "sample",
        "sequences": [{"tokens": t, "logprobs": lp, "stop_reason": stop} for t, lp, stop in seqs],
    }
    if prompt_lp is not None:
        data["prompt_logprobs"] = [None if math.isnan(x) else x for x in prompt_lp]

    def proto() -> bytes:
        pb = schema()
        out = pb.SampleResponse()
        for t, lp, stop in seqs:
            s = out.sequences.add(tokens=_pack(t, "i"), logprobs=_pack(lp, "f"))
            s.stop_reason = pb.STOP_REASON_LENGTH if stop == "length" else pb.STOP_REASON_STOP
        if prompt_lp is not None:
            out.prompt_logprobs = _pack(prompt_lp, "f")
        return out.SerializeToString()

    return _Result(data, proto)


# -- the router ----------------------------------------------------------------------------------


def tinker_router(
    up,
    base_model: Callable[[list], Awaitable[store_pb2.GetBaseModelResponse]],
    *,
    request_timeout_s: float = 600.0,
    default_max_tokens: int = 512,
    config: TinkerConfig | None = None,
) -> APIRouter:
    """The /api/v1 routes. up: the gateway's Upstream (router and store stubs, grpc.aio);
    base_model(md): the store's GetBaseModel (cached by the app)."""
    if config is None:
        from mintmesh.services.common.config import load_config

        config = load_config(TinkerConfig, "GATEWAY_TINKER", {})
    cfg = config
    api = APIRouter(prefix="/api/v1")
    callers: dict[str, Caller] = {}
    sessions: dict[str, _Session] = {}
    models: dict[str, _Model] = {}
    samplers: dict[str, _Sampler] = {}
    futures: dict[str, _Future] = {}
    idempotent: dict[tuple[str, str], tuple[str, float]] = {}
    janitor: list[asyncio.Task] = []
    T = request_timeout_s

    def route(fn):
        @functools.wraps(fn)
        async def wrapped(*args, **kwargs):
            _start_janitor()
            try:
                return await fn(*args, **kwargs)
            except _HTTPError as e:
                return e.response()
            except grpc.aio.AioRpcError as err:
                return _grpc_http(err).response()

        return wrapped

    async def body_json(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError as e:
            raise _HTTPError(400, f"the request body is not valid JSON: {e}", "json_invalid") from e
        except RecursionError:
            raise _HTTPError(400, "the request body nests too deep", "json_invalid") from None
        if not isinstance(body, dict):
            raise _HTTPError(400, "the request body is not a JSON object", "json_invalid")
        for name, typ in _ID_FIELDS.items():
            v = body.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, typ)):
                want = "a string" if typ is str else "an integer"
                got = type(v).__name__
                raise _HTTPError(400, f"{name} must be {want} (got {got})", "invalid_request")
        return body

    jwt_secret = secrets.token_bytes(32)
    jwt_keys: dict[str, tuple[str, float]] = {}  # jti -> (mesh key, expiry, unix s)

    def _b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")

    def issue_jwt(key: str) -> str:
        now = int(time.time())
        exp = now + int(cfg.jwt_ttl_s)
        jti = secrets.token_hex(16)
        head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        body = _b64(json.dumps({"iat": now, "exp": exp, "jti": jti}).encode())
        sig = _b64(hmac.new(jwt_secret, f"{head}.{body}".encode(), hashlib.sha256).digest())
        for old in [j for j, (_, e) in jwt_keys.items() if e < now]:
            jwt_keys.pop(old, None)
        jwt_keys[jti] = (key, exp)
        return f"{head}.{body}.{sig}"

    def key_of_jwt(token: str) -> str:
        """The mesh key a JWT of this gateway stands for; 401 invalid_token (the SDK then
        trades its key again) if it is not one, or has expired."""
        bad = _HTTPError(
            401,
            "the JWT is not valid here (expired, or from another gateway): exchange the API "
            "key again at /api/v1/auth/token",
            "invalid_token",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
        parts = token.split(".")
        if len(parts) != 3:
            raise bad
        want = _b64(hmac.new(jwt_secret, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256)
                    .digest())  # fmt: skip
        if not hmac.compare_digest(want, parts[2]):
            raise bad
        try:
            payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
            key, exp = jwt_keys[payload["jti"]]
        except (ValueError, KeyError, TypeError):
            raise bad from None
        if exp < time.time():
            raise bad
        return key

    def mesh_key(raw: str) -> str:
        """The mesh key in an X-API-Key: tml-<key> (the SDK's prefix), sk-<key> (MinT's), or
        a JWT this gateway issued for one."""
        if raw.startswith("eyJ"):
            return key_of_jwt(raw)
        for prefix in (KEY_PREFIX, SK_PREFIX):
            if raw.startswith(prefix):
                return raw[len(prefix) :]
        raise _HTTPError(
            401, f"the API key must be {KEY_PREFIX}<MinT API key> or {SK_PREFIX}<MinT API key>"
        )

    async def caller_of(request: Request) -> Caller:
        raw = request.headers.get("x-api-key", "")
        if not raw:
            raise _HTTPError(401, f"no X-API-Key: give the SDK api_key={KEY_PREFIX}<MinT key>")
        key = mesh_key(raw)
        raw = f"{KEY_PREFIX}{key}"  # one cache entry per mesh key, however it came
        problem = header_value_problem(key)
        if not key or problem:
            raise _HTTPError(401, f"the API key is not usable: it {problem or 'is empty'}")
        h = hashlib.sha256(raw.encode()).hexdigest()
        now = time.monotonic()
        hit = callers.get(h)
        if hit is not None and hit.expires > now:
            return hit
        try:
            who = await up.store.Authenticate(
                store_pb2.AuthenticateRequest(),
                metadata=[("authorization", f"Bearer {key}")],
                timeout=10.0,
            )
        except grpc.aio.AioRpcError as err:
            raise _grpc_http(err) from None
        c = Caller(key, h, who.tenant, who.is_admin, expires=now + 30.0)
        if len(callers) > 10_000:
            callers.clear()
        callers[h] = c
        return c

    async def base(c: Caller) -> store_pb2.GetBaseModelResponse:
        return await base_model(c.md())

    def new_future(c: Caller, session_id: str = "") -> _Future:
        fut = _Future(id=f"req-{uuid.uuid4().hex}", owner=c.owner, session_id=session_id)
        futures[fut.id] = fut
        return fut

    def future_answer(fut: _Future, **extra) -> dict:
        return {"request_id": fut.id, **extra}

    def replay(c: Caller, request: Request) -> _Future | None:
        """The future an HTTP-layer retry of this very call already made."""
        key = request.headers.get("x-idempotency-key")
        hit = idempotent.get((c.owner, key)) if key else None
        return futures.get(hit[0]) if hit else None

    def remember(c: Caller, request: Request, fut: _Future) -> None:
        key = request.headers.get("x-idempotency-key")
        if key:
            idempotent[(c.owner, key)] = (fut.id, time.monotonic())

    async def run(fut: _Future, work: Awaitable[_Result]) -> None:
        try:
            fut.finish(await work)
        except (_UserError, _HTTPError, grpc.aio.AioRpcError) as e:
            fut.finish(exc=e)
        except asyncio.CancelledError:
            fut.finish(exc=_HTTPError(499, "cancelled", "cancelled", category="user"))
            raise
        except Exception as e:  # noqa: BLE001 - reported to the poller, logged here
            logger.exception("tinker call %s failed", fut.id)
            fut.finish(exc=e)

    async def with_capacity(fut: _Future, call: Callable[[], Awaitable[Any]]):
        """call(), retried after the router's delay while it says RESOURCE_EXHAUSTED."""
        give_up = time.monotonic() + cfg.capacity_retry_s
        while True:
            try:
                return await call()
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                delay = float(from_grpc(err).headers.get("Retry-After", "1"))
                if time.monotonic() + delay > give_up:
                    raise
                fut.queue_state = "paused_capacity"
                await asyncio.sleep(delay)
                fut.queue_state = "active"

    # -- sessions, models, samplers ----------------------------------------------------------

    def session_of(c: Caller, sid: Any) -> _Session:
        s = sessions.get(sid) if isinstance(sid, str) else None
        if s is None or not c.may(s.owner):
            raise _HTTPError(404, f"no session {sid!r} (sessions live in this gateway's memory)")
        s.last_seen = time.monotonic()
        return s

    def model_of(c: Caller, mid: Any) -> _Model:
        m = models.get(mid) if isinstance(mid, str) else None
        if m is None or not c.may(m.owner):
            raise _HTTPError(404, f"no model {mid!r}", "model_not_found")
        s = sessions.get(m.session_id)
        if s is not None:
            s.last_seen = time.monotonic()
        return m

    async def end_session(s: _Session) -> None:
        sessions.pop(s.id, None)
        for sid in s.samplers:
            samplers.pop(sid, None)
        for mid in s.models:
            m = models.pop(mid, None)
            if m is None:
                continue
            if m.worker is not None:
                m.worker.cancel()
            for fut, _ in m.pending.values():
                fut.finish(exc=_HTTPError(410, "the session ended", "session_ended"))
            try:
                await up.router.DropTrainingRun(
                    training_pb2.DropTrainingRunRequest(run_id=m.run_id),
                    metadata=s.caller.md(),
                    timeout=30.0,
                )
            except grpc.aio.AioRpcError as err:
                logger.info("dropping run %s: %s", m.run_id, err.details())

    def _start_janitor() -> None:
        if janitor and not janitor[0].done():
            return
        janitor[:] = [asyncio.get_running_loop().create_task(sweep())]

    async def sweep() -> None:
        while True:
            await asyncio.sleep(min(30.0, cfg.session_ttl_s / 2))
            now = time.monotonic()
            for s in [s for s in sessions.values() if now - s.last_seen > cfg.session_ttl_s]:
                logger.info("tinker session %s idle for %.0f s: ended", s.id, now - s.last_seen)
                await end_session(s)
            for fid in [f.id for f in futures.values()
                        if f.done.is_set() and now - f.finished_at > cfg.result_ttl_s]:  # fmt: skip
                futures.pop(fid, None)
            for k in [k for k, (_, t) in idempotent.items() if now - t > cfg.result_ttl_s]:
                idempotent.pop(k, None)

    def enqueue(m: _Model, seq: int | None, fut: _Future, work: Callable[[], Awaitable[_Result]]):
        if seq is None:
            seq = max([m.next_seq, *(s + 1 for s in m.pending)])
        else:
            m.by_seq[seq] = fut.id
            if len(m.by_seq) > 4096:
                for old in sorted(m.by_seq)[:2048]:
                    m.by_seq.pop(old, None)
        m.pending[seq] = (fut, work)
        m.changed.set()
        if m.worker is None or m.worker.done():
            m.worker = asyncio.get_running_loop().create_task(drain(m))

    async def drain(m: _Model) -> None:
        """Run the model's calls one at a time, in seq_id order."""
        while m.pending:
            seq = m.next_seq if m.next_seq in m.pending else None
            if seq is None and min(m.pending) < m.next_seq:
                seq = min(m.pending)  # a late one (its turn has passed): at once
            if seq is None:
                m.changed.clear()
                try:
                    await asyncio.wait_for(m.changed.wait(), cfg.gap_s)
                    continue
                except asyncio.TimeoutError:
                    seq = min(m.pending)
                    logger.warning(
                        "model %s: seq_id %d never came; going on with %d",
                        m.model_id, m.next_seq, seq,
                    )  # fmt: skip
            fut, work = m.pending.pop(seq)
            m.next_seq = max(m.next_seq, seq + 1)
            await run(fut, work())

    def submit_ordered(c, request, m: _Model, seq: Any, work) -> dict:
        if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int)):
            raise _HTTPError(400, f"seq_id {seq!r} is not an integer", "invalid_seq_id")
        fut = replay(c, request)
        if fut is None and seq is not None and seq in m.by_seq:
            fut = futures.get(m.by_seq[seq])
        if fut is not None:
            return future_answer(fut, model_id=m.model_id)
        fut = new_future(c, m.session_id)
        remember(c, request, fut)
        enqueue(m, seq, fut, work)
        return future_answer(fut, model_id=m.model_id)

    def adapter_from_path(path: Any) -> str:
        if not isinstance(path, str) or not path.startswith("tinker://"):
            raise _HTTPError(400, f"model_path {path!r} does not start with tinker://")
        ref = path[len("tinker://") :]
        try:
            parse_ref(ref)
        except InvalidArgument:
            raise _HTTPError(
                404,
                f"no model at {path!r}: this server's paths are tinker://<tenant>/<name>[@rev]",
                "model_not_found",
            ) from None
        return ref

    async def make_sampler(c: Caller, sid: str, model_path: Any, base_name: Any) -> _Sampler:
        b = await base(c)
        if model_path is not None:
            ref = adapter_from_path(model_path)
            try:
                rev = (
                    await up.store.ResolveAdapter(
                        store_pb2.ResolveAdapterRequest(ref=ref), metadata=c.md(), timeout=10.0
                    )
                ).revision
            except grpc.aio.AioRpcError as err:
                e = _grpc_http(err, hide_other_tenants=True)
                if e.status == 404:
                    e.detail = f"no model at {model_path!r} for this key: {e.detail}"
                raise e from None
            return _Sampler(sid, c.owner, rev.ref, b.name, model_path)
        if base_name is not None and base_name != b.name:
            raise _HTTPError(
                404, f"no base model {base_name!r}: this mesh serves {b.name!r}", "model_not_found"
            )
        return _Sampler(sid, c.owner, "", b.name, None)

    # -- bootstrap -------------------------------------------------------------------------------

    @api.post("/client/config")
    @route
    async def client_config(request: Request):
        return {
            "pjwt_auth_enabled": cfg.pjwt_auth,
            "credential_default_source": "api_key",
            "parallel_fwdbwd_chunks": True,
            "proto_compress_fwdbwd": False,
            "sample_use_retrieve_futures": False,
            "sample_join_sampling_session": False,
            "custom_loss_server_side": False,
        }

    @api.post("/client/dynamic_config")
    @route
    async def dynamic_config(request: Request):
        return {"refresh_interval_sec": 300, "sample_cancel_enabled": False}

    @api.post("/auth/token")
    @route
    async def auth_token(request: Request):
        if not cfg.pjwt_auth:
            raise _HTTPError(
                400, f"JWT exchange is off here: send X-API-Key {KEY_PREFIX}<MinT key>"
            )
        c = await caller_of(request)  # the key is checked with the store before a JWT is made
        return {"jwt": issue_jwt(c.key)}

    @api.get("/healthz")
    @route
    async def healthz(request: Request):
        return {"status": "ok"}

    @api.post("/telemetry")
    @route
    async def telemetry(request: Request):
        return {"status": "accepted"}

    @api.post("/create_session")
    @route
    async def create_session(request: Request):
        c = await caller_of(request)
        await body_json(request)
        sid = f"s{uuid.uuid4().hex[:24]}"
        sessions[sid] = _Session(sid, c.owner, c, time.monotonic())
        return {"session_id": sid}

    @api.post("/session_heartbeat")
    @route
    async def heartbeat(request: Request):
        c = await caller_of(request)
        body = await body_json(request)
        s = sessions.get(body.get("session_id"))
        if s is None or not c.may(s.owner):
            raise _HTTPError(410, "the session has ended", "session_ended")
        s.last_seen = time.monotonic()
        return {}

    @api.post("/sessions/{session_id}/finish")
    @route
    async def finish(session_id: str, request: Request):
        c = await caller_of(request)
        s = sessions.get(session_id)
        if s is not None and c.may(s.owner):
            await end_session(s)
        return {}

    @api.get("/get_server_capabilities")
    @route
    async def capabilities(request: Request):
        c = await caller_of(request)
        b = await base(c)
        return {"supported_models": [{"model_name": b.name, "trainable": True, "sampleable": True}]}

    # -- training --------------------------------------------------------------------------------

    @api.post("/create_model")
    @route
    async def create_model(request: Request):
        c = await caller_of(request)
        body = await body_json(request)
        s, mid, hit = new_model_id(c, request, body)
        if hit is not None:
            return hit
        b = await base(c)
        if body.get("base_model") not in (None, b.name):
            raise _HTTPError(
                404,
                f"no base model {body.get('base_model')!r}: this mesh serves {b.name!r}",
                "model_not_found",
            )
        lora = body.get("lora_config") or {}
        opt = body.get("optimizer_config") or {}
        if not isinstance(lora, dict) or not isinstance(opt, dict):
            raise _HTTPError(400, "lora_config and optimizer_config are objects")
        if opt.get("type", "adamw") != "adamw":
            raise _HTTPError(400, f"optimizer {opt.get('type')!r}: only adamw is served here")
        rank = lora.get("rank", 32)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise _HTTPError(400, f"lora_config.rank={rank!r} must be an integer >= 1")
        trainable = set(b.target_modules) or set(ATTN + MLP)
        wanted = (ATTN if lora.get("train_attn", True) else ()) + (
            MLP if lora.get("train_mlp", True) else ()
        )
        targets = [t for t in wanted if t in trainable]
        if not targets:
            raise _HTTPError(
                400,
                "lora_config trains nothing here: the unembedding (lm_head, train_unembed) is "
                "not trainable on this mesh; set train_attn and/or train_mlp",
                "invalid_lora_config",
            )
        seed = lora.get("seed")
        if seed is None:
            seed = secrets.randbits(63)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise _HTTPError(400, f"lora_config.seed={seed!r} is not an integer")
        req = training_pb2.CreateTrainingRunRequest(
            run_id=mid.replace(":", "-"),
            lora=training_pb2.LoraConfig(rank=rank, alpha=cfg.lora_alpha, target_modules=targets),
            seed=seed % 2**64,
        )
        return await add_model(c, request, s, mid, req)

    def new_model_id(c: Caller, request: Request, body: dict):
        """(session, model id the SDK expects, the answer if a retry already made it)."""
        s = session_of(c, body.get("session_id"))
        seq = body.get("model_seq_id")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise _HTTPError(400, f"model_seq_id {seq!r} is not an integer >= 0")
        mid = f"{s.id}:train:{seq}"
        if mid not in models:
            return s, mid, None
        fut = replay(c, request) or new_future(c, s.id)  # a retry of a call that made it
        if not fut.done.is_set():
            fut.finish(_Result({"model_id": mid}))
        return s, mid, future_answer(fut, model_id=mid)

    async def add_model(c: Caller, request: Request, s: _Session, mid: str, req) -> dict:
        rank = req.lora.rank
        try:
            resp = await up.router.CreateTrainingRun(req, metadata=c.md(), timeout=T)
            rank = resp.lora.rank or rank
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise _grpc_http(err, hide_other_tenants=True) from None
        models[mid] = _Model(mid, req.run_id, s.id, c.owner, rank, c)
        s.models.append(mid)
        fut = new_future(c, s.id)
        remember(c, request, fut)
        fut.finish(_Result({"model_id": mid}))
        return future_answer(fut, model_id=mid)

    @api.post("/get_info")
    @route
    async def get_info(request: Request):
        c = await caller_of(request)
        body = await body_json(request)
        m = model_of(c, body.get("model_id"))
        b = await base(c)
        return {
            "model_id": m.model_id,
            "model_data": {
                "arch": b.model_type,
                "model_name": b.name,
                "tokenizer_id": cfg.tokenizer_id or b.name,
            },
            "is_lora": True,
            "lora_rank": m.rank,
            "model_name": b.name,
        }

    async def fwdbwd(request: Request, *, json_key: str, forward_only: bool | None):
        c = await caller_of(request)
        ctype = request.headers.get("content-type", "")
        raw = await request.body()
        if PROTOBUF in ctype:
            if request.headers.get("content-encoding", "identity") not in ("identity", ""):
                raise _HTTPError(400, "compressed forward_backward bodies are not taken here")
            pb = schema()
            msg = pb.ForwardBackwardRequest()
            try:
                msg.ParseFromString(raw)
            except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and kin
                raise _HTTPError(400, f"the protobuf body does not parse: {e}") from None
            mid, seq = msg.model_id, msg.seq_id or None
            loss_fn, only = msg.loss_fn, msg.forward_only if forward_only is None else forward_only
            config: dict[str, Any] = dict(msg.loss_fn_config)
            for k, v in msg.loss_fn_config_v2.items():
                config[k] = v.number if v.WhichOneof("value") == "number" else v.text

            def datums():
                return _proto_datums(pb, msg)
        else:
            body = await body_json(request)
            inp = body.get(json_key) or {}
            if not isinstance(inp, dict):
                raise _HTTPError(400, f"{json_key} is not an object")
            mid, seq = body.get("model_id"), body.get("seq_id")
            loss_fn, only = inp.get("loss_fn", ""), bool(forward_only)
            config = inp.get("loss_fn_config") or {}
            if not isinstance(config, dict):
                raise _HTTPError(400, "loss_fn_config is not an object")

            def datums():
                return _json_datums(inp.get("data"))

        m = model_of(c, mid)
        fut_box: list[_Future] = []

        async def work() -> _Result:
            req = training_pb2.ForwardBackwardRequest(
                run_id=m.run_id,
                data=datums(),
                loss_fn=loss_fn,
                loss_fn_config=_loss_config(config),
                forward_only=only,
            )
            resp = await with_capacity(
                fut_box[0],
                lambda: up.router.ForwardBackward(req, metadata=c.md(), timeout=T),
            )
            return _fwdbwd_result(resp)

        answer = submit_ordered(c, request, m, seq, work)
        fut_box.append(futures[answer["request_id"]])
        return answer

    @api.post("/forward_backward")
    @route
    async def forward_backward(request: Request):
        return await fwdbwd(request, json_key="forward_backward_input", forward_only=None)

    @api.post("/forward")
    @route
    async def forward(request: Request):
        return await fwdbwd(request, json_key="forward_input", forward_only=True)

    @api.post("/optim_step")
    @route
    async def optim_step(request: Request):
        c = await caller_of(request)
        body = await body_json(request)
        m = model_of(c, body.get("model_id"))
        params = next(
            (body[k] for k in ("adam_params", "optim_params", "optimizer_params") if k in body),
            {},
        )
        fut_box: list[_Future] = []

        async def work() -> _Result:
            if not isinstance(params, dict) or params.get("type", "adam") not in ("adam", "adamw"):
                kind = params.get("type") if isinstance(params, dict) else params
                raise _UserError(f"optimizer params {kind!r}: only AdamParams are served here")
            adam = training_pb2.AdamParams()
            for name in ("learning_rate", "beta1", "beta2", "eps", "weight_decay",
                         "grad_clip_norm"):  # fmt: skip
                v = params.get(name)
                if v is None:
                    continue
                if isinstance(v, bool) or not isinstance(v, int | float):
                    raise _UserError(f"adam_params.{name}={v!r} is not a number")
                setattr(adam, name, float(v))
            req = training_pb2.OptimStepRequest(run_id=m.run_id, adam=adam)
            resp = await with_capacity(
                fut_box[0], lambda: up.router.OptimStep(req, metadata=c.md(), timeout=T)
            )
            return _Result({"metrics": dict(resp.metrics)})

        answer = submit_ordered(c, request, m, body.get("seq_id"), work)
        fut_box.append(futures[answer["request_id"]])
        return answer

    def checked_name(name: Any) -> str:
        try:
            check_part("name", name if isinstance(name, str) else "")
        except InvalidArgument:
            raise _UserError(
                f"name {name!r}: letters, digits, '_', '-' and '.' (1-64, not starting "
                "with '.' or '-')"
            ) from None
        return name

    async def save_run(fut: _Future, c: Caller, m: _Model, name: str, labels: Any,
                       with_state: bool) -> training_pb2.SaveRunWeightsResponse:  # fmt: skip
        if not c.tenant:
            raise _UserError("an admin key has no tenant to save weights under: use a tenant's key")
        if not isinstance(labels, dict):
            raise _UserError("user_metadata is not a mapping")
        req = training_pb2.SaveRunWeightsRequest(
            run_id=m.run_id,
            name=f"{c.tenant}/{checked_name(name)}",
            labels={str(k): str(v) for k, v in labels.items()},
            with_state=with_state,
        )
        return await with_capacity(
            fut, lambda: up.router.SaveRunWeights(req, metadata=c.md(), timeout=T)
        )

    @api.post("/save_weights_for_sampler")
    @route
    async def save_for_sampler(request: Request):
        c = await caller_of(request)
        body = await body_json(request)
        m = model_of(c, body.get("model_id"))
        path, sseq = body.get("path"), body.get("sampling_session_seq_id")
        fut_box: list[_Future] = []

        async def work() -> _Result:
            if path is None:
                name = f"{m.run_id}-sampler-{sseq if isinstance(sseq, int) else 0}"
            else:
                name = path
            labels = body.get("user_metadata") or {}
            resp = await save_run(fut_box[0], c, m, name, labels, with_state=False)
            if path is not None:
                return _Result({"path": f"tinker://{resp.ref}"})
            sid = f"{m.session_id}:sample:{sseq if isinstance(sseq, int) else uuid.uuid4().hex}"
            b = await base(c)
            samplers[sid] = _Sampler(sid, c.owner, resp.ref, b.name, f"tinker://{resp.ref}")
            s = sessions.get(m.session_id)
            if s is not None:
                s.samplers.append(sid)
            return _Result({"sampling_session_id": sid})

        answer = submit_ordered(c, request, m, body.get("seq_id"), work)
        fut_box.append(futures[answer["request_id"]])
        return answer

    @api.post("/save_weights")
    @route
    async def save_weights(request: Request):
        """save_state(name): the run's LoRA as a revision of <tenant>/<name> with its training
        state (fp32 weights, AdamW moments) kept beside it, so load_state resumes exactly."""
        c = await caller_of(request)
        body = await body_json(request)
        m = model_of(c, body.get("model_id"))
        fut_box: list[_Future] = []

        async def work() -> _Result:
            name = body.get("path")
            if name is None:
                raise _UserError("save_weights needs a name (path)")
            labels = body.get("user_metadata") or {}
            resp = await save_run(fut_box[0], c, m, name, labels, with_state=True)
            return _Result({"path": f"tinker://{resp.ref}", "type": "save_weights"})

        answer = submit_ordered(c, request, m, body.get("seq_id"), work)
        fut_box.append(futures[answer["request_id"]])
        return answer

    @api.post("/load_weights")
    @route
    async def load_weights(request: Request):
        """load_state(path) into a live model (its seq_id order), or, with session_id and
        model_seq_id, create_training_client_from_state(path): a new model that starts from the
        revision (its training state when it has one: exact weights; `optimizer`: its AdamW
        state and steps too)."""
        c = await caller_of(request)
        body = await body_json(request)
        ref = adapter_from_path(body.get("path"))
        optimizer = body.get("optimizer", False)
        if not isinstance(optimizer, bool):
            raise _HTTPError(400, f"optimizer {optimizer!r} is not a boolean")
        if "model_id" in body and body.get("model_id") is not None:
            m = model_of(c, body.get("model_id"))
            fut_box: list[_Future] = []

            async def work() -> _Result:
                req = training_pb2.CreateTrainingRunRequest(
                    run_id=m.run_id, from_ref=ref, with_optimizer=optimizer, replace=True
                )
                resp = await with_capacity(
                    fut_box[0],
                    lambda: up.router.CreateTrainingRun(req, metadata=c.md(), timeout=T),
                )
                m.rank = resp.lora.rank
                return _Result({"path": body.get("path"), "type": "load_weights"})

            answer = submit_ordered(c, request, m, body.get("seq_id"), work)
            fut_box.append(futures[answer["request_id"]])
            return answer
        s, mid, hit = new_model_id(c, request, body)
        if hit is not None:
            return hit
        if body.get("base_model") not in (None, (await base(c)).name):
            raise _HTTPError(404, f"no base model {body.get('base_model')!r}", "model_not_found")
        req = training_pb2.CreateTrainingRunRequest(
            run_id=mid.replace(":", "-"), from_ref=ref, with_optimizer=optimizer
        )
        return await add_model(c, request, s, mid, req)

    # -- sampling --------------------------------------------------------------------------------

    @api.post("/create_sampling_session")
    @route
    async def create_sampling_session(request: Request):
        c = await caller_of(request)
        body = await body_json(request)
        s = session_of(c, body.get("session_id"))
        seq = body.get("sampling_session_seq_id")
        sid = f"{s.id}:sample:{seq if isinstance(seq, int) else uuid.uuid4().hex}"
        if sid not in samplers:
            samplers[sid] = await make_sampler(
                c, sid, body.get("model_path"), body.get("base_model")
            )
            s.samplers.append(sid)
        return {"sampling_session_id": sid}

    @api.get("/samplers/{sampler_id}")
    @route
    async def get_sampler(sampler_id: str, request: Request):
        c = await caller_of(request)
        sm = samplers.get(sampler_id)
        if sm is None or not c.may(sm.owner):
            raise _HTTPError(404, f"no sampler {sampler_id!r}", "sampler_not_found")
        out = {"sampler_id": sm.id, "base_model": sm.base_model}
        if sm.model_path:
            out["model_path"] = sm.model_path
        return out

    def sampling_params(sp: Any, n: int) -> list[common_pb2.SamplingParams]:
        if not isinstance(sp, dict):
            raise _HTTPError(400, "sampling_params is not an object")
        max_tokens = sp.get("max_tokens")
        max_tokens = default_max_tokens if max_tokens is None else max_tokens
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise _HTTPError(400, f"sampling_params.max_tokens={max_tokens!r} must be >= 1")
        num = {}
        for name, default in (("temperature", 1.0), ("top_p", 1.0), ("top_k", -1)):
            v = sp.get(name, default)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise _HTTPError(400, f"sampling_params.{name}={v!r} is not a number")
            num[name] = v
        if num["temperature"] < 0 or not 0 < num["top_p"] <= 1:
            raise _HTTPError(400, "sampling_params: temperature >= 0 and 0 < top_p <= 1")
        stop = sp.get("stop")
        strs, ids, ignore_eos = [], [], False
        if isinstance(stop, str):
            strs = [stop]
        elif isinstance(stop, list):
            if not stop:
                ignore_eos = True  # Tinker: [] disables every stop, EOS included
            elif all(isinstance(s, str) for s in stop):
                strs = stop
            elif all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < _UINT32
                     for s in stop):  # fmt: skip
                ids = stop
            else:
                raise _HTTPError(400, "sampling_params.stop: strings or token ids, not a mix")
        elif stop is not None:
            raise _HTTPError(400, f"sampling_params.stop={stop!r}: a string or a list")
        seed = sp.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise _HTTPError(400, f"sampling_params.seed={seed!r} is not an integer")
        out = []
        for i in range(n):
            p = common_pb2.SamplingParams(
                temperature=float(num["temperature"]),
                top_p=float(num["top_p"]),
                top_k=max(0, int(num["top_k"])),
                max_tokens=max_tokens,
                stop=strs,
                stop_token_ids=ids,
                logprobs=True,
                ignore_eos=ignore_eos,
            )
            if seed is not None:
                p.seed = (seed + i) % 2**64
            out.append(p)
        return out

    async def sample_work(c, sm: _Sampler, fut: _Future, prompt, params, want_prompt_lp,
                          admitted: asyncio.Event) -> _Result:  # fmt: skip
        md = c.md()
        calls = [
            up.router.Generate(
                router_pb2.GenerateRequest(
                    adapter=sm.adapter,
                    prompt_token_ids=prompt,
                    sampling=p,
                    request_id=f"{fut.id}-{i}",
                ),
                metadata=md,
                timeout=T,
            )  # fmt: skip
            for i, p in enumerate(params)
        ]
        started = [asyncio.Event() for _ in calls]

        async def read(call, first: asyncio.Event):
            toks: list[int] = []
            lps: list[float] = []
            finish = 0
            try:
                async for resp in call:
                    first.set()
                    ch = resp.chunk
                    toks += ch.token_ids
                    lps += ch.logprobs
                    if ch.finish_reason:
                        finish = ch.finish_reason
            finally:
                first.set()
            stop = "length" if finish == common_pb2.FINISH_REASON_LENGTH else "stop"
            return toks, lps, stop

        async def prompt_logprobs():
            if len(prompt) < 2:
                return [math.nan] * len(prompt)
            r = await up.router.Score(
                router_pb2.ScoreRequest(adapter=sm.adapter, prompt_token_ids=prompt),
                metadata=md,
                timeout=T,
            )
            return [math.nan, *r.result.logprobs]

        tasks = [
            asyncio.ensure_future(read(call, e)) for call, e in zip(calls, started, strict=True)
        ]
        score = asyncio.ensure_future(prompt_logprobs()) if want_prompt_lp else None

        async def admit():
            """Set admitted once every call has streamed (and the score is in) without a
            refusal; a refusal instead ends the whole call (the submit sees it done)."""
            await asyncio.gather(*(e.wait() for e in started))
            if score is not None:
                await asyncio.wait([score])
            refused = [t for t in (*tasks, score) if t is not None and t.done()
                       and not t.cancelled() and t.exception() is not None]  # fmt: skip
            if not refused:
                admitted.set()

        admitting = asyncio.ensure_future(admit())
        try:
            seqs = await asyncio.gather(*tasks)
            plp = await score if score is not None else None
        finally:
            admitting.cancel()
            for call in calls:
                call.cancel()
            for t in [*tasks, *([score] if score else [])]:
                t.cancel()
        return _sample_result(list(seqs), plp)

    @api.post("/asample")
    @route
    async def asample(request: Request):
        c = await caller_of(request)
        body = await body_json(request)
        sid = body.get("sampling_session_id")
        if sid is not None:
            sm = samplers.get(sid)
            if sm is None or not c.may(sm.owner):
                raise _HTTPError(404, f"no sampler {sid!r}", "sampler_not_found")
        else:
            sm = await make_sampler(c, "", body.get("model_path"), body.get("base_model"))
        seq = body.get("seq_id")
        fut = replay(c, request)
        if fut is None and isinstance(seq, int) and seq in sm.by_seq:
            fut = futures.get(sm.by_seq[seq])
        n = body.get("num_samples", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= cfg.max_samples:
            raise _HTTPError(400, f"num_samples={n!r} must be in [1, {cfg.max_samples}]")
        if fut is not None:
            return future_answer(fut, sample_sequence_ids=[f"{fut.id}:{i}" for i in range(n)])
        for name in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k"):
            if body.get(name):
                raise _HTTPError(400, f"{name} is not served here yet", "not_supported")
        for name in ("target_prompt_logprobs", "prompt_logprobs_last_n"):
            if body.get(name) is not None:
                raise _HTTPError(400, f"{name} is not served here yet", "not_supported")
        try:
            prompt = _chunk_tokens(body.get("prompt"), "prompt")
        except _UserError as e:
            raise _HTTPError(400, str(e)) from None
        if not prompt:
            raise _HTTPError(400, "prompt is empty")
        params = sampling_params(body.get("sampling_params") or {}, n)
        fut = new_future(c)
        admitted = asyncio.Event()
        work = sample_work(c, sm, fut, prompt, params, bool(body.get("prompt_logprobs")), admitted)
        fut.task = asyncio.get_running_loop().create_task(run(fut, work))
        # Until its calls stream (or fail): a full mesh is then a 429 the SDK backs off on.
        waiter = asyncio.ensure_future(admitted.wait())
        await asyncio.wait(
            [fut.task, waiter], timeout=cfg.admit_wait_s, return_when=asyncio.FIRST_COMPLETED
        )
        waiter.cancel()
        err = fut.exc
        if isinstance(err, grpc.aio.AioRpcError) and (
            err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        ):
            futures.pop(fut.id, None)  # not accepted: the SDK backs off and sends it again
            raise _grpc_http(err)
        remember(c, request, fut)
        if isinstance(seq, int):
            sm.by_seq[seq] = fut.id
            if len(sm.by_seq) > 4096:
                for old in sorted(sm.by_seq)[:2048]:
                    sm.by_seq.pop(old, None)
        return future_answer(fut, sample_sequence_ids=[f"{fut.id}:{i}" for i in range(n)])

    # -- futures ---------------------------------------------------------------------------------

    # -- MinT's extras (mindlab-toolkit's mint.mint) --------------------------------------------

    @api.post("/mint/checkpoints/interpolate")
    @route
    async def interpolate_checkpoints(request: Request):
        """interpolate_checkpoints(source_paths, coefficients, output_path): the store's merge,
        a new revision whose delta is exactly sum_i c_i * delta_i (the sources' low-rank
        factors concatenated; rank = the sum of theirs), provenance = the sources."""
        c = await caller_of(request)
        body = await body_json(request)
        fut = replay(c, request)
        if fut is not None:
            return future_answer(fut)
        paths, coefs = body.get("source_paths"), body.get("coefficients")
        if not isinstance(paths, list) or not paths:
            raise _HTTPError(400, "source_paths must be a non-empty list of tinker:// paths")
        if not isinstance(coefs, list) or len(coefs) != len(paths):
            raise _HTTPError(
                400, f"coefficients must be a list of {len(paths)} numbers, one per source path"
            )
        for i, w in enumerate(coefs):
            if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
                raise _HTTPError(400, f"coefficients[{i}]={w!r} is not a finite number")
        if body.get("output_checkpoint_type", "sampler") != "sampler":
            raise _HTTPError(400, "output_checkpoint_type: only 'sampler' is served")
        refs = [adapter_from_path(p) for p in paths]
        out = body.get("output_path")
        if not c.tenant:
            raise _HTTPError(400, "an admin key has no tenant to save under: use a tenant's key")
        if out is None:
            name = f"interpolated-{uuid.uuid4().hex[:12]}"
        elif isinstance(out, str) and out.startswith("tinker://"):
            target = out[len("tinker://") :]
            tenant, _, name = target.partition("/")
            if tenant != c.tenant or "@" in name or ":" in name:
                raise _HTTPError(
                    400, f"output_path {out!r} must be tinker://{c.tenant}/<name> (no revision)"
                )
        else:
            name = out
        try:
            name = checked_name(name)
        except _UserError as e:
            raise _HTTPError(400, f"output_path: {e}") from None
        fut = new_future(c)
        remember(c, request, fut)

        async def work() -> _Result:
            req = store_pb2.MergeAdaptersRequest(
                name=f"{c.tenant}/{name}",
                sources=[
                    store_pb2.MergeSource(ref=r, weight=float(w))
                    for r, w in zip(refs, coefs, strict=True)
                ],  # fmt: skip
                labels={"mint.interpolate": "1"},
            )
            try:
                resp = await up.store.MergeAdapters(req, metadata=c.md(), timeout=T)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.PERMISSION_DENIED:  # another tenant's path
                    raise _UserError(f"no model at one of {paths!r} for this key") from None
                raise
            return _Result(
                {
                    "path": f"tinker://{resp.revision.ref}",
                    "source_paths": paths,
                    "coefficients": coefs,
                    "checkpoint_type": "sampler",
                    "has_rank_shards": False,
                    "type": "mint_interpolate_checkpoints",
                }
            )

        fut.task = asyncio.get_running_loop().create_task(run(fut, work()))
        return future_answer(fut)

    @api.post("/mint/forward_backward_reverse_kl")
    @route
    async def forward_backward_reverse_kl(request: Request):
        """forward_backward_reverse_kl(reference_model_path, data, temperature): distillation,
        the loss sum_t weights_t * KL(student_t || reference_t) over the vocabulary (the
        executor's reverse_kl), gradients accumulated like forward_backward; outputs per datum
        `loss` (per position), metrics loss:sum."""
        c = await caller_of(request)
        body = await body_json(request)
        m = model_of(c, body.get("model_id"))
        path = body.get("reference_model_path")
        if isinstance(path, str) and path.startswith("mint://"):
            path = "tinker://" + path[len("mint://") :]
        ref = adapter_from_path(path)
        tau = body.get("temperature", 1.0)
        if isinstance(tau, bool) or not isinstance(tau, int | float):
            raise _HTTPError(400, f"temperature={tau!r} is not a number")
        fut_box: list[_Future] = []

        def datums() -> list[training_pb2.TrainingDatum]:
            data = body.get("data")
            if not isinstance(data, list) or not data:
                raise _UserError("data must be a non-empty list of ReverseKLDatum")
            out = []
            for i, d in enumerate(data):
                if not isinstance(d, dict):
                    raise _UserError(f"data[{i}] is not an object")
                ids = _chunk_tokens(d.get("student_input"), f"data[{i}].student_input")
                rids = _chunk_tokens(d.get("reference_input"), f"data[{i}].reference_input")
                inputs = {
                    k: _json_tensor(d.get(k), f"data[{i}].{k}")
                    for k in ("target_tokens", "weights")
                }
                dat = _datum(i, ids, inputs)
                dat.reference_input_ids.extend(rids)
                out.append(dat)
            return out

        async def work() -> _Result:
            req = training_pb2.ForwardBackwardRequest(
                run_id=m.run_id,
                data=datums(),
                loss_fn="reverse_kl",
                loss_fn_config={"temperature": float(tau)},
                reference_ref=ref,
            )
            resp = await with_capacity(
                fut_box[0], lambda: up.router.ForwardBackward(req, metadata=c.md(), timeout=T)
            )
            outs = [list(o.logprobs) for o in resp.outputs]
            return _Result(
                {
                    "outputs": [
                        {"loss": {"data": o, "shape": [len(o)], "dtype": "float32"}} for o in outs
                    ],
                    "metrics": dict(resp.metrics),
                    "type": "mint_forward_backward_reverse_kl",
                }
            )

        answer = submit_ordered(c, request, m, body.get("seq_id"), work)
        fut_box.append(futures[answer["request_id"]])
        return answer

    @api.post("/retrieve_future")
    @route
    async def retrieve_future(request: Request):
        c = await caller_of(request)
        body = await body_json(request)
        rid = body.get("request_id")
        fut = futures.get(rid) if isinstance(rid, str) else None
        if fut is None or not c.may(fut.owner):
            raise _HTTPError(404, f"no future {rid!r}", "future_not_found")
        if not fut.done.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(fut.done.wait(), cfg.poll_s)
        if not fut.done.is_set():
            return {"type": "try_again", "request_id": fut.id, "queue_state": fut.queue_state}
        if fut.error is not None:
            return fut.error
        return fut.result.response(request.headers.get("accept", ""))

    @api.post("/cancel_future")
    @route
    async def cancel_future(request: Request):
        c = await caller_of(request)
        body = await body_json(request)
        fut = futures.get(body.get("request_id"))
        if fut is not None and c.may(fut.owner) and fut.task is not None:
            fut.task.cancel()
        return {}

    return api
