"""The gateway's configuration: read once at start (CLI flags over MINT_GATEWAY_* over defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from mintmesh.services.common.config import check_metrics_port


@dataclass(frozen=True)
class GatewayConfig:
    # The router's gRPC address: the gateway's only upstream.
    router_address: str = "127.0.0.1:50051"
    host: str = "127.0.0.1"
    # HTTP port; 0 picks a free one.
    port: int = 8000
    # Prometheus scrape port (GET /metrics); None = none, 0 = a free one.
    metrics_port: int | None = None
    otlp_endpoint: str = ""
    # Deadline of one request's gRPC calls (a client may ask for less with its own timeout).
    request_timeout_s: float = 600.0
    # Largest n (choices per prompt) and number of prompts in one request.
    max_choices: int = 16
    max_prompts: int = 64
    # A chat's max_tokens when the request gives neither max_completion_tokens nor max_tokens
    # (the executor also ends a sequence at the model's context length).
    default_max_tokens: int = 512
    # HTTPS with the operator's certificate and key (PEM files); both empty = plain HTTP. The
    # router's client port, when it speaks TLS, is trusted through MINT_TLS_CA.
    tls_cert: str = ""
    tls_key: str = ""

    def __post_init__(self) -> None:
        if not self.router_address:
            raise ValueError("router_address is empty: give the router's host:port")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port {self.port} is not a TCP port")
        check_metrics_port(self.metrics_port)
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s {self.request_timeout_s} must be > 0")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("HTTPS needs both tls_cert and tls_key (--tls-cert, --tls-key)")
        if self.max_choices < 1 or self.max_prompts < 1 or self.default_max_tokens < 1:
            raise ValueError("max_choices, max_prompts and default_max_tokens must be >= 1")
