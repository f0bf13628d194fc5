"""Domain exceptions. Core code raises these; services/common maps them to gRPC status codes
in one interceptor (see mintmesh.services.common.errors). Messages name the bad value."""

from __future__ import annotations


class MintError(Exception):
    """Base of every domain error. `reason` becomes the google.rpc.ErrorInfo reason."""

    reason = "MINT_ERROR"

    def __init__(self, message: str, *, metadata: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.metadata = dict(metadata or {})


class AdapterNotFound(MintError):
    """Unknown adapter, revision, alias or digest (NOT_FOUND)."""

    reason = "ADAPTER_NOT_FOUND"


class TrainingRunNotFound(AdapterNotFound):
    """No such training run on this executor (NOT_FOUND); metadata run_id names it."""

    reason = "TRAINING_RUN_NOT_FOUND"


class InvalidArgument(MintError):
    """A malformed request: bad reference, bad sampling parameters (INVALID_ARGUMENT)."""

    reason = "INVALID_ARGUMENT"


class InvalidAdapter(InvalidArgument):
    """An upload that is not a valid LoRA adapter for this deployment (INVALID_ARGUMENT)."""

    reason = "INVALID_ADAPTER"


class BaseModelMismatch(MintError):
    """An adapter made for another base model (FAILED_PRECONDITION)."""

    reason = "BASE_MODEL_MISMATCH"


class FailedPrecondition(MintError):
    """The system is not in a state where the request can run (FAILED_PRECONDITION)."""

    reason = "FAILED_PRECONDITION"


class TenantDenied(MintError):
    """The caller's tenant may not touch this adapter (PERMISSION_DENIED)."""

    reason = "TENANT_DENIED"


class Unauthenticated(MintError):
    """Missing or wrong API key (UNAUTHENTICATED)."""

    reason = "UNAUTHENTICATED"


class DigestMismatch(MintError):
    """Bytes whose sha256 differs from the digest they were sent under (DATA_LOSS)."""

    reason = "DIGEST_MISMATCH"


class ResourceExhausted(MintError):
    """A queue, pool or budget is full (RESOURCE_EXHAUSTED + RetryInfo)."""

    reason = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, retry_after_s: float = 0.5, **kw):
        super().__init__(message, **kw)
        self.retry_after_s = retry_after_s


class Unavailable(MintError):
    """Draining, down or no healthy backend: retry elsewhere (UNAVAILABLE)."""

    reason = "UNAVAILABLE"


class AlreadyExists(MintError):
    """ALREADY_EXISTS."""

    reason = "ALREADY_EXISTS"
