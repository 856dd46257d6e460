"""`custodes serve`: the dashboard and the JSON API that officials' clients log in to.

Runs on the host and unlocks the vault once with the keyring passphrase.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import click
import platformdirs

from custodes import settings
from custodes.cli.common import (
    database_override,
    log_to_directory,
    out,
    secret,
    unlock_host_vault,
    vault_directory,
    vault_options,
)
from custodes.crypto.keyring import ShareMode
from custodes.errors import AccessDenied, ConfigurationError


@click.command()
@vault_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Server processes sharing the port (one per core serves the most).",
)
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), help="PEM certificate.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="PEM private key.")
@click.option(
    "--tls-self-signed",
    is_flag=True,
    help="Generate a key and a self-signed certificate for --host and print its fingerprint.",
)
@click.option(
    "--tls-dir",
    type=click.Path(file_okay=False),
    help="Where --tls-self-signed writes (default: the user's configuration directory).",
)
@click.option(
    "--trusted-proxy",
    "trusted_proxies",
    multiple=True,
    help="A reverse proxy (address or network) whose X-Forwarded-For names the client; "
    "repeatable. Logins are throttled per client address: behind a proxy not named here, "
    "every official shares the proxy's.",
)
@click.option(
    "--behind-tls-proxy",
    is_flag=True,
    help="Served only through a TLS-terminating reverse proxy named by --trusted-proxy: "
    "requests it relays with X-Forwarded-Proto: https get Secure cookies and HSTS; any "
    "other request is refused (421).",
)
@click.option(
    "--witness",
    "witnesses",
    multiple=True,
    metavar="URL",
    help="A witness to send each signed checkpoint to, e.g. http://127.0.0.1:7380/ "
    "(repeatable; loopback only until TLS). Each server process sends it within about a "
    "minute of signing, retries while it is down, and logs every failure.",
)
@click.option(
    "--alert-webhook",
    metavar="URL",
    help="Send each alert to this address as a signed JSON POST (https://, or http:// on "
    f"this host), retried with backoff; the secret comes from ${settings.ENV_ALERT_SECRET}.",
)
@click.option(
    "--alert-syslog",
    metavar="udp://HOST:PORT|tcp://HOST:PORT",
    help="Send each alert to syslog as an RFC 5424 message (facility auth).",
)
@click.option(
    "--guard-every",
    type=click.FloatRange(0.1, 3600),
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="How often the anomaly guard reads the access log, scores officials and acts.",
)
@click.option(
    "--retention-every",
    type=click.FloatRange(1, 7 * 86400),
    default=3600.0,
    show_default=True,
    metavar="SECONDS",
    help="How often the schema's retention rules erase the records past their time.",
)
def serve(
    vault_dir: str | None,
    keyring: str | None,
    host: str,
    port: int,
    workers: int,
    tls_cert: str | None,
    tls_key: str | None,
    tls_self_signed: bool,
    tls_dir: str | None,
    trusted_proxies: tuple[str, ...],
    behind_tls_proxy: bool,
    witnesses: tuple[str, ...],
    alert_webhook: str | None,
    alert_syslog: str | None,
    guard_every: float,
    retention_every: float,
) -> None:
    """Serve the dashboard and the API. Loopback only unless TLS is configured; every
    page and route needs a logged-in account, and no option changes that."""
    from custodes.web import serve as web

    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("--tls-cert and --tls-key go together")
    from custodes.web.security import trusted_networks

    try:
        trusted_networks(trusted_proxies)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--trusted-proxy") from None
    try:
        web.check_proxy_mode(trusted_proxies, behind_tls_proxy)
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from None
    from custodes.audit.witness import check_witness_url

    for url in witnesses:
        try:
            check_witness_url(url)
        except ConfigurationError as exc:
            raise click.BadParameter(str(exc), param_hint="--witness") from None
    from custodes.alerts import AlertRoutes

    secret = os.environ.get(settings.ENV_ALERT_SECRET, "").encode()
    if alert_webhook and not secret:
        raise click.UsageError(f"--alert-webhook needs its secret in ${settings.ENV_ALERT_SECRET}")
    routes = AlertRoutes(alert_webhook, secret, alert_syslog)
    try:
        routes.check()
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc), param_hint="--alert-webhook/--alert-syslog") from None
    if tls_self_signed and tls_cert:
        raise click.UsageError("choose --tls-cert/--tls-key or --tls-self-signed, not both")
    tls = web.TlsFiles(Path(tls_cert), Path(tls_key)) if tls_cert and tls_key else None
    if not tls_self_signed:
        # Refuse before asking for the passphrase.
        web.check_bind(host, tls)
    if tls_self_signed:
        directory = Path(tls_dir) if tls_dir else platformdirs.user_config_path("custodes") / "tls"
        tls = web.self_signed(host, directory, vault_dir=vault_directory(vault_dir))
        out.print(f"self-signed certificate: {tls.cert}")
        out.print(f"SHA-256 fingerprint: {web.fingerprint(tls.cert.read_bytes())}")
        out.print("  check this fingerprint in the browser before logging in")
    scheme = "https" if tls else "http"
    proxied = " (reached through its TLS proxy only)" if behind_tls_proxy else ""
    if _serves_sealed(vault_dir, keyring):
        directory = vault_directory(vault_dir)
        recorded = settings.VaultLayout(directory).read()
        mode = _share_mode(vault_dir, keyring)
        assert mode is not None
        log_to_directory(directory)

        def ready_sealed() -> None:
            out.print(
                f"serving SEALED on {scheme}://{host}:{port}/ : {mode.threshold} of "
                f"{mode.parts} officers unseal it with 'custodes unseal --server URL --share "
                "FILE'; 'custodes seal' seals it again"
            )

        with _until_ctrl_c():
            web.serve_sealed(
                directory,
                vault_id=recorded.vault_id,
                mode=mode,
                keyring_path=Path(keyring) if keyring else None,
                database=database_override(),
                host=host,
                port=port,
                tls=tls,
                workers=workers,
                trusted_proxies=trusted_proxies,
                witnesses=witnesses,
                alerts=routes,
                guard_every=guard_every,
                retention_every=retention_every,
                ready=ready_sealed,
                behind_tls_proxy=behind_tls_proxy,
            )
        return
    unlocked = unlock_host_vault(vault_dir, keyring)
    plural = "es" if workers > 1 else ""

    def ready() -> None:
        # Only once the port is this server's: a refused second server says nothing else.
        out.print(
            f"serving on {scheme}://{host}:{port}/{proxied}  ({workers} worker process{plural})"
        )
        for url in witnesses:
            out.print(f"each signed checkpoint goes to the witness at {url}")

    with _until_ctrl_c():
        web.serve(
            unlocked,
            host=host,
            port=port,
            tls=tls,
            workers=workers,
            trusted_proxies=trusted_proxies,
            witnesses=witnesses,
            alerts=routes,
            guard_every=guard_every,
            retention_every=retention_every,
            ready=ready,
            behind_tls_proxy=behind_tls_proxy,
        )


@contextlib.contextmanager
def _until_ctrl_c() -> Iterator[None]:
    """Serve until Ctrl-C, which is how a server is meant to end: a message and exit 0,
    not an abort."""
    with contextlib.suppress(KeyboardInterrupt):
        yield
    out.print("server stopped")


def _share_mode(vault_dir: str | None, keyring: str | None) -> ShareMode | None:
    from custodes.bootstrap import keyring_share_mode

    return keyring_share_mode(vault_directory(vault_dir), Path(keyring) if keyring else None)


def _serves_sealed(vault_dir: str | None, keyring: str | None) -> bool:
    """A keyring sealed M-of-N with no --share given: the server starts sealed."""
    if _share_mode(vault_dir, keyring) is None:
        return False
    ctx = click.get_current_context()
    return not ctx.meta.get("custodes.shares")


@click.command()
@click.option("--server", "server_url", required=True, metavar="URL", help="The server's address.")
@click.option(
    "--share",
    "share_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="This officer's key share file (its passphrase from CUSTODES_SHARE_PASSPHRASE or a "
    "prompt, if sealed).",
)
@click.option("--ca-cert", type=click.Path(exists=True, dir_okay=False), help="CA for HTTPS.")
def unseal(server_url: str, share_file: str, ca_cert: str | None) -> None:
    """Give one officer's key share to a server that started sealed (M-of-N).

    The share is opened here (with its officer's passphrase if sealed) and sent over
    loopback or HTTPS only; the server says how many shares it holds."""
    import json

    import httpx

    from custodes.crypto.key_shares import is_sealed, parse_share
    from custodes.crypto.sealed_file import b64encode, read_sealed_file

    base = _checked_server(server_url)
    data = read_sealed_file(Path(share_file), what="key share file")
    passphrase = None
    if is_sealed(data):
        passphrase = secret(settings.ENV_SHARE_PASSPHRASE, "Passphrase for this share")
    share = parse_share(data, passphrase=passphrase)
    plain = {
        "format": "custodes-key-share",
        "version": 1,
        "vault_id": share.vault_id.hex(),
        "officer": share.officer,
        "index": share.number,
        "parts": share.mode.parts,
        "threshold": share.mode.threshold,
        "share": b64encode(share.share),
    }
    try:
        answer = httpx.post(
            f"{base}/api/v1/sys/unseal",
            json={"share": json.dumps(plain)},
            timeout=120,
            verify=ca_cert or True,
        )
        doc = answer.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise ConfigurationError(
            f"the server at {base} did not answer: {type(exc).__name__}"
        ) from None
    if answer.status_code != 200:
        raise AccessDenied(
            f"share refused: {doc.get('error', answer.status_code)} "
            f"({doc.get('progress', 0)} of {doc.get('threshold', '?')} held)"
        )
    if doc.get("sealed"):
        out.print(f"share taken: {doc['progress']} of {doc['threshold']}; still sealed")
    else:
        out.print("unsealed: the server serves")


@click.command()
@click.option("--server", "server_url", required=True, metavar="URL", help="The server's address.")
@click.option("--ca-cert", type=click.Path(exists=True, dir_okay=False), help="CA for HTTPS.")
def seal_status(server_url: str, ca_cert: str | None) -> None:
    """Whether a server is sealed, and how many shares it holds of how many it needs."""
    import httpx

    base = _checked_server(server_url)
    try:
        doc = httpx.get(f"{base}/api/v1/sys/seal-status", timeout=30, verify=ca_cert or True).json()
    except (httpx.HTTPError, ValueError) as exc:
        raise ConfigurationError(
            f"the server at {base} did not answer: {type(exc).__name__}"
        ) from None
    state = "sealed" if doc.get("sealed") else "unsealed"
    out.print(f"{state}: {doc.get('progress')} of {doc.get('threshold')} shares held")


def _checked_server(url: str) -> str:
    from urllib.parse import urlsplit

    from custodes.web.serve import is_loopback

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise click.BadParameter("an http(s) URL", param_hint="--server")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise click.BadParameter(
            "a share goes over HTTPS, or plain HTTP on this host only", param_hint="--server"
        )
    return url.rstrip("/")


@click.command()
@click.option(
    "--vault",
    "vault_dir",
    type=click.Path(file_okay=False),
    help=f"Vault directory (default: ${settings.ENV_VAULT} or the current directory).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="The server's address.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
def seal(vault_dir: str | None, host: str, port: int) -> None:
    """Seal a server started sealed (M-of-N) again: it drops its keys and answers only
    its seal status and officers' shares until M of them unseal it. On the server's host."""
    from custodes.web.serve import seal_server

    pid = seal_server(vault_directory(vault_dir), host, port)
    out.print(f"asked the server (process {pid}) to seal itself")
