"""`mint certs` (the README's command) makes a mesh CA and certificates that real gRPC servers
and channels use for mutual TLS: a peer with one is served, a caller without is refused."""

from __future__ import annotations

import stat
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mintmesh.services.common import tls
from mintmesh.services.common.server import build_server, mesh_channel


@pytest.fixture
def certs(tmp_path):
    d = tmp_path / "certs"
    r = subprocess.run(
        [sys.executable, "-m", "mintmesh.cli", "certs", str(d), "--name", "alpha"]
        + ["--name", "beta", "--host", "10.1.2.3", "--host", "store.internal"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "wrote the mesh CA and 3 certificates" in r.stdout  # alpha, beta, operator
    return d


def _check(channel) -> grpc.StatusCode | None:
    try:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    except grpc.RpcError as err:
        return err.code()
    return None


def test_mint_certs_makes_a_working_mesh(certs):
    from cryptography import x509

    for name in ("ca", "alpha", "beta", "operator"):
        for f in (certs / f"{name}.pem", certs / f"{name}-key.pem"):
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    cert = x509.load_pem_x509_certificate((certs / "beta.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {tls.MESH_NAME, "beta", "localhost", "store.internal"} <= set(
        san.get_values_for_type(x509.DNSName)
    )
    assert {"127.0.0.1", "10.1.2.3"} <= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}

    tls.configure(
        tls.MeshIdentity.load(certs / "ca.pem", certs / "alpha.pem", certs / "alpha-key.pem")
    )
    try:
        server = build_server(add_servicers=lambda s: [], mesh_only=True)
        try:
            # This process's own identity (alpha) calling its own mesh-only server: served.
            with mesh_channel(server.address, traced=False) as ch:
                assert _check(ch) is None
            beta = grpc.ssl_channel_credentials(
                root_certificates=(certs / "ca.pem").read_bytes(),
                private_key=(certs / "beta-key.pem").read_bytes(),
                certificate_chain=(certs / "beta.pem").read_bytes(),
            )
            override = [("grpc.ssl_target_name_override", tls.MESH_NAME)]
            with grpc.secure_channel(server.address, beta, options=override) as ch:
                assert _check(ch) is None  # another peer of the same mesh
            anon = grpc.ssl_channel_credentials(root_certificates=(certs / "ca.pem").read_bytes())
            with grpc.secure_channel(server.address, anon, options=override) as ch:
                assert _check(ch) == grpc.StatusCode.UNAVAILABLE  # no client certificate
            with grpc.insecure_channel(server.address) as ch:
                assert _check(ch) == grpc.StatusCode.UNAVAILABLE  # plaintext
        finally:
            server.stop(0)
    finally:
        tls.configure(None)


def test_setup_refuses_half_an_identity_and_warns_on_plaintext(certs, caplog, monkeypatch):
    for k in ("MINT_MESH_CA", "MINT_MESH_CERT", "MINT_MESH_KEY", "MINT_INSECURE_MESH"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="no mesh identity"):
        tls.setup_from({})
    with pytest.raises(ValueError, match="all three"):
        tls.setup_from({"mesh_ca": str(certs / "ca.pem")})
    with pytest.raises(ValueError, match="cannot read"):
        tls.setup_from({"mesh_ca": str(certs / "nope.pem"), "mesh_cert": "x", "mesh_key": "y"})
    with pytest.raises(ValueError, match="both --tls-cert and --tls-key"):
        tls.setup_from({"insecure_mesh": True, "tls_cert": str(certs / "alpha.pem")})
    try:
        with caplog.at_level("WARNING"):
            assert tls.setup_from({"insecure_mesh": True}) is None
        assert "MESH TLS IS OFF" in caplog.text
        assert tls.mesh_identity() is None
    finally:
        tls.configure(None)


def test_gateway_serves_https_with_the_operators_certificate(certs, tmp_path):
    import os
    import ssl
    import urllib.error
    import urllib.request

    argv = [sys.executable, "-m", "mintmesh.services.gateway", "--router", "127.0.0.1:1"]
    argv += ["--port", "0", "--tls-cert", str(certs / "alpha.pem")]
    argv += ["--tls-key", str(certs / "alpha-key.pem")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINT_")}
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=tmp_path
    )
    try:
        line = proc.stdout.readline().split()
        assert line[:2] == ["READY", "gateway"], line
        port = line[2].rpartition(":")[2]
        ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        with urllib.request.urlopen(
            f"https://localhost:{port}/health", context=ctx, timeout=10
        ) as r:
            assert r.status == 200 and b"ok" in r.read()
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP: refused
            urllib.request.urlopen(f"http://localhost:{port}/health", timeout=10).read()
    finally:
        proc.terminate()
        proc.wait(20)
