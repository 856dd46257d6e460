"""Running the app under uvicorn: loopback by default, TLS required for any other address,
and a self-signed certificate on request, written outside the vault directory.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from custodes.audit.witness import check_witness_url
from custodes.bootstrap import UnlockedVault, assemble_vault
from custodes.errors import ConfigurationError
from custodes.settings import is_within
from custodes.web.security import trusted_networks

log = logging.getLogger("custodes.serve")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MAX_WORKERS = 64
MAX_RESTARTS = 5  # within RESTART_WINDOW seconds, before the server gives up
RESTART_WINDOW = 60.0
SHUTDOWN_GRACE = 30.0
LISTEN_BACKLOG = (
    2048  # uvicorn's own default  # seconds a worker has to finish its requests when stopped
)


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
    unlocked: UnlockedVault,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    tls: TlsFiles | None = None,
    workers: int = 1,
    trusted_proxies: Sequence[str] = (),
    witnesses: Sequence[str] = (),
) -> None:
    """Serve the dashboard and API until interrupted, from `workers` processes.

    Every worker opens the vault's database for itself and listens on the port through a
    socket of its own (SO_REUSEPORT), so that the kernel spreads connections across the
    workers; sessions, failed-login counts and the access log live in the database, so
    any worker may answer any request. Workers are forked after the keys are unsealed,
    so the passphrase is asked for once and the keys never leave memory. Every worker
    signs the log on a timer and sends what is signed on to each of `witnesses`.
    """
    check_bind(host, tls)
    if not 1 <= workers <= MAX_WORKERS:
        raise ConfigurationError(f"--workers is 1 to {MAX_WORKERS}")
    trusted_networks(trusted_proxies)  # refuse a malformed entry before anything starts
    for url in witnesses:
        check_witness_url(url)
    listen = _Listen(host, port, tls, tuple(trusted_proxies), tuple(witnesses))
    if workers == 1:
        _run_worker(unlocked, listen, own_socket=False)
        return
    # Bound, never listening: the port is held, and taken ports are refused here, at once.
    reservation = _port_socket(host, port)
    try:
        _supervise(unlocked, listen, workers)
    finally:
        reservation.close()


@dataclass(frozen=True, slots=True)
class _Listen:
    host: str
    port: int
    tls: TlsFiles | None
    trusted_proxies: tuple[str, ...] = ()
    witnesses: tuple[str, ...] = ()  # where each worker sends the checkpoints signed


def _port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port that other sockets of this user may share.

    One listening socket shared by forked workers hands each new connection to whichever
    worker wakes first, and a busy one keeps waking first: 15 of 16 connections were
    seen on one of two workers. Sockets of their own under SO_REUSEPORT have the kernel
    spread connections over the workers instead (Linux lets only the same user join).
    """
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigurationError("--workers above 1 needs SO_REUSEPORT, which this system lacks")
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def _config(app: Any, listen: _Listen) -> uvicorn.Config:
    tls = listen.tls
    return uvicorn.Config(
        app,
        host=listen.host,
        port=listen.port,
        ssl_certfile=str(tls.cert) if tls else None,
        ssl_keyfile=str(tls.key) if tls else None,
        # Query strings can hold enrolment codes and searched values: no access log.
        access_log=False,
        server_header=False,
        # X-Forwarded-For is read by the app only from the operator's trusted proxies;
        # uvicorn's own reading would take it from any peer.
        proxy_headers=False,
        log_level="info",
    )


def _run_worker(unlocked: UnlockedVault, listen: _Listen, *, own_socket: bool) -> None:
    from custodes.web.app import create_app

    sock = None
    if own_socket:
        sock = _port_socket(listen.host, listen.port)
        sock.listen(LISTEN_BACKLOG)
    vault = assemble_vault(unlocked)
    vault.keep_signing(witnesses=listen.witnesses)
    try:
        app = create_app(vault, tls=listen.tls is not None, trusted_proxies=listen.trusted_proxies)
        config = _config(app, listen)
        server = uvicorn.Server(config)
        server.run(sockets=[sock] if sock is not None else None)
    finally:
        vault.close()
        if sock is not None:
            sock.close()


def _supervise(unlocked: UnlockedVault, listen: _Listen, workers: int) -> None:
    """Fork the workers and keep them running until told to stop.

    A worker that dies is replaced (a crash must not shrink the service silently), unless
    workers keep dying at once, which means something is wrong that restarting won't fix.
    """
    context = multiprocessing.get_context("fork")
    stopping = False

    def start() -> multiprocessing.process.BaseProcess:
        process = context.Process(
            target=_run_worker, args=(unlocked, listen), kwargs={"own_socket": True}
        )
        process.start()
        return process

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    running = [start() for _ in range(workers)]
    restarts: list[float] = []
    try:
        while not stopping:
            time.sleep(0.2)
            for n, process in enumerate(running):
                if process.is_alive() or stopping:
                    continue
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < RESTART_WINDOW] + [now]
                if len(restarts) > MAX_RESTARTS:
                    raise ConfigurationError(
                        "server workers keep exiting at start; see the messages above"
                    )
                log.warning("a server worker exited (code %s); starting another", process.exitcode)
                running[n] = start()
    finally:
        for process in running:
            if process.is_alive():
                process.terminate()
        for process in running:
            process.join(timeout=SHUTDOWN_GRACE)
            if process.is_alive():
                process.kill()
                process.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
