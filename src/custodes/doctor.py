"""Checks a deployment for exposure: file modes, keys beside data, listeners, TLS, accounts.

Each check returns findings (severity, what is wrong, how to fix it) and never prints or
exits; `custodes doctor` does that. Nothing here needs the keyring or its passphrase.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from custodes.errors import ConfigurationError, CustodesError, StorageError
from custodes.policy import assigned_cases, district_prefix, reads_records
from custodes.sessions import IDLE_TIMEOUT
from custodes.settings import VaultLayout, is_within
from custodes.storage.base import SessionRow
from custodes.web.serve import DEFAULT_PORT, is_loopback

if TYPE_CHECKING:
    from custodes.accounts import Account
    from custodes.bootstrap import DeploymentFacts

CERT_WARN_DAYS = 30
# How long a witness may go without cosigning while the log is signed on past it: a server
# sends it each checkpoint within about a minute, so a quarter of an hour is no delay.
WITNESS_GRACE = 15 * 60
PROC_NET = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))


class Severity(StrEnum):
    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"


_ORDER = {Severity.HIGH: 0, Severity.MEDIUM: 1, Severity.LOW: 2}


@dataclass(frozen=True, slots=True)
class Finding:
    check: str  # a stable tag, e.g. "files:database:mode"
    severity: Severity
    message: str  # what is wrong, naming the file or account, never a personal value
    fix: str  # what to do about it


@dataclass(frozen=True, slots=True)
class Listener:
    address: str
    port: int

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.address).is_loopback


# A probe answers whether host:port completes a TLS handshake (None: could not connect).
TlsProbe = Callable[[str, int], bool | None]


@dataclass(frozen=True, slots=True)
class Deployment:
    """What to check. Anything left None is not checked."""

    vault_dir: Path
    port: int = DEFAULT_PORT
    url: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    schema_path: Path | None = None
    listeners: Callable[[], list[Listener]] | None = None  # default: this host's, from /proc
    probe: TlsProbe | None = None  # default: a real handshake with a short timeout
    # The server's own proxy settings (serve --trusted-proxy, --behind-tls-proxy).
    trusted_proxies: tuple[str, ...] = ()
    behind_tls_proxy: bool = False
    now: float = field(default_factory=time.time)


def examine(deployment: Deployment) -> list[Finding]:
    """Every finding for a deployment, most severe first."""
    found: list[Finding] = []
    for check in (
        check_vault_files,
        check_keys,
        check_shares_held_here,
        check_database,
        check_replicas,
        check_listeners,
        check_proxies,
        check_url,
        check_certificate,
        check_accounts,
        check_rotation,
        check_erasures,
        check_log,
        check_witnesses,
        check_schema,
    ):
        found.extend(check(deployment))
    return sorted(found, key=lambda f: _ORDER[f.severity])


def worst(findings: Iterable[Finding]) -> Severity | None:
    ranked = sorted((f.severity for f in findings), key=_ORDER.__getitem__)
    return ranked[0] if ranked else None


# -- files -----------------------------------------------------------------------------


def _mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return None


def _open_to_others(mode: int) -> bool:
    return bool(mode & 0o077)


def check_vault_files(d: Deployment) -> Iterator[Finding]:
    layout = VaultLayout(d.vault_dir)
    mode = _mode(layout.directory)
    if mode is None:
        yield Finding(
            "files:vault:missing",
            Severity.HIGH,
            f"no vault directory at {layout.directory}",
            "pass --vault with the directory 'custodes init' created",
        )
        return
    if _open_to_others(mode):
        yield Finding(
            "files:vault:mode",
            Severity.HIGH,
            f"the vault directory {layout.directory} has mode {mode:04o}: others can list "
            "or enter it",
            f"chmod 700 {layout.directory}",
        )
    db = layout.database
    log = Path(f"{db}-log")  # the access log's own file
    files = [Path(f"{base}{suffix}") for base in (db, log) for suffix in _SQLITE_SUFFIXES]
    for path in files:
        mode = _mode(path)
        if mode is not None and _open_to_others(mode):
            yield Finding(
                "files:database:mode",
                Severity.HIGH,
                f"{path.name} has mode {mode:04o}: other accounts on this host can copy it",
                f"chmod 600 {path}",
            )
    for extra in (layout.vault_file, layout.rejects, layout.logs):
        mode = _mode(extra)
        if mode is not None and _open_to_others(mode):
            wanted = "700" if extra.is_dir() else "600"
            yield Finding(
                "files:vault:extra-mode",
                Severity.MEDIUM,
                f"{extra.name} in the vault directory has mode {mode:04o}",
                f"chmod {wanted} {extra}",
            )


_SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")
# Sealed key files are small JSON documents naming their format; anything larger is data.
_KEY_FORMATS = (b'"custodes-keyring"', b'"custodes-signing-key"')
_KEY_SCAN_LIMIT = 64 * 1024


def _key_copies(directory: Path) -> list[Path]:
    """Files inside the vault directory that are sealed key files (a keyring or a signing
    key): a copy of the data would carry them."""
    found = []
    for path in sorted(directory.rglob("*")):
        try:
            if not path.is_file() or path.is_symlink() or path.stat().st_size > _KEY_SCAN_LIMIT:
                continue
            head = path.read_bytes()
        except OSError:
            continue
        if head.lstrip().startswith(b"{") and any(f in head for f in _KEY_FORMATS):
            found.append(path)
    return found


def check_keys(d: Deployment) -> Iterator[Finding]:
    try:
        recorded = VaultLayout(d.vault_dir).read()
    except ConfigurationError as exc:
        yield Finding(
            "keys:vault-file",
            Severity.HIGH,
            f"cannot read where the keys are: {exc}",
            "restore vault.toml from a backup, or re-run 'custodes init' for a new vault",
        )
        return
    if d.vault_dir.is_dir():
        for copy in _key_copies(d.vault_dir):
            yield Finding(
                "keys:copy-beside-data",
                Severity.HIGH,
                f"{copy} inside the vault directory is a sealed key file: a copy of the data "
                "carries a key, and its passphrase is all that stands in the way",
                f"remove it ({copy}); keep keys only where vault.toml says, outside the "
                "vault directory",
            )
    for what, path in (("keyring", recorded.keyring), ("log signing key", recorded.log_key)):
        if is_within(path, d.vault_dir):
            yield Finding(
                f"keys:{_tag(what)}:beside-data",
                Severity.HIGH,
                f"the {what} {path} lies inside the vault directory: a copy of the data "
                "carries its key",
                "move the key file out of the vault directory (e.g. to the service "
                "account's configuration directory) and update vault.toml",
            )
        mode = _mode(path)
        if mode is None:
            yield Finding(
                f"keys:{_tag(what)}:missing",
                Severity.MEDIUM,
                f"the {what} recorded in vault.toml is not at {path}",
                "restore it from its backup; without it the vault cannot be opened",
            )
            continue
        if mode & 0o044:
            yield Finding(
                f"keys:{_tag(what)}:readable",
                Severity.HIGH,
                f"the {what} {path} has mode {mode:04o}: other accounts can read it",
                f"chmod 600 {path}",
            )
        elif _open_to_others(mode):
            yield Finding(
                f"keys:{_tag(what)}:mode",
                Severity.MEDIUM,
                f"the {what} {path} has mode {mode:04o}",
                f"chmod 600 {path}",
            )
        parent = _mode(path.parent)
        if parent is not None and parent & 0o022:
            yield Finding(
                f"keys:{_tag(what)}:directory",
                Severity.MEDIUM,
                f"the directory holding the {what} has mode {parent:04o}: others can "
                "replace the file",
                f"chmod 700 {path.parent}",
            )


def where_keks_live(vault_dir: Path) -> str | None:
    """Where the vault's key-encryption keys are, as its keyring file's header says: the
    keyring file itself, or a PKCS#11 token (its module and label; never a PIN). Read
    without the passphrase, so not authenticated: unlocking is what checks it. None if
    the vault's settings or keyring cannot be read."""
    from custodes.crypto import Keyring

    try:
        recorded = VaultLayout(vault_dir).read()
    except ConfigurationError:
        return None
    if not recorded.keyring.is_file():
        return None
    token = Keyring.token_of(recorded.keyring)
    if token is None:
        return f"in the keyring file {recorded.keyring}, sealed under its passphrase"
    return f"in the {token.describe()}, not extractable; the keyring file holds none"


def _tag(what: str) -> str:
    return what.replace(" ", "-")


def unseal_mode(vault_dir: Path) -> str | None:
    """Which unseal mode is in force, in words (from the keyring's header; no key read):
    one passphrase, or M of N officers' shares. None if the keyring cannot be read."""
    from custodes.crypto.keyring import read_share_mode

    try:
        mode = read_share_mode(VaultLayout(vault_dir).read().keyring)
    except CustodesError:
        return None
    if mode is None:
        return "unseal: the keyring opens with one passphrase (its holder alone reads everything)"
    return (
        f"unseal: the keyring opens with {mode.threshold} of {mode.parts} officers' key shares "
        "(M-of-N)"
    )


def check_shares_held_here(d: Deployment) -> Iterator[Finding]:
    """All the shares a shares-mode keyring needs, left where 'init' wrote them by default,
    make this host's administrator the one holder that M-of-N was meant to rule out."""
    from custodes.crypto.keyring import read_share_mode

    try:
        recorded = VaultLayout(d.vault_dir).read()
        mode = read_share_mode(recorded.keyring)
    except CustodesError:
        return
    if mode is None:
        return
    held = recorded.keyring.parent / f"{recorded.vault_id.hex()}.shares"
    files = sorted(held.glob("*.share")) if held.is_dir() else []
    if len(files) >= mode.threshold:
        yield Finding(
            "keys:shares:held-together",
            Severity.HIGH,
            f"{len(files)} key shares lie together in {held}, as many as the {mode.threshold} "
            "that open the keyring: whoever reads this host reads everything",
            f"hand each share file to its officer and remove them from {held}",
        )


# -- the database's roles ------------------------------------------------------------------

_GRANT = "'custodes database grant --owner-database {owner} --app-role {role}'"


def check_database(d: Deployment) -> Iterator[Finding]:
    """A vault in PostgreSQL, as its server connects: the role of the URL the vault
    recorded, asked of the database itself (no key needed), and so too for the access
    log's own database where the vault has one. The role must not hold the schema
    owner's powers, must hold nothing beyond what grant_app_role gives, and the schema
    must be at this software's version."""
    try:
        recorded = VaultLayout(d.vault_dir).read()
    except ConfigurationError:
        return  # check_keys reports an unreadable vault.toml
    if recorded.database is None:
        return
    yield from _check_database_role(d, recorded.app_role, log=False)
    if recorded.log_database is not None:
        yield from _check_database_role(d, recorded.app_role, log=True)


def _check_database_role(d: Deployment, app_role: str | None, *, log: bool) -> Iterator[Finding]:
    """check_database's findings for one of the vault's databases: the records' (and
    everything else's), or with `log` its access log's own."""
    from custodes.bootstrap import database_standing

    # `database grant` grants in the log's database when given its schema owner's URL.
    owner = "LOG_OWNER_URL" if log else "OWNER_URL"
    grant = _GRANT.format(owner=owner, role=app_role or "NAME")
    which = "the vault's access log database" if log else "the vault's PostgreSQL database"
    try:
        standing = database_standing(d.vault_dir, log=log)
    except StorageError as exc:
        yield Finding(
            "database:unreachable",
            Severity.HIGH,
            f"{which} cannot be reached as recorded: {exc}",
            "check that the database server runs and that vault.toml's URL and the "
            "password file (~/.pgpass or PGPASSFILE) are right for the server's role",
        )
        return
    except ConfigurationError as exc:
        yield Finding(
            "database:unusable",
            Severity.HIGH,
            f"the vault's server cannot use {which} as recorded: {exc}",
            f"as the schema's owner, run {grant}",
        )
        return
    if standing is None:
        return
    role = standing.role
    if standing.holds_owner_powers:
        powers = [
            what
            for held, what in (
                (standing.owner, "owns the vault's schema"),
                (standing.superuser, "is a superuser"),
                (standing.creates_roles, "may create roles (and so become the owner)"),
            )
            if held
        ]
        recorded_other = (
            f"; yet the vault recorded {app_role!r} for its server: its settings were changed"
            if app_role is not None and app_role != role
            else ""
        )
        harm = "the access log" if log else "the records and the access log"
        yield Finding(
            "database:owner-role",
            Severity.HIGH,
            f"the vault's server connects to {which} as {role!r}, which "
            f"{' and '.join(powers)}: whoever takes over the server could rewrite, delete or "
            f"drop {harm}{recorded_other}",
            f"give the server a plain role of its own (CREATE ROLE NAME LOGIN) and run {grant} "
            "as the schema's owner; keep the owner's credentials off the server's host",
        )
    elif standing.too_wide:
        held = [f"UPDATE, DELETE or TRUNCATE on {name}" for name in standing.rewrites]
        if standing.creates_in_schema:
            held.insert(0, "CREATE on the schema")
        yield Finding(
            "database:grants-too-wide",
            Severity.HIGH,
            f"the role {role!r} of {which} holds more than the server needs: "
            f"{'; '.join(held)}; whoever takes over the server could change or remove history",
            f"as the schema's owner, run {_GRANT.format(owner=owner, role=role)} again: it revokes "
            "everything and grants back only what the server needs",
        )
    version, expected = standing.version, standing.expected_version
    if version is None:
        yield Finding(
            "database:unusable",
            Severity.HIGH,
            f"the role {role!r} of {which} has not been granted the vault's tables",
            f"as the schema's owner, run {_GRANT.format(owner=owner, role=role)}",
        )
    elif version < expected:
        yield Finding(
            "database:schema-version",
            Severity.HIGH,
            f"the schema of {which} is version {version}; this software needs "
            f"{expected}: the server's role may not migrate it, and will not start",
            f"as the schema's owner, run {grant}: it migrates, then grants",
        )
    elif version > expected:
        yield Finding(
            "database:schema-version",
            Severity.HIGH,
            f"the schema of {which} is version {version}, newer than this software "
            f"knows ({expected}): a newer custodes migrated it",
            "run the custodes version that migrated it",
        )
    # The log's database holds no records: it is made with one partition of each table.
    if standing.unpartitioned and not log:
        yield Finding(
            "database:unpartitioned",
            Severity.LOW,
            "the vault's records, data keys and tokens are plain tables, made before "
            "custodes partitioned them: everything works, but VACUUM, index builds and "
            "dumps each take a whole table, which at tens of millions of people means hours",
            "a vault made now has them hash-partitioned; to move this one, ingest its "
            "source data into a new vault (custodes does not repartition stored records "
            "in place)",
        )


# -- the network -------------------------------------------------------------------------


def check_replicas(d: Deployment) -> Iterator[Finding]:
    """Each replica the vault would read records and tokens from, as it answers: one that
    is down or no standby serves nothing (reads go to the primary); one of another
    cluster is a wrong URL, and is never read from. Named by its place in the list, never
    its connection string."""
    from custodes.bootstrap import replica_standings

    try:
        standings = replica_standings(d.vault_dir)
    except ConfigurationError:
        return  # check_keys reports an unreadable vault.toml
    for number, standing in enumerate(standings, 1):
        if not standing.reachable:
            yield Finding(
                "database:replica-unreachable",
                Severity.MEDIUM,
                f"replica {number} cannot be reached: every read goes to the primary",
                "check that the replica runs and streams, and its URL in vault.toml",
            )
        elif not standing.standby:
            yield Finding(
                "database:replica-not-standby",
                Severity.MEDIUM,
                f"replica {number} is not a standby (a promoted node, or a primary's URL): "
                "no read goes there",
                "name a standby (target_session_attrs=standby finds one among several hosts)",
            )
        elif not standing.same_cluster:
            yield Finding(
                "database:replica-foreign",
                Severity.HIGH,
                f"replica {number} is a standby of another cluster than the vault's primary "
                "(or the primary did not answer): no read goes there",
                "correct the replica's URL in vault.toml (custodes init --replica) or "
                "CUSTODES_REPLICAS",
            )


def listening_sockets(paths: Iterable[Path] = PROC_NET) -> list[Listener]:
    """TCP sockets in LISTEN state on this host, from the kernel's tables."""
    found = []
    for path in paths:
        try:
            lines = path.read_text("ascii").splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) < 4 or parts[3] != "0A":  # 0A: TCP_LISTEN
                continue
            host_hex, port_hex = parts[1].split(":")
            found.append(Listener(_address(host_hex), int(port_hex, 16)))
    return found


def _address(host_hex: str) -> str:
    raw = bytes.fromhex(host_hex)
    # The kernel prints each 32-bit word in host byte order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def speaks_tls(host: str, port: int, timeout: float = 2.0) -> bool | None:
    """Whether host:port completes a TLS handshake; None if nothing answers."""
    context = ssl.create_default_context()
    # The question is only whether TLS is spoken; the certificate is checked elsewhere.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return True
    except ssl.SSLError:
        return False
    except OSError:
        return None


def check_listeners(d: Deployment) -> Iterator[Finding]:
    listeners = (d.listeners or listening_sockets)()
    probe = d.probe or speaks_tls
    for listener in listeners:
        if listener.port != d.port or listener.loopback:
            continue
        addr = ipaddress.ip_address(listener.address)
        target = listener.address
        if addr.is_unspecified:
            target = "127.0.0.1" if addr.version == 4 else "::1"
        tls = probe(target, listener.port)
        shown = f"[{listener.address}]" if addr.version == 6 else listener.address
        if tls is False:
            yield Finding(
                "network:listener:plaintext",
                Severity.HIGH,
                f"port {listener.port} listens on {shown}, beyond this host, without TLS",
                "serve on 127.0.0.1 behind a TLS proxy (named with --trusted-proxy, so "
                "that logins are throttled per official), or give 'custodes serve' a "
                "certificate and key (--tls-cert/--tls-key)",
            )
        elif tls is None:
            yield Finding(
                "network:listener:unknown",
                Severity.MEDIUM,
                f"port {listener.port} listens on {shown}, beyond this host, and did not "
                "answer a TLS handshake from here",
                "check that this listener is custodes behind TLS, or bind it to 127.0.0.1",
            )


def check_proxies(d: Deployment) -> Iterator[Finding]:
    """A trusted proxy's X-Forwarded-For names the client (logins are throttled by it) and
    its X-Forwarded-Proto decides Secure cookies and HSTS: whoever holds a trusted address
    can say both. That is sound for a proxy on this host or the private network, not for
    an address on the internet."""
    if d.behind_tls_proxy and not d.trusted_proxies:
        yield Finding(
            "network:proxy:unnamed",
            Severity.HIGH,
            "the server is meant to be reached through a TLS proxy, but no proxy is trusted",
            "name the proxy with 'serve --trusted-proxy 127.0.0.1' (its address)",
        )
    for entry in d.trusted_proxies:
        try:
            network = ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            yield Finding(
                "network:proxy:malformed",
                Severity.HIGH,
                f"the trusted proxy {entry!r} is neither an address nor a network",
                "name the proxy by its address, e.g. 127.0.0.1",
            )
            continue
        if not (network.is_loopback or network.is_private):
            yield Finding(
                "network:proxy:public",
                Severity.HIGH,
                f"the trusted proxy {network} lies beyond this host and the private network: "
                "anyone there can name any client address and claim https",
                "run the TLS proxy on this host (trust 127.0.0.1) or on the private network, "
                "and trust its address alone",
            )
    if d.trusted_proxies and not d.behind_tls_proxy:
        yield Finding(
            "network:proxy:plain",
            Severity.LOW,
            "requests the trusted proxy relays over plain http are answered, with session "
            "cookies that are not Secure",
            "serve with --behind-tls-proxy, so that only what the proxy relays over https "
            "is answered",
        )


def check_url(d: Deployment) -> Iterator[Finding]:
    if d.url is None:
        return
    parts = urlsplit(d.url)
    host = parts.hostname or ""
    if parts.scheme == "http" and not is_loopback(host):
        yield Finding(
            "network:url:plaintext",
            Severity.HIGH,
            f"{d.url} is served without TLS to a non-loopback address",
            "serve it over https (a certificate and key, or a TLS proxy)",
        )
        return
    if parts.scheme == "https":
        port = parts.port or 443
        try:
            pem = ssl.get_server_certificate((host, port), timeout=5)
        except (OSError, ssl.SSLError):
            yield Finding(
                "network:url:unreachable",
                Severity.MEDIUM,
                f"{d.url} did not complete a TLS handshake",
                "check the address, or that the server is running",
            )
            return
        yield from _expiry(pem.encode(), f"the certificate served at {d.url}", d.now)


def check_certificate(d: Deployment) -> Iterator[Finding]:
    if d.tls_cert is not None:
        try:
            pem = d.tls_cert.read_bytes()
        except OSError:
            yield Finding(
                "tls:certificate:missing",
                Severity.HIGH,
                f"cannot read the certificate {d.tls_cert}",
                "give the path of the PEM certificate the server uses",
            )
        else:
            yield from _expiry(pem, f"the certificate {d.tls_cert}", d.now)
    if d.tls_key is not None:
        mode = _mode(d.tls_key)
        if mode is not None and _open_to_others(mode):
            yield Finding(
                "tls:key:mode",
                Severity.HIGH,
                f"the TLS private key {d.tls_key} has mode {mode:04o}",
                f"chmod 600 {d.tls_key}",
            )


def _expiry(pem: bytes, what: str, now: float) -> Iterator[Finding]:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        yield Finding(
            "tls:certificate:unreadable",
            Severity.HIGH,
            f"{what} is not a PEM certificate",
            "give the PEM certificate file",
        )
        return
    left = (cert.not_valid_after_utc.timestamp() - now) / 86400
    if left <= 0:
        yield Finding(
            "tls:certificate:expired",
            Severity.HIGH,
            f"{what} expired {-left:.0f} days ago: clients must refuse it, or learn to "
            "click through warnings",
            "renew it and restart the server",
        )
    elif left < CERT_WARN_DAYS:
        yield Finding(
            "tls:certificate:expiring",
            Severity.MEDIUM,
            f"{what} expires in {left:.0f} days",
            "renew it before it expires",
        )


# -- accounts and schema ------------------------------------------------------------------


def _facts(d: Deployment) -> DeploymentFacts | None:
    """What the vault's database holds, read without keys; None if it has none, or if a
    PostgreSQL database cannot be read as recorded (check_database reports why)."""
    from custodes.bootstrap import deployment_facts

    try:
        return deployment_facts(d.vault_dir)
    except CustodesError:
        if _recorded_database(d) is None:
            raise
        return None


def _recorded_database(d: Deployment) -> str | None:
    try:
        return VaultLayout(d.vault_dir).read().database
    except ConfigurationError:
        return None


def check_accounts(d: Deployment) -> Iterator[Finding]:
    facts = _facts(d)
    if facts is None:
        return
    accounts = facts.accounts
    yield from _check_sessions(facts.sessions, {a.username: a for a in accounts}, d.now)
    for account in accounts:
        name = account.username
        if account.disabled:
            yield Finding(
                "accounts:disabled",
                Severity.LOW,
                f"account {name!r} is disabled",
                "nothing to do if that is intended; it keeps its place in the log",
            )
            continue
        if account.locked and account.locked_by == "guard:canary":
            yield Finding(
                "accounts:canary-read",
                Severity.HIGH,
                f"account {name!r} was locked when it was shown a canary record: no "
                "legitimate search returns one, so it was walking or dumping records",
                f"treat it as stolen or misused: check its reads ('custodes audit log "
                f"--actor {name}') and the alert on the dashboard before anyone unlocks it",
            )
        elif account.locked and account.crossed:
            yield Finding(
                "accounts:budget-locked",
                Severity.HIGH,
                f"account {name!r} was locked when a read would have crossed its budget "
                f"({', '.join(account.crossed)}): it may have been scraping records",
                f"check its reads ('custodes audit log --actor {name}'), then give it a budget "
                f"of its own ('custodes account budget {name} ...') or "
                f"'custodes account unlock {name}'",
            )
        elif account.locked and account.anomaly:
            yield Finding(
                "accounts:anomaly-locked",
                Severity.HIGH,
                f"account {name!r} was locked by the anomaly guard "
                f"({', '.join(account.anomaly)}): it may have been snooping or enumerating",
                f"read why ('custodes audit log --actor {name}', the guard:account:act entry), "
                f"then 'custodes account unlock {name}' or disable it",
            )
        elif account.locked:
            yield Finding(
                "accounts:locked",
                Severity.MEDIUM,
                f"account {name!r} is locked after repeated failed logins: someone may "
                "be guessing its password",
                f"check the log ('custodes audit log --actor {name}'), then "
                f"'custodes account unlock {name}'",
            )
        if (
            reads_records(account.role)
            and district_prefix(account.attributes.get("district")) is None
        ):
            cases = assigned_cases(account.attributes.get("cases"))
            yield Finding(
                "accounts:no-district",
                Severity.LOW if cases else Severity.MEDIUM,
                f"account {name!r} ({account.role.value}) has no usable district, so it "
                + (
                    f"reads only the records its {len(cases)} assigned case(s) name"
                    if cases
                    else "can read no records at all"
                ),
                f"'custodes account district {name} CODE' (a division code of 2, 4 or 6 "
                "digits, or '*' for a national unit)",
            )
        if not account.mfa_enrolled:
            reads = reads_records(account.role)
            yield Finding(
                "accounts:no-mfa",
                Severity.HIGH if reads else Severity.MEDIUM,
                f"account {name!r} ({account.role.value}) has no second factor enrolled"
                + (": it can see personal data" if reads else ""),
                f"'custodes account enrol {name}' and have its holder enrol, or disable it",
            )


def check_erasures(d: Deployment) -> Iterator[Finding]:
    facts = _facts(d)
    if facts is None:
        return
    if facts.erased_still_stored is None:
        yield Finding(
            "erasures:ledger-broken",
            Severity.HIGH,
            "the erasure ledger does not verify against the log's key: it was changed, "
            "cut or replaced, and the vault will not serve",
            "put the ledger back from a backup ('custodes backup restore-keys') and compare "
            "it with the access log's erasure entries",
        )
    elif facts.erased_still_stored:
        yield Finding(
            "erasures:still-stored",
            Severity.HIGH,
            f"{facts.erased_still_stored} records erased on the ledger are still stored: no "
            "one reads them, but their sealed bytes remain (a database role that may not "
            "delete, or a copy put back)",
            "apply the ledger with the schema owner's credentials on the host: "
            "CUSTODES_DATABASE=<owner URL> custodes retention run",
        )


def check_rotation(d: Deployment) -> Iterator[Finding]:
    facts = _facts(d)
    if facts is not None and facts.rotation_unfinished:
        yield Finding(
            "keys:rotation-unfinished",
            Severity.MEDIUM,
            "a key rotation began and has not finished: the old keys it replaces are "
            "still live, and records may still be under them",
            "'custodes keys status' says how far it got; 'custodes keys rotate --resume' "
            "finishes it",
        )


def _check_sessions(
    sessions: list[SessionRow], accounts: dict[str, Account], now: float
) -> Iterator[Finding]:
    ended = [r for r in sessions if now >= r.expires or now - r.last_seen > IDLE_TIMEOUT]
    if ended:
        yield Finding(
            "sessions:ended",
            Severity.LOW,
            f"{len(ended)} session(s) past their idle or absolute timeout are still stored; "
            "they can no longer be used",
            "nothing to do: ended sessions are removed at the next login",
        )
    live: dict[str, int] = {}
    for row in sessions:
        if row not in ended:
            live[row.username] = live.get(row.username, 0) + 1
    for name, count in sorted(live.items()):
        account = accounts.get(name)
        if account is None or account.disabled:
            state = "no longer exists" if account is None else "is disabled"
            yield Finding(
                "sessions:inactive-account",
                Severity.HIGH,
                f"account {name!r} {state} but still has {count} live session(s)",
                f"'custodes account disable {name}' ends them; then find out how they "
                "outlived the account ('custodes audit log --actor NAME')",
            )


def check_log(d: Deployment) -> Iterator[Finding]:
    """The access log against what its signer last signed and what is published: a log
    shorter than its last signed checkpoint was rolled back or cut; a stored verifier key
    that is not the log key's was replaced; entries past the last stored checkpoint are not
    yet covered by any signature."""
    from custodes.audit.checkpoint import signed_losses, signed_state

    facts = _facts(d)
    if facts is None:
        return
    try:
        recorded = VaultLayout(d.vault_dir).read()
        vkey, last = signed_state(recorded.log_key)
        losses = signed_losses(recorded.log_key)
    except CustodesError as exc:
        yield Finding(
            "log:signer-state",
            Severity.HIGH,
            f"the log signer's key or state cannot be read: {exc}",
            "restore the log key and its .state file from their backup before serving",
        )
        return
    for loss in losses:
        yield Finding(
            "log:loss-acknowledged",
            Severity.MEDIUM,
            f"the host operator acknowledged a loss of the access log: its signer had "
            f"signed {loss.signed.size:,} entries and the log went on from "
            f"{loss.resumed.size:,} (at {_utc(loss.at)}, reason given: {loss.reason!r})",
            "kept for good, as it must be: make sure the witnesses' operators and the "
            "auditors know, and that checkpoints of the lost entries are kept as evidence",
        )
    if facts.verifier_key != vkey:
        yield Finding(
            "log:verifier-key-replaced",
            Severity.HIGH,
            "the log verifier key stored in the vault is not the log signing key's: checks "
            "that trust the stored key would accept another signer's checkpoints",
            "compare with the published key; restore the database's meta from a backup",
        )
    if facts.log_size < last.size:
        yield Finding(
            "log:rolled-back",
            Severity.HIGH,
            f"the access log holds {facts.log_size:,} entries, but its signer already signed "
            f"a checkpoint of {last.size:,}: the log was rolled back, cut or replaced",
            "nothing is served from it: find out how (a restored copy, a swapped log file) "
            "with 'custodes audit verify'; put the log back from a copy if one holds the "
            "entries, or accept the loss with 'custodes audit acknowledge-loss --reason ...'",
        )
        return
    unsigned = facts.log_size - max(facts.signed_size, last.size)
    if unsigned > 0:
        yield Finding(
            "log:unsigned-tail",
            Severity.LOW,
            f"{unsigned:,} access-log {'entry is' if unsigned == 1 else 'entries are'} not "
            "yet covered by a signed checkpoint (until one is signed, they could be "
            "changed unnoticed)",
            "run 'custodes audit checkpoint' (a running server signs one every minute "
            "while it is busy)",
        )


def check_witnesses(d: Deployment) -> Iterator[Finding]:
    """How far behind the signed log each witness is, as far as the vault knows: the newest
    checkpoint each has cosigned (stored by `custodes serve --witness` or `custodes audit
    witness`) against the largest signed, when it has cosigned nothing for longer than
    WITNESS_GRACE; and a log with entries that no witness has cosigned at all."""
    from custodes.audit.witness import cosigners

    facts = _facts(d)
    if facts is None:
        return
    newest: dict[str, tuple[int, int]] = {}  # witness -> (size, time) of its last cosignature
    for size, note in facts.checkpoints:  # ascending: a later one replaces an earlier
        try:
            newest.update({name: (size, at) for name, at in cosigners(note).items()})
        except CustodesError:
            continue  # a damaged note is `audit verify`'s to name
    if not newest:
        if facts.log_size:
            yield Finding(
                "log:unwitnessed",
                Severity.LOW,
                "no witness has cosigned any checkpoint of the access log: whoever holds "
                "the log key could rewrite it, and re-sign every checkpoint, unnoticed",
                "run a witness elsewhere ('custodes witness serve') and start the server "
                "with --witness URL, or run 'custodes audit witness --url URL'",
            )
        return
    for name, (size, at) in sorted(newest.items()):
        behind = facts.signed_size - size
        idle = d.now - at
        if behind > 0 and idle > WITNESS_GRACE:
            yield Finding(
                "log:witness-behind",
                Severity.MEDIUM,
                f"witness {name} last cosigned the access log at size {size:,}, "
                f"{int(idle // 60):,} minutes ago; it has not seen the {behind:,} "
                f"{'entry' if behind == 1 else 'entries'} signed since",
                "check that the witness is up and that the server runs with --witness "
                "for it (its log names every failed push), or run 'custodes audit witness'",
            )


def check_schema(d: Deployment) -> Iterator[Finding]:
    from custodes.schema import load_schema, parse_schema

    facts = _facts(d)
    if facts is None:
        return
    stored = facts.schema
    if stored is None:
        yield Finding(
            "schema:missing",
            Severity.HIGH,
            "the vault database holds no schema",
            "restore the database from a backup",
        )
        return
    try:
        digest = parse_schema(stored.decode("utf-8")).digest
    except (CustodesError, UnicodeDecodeError):
        yield Finding(
            "schema:damaged",
            Severity.HIGH,
            "the schema stored in the vault database does not parse",
            "restore the database from a backup",
        )
        return
    if d.schema_path is not None:
        expected = load_schema(d.schema_path).digest
        if expected != digest:
            yield Finding(
                "schema:digest-mismatch",
                Severity.MEDIUM,
                f"the vault was created with another schema than {d.schema_path} "
                f"(vault {digest[:12]}, file {expected[:12]})",
                "deploy the schema the vault was created with; a schema is fixed for "
                "the life of a vault",
            )


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(seconds))
