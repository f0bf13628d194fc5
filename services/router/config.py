from __future__ import annotations

from dataclasses import dataclass

from mintmesh.services.common.config import check_metrics_port


@dataclass(frozen=True)
class RouterConfig:
    store_address: str = "127.0.0.1:50052"
    executors: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 50051
    # How often executors' grpc.health.v1 status is checked.
    health_interval_s: float = 1.0
    # Deadline for a whole Generate when the client sets none.
    request_timeout_s: float = 300.0
    # Deadline for store calls when the client sets none.
    store_timeout_s: float = 30.0
    # Bounded load: no executor takes more than (1 + eps) x the mean in-flight load (+1).
    load_epsilon: float = 0.25
    otlp_endpoint: str = ""
    # Tenants: require an API key on every call, checked through the store's Authenticate.
    auth: bool = False
    # Shared with the store: lets the router call it on behalf of a verified tenant.
    internal_token: str = ""
    # Failed authentications a client address may make in a minute before unknown keys are
    # refused from it (RESOURCE_EXHAUSTED) for the rest of the window.
    auth_failures_per_minute: int = 30
    # RPCs served at once (each open Generate stream holds one thread): above it, requests queue
    # in the server before any fairness applies, so it bounds the streams one tenant can hold.
    max_workers: int = 1024
    # Prometheus endpoint (http://host:PORT/metrics): None = none, 0 = a free port.
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        check_metrics_port(self.metrics_port)
        if self.max_workers < 1:
            raise ValueError(f"max_workers={self.max_workers} must be >= 1")
