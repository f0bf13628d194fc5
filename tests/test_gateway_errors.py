"""The gateway's mapping of the router's status codes to OpenAI's error statuses and bodies,
on real grpc.aio errors carrying the google.rpc details our servers send."""

from __future__ import annotations

import grpc
import pytest
from grpc.aio import AioRpcError, Metadata

from mintmesh import errors as E
from mintmesh.services.common.errors import to_rpc_status
from mintmesh.services.gateway.app import from_grpc


def _err(exc: E.MintError) -> AioRpcError:
    st = to_rpc_status(exc)
    return AioRpcError(st.code, Metadata(), Metadata(*st.trailing_metadata), st.details)


@pytest.mark.parametrize(
    "exc, status, type_, code",
    [
        (E.InvalidArgument("bad top_p"), 400, "invalid_request_error", "invalid_argument"),
        (E.FailedPrecondition("gate"), 400, "invalid_request_error", "failed_precondition"),
        (E.Unauthenticated("no key"), 401, "authentication_error", "unauthenticated"),
        (E.TenantDenied("not yours"), 403, "permission_error", "tenant_denied"),
        (E.AdapterNotFound("alice/x"), 404, "not_found_error", "model_not_found"),
        (E.ResourceExhausted("full", retry_after_s=2.2), 429, "rate_limit_error",
         "resource_exhausted"),
        (E.Unavailable("draining"), 503, "service_unavailable_error", "unavailable"),
        (E.MintError("bug"), 500, "server_error", "mint_error"),
    ],
)  # fmt: skip
def test_status_codes_map_to_openai_errors(exc, status, type_, code):
    api = from_grpc(_err(exc), model_param=True)
    assert (api.status, api.type, api.code) == (status, type_, code)
    assert api.body()["error"]["message"] == exc.message
    if status == 429:
        assert api.headers == {"Retry-After": "3"}  # RetryInfo 2.2 s, rounded up
    else:
        assert api.headers == {}
    assert api.param == ("model" if status in (403, 404) else None)


def test_deadline_and_cancel_map_to_504_and_499():
    e = AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, Metadata(), Metadata(), "too slow")
    assert from_grpc(e).status == 504 and from_grpc(e).type == "timeout_error"
    e = AioRpcError(grpc.StatusCode.CANCELLED, Metadata(), Metadata(), "gone")
    assert from_grpc(e).status == 499
