"""Mutual TLS inside the mesh, and TLS on the client ports.

Every service holds a mesh identity: a certificate signed by the mesh's own CA, used both to
serve (the store, the cache sidecars and the executors accept only callers that present a
certificate from the same CA) and to call its peers. `mint up` makes the CA and one certificate
per service (`make_mesh_pki`); compose mounts those `mint certs` wrote. The identity is set once
per process (`configure`, from --mesh-ca/--mesh-cert/--mesh-key or MINT_MESH_CA/_CERT/_KEY),
the way tracing is: every server and mesh channel the process then builds uses it.

Peers check that a certificate comes from the mesh CA, not which host it names: addresses in
the mesh are whatever the deployment gives (127.0.0.1:port here, service names in compose), so
every mesh certificate carries the name MESH_NAME and channels verify against it.

The router's and the gateway's client ports are served with TLS when the operator gives a
certificate (--tls-cert/--tls-key); clients then trust it with MINT_TLS_CA (or the system's
roots). Without a mesh identity a service refuses to start unless told --insecure-mesh, and
then says so on every start: plaintext is for development only.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

MESH_NAME = "mint-mesh"
INSECURE_WARNING = (
    "MESH TLS IS OFF (--insecure-mesh): this service accepts calls from anyone who can reach "
    "its port, with no certificate. Use this for development only."
)


@dataclass(frozen=True)
class MeshIdentity:
    """PEM bytes: the mesh CA's certificate, this service's certificate and its key."""

    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def load(cls, ca: str | Path, cert: str | Path, key: str | Path) -> MeshIdentity:
        try:
            return cls(Path(ca).read_bytes(), Path(cert).read_bytes(), Path(key).read_bytes())
        except OSError as e:
            raise ValueError(f"cannot read the mesh TLS files: {e}") from None


@dataclass(frozen=True)
class ServerTLS:
    """A certificate and key (PEM) for a client-facing port."""

    cert: bytes
    key: bytes


_mesh: MeshIdentity | None = None


def configure(identity: MeshIdentity | None) -> None:
    """Set this process's mesh identity (None: plaintext)."""
    global _mesh
    _mesh = identity


def mesh_identity() -> MeshIdentity | None:
    return _mesh


def add_flags(parser, *, client_port: bool = False) -> None:
    """The mesh TLS flags of a service's command line (and, client_port, the client port's)."""
    parser.add_argument("--mesh-ca", help="the mesh CA's certificate (env MINT_MESH_CA)")
    parser.add_argument("--mesh-cert", help="this service's mesh certificate (MINT_MESH_CERT)")
    parser.add_argument("--mesh-key", help="its private key (MINT_MESH_KEY)")
    parser.add_argument(
        "--insecure-mesh",
        action="store_true",
        default=None,
        help="serve and call peers in plaintext, with no certificates: development only "
        "(MINT_INSECURE_MESH=1)",
    )
    if client_port:
        parser.add_argument(
            "--tls-cert", help="TLS certificate for the client port (MINT_TLS_CERT; default: none)"
        )
        parser.add_argument("--tls-key", help="its private key (MINT_TLS_KEY)")


def setup_from(args: dict) -> ServerTLS | None:
    """Configure the mesh identity from parsed flags (popped from args) or the environment;
    return the client port's TLS, if any. ValueError when neither an identity nor
    --insecure-mesh is given, or the files do not load."""
    env = os.environ
    ca = args.pop("mesh_ca", None) or env.get("MINT_MESH_CA", "")
    cert = args.pop("mesh_cert", None) or env.get("MINT_MESH_CERT", "")
    key = args.pop("mesh_key", None) or env.get("MINT_MESH_KEY", "")
    insecure = args.pop("insecure_mesh", None) or env.get("MINT_INSECURE_MESH", "") in ("1", "true")
    tls_cert = args.pop("tls_cert", None) or env.get("MINT_TLS_CERT", "")
    tls_key = args.pop("tls_key", None) or env.get("MINT_TLS_KEY", "")
    if ca or cert or key:
        if not (ca and cert and key):
            raise ValueError("mesh TLS needs all three of --mesh-ca, --mesh-cert and --mesh-key")
        configure(MeshIdentity.load(ca, cert, key))
    elif insecure:
        configure(None)
        logger.warning("%s", INSECURE_WARNING)
    else:
        raise ValueError(
            "no mesh identity: give --mesh-ca, --mesh-cert and --mesh-key (`mint certs DIR` "
            "makes them; `mint up` does it for you), or --insecure-mesh for plaintext in "
            "development"
        )
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("client-port TLS needs both --tls-cert and --tls-key")
    if tls_cert:
        try:
            return ServerTLS(Path(tls_cert).read_bytes(), Path(tls_key).read_bytes())
        except OSError as e:
            raise ValueError(f"cannot read the client-port TLS files: {e}") from None
    return None


def server_credentials(*, mesh_only: bool, client_tls: ServerTLS | None = None):
    """Credentials for a server port, or None for plaintext. mesh_only: the mesh identity,
    client certificates required (an executor, a sidecar, the store). Otherwise the client
    port's own certificate when given (the router, the gateway)."""
    import grpc

    if mesh_only:
        if _mesh is None:
            return None
        return grpc.ssl_server_credentials(
            [(_mesh.key, _mesh.cert)], root_certificates=_mesh.ca, require_client_auth=True
        )
    if client_tls is not None:
        return grpc.ssl_server_credentials([(client_tls.key, client_tls.cert)])
    return None


def channel_credentials():
    """(credentials, options) for a channel to a mesh peer; (None, []) in plaintext."""
    import grpc

    if _mesh is None:
        return None, []
    creds = grpc.ssl_channel_credentials(
        root_certificates=_mesh.ca, private_key=_mesh.key, certificate_chain=_mesh.cert
    )
    return creds, [("grpc.ssl_target_name_override", MESH_NAME)]


# -- making a mesh's certificates ---------------------------------------------------------


def make_mesh_pki(
    directory: str | Path, names: Iterable[str], *, hosts: Iterable[str] = (), days: int = 365
) -> Path:
    """A new CA (ca.pem, ca-key.pem) and, for each name, <name>.pem and <name>-key.pem signed
    by it, valid for MESH_NAME, the name itself, localhost, 127.0.0.1 and hosts. Every file is
    written 0600 (this user's only, like every data file). Returns the directory."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    def pem_key(k) -> bytes:
        return k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(path: Path, data: bytes, mode: int) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(path, mode)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "MinT mesh CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    write(d / "ca.pem", ca.public_bytes(serialization.Encoding.PEM), 0o600)
    write(d / "ca-key.pem", pem_key(ca_key), 0o600)
    extra = list(hosts)
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [
            x509.DNSName(n) for n in dict.fromkeys([MESH_NAME, name, "localhost"])
        ]
        ips = ["127.0.0.1"]
        for h in extra:
            try:
                ips.append(str(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in dict.fromkeys(ips)]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        write(d / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM), 0o600)
        write(d / f"{name}-key.pem", pem_key(key), 0o600)
    return d
