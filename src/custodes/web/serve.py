"""Running the app under uvicorn: loopback by default, TLS required for any other address,
and a self-signed certificate on request, written outside the vault directory.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from custodes.errors import ConfigurationError
from custodes.settings import is_within
from custodes.vault import Vault

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert: Path
    key: Path


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name may resolve anywhere: treated as public


def check_bind(host: str, tls: TlsFiles | None) -> None:
    """Refuse to listen beyond this host without TLS, saying why and how to fix it."""
    if tls is None and not is_loopback(host):
        raise ConfigurationError(
            f"refusing to listen on {host} without TLS: the dashboard would send passwords "
            "and personal data in the clear to the network. Pass --tls-cert and --tls-key, "
            "or --tls-self-signed, or listen on 127.0.0.1 (the default)"
        )


def fingerprint(cert_pem: bytes) -> str:
    """The certificate's SHA-256 fingerprint, as browsers show it."""
    digest = x509.load_pem_x509_certificate(cert_pem).fingerprint(hashes.SHA256())
    return ":".join(f"{b:02X}" for b in digest)


def self_signed(host: str, directory: Path, *, vault_dir: Path | None, days: int = 90) -> TlsFiles:
    """A new P-256 key and a certificate for host, written 0600 into directory (which must
    lie outside the vault directory: keys never sit beside the data)."""
    if vault_dir is not None and is_within(directory, vault_dir):
        raise ConfigurationError("TLS keys must live outside the vault directory")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        alt = x509.DNSName(host)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    files = TlsFiles(directory / "custodes-tls.crt", directory / "custodes-tls.key")
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    for path, data in (
        (files.key, key_pem),
        (files.cert, cert.public_bytes(serialization.Encoding.PEM)),
    ):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return files


def serve(
    vault: Vault, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, tls: TlsFiles | None = None
) -> None:
    """Serve the dashboard and API until interrupted. One process: sessions live in it."""
    import uvicorn

    from custodes.web.app import create_app

    check_bind(host, tls)
    app = create_app(vault, tls=tls is not None)
    uvicorn.run(
        app,
        host=host,
        port=port,
        ssl_certfile=str(tls.cert) if tls else None,
        ssl_keyfile=str(tls.key) if tls else None,
        # Query strings can hold enrolment codes and searched values: no access log.
        access_log=False,
        server_header=False,
        # The peer address is the client: X-Forwarded-For would let it pick another one.
        proxy_headers=False,
        workers=1,
        log_level="info",
    )
