"""`custodes serve`: the dashboard and the JSON API that officials' clients log in to.

Runs on the host and unlocks the vault once with the keyring passphrase.
"""

from __future__ import annotations

import os
from pathlib import Path

import click
import platformdirs

from custodes import settings
from custodes.cli.common import out, unlock_host_vault, vault_directory, vault_options


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
    witnesses: tuple[str, ...],
    alert_webhook: str | None,
    alert_syslog: str | None,
    guard_every: float,
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
    from custodes.audit.witness import check_witness_url
    from custodes.errors import ConfigurationError

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
    unlocked = unlock_host_vault(vault_dir, keyring)
    scheme = "https" if tls else "http"
    plural = "es" if workers > 1 else ""

    def ready() -> None:
        # Only once the port is this server's: a refused second server says nothing else.
        out.print(f"serving on {scheme}://{host}:{port}/  ({workers} worker process{plural})")
        for url in witnesses:
            out.print(f"each signed checkpoint goes to the witness at {url}")

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
        ready=ready,
    )
