"""The gateway's configuration: read once at start (CLI flags over MINT_GATEWAY_* over defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mintmesh.services.common.config import check_metrics_port


@dataclass(frozen=True)
class GatewayConfig:
    # The router's gRPC address: the gateway's only upstream.
    router_address: str = field(
        default="127.0.0.1:50051",
        metadata={"help": "router address host:port", "flag": "--router", "metavar": "HOST:PORT"},
    )
    host: str = field(default="127.0.0.1", metadata={"help": "bind address"})
    # HTTP port; 0 picks a free one.
    port: int = field(default=8000, metadata={"help": "HTTP port; 0 picks a free one"})
    # Prometheus scrape port (GET /metrics); None = none, 0 = a free one.
    metrics_port: int | None = field(
        default=None, metadata={"help": "Prometheus port (GET /metrics); 0 = a free one"}
    )
    otlp_endpoint: str = field(
        default="", metadata={"help": "OTLP/gRPC endpoint for traces (else env MINT_OTLP_ENDPOINT)"}
    )
    # Deadline of one request's gRPC calls (a client may ask for less with its own timeout).
    request_timeout_s: float = field(
        default=600.0, metadata={"help": "deadline of one request, in seconds"}
    )
    # Largest n (choices per prompt) and number of prompts in one request.
    max_choices: int = field(
        default=16, metadata={"help": "largest n (choices per prompt) of one request"}
    )
    max_prompts: int = field(default=64, metadata={"help": "most prompts in one request"})
    # A chat's max_tokens when the request gives neither max_completion_tokens nor max_tokens
    # (the executor also ends a sequence at the model's context length).
    default_max_tokens: int = field(
        default=512, metadata={"help": "a chat's max_tokens when the request sets none"}
    )
    # HTTPS with the operator's certificate and key (PEM files); both empty = plain HTTP. The
    # router's client port, when it speaks TLS, is trusted through MINT_TLS_CA.
    tls_cert: str = field(default="", metadata={"help": "serve HTTPS with this certificate (PEM)"})
    tls_key: str = field(default="", metadata={"help": "its private key (PEM)"})

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


@dataclass(frozen=True)
class TinkerConfig:
    """The Tinker API's knobs (env MINT_GATEWAY_TINKER_<FIELD>)."""

    # get_info's tokenizer id: what TrainingClient.get_tokenizer() loads with
    # AutoTokenizer.from_pretrained (a hub id, or a local directory without ':' to load
    # offline). "" = the base model's served name.
    tokenizer_id: str = field(
        default="",
        metadata={
            "help": "the Tinker API's get_info tokenizer: a hub id or a local directory (no ':')",
            "default_help": "the base model's served name",
        },
    )
    # LoRA alpha of the runs create_model makes (Tinker's LoRA uses a fixed alpha).
    lora_alpha: float = field(
        default=32.0,
        metadata={"help": "LoRA alpha of the runs the Tinker API's create_model makes"},
    )
    # How long retrieve_future holds a poll open before try_again (the SDK's limit is 45 s).
    poll_s: float = field(
        default=20.0,
        metadata={
            "help": "how long retrieve_future holds a poll open before try_again, in seconds (< 45)"
        },
    )
    # How long a model's calls wait for a missing seq_id before going on without it.
    gap_s: float = field(
        default=10.0,
        metadata={"help": "how long a model's calls wait for a missing seq_id, in seconds"},
    )
    # A session that sends nothing for this long is ended (its runs dropped).
    session_ttl_s: float = field(
        default=600.0,
        metadata={"help": "a Tinker session that sends nothing for this long is ended, in seconds"},
    )
    # How long a finished future's result is kept for its poller.
    result_ttl_s: float = field(
        default=900.0,
        metadata={"help": "how long a finished future's result is kept for its poller, in seconds"},
    )
    # How long an accepted training call retries a RESOURCE_EXHAUSTED router.
    capacity_retry_s: float = field(
        default=120.0,
        metadata={"help": "how long an accepted training call retries a full mesh, in seconds"},
    )
    # How long asample waits for its first tokens before answering (so that a full mesh is a
    # 429 the SDK backs off on).
    admit_wait_s: float = field(
        default=10.0,
        metadata={"help": "how long asample waits for its first tokens before a 429, in seconds"},
    )
    max_samples: int = field(
        default=16, metadata={"help": "most samples of one Tinker sample call"}
    )
    # Tell the SDK pjwt_auth_enabled: it then trades its key for a JWT at /auth/token and
    # sends the JWT on every call; that is what lets MinT's `sk-` keys (mindlab-toolkit)
    # through the SDK. The JWT is this gateway's own (HMAC-signed, remembered in memory).
    pjwt_auth: bool = field(
        default=True,
        metadata={
            "help": "tell the SDK to trade its key for this gateway's JWT (lets sk- keys through)"
        },
    )
    jwt_ttl_s: float = field(
        default=3600.0, metadata={"help": "lifetime of the gateway's JWTs, in seconds"}
    )

    def __post_init__(self) -> None:
        for name in ("poll_s", "gap_s", "session_ttl_s", "result_ttl_s", "admit_wait_s",
                     "jwt_ttl_s"):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ValueError(f"tinker {name}={getattr(self, name)} must be > 0")
        if not 0 < self.poll_s < 45:
            raise ValueError(f"tinker poll_s={self.poll_s} must be in (0, 45): the SDK's limit")
        if self.lora_alpha <= 0 or self.capacity_retry_s < 0 or self.max_samples < 1:
            raise ValueError("tinker lora_alpha > 0, capacity_retry_s >= 0, max_samples >= 1")
        if ":" in self.tokenizer_id:
            raise ValueError(f"tinker tokenizer_id {self.tokenizer_id!r}: the SDK cuts at ':'")
