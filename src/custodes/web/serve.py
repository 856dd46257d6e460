"""Running the app under uvicorn: loopback by default, TLS required for any other address,
and a self-signed certificate on request, written outside the vault directory. With
several workers, a supervisor keeps them running and the port its own.
"""

from __future__ import annotations

import ctypes
import datetime
import errno
import fcntl
import ipaddress
import logging
import multiprocessing
import os
import re
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from custodes.alerts import AlertRoutes, Dispatcher
from custodes.audit.sequencer import SequencerAddress
from custodes.audit.witness import check_witness_url
from custodes.bootstrap import UnlockedVault, assemble_vault, for_server, runs_as_schema_owner
from custodes.crypto.keyring import ShareMode
from custodes.errors import ConfigurationError
from custodes.settings import is_within
from custodes.vault import Vault
from custodes.web.security import trusted_networks

log = logging.getLogger("custodes.serve")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MAX_WORKERS = 64
# A dead worker is replaced after RESTART_DELAY seconds, doubled at each death in a row up
# to RESTART_DELAY_MAX; a worker that stayed up RESTART_RESET_AFTER seconds starts it over.
RESTART_DELAY = 1.0
RESTART_DELAY_MAX = 60.0
RESTART_RESET_AFTER = 60.0
SHUTDOWN_GRACE = 30.0  # seconds a worker has to finish its requests when stopped
LISTEN_BACKLOG = 2048  # uvicorn's own default


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


def check_proxy_mode(trusted_proxies: Sequence[str], behind_tls_proxy: bool) -> None:
    """Behind a TLS proxy, the proxy must be named: only a trusted proxy's word that the
    client spoke https is taken, and without one no request could be answered."""
    if behind_tls_proxy and not trusted_proxies:
        raise ConfigurationError(
            "--behind-tls-proxy needs the proxy's address in --trusted-proxy (127.0.0.1 "
            "for a proxy on this host): only requests it relays over https are answered"
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
    alerts: AlertRoutes | None = None,
    guard_every: float = 10.0,
    ready: Callable[[], None] | None = None,
    retention_every: float = 3600.0,
    behind_tls_proxy: bool = False,
) -> None:
    """Serve the dashboard and API until interrupted, from `workers` processes.

    Every worker opens the vault's database for itself and listens on the port through a
    socket of its own (SO_REUSEPORT), so that the kernel spreads connections across the
    workers; sessions, failed-login counts and the access log live in the database, so
    any worker may answer any request. Workers are forked after the keys are unsealed,
    so the passphrase is asked for once and the keys never leave memory. Every worker
    signs the log on a timer and sends what is signed on to each of `witnesses`. One
    process (the single worker, or the log sequencer beside several) runs the anomaly
    guard every `guard_every` seconds, and the schema's retention rules every
    `retention_every` seconds.
    The port is claimed first (a port another custodes server holds is refused); `ready`
    is called, with one worker, once it serves, and with several once the port is this
    server's, before the workers start (the supervisor takes the stop signals itself).
    """
    check_bind(host, tls)
    if not 1 <= workers <= MAX_WORKERS:
        raise ConfigurationError(f"--workers is 1 to {MAX_WORKERS}")
    trusted_networks(trusted_proxies)  # refuse a malformed entry before anything starts
    check_proxy_mode(trusted_proxies, behind_tls_proxy)
    for url in witnesses:
        check_witness_url(url)
    if tls is not None:
        _check_tls(tls)
    # A vault set up with a least-privileged role is served with that role's rights only.
    unlocked = for_server(unlocked)
    if runs_as_schema_owner(unlocked):
        log.warning(
            "the server connects to PostgreSQL as the owner of the vault's schema (or a "
            "role as strong): whoever takes over this process could rewrite, delete or "
            "drop the records and the access log. Give the server a role of its own: "
            "'custodes database grant --owner-database URL --app-role NAME'"
        )
    routes = alerts or AlertRoutes()
    routes.check()
    listen = _Listen(
        host,
        port,
        tls,
        tuple(trusted_proxies),
        tuple(witnesses),
        routes,
        guard_every,
        retention_every,
        behind_tls_proxy,
    )
    claim = _claim_port(unlocked.directory, host, port, reserve=workers > 1)
    try:
        if workers == 1:
            _run_worker(unlocked, listen, own_socket=False, ready=ready)
            return
        # Restarts never give up, so what restarting cannot fix must stop the server here,
        # before any fork: a vault that does not open (a tampered setting, a rolled-back
        # log) would otherwise stop every worker at its start, retried forever.
        assemble_vault(unlocked).close()
        if ready is not None:
            ready()
        _supervise(unlocked, listen, workers, claim)
    finally:
        claim.close()


def serve_sealed(
    directory: Path,
    *,
    vault_id: bytes,
    mode: ShareMode,
    keyring_path: Path | None = None,
    database: str | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    tls: TlsFiles | None = None,
    workers: int = 1,
    trusted_proxies: Sequence[str] = (),
    witnesses: Sequence[str] = (),
    alerts: AlertRoutes | None = None,
    guard_every: float = 10.0,
    ready: Callable[[], None] | None = None,
    retention_every: float = 3600.0,
    behind_tls_proxy: bool = False,
) -> None:
    """Serve a vault whose keyring is sealed M-of-N, starting sealed (web.unseal): only
    the seal status and officers' shares are answered until the threshold of shares opens
    the keyring; then the vault is served as by `serve`. SIGUSR1 seals it again.

    One worker only for now: forked workers would each need the shares, or the keys
    handed to them after the fork."""
    from custodes.web.unseal import SealedServer

    check_bind(host, tls)
    if workers != 1:
        raise ConfigurationError(
            "a vault sealed M-of-N is served by one worker for now: drop --workers (or give "
            "the officers' shares with --share to unseal before the workers fork)"
        )
    trusted_networks(trusted_proxies)
    check_proxy_mode(trusted_proxies, behind_tls_proxy)
    for url in witnesses:
        check_witness_url(url)
    if tls is not None:
        _check_tls(tls)
    routes = alerts or AlertRoutes()
    routes.check()
    listen = _Listen(
        host,
        port,
        tls,
        tuple(trusted_proxies),
        tuple(witnesses),
        routes,
        guard_every,
        retention_every,
        behind_tls_proxy,
    )

    def open_app(unlocked: UnlockedVault, officers: list[str]) -> tuple[Any, Callable[[], None]]:
        # The officers act together as the host operator would: the entry is made by a
        # host vault of its own, closed before the server's vault (which has none) opens.
        host_vault = assemble_vault(unlocked, host=True)
        try:
            host_vault.record_unseal(host_vault.operator, officers)
        finally:
            host_vault.close()
        vault = _serving_vault(for_server(unlocked), listen, sequencer=None)
        try:
            app = _app_for(vault, listen)
        except BaseException:
            vault.close()
            raise
        return app, vault.close

    gate = SealedServer(
        directory,
        vault_id=vault_id,
        mode=mode,
        open_app=open_app,
        keyring_path=keyring_path,
        database=database,
    )
    claim = _claim_port(directory, host, port, reserve=False)
    try:
        server = _Server(_config(guarded(gate, listen), listen), ready)
        _stop.server = server
        if _stop.asked:
            return
        server.run()
    finally:
        gate.seal()
        claim.close()


@dataclass(frozen=True, slots=True)
class _Listen:
    host: str
    port: int
    tls: TlsFiles | None
    trusted_proxies: tuple[str, ...] = ()
    witnesses: tuple[str, ...] = ()  # where each worker sends the checkpoints signed
    alerts: AlertRoutes = field(default_factory=AlertRoutes)  # where each worker alerts
    guard_every: float = 10.0  # seconds between the anomaly guard's rounds
    retention_every: float = 3600.0  # seconds between the retention rules' passes
    behind_tls_proxy: bool = False  # answer only what a trusted proxy relays over https


def _check_tls(tls: TlsFiles) -> None:
    """Load the certificate and key as every worker will, so that a pair that cannot
    load stops the server once, with the reason, instead of every worker at its start."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # An empty password: an encrypted key is refused, never asked for at the terminal.
        context.load_cert_chain(tls.cert, tls.key, password=lambda: b"")
    except ssl.SSLError as exc:
        raise ConfigurationError(
            f"cannot use the TLS certificate and key: {exc.reason or 'they do not load'}"
        ) from None
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read the TLS certificate or key: {exc.strerror}"
        ) from None


@dataclass(frozen=True, slots=True)
class _Address:
    family: socket.AddressFamily
    kind: socket.SocketKind
    proto: int
    sockaddr: tuple[str, int] | tuple[str, int, int, int] | tuple[int, bytes]


def _address(host: str, port: int) -> _Address:
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return _Address(family, kind, proto, sockaddr)


class _PortClaim:
    """A server's hold on its port for as long as it runs: an flock on a file of the vault
    directory, and with several workers the bound, never listening, socket that reserves
    the port (see _claim_port)."""

    def __init__(self, lock: int, reservation: socket.socket | None) -> None:
        self._lock = lock
        self._reservation = reservation

    def close(self) -> None:
        """Let go of this process's copies. Closed, never unlocked: an flock belongs to the
        open file, which forked workers share, so a worker closing its copy leaves the
        supervisor's hold as it was, where unlocking would end it."""
        if self._reservation is not None:
            self._reservation.close()
            self._reservation = None
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1


def _claim_port(directory: Path, host: str, port: int, *, reserve: bool) -> _PortClaim:
    """Make host:port this server's, or refuse, naming the port and who holds it.

    Workers listen under SO_REUSEPORT, which lets any later socket of the same user that
    sets it join the port, and the kernel would hand it a share of the connections: a
    second `custodes serve` would start beside the first, neither knowing. So a server
    holds an flock on a file named for its address in the vault directory for its life
    (the kernel lets go when the process dies, however it dies, so a killed server never
    blocks its restart), then binds a probe without SO_REUSEPORT, which fails while
    anything listens on the port, another vault's server included.
    """
    address = _address(host, port)
    named = re.sub(r"[^0-9A-Za-z.]", "_", str(address.sockaddr[0]))
    try:
        lock = os.open(directory / f"serving-{named}-{port}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot open the server's lock file in the vault directory: {exc.strerror}"
        ) from None
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigurationError(
                f"port {port} on {host} is held by another custodes server{_holder(lock)} "
                "serving this vault: stop it first, or choose another --port"
            ) from None
        except OSError as exc:
            raise ConfigurationError(
                f"cannot lock the server's lock file: {exc.strerror}"
            ) from None
        _refuse_a_listener(address, host, port)
        reservation = _port_socket(host, port) if reserve else None
    except BaseException:
        os.close(lock)
        raise
    os.ftruncate(lock, 0)
    os.pwrite(lock, f"{os.getpid()}\n".encode(), 0)
    return _PortClaim(lock, reservation)


def seal_server(directory: Path, host: str, port: int) -> int:
    """Ask the server of this vault on host:port to seal itself (SIGUSR1: drop its keys;
    only a server started sealed, M-of-N, acts on it); the server's process id.

    Found through its port lock in the vault directory, so only an account that may read
    the vault directory and signal the server's processes (its own, or root) can."""
    address = _address(host, port)
    named = re.sub(r"[^0-9A-Za-z.]", "_", str(address.sockaddr[0]))
    path = directory / f"serving-{named}-{port}.lock"
    try:
        lock = os.open(path, os.O_RDONLY)
    except OSError:
        raise ConfigurationError(f"no custodes server of this vault on {host}:{port}") from None
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # held: a server runs
        else:
            raise ConfigurationError(f"no custodes server of this vault on {host}:{port}")
        written = os.pread(lock, 32, 0).decode("ascii", "replace").strip()
    finally:
        os.close(lock)
    if not written.isdigit():
        raise ConfigurationError(f"the server on {host}:{port} did not say its process id")
    pid = int(written)
    try:
        os.kill(pid, signal.SIGUSR1)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot signal the server (process {pid}): {exc.strerror}"
        ) from None
    return pid


def _holder(lock: int) -> str:
    """The process holding a server's lock, as it wrote itself into the file."""
    try:
        written = os.pread(lock, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (process {written})" if written.isdigit() else ""


def _refuse_a_listener(address: _Address, host: str, port: int) -> None:
    """Bind host:port without SO_REUSEPORT and let go: refused while anything listens."""
    probe = socket.socket(address.family, address.kind, address.proto)
    try:
        # SO_REUSEADDR, as servers set it: connections of an earlier server still in
        # TIME_WAIT leave the port free; only a listening socket makes it busy.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address.sockaddr)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigurationError(
                f"port {port} on {host} is in use: another custodes server, or another "
                "program, listens there; stop it first, or choose another --port"
            ) from None
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    finally:
        probe.close()


def _port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port that other sockets of this user may share.

    One listening socket shared by forked workers hands each new connection to whichever
    worker wakes first, and a busy one keeps waking first: 15 of 16 connections were
    seen on one of two workers. Sockets of their own under SO_REUSEPORT have the kernel
    spread connections over the workers instead (Linux lets only the same user join).
    """
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigurationError("--workers above 1 needs SO_REUSEPORT, which this system lacks")
    address = _address(host, port)
    sock = socket.socket(address.family, address.kind, address.proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address.sockaddr)
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


def _run_worker(
    unlocked: UnlockedVault,
    listen: _Listen,
    *,
    own_socket: bool,
    sequencer: SequencerAddress | None = None,
    ready: Callable[[], None] | None = None,
) -> None:
    sock = None
    if own_socket:
        sock = _port_socket(listen.host, listen.port)
        sock.listen(LISTEN_BACKLOG)
    vault = _serving_vault(unlocked, listen, sequencer=sequencer)
    try:
        app = _app_for(vault, listen)
        config = _config(app, listen)
        server = _Server(config, ready)
        _stop.server = server
        if _stop.asked:
            return  # asked to stop while starting, and the exception was lost (_stop_worker)
        server.run(sockets=[sock] if sock is not None else None)
    finally:
        vault.close()
        if sock is not None:
            sock.close()


def _serving_vault(
    unlocked: UnlockedVault, listen: _Listen, *, sequencer: SequencerAddress | None
) -> Vault:
    vault = assemble_vault(unlocked)
    if sequencer is not None:
        vault.sequence_log_through(sequencer)
    if destinations := listen.alerts.destinations():
        vault.send_alerts(Dispatcher(destinations))
    vault.keep_signing(witnesses=listen.witnesses)
    if sequencer is None:
        # The only process: it scores the log as well. With several workers the log
        # sequencer does, so that one guard acts once on each account.
        vault.keep_guarding(listen.guard_every)
        vault.keep_retaining(listen.retention_every)
    return vault


def _app_for(vault: Vault, listen: _Listen) -> Any:
    from custodes.web.app import create_app

    return create_app(
        vault,
        tls=listen.tls is not None,
        trusted_proxies=listen.trusted_proxies,
        behind_tls_proxy=listen.behind_tls_proxy,
    )


def guarded(app: Any, listen: _Listen) -> Any:
    """An app that answers before the vault's own (a sealed server's gate), behind the
    same security middleware: headers, the client's address, and behind a TLS proxy no
    officer's share taken over a connection the proxy did not relay over https."""
    from custodes.web.security import SecurityHeaders

    return SecurityHeaders(
        app,
        tls=listen.tls is not None,
        trusted_proxies=trusted_networks(listen.trusted_proxies),
        behind_tls_proxy=listen.behind_tls_proxy,
    )


class _Server(uvicorn.Server):
    """uvicorn's server, calling `ready` once it serves: by then it has taken SIGINT and
    SIGTERM for itself. Said earlier, a stop sent at once could land while asyncio's own
    handler holds SIGINT, and be spent cancelling a startup that goes on regardless."""

    def __init__(self, config: uvicorn.Config, ready: Callable[[], None] | None) -> None:
        super().__init__(config)
        self._ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self._ready is not None:
            self._ready()


# From <linux/prctl.h>: the signal a process gets when the thread that forked it exits.
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
SEQUENCER_NAME = b"custodes-log"  # the log sequencer's process name (at most 15 bytes)


def _forked_worker(
    unlocked: UnlockedVault,
    listen: _Listen,
    supervisor: int,
    claim: _PortClaim,
    sequencer: _Sequencer,
) -> None:
    """A worker's life from the fork: bound to its supervisor's, then serving."""
    _die_with(supervisor)
    # The lock and the reservation are the supervisor's; a worker's copies would keep the
    # port claimed after the supervisor is gone. The sequencer's socket is its own.
    claim.close()
    sequencer.listener.close()
    _run_worker(unlocked, listen, own_socket=True, sequencer=sequencer.address)


@dataclass(frozen=True, slots=True)
class _Sequencer:
    """The access log's one writer for all the workers (custodes.audit.sequencer): where
    it listens, and the socket, made before any fork so that it outlives a restart."""

    address: SequencerAddress
    listener: socket.socket


def _forked_sequencer(
    unlocked: UnlockedVault,
    listen: _Listen,
    supervisor: int,
    claim: _PortClaim,
    sequencer: _Sequencer,
) -> None:
    """The log sequencer's life from the fork: bound to its supervisor's, appending the
    workers' entries until stopped."""
    _die_with(supervisor)
    claim.close()
    if sys.platform == "linux":
        # So that ps and top tell it from the workers it writes for.
        ctypes.CDLL(None).prctl(_PR_SET_NAME, SEQUENCER_NAME, 0, 0, 0)
    vault = assemble_vault(unlocked)
    try:
        if destinations := listen.alerts.destinations():
            vault.send_alerts(Dispatcher(destinations))
        vault.run_log_sequencer(sequencer.listener, sequencer.address.secret)
        # The one process that sees every worker's entries as they are appended: the
        # anomaly guard runs here, reading the log, never in a read's path.
        vault.keep_guarding(listen.guard_every)
        vault.keep_retaining(listen.retention_every)
        if _stop.asked:
            return
        while True:
            time.sleep(3600)  # until SIGTERM (_stop_worker) ends it
    finally:
        vault.close()


class _WorkerStop:
    """A stop asked of this worker by signal, kept beside the exception that carries it."""

    asked = False
    server: uvicorn.Server | None = None  # once made, told to stop as uvicorn's own handler would


_stop = _WorkerStop()


def _stop_worker(_signum: int, _frame: object) -> None:
    # An exception alone can be lost: raised while the main thread runs a finalizer (a
    # __del__ the collector called just then), it is printed as ignored and dropped, and
    # a worker whose supervisor died would start serving on without it. So the stop is
    # also kept, read once more before uvicorn starts, and handed to a server already
    # made, which then starts and stops at once.
    _stop.asked = True
    if _stop.server is not None:
        _stop.server.should_exit = True
    raise SystemExit(0)  # unwinds through _run_worker's finally: the vault is closed


def _die_with(supervisor: int) -> None:
    """Have this worker stop when its supervisor dies, however it dies.

    A supervisor killed outright (SIGKILL, the OOM killer) runs none of its cleanup: its
    workers would go on answering on the port, unsupervised and never replaced, and a
    restarted server would find the port taken. On Linux the kernel sends the worker
    SIGTERM when the supervisor dies (PR_SET_PDEATHSIG; uvicorn then finishes the
    requests in hand); elsewhere a thread watches for the worker's parent to change.
    """
    # Handlers of the worker's own first: the supervisor's, inherited through the fork,
    # would swallow the SIGTERM. Once uvicorn runs it takes the signals, finishes its
    # requests, puts these back and raises the signal again.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop_worker)
    if sys.platform == "linux":
        # Sent when the forking thread exits, not the process: the supervisor forks from
        # its main thread, which lives exactly as long as it does.
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:
        threading.Thread(
            target=_watch_supervisor, args=(supervisor,), name="custodes-watch", daemon=True
        ).start()
    # A supervisor that died between the fork and the line above sent nothing; the worker
    # already belongs to another parent, and goes.
    if os.getppid() != supervisor:
        raise SystemExit(0)


def _watch_supervisor(supervisor: int) -> None:
    while os.getppid() == supervisor:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


@dataclass(slots=True)
class _Slot:
    """One worker's place: the process in it, or when the next one starts."""

    target: Callable[..., None]
    what: str  # as reports name it
    process: BaseProcess | None = None
    started: float = 0.0
    due: float = 0.0
    delay: float = RESTART_DELAY  # before the next replacement, should this one die


def _supervise(unlocked: UnlockedVault, listen: _Listen, workers: int, claim: _PortClaim) -> None:
    """Fork the workers and keep them running until told to stop.

    A worker that dies is replaced (a crash must not shrink the service silently), after
    a delay that doubles with each death in a row, up to RESTART_DELAY_MAX, each logged:
    workers that keep dying are retried ever less often, and never given up on, since a
    server that exits for good serves no one until someone notices. What restarting
    cannot fix is refused before the first fork (see serve).
    """
    context = multiprocessing.get_context("fork")
    supervisor = os.getpid()
    stopping = False
    address = SequencerAddress.new()
    sequencer = _Sequencer(address, address.listen())

    def start(slot: _Slot) -> None:
        process = context.Process(
            target=slot.target, args=(unlocked, listen, supervisor, claim, sequencer)
        )
        try:
            process.start()
        except OSError as exc:  # no fork now (a process limit, memory): retried like a death
            _report(f"{slot.what} could not be forked ({exc.strerror})", slot.delay)
            slot.due = time.monotonic() + slot.delay
            slot.delay = min(slot.delay * 2, RESTART_DELAY_MAX)
            return
        slot.process, slot.started = process, time.monotonic()

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    slots = [_Slot(_forked_sequencer, "the log sequencer")]
    slots += [_Slot(_forked_worker, "a server worker") for _ in range(workers)]
    try:
        for slot in slots:
            start(slot)
        while not stopping:
            time.sleep(0.2)
            for slot in slots:
                if stopping:
                    break
                now = time.monotonic()
                process = slot.process
                if process is None:
                    if now >= slot.due:
                        start(slot)
                    continue
                if process.is_alive():
                    continue
                if now - slot.started >= RESTART_RESET_AFTER:
                    slot.delay = RESTART_DELAY
                _report(f"{slot.what} exited ({_how_it_ended(process.exitcode)})", slot.delay)
                process.close()
                slot.process, slot.due = None, now + slot.delay
                slot.delay = min(slot.delay * 2, RESTART_DELAY_MAX)
    finally:
        running = [slot.process for slot in slots if slot.process is not None]
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
        sequencer.listener.close()


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is None or exitcode >= 0:
        return f"exit code {exitcode}"
    try:
        return f"killed by {signal.Signals(-exitcode).name}"
    except ValueError:
        return f"killed by signal {-exitcode}"


def _report(event: str, delay: float) -> None:
    """Log a worker lost and when the next one starts: a warning, an error once the delay
    is at its longest. Exit codes and signals only; a worker's own messages say why."""
    if delay < RESTART_DELAY_MAX:
        log.warning("%s; starting another in %g s", event, delay)
    else:
        log.error(
            "%s, again; starting another every %g s until one stays up; see the messages above",
            event,
            delay,
        )
