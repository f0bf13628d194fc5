"""A whole local cluster as real processes on 127.0.0.1: the store, N (cache sidecar, executor)
pairs, the router and the HTTP gateway. Used by `mint up`, `mint demo` and the end-to-end tests.

Every child is started with `python -m <service module>` on port 0 (the router on the port asked
for) and prints "READY <service> <address>" when it serves; its other output goes to a log file
under <data>/logs. stop() sends SIGTERM (graceful drain) in reverse start order, then SIGKILL to
anything still alive after the grace period.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    pass


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    address: str = ""
    metrics_address: str = ""  # host:port of its /metrics, from "METRICS <service> <host:port>"
    _ready: threading.Event = field(default_factory=threading.Event)
    _reader: threading.Thread | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the reader thread
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,
            # Not the caller's directory: `python -m` puts its cwd first on sys.path, and from a
            # checkout the top-level kernels/ and cache/ folders would shadow the PyPI packages
            # of those names that transformers imports (transformers >= 5.25 needs `kernels`).
            cwd=str(self.log_path.parent),
        )
        self._reader = threading.Thread(
            target=self._read, args=(log,), name=f"out-{self.name}", daemon=True
        )
        self._reader.start()

    def _read(self, log) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace")
            if line.startswith("METRICS ") and not self._ready.is_set():
                parts = line.split()
                if len(parts) >= 3:
                    self.metrics_address = parts[2]
            if line.startswith("READY ") and not self._ready.is_set():
                parts = line.split()
                if len(parts) >= 3:
                    self.address = parts[2]
                    self._ready.set()
            log.write(raw)
            log.flush()
        log.close()

    def wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.1):
            if self.proc is not None and self.proc.poll() is not None:
                raise ClusterError(
                    f"{self.name} exited with code {self.proc.returncode} before it was ready; "
                    f"log: {self.log_path}\n{tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"{self.name} not ready after {timeout:.0f}s; log: {self.log_path}\n"
                    f"{tail(self.log_path)}"
                )
        return self.address

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


@dataclass
class ClusterConfig:
    model_dir: Path
    data_dir: Path
    executors: int = 2
    host: str = "127.0.0.1"
    port: int = 50051
    otlp_endpoint: str = ""
    max_batch_size: int = 32
    cache_capacity_bytes: int = 0
    env: dict[str, str] = field(default_factory=dict)
    # Tenants and API keys: on by default; the admin key is generated unless given.
    auth: bool = True
    admin_key: str = ""
    # The HTTP gateway (OpenAI API): its port (0 = any free one), or None for no gateway.
    http_port: int | None = 0


class LocalCluster:
    def __init__(self, config: ClusterConfig):
        self.config = config
        self.children: dict[str, Child] = {}
        self.router_address = ""
        self.store_address = ""
        self.cache_addresses: list[str] = []
        self.executor_addresses: list[str] = []
        self.gateway_address = ""
        self.admin_key = config.admin_key or (
            f"mint_admin_{secrets.token_urlsafe(24)}" if config.auth else ""
        )
        self._internal_token = secrets.token_urlsafe(32) if config.auth else ""

    @property
    def openai_base_url(self) -> str:
        """The gateway's OpenAI API root ("" without a gateway)."""
        return f"http://{self.gateway_address}/v1" if self.gateway_address else ""

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.config.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        # Each process is small: keep intra-op threads modest on shared CPUs.
        env.setdefault("OMP_NUM_THREADS", "2")
        if self.config.otlp_endpoint:
            env["MINT_OTLP_ENDPOINT"] = self.config.otlp_endpoint
        if self.config.auth:
            # Secrets travel in the environment, not on command lines others can read.
            env.update(
                MINT_STORE_AUTH="1",
                MINT_STORE_ADMIN_KEY=self.admin_key,
                MINT_STORE_INTERNAL_TOKEN=self._internal_token,
                MINT_CACHE_INTERNAL_TOKEN=self._internal_token,
                MINT_ROUTER_AUTH="1",
                MINT_ROUTER_INTERNAL_TOKEN=self._internal_token,
            )
        return env

    def _child(self, name: str, module: str, args: list[str]) -> Child:
        argv = [sys.executable, "-m", module, *args]
        if self.config.otlp_endpoint:
            argv += ["--otlp-endpoint", self.config.otlp_endpoint]
        child = Child(
            name=name,
            argv=argv,
            log_path=self.config.data_dir / "logs" / f"{name}.log",
            env=self._env(),
        )
        self.children[name] = child
        return child

    def start(self, timeout: float = 180.0) -> str:
        c = self.config
        c.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            store = self._child(
                "store",
                "mintmesh.services.store",
                [
                    "--data-dir",
                    str(c.data_dir / "store"),
                    "--model-dir",
                    str(c.model_dir),
                    "--host",
                    c.host,
                    "--port",
                    "0",
                    "--metrics-port",
                    "0",
                ],
            )
            store.start()
            self.store_address = store.wait_ready(timeout)
            caches = []
            for i in range(c.executors):
                args = [
                    "--cache-dir",
                    str(c.data_dir / f"node-{i}"),
                    "--store",
                    self.store_address,
                    "--host",
                    c.host,
                    "--port",
                    "0",
                    "--metrics-port",
                    "0",
                ]
                if c.cache_capacity_bytes:
                    args += ["--capacity-bytes", str(c.cache_capacity_bytes)]
                ch = self._child(f"cache-{i}", "mintmesh.cache", args)
                ch.start()
                caches.append(ch)
            self.cache_addresses = [ch.wait_ready(timeout) for ch in caches]
            execs = []
            for i in range(c.executors):
                ex = self._child(
                    f"executor-{i}",
                    "mintmesh.services.executor",
                    [
                        "--model-dir",
                        str(c.model_dir),
                        "--cache-dir",
                        str(c.data_dir / f"node-{i}"),
                        "--cache",
                        self.cache_addresses[i],
                        "--host",
                        c.host,
                        "--port",
                        "0",
                        "--executor-id",
                        f"executor-{i}",
                        "--max-batch-size",
                        str(c.max_batch_size),
                        "--metrics-port",
                        "0",
                    ],
                )
                ex.start()
                execs.append(ex)
            self.executor_addresses = [ex.wait_ready(timeout) for ex in execs]
            args = ["--store", self.store_address, "--host", c.host, "--port", str(c.port)]
            args += ["--metrics-port", "0"]
            for addr in self.executor_addresses:
                args += ["--executor", addr]
            router = self._child("router", "mintmesh.services.router", args)
            router.start()
            self.router_address = router.wait_ready(timeout)
            if c.http_port is not None:
                gw = self._child(
                    "gateway",
                    "mintmesh.services.gateway",
                    [
                        "--router",
                        self.router_address,
                        "--host",
                        c.host,
                        "--port",
                        str(c.http_port),
                        "--metrics-port",
                        "0",
                    ],  # fmt: skip
                )
                gw.start()
                self.gateway_address = gw.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self._wait_executors_healthy(timeout)
        return self.router_address

    def _wait_executors_healthy(self, timeout: float) -> None:
        from mintmesh.client import MintClient

        deadline = time.monotonic() + timeout
        with MintClient(self.router_address, timeout=5, api_key=self.admin_key) as cl:
            while True:
                st = cl.status()
                if st.executors and all(e.healthy for e in st.executors):
                    return
                if time.monotonic() > deadline:
                    raise ClusterError(f"executors not healthy after {timeout:.0f}s: {st}")
                time.sleep(0.2)

    @property
    def metrics_urls(self) -> dict[str, str]:
        """Each child's Prometheus endpoint, by child name (store, cache-0, executor-0, ...)."""
        return {
            name: f"http://{ch.metrics_address}/metrics"
            for name, ch in self.children.items()
            if ch.metrics_address
        }

    def stop(self, grace: float = 15.0) -> None:
        for child in reversed(list(self.children.values())):
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in reversed(list(self.children.values())):
            if child.wait(max(0.1, deadline - time.monotonic())) is None and child.alive:
                logger.warning("%s did not stop within %.0fs: killing it", child.name, grace)
                child.signal(signal.SIGKILL)
                child.wait(5)

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
