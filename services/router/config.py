from __future__ import annotations

from dataclasses import dataclass, field

from mintmesh.services.common.config import check_metrics_port


@dataclass(frozen=True)
class RouterConfig:
    store_address: str = field(
        default="127.0.0.1:50052",
        metadata={"help": "store address host:port", "flag": "--store", "metavar": "HOST:PORT"},
    )
    executors: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "executor address host:port (repeat the flag for each)",
            "flag": "--executor",
            "metavar": "HOST:PORT",
        },
    )
    host: str = field(default="127.0.0.1", metadata={"help": "bind address"})
    port: int = field(default=50051, metadata={"help": "port; 0 picks a free one"})
    # How often executors' grpc.health.v1 status is checked.
    health_interval_s: float = field(
        default=1.0, metadata={"help": "seconds between checks of the executors' health"}
    )
    # Deadline for a whole Generate when the client sets none.
    request_timeout_s: float = field(
        default=300.0,
        metadata={"help": "deadline of a whole Generate when the client sets none, in seconds"},
    )
    # Deadline for store calls when the client sets none.
    store_timeout_s: float = field(
        default=30.0,
        metadata={"help": "deadline of store calls when the client sets none, in seconds"},
    )
    # Bounded load: no executor takes more than (1 + eps) x the mean in-flight load (+1).
    load_epsilon: float = field(
        default=0.25,
        metadata={
            "help": "bounded load: no executor takes more than (1 + eps) x the mean load (+1)"
        },
    )
    otlp_endpoint: str = field(
        default="", metadata={"help": "OTLP/gRPC endpoint for traces (else env MINT_OTLP_ENDPOINT)"}
    )
    # Tenants: require an API key on every call, checked through the store's Authenticate.
    auth: bool = field(
        default=False, metadata={"help": "require API keys (checked through the store)"}
    )
    # Shared with the store: lets the router call it on behalf of a verified tenant.
    internal_token: str = field(
        default="", metadata={"help": "the mesh's internal token, shared with the store"}
    )
    # Failed authentications a client address may make in a minute before unknown keys are
    # refused from it (RESOURCE_EXHAUSTED) for the rest of the window.
    auth_failures_per_minute: int = field(
        default=30,
        metadata={
            "help": "failed authentications per client address per minute before it is refused"
        },
    )
    # RPCs served at once (each open Generate stream holds one thread): above it, requests queue
    # in the server before any fairness applies, so it bounds the streams one tenant can hold.
    max_workers: int = field(default=1024, metadata={"help": "RPCs (open streams) served at once"})
    # Prometheus endpoint (http://host:PORT/metrics): None = none, 0 = a free port.
    metrics_port: int | None = field(
        default=None,
        metadata={
            "help": "serve Prometheus metrics on http://HOST:PORT/metrics; 0 picks a free port"
        },
    )

    def __post_init__(self) -> None:
        check_metrics_port(self.metrics_port)
        if self.max_workers < 1:
            raise ValueError(f"max_workers={self.max_workers} must be >= 1")
