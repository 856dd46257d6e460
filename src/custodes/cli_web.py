"""Command line for the server and for account security: serve; account enrol, mfa, passwd,
disable, enable, unlock, assign, unassign, token. Run on the host, with the keyring
passphrase.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import platformdirs

from custodes import settings
from custodes.errors import ConfigurationError

F = TypeVar("F", bound=Callable[..., Any])


def register(cli: click.Group) -> None:
    cli.add_command(serve)
    account = cli.commands.get("account")
    if not isinstance(account, click.Group):
        raise ConfigurationError("the account command group is missing")
    for command in (enrol, mfa, passwd, disable, enable, unlock, assign, unassign, token):
        account.add_command(command)


def _vault_options(fn: F) -> F:
    fn = click.option("--keyring", type=click.Path(dir_okay=False), help="Keyring file.")(fn)
    fn = click.option(
        "--vault",
        "vault_dir",
        type=click.Path(file_okay=False),
        help=f"Vault directory (default: ${settings.ENV_VAULT} or the current directory).",
    )(fn)
    return fn


@click.command()
@_vault_options
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
) -> None:
    """Serve the dashboard and the API. Loopback only unless TLS is configured; every
    page and route needs a logged-in account, and no option changes that."""
    from custodes.cli import _unlock, _vault_dir, out
    from custodes.web import serve as web

    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if tls_self_signed and tls_cert:
        raise click.UsageError("choose --tls-cert/--tls-key or --tls-self-signed, not both")
    tls = web.TlsFiles(Path(tls_cert), Path(tls_key)) if tls_cert and tls_key else None
    if not tls_self_signed:
        # Refuse before asking for the passphrase.
        web.check_bind(host, tls)
    if tls_self_signed:
        directory = Path(tls_dir) if tls_dir else platformdirs.user_config_path("custodes") / "tls"
        tls = web.self_signed(host, directory, vault_dir=_vault_dir(vault_dir))
        out.print(f"self-signed certificate: {tls.cert}")
        out.print(f"SHA-256 fingerprint: {web.fingerprint(tls.cert.read_bytes())}")
        out.print("  check this fingerprint in the browser before logging in")
    unlocked = _unlock(vault_dir, keyring)
    scheme = "https" if tls else "http"
    plural = "es" if workers > 1 else ""
    out.print(f"serving on {scheme}://{host}:{port}/  ({workers} worker process{plural})")
    web.serve(unlocked, host=host, port=port, tls=tls, workers=workers)


@click.command("enrol")
@click.argument("username")
@_vault_options
def enrol(username: str, vault_dir: str | None, keyring: str | None) -> None:
    """Issue a new one-time enrolment code for USERNAME's second factor (24 h)."""
    from custodes.cli import _open, out

    vault = _open(vault_dir, keyring)
    try:
        code = vault.issue_enrolment(username)
    finally:
        vault.close()
    out.print(f"enrolment code (one use, valid 24 h): {code}")
    out.print("  open /enrol?code=<code> on the dashboard, or run 'custodes account mfa'")


@click.command("mfa")
@_vault_options
def mfa(vault_dir: str | None, keyring: str | None) -> None:
    """Enrol a second factor in this terminal, with an enrolment code (prompted)."""
    import segno

    from custodes.cli import _open, _secret, out

    code = _secret(settings.ENV_ENROLMENT_CODE, "Enrolment code")
    vault = _open(vault_dir, keyring)
    try:
        enrolment = vault.enrolment(code)
        segno.make(enrolment.uri, error="m").terminal(compact=True)
        out.print(f"account: {enrolment.username}")
        out.print(f"key (to type instead of scanning): {enrolment.secret}")
        totp = str(click.prompt("Code the app shows now"))
        vault.complete_enrolment(code, totp)
    finally:
        vault.close()
    out.print("second factor enrolled: log in with the password and the app's code")


@click.command("passwd")
@click.argument("username")
@_vault_options
def passwd(username: str, vault_dir: str | None, keyring: str | None) -> None:
    """Set a new password (from $CUSTODES_NEW_PASSWORD or a prompt); ends every session."""
    from custodes.cli import _open, _secret, out

    vault = _open(vault_dir, keyring)
    try:
        password = _secret(settings.ENV_NEW_PASSWORD, f"New password for {username}", confirm=True)
        vault.change_password(username, password)
    finally:
        vault.close()
    out.print(f"password of {username} changed; its sessions are ended")


@click.command("disable")
@click.argument("username")
@_vault_options
def disable(username: str, vault_dir: str | None, keyring: str | None) -> None:
    """Disable an account: its sessions and API tokens stop working at once."""
    _account_change(vault_dir, keyring, lambda v: v.disable_account(username), "disabled")


@click.command("enable")
@click.argument("username")
@_vault_options
def enable(username: str, vault_dir: str | None, keyring: str | None) -> None:
    """Enable a disabled account again."""
    _account_change(vault_dir, keyring, lambda v: v.enable_account(username), "enabled")


@click.command("unlock")
@click.argument("username")
@_vault_options
def unlock(username: str, vault_dir: str | None, keyring: str | None) -> None:
    """Unlock an account locked by repeated failed logins."""
    _account_change(vault_dir, keyring, lambda v: v.unlock_account(username), "unlocked")


@click.command("assign")
@click.argument("username")
@click.argument("case_no")
@_vault_options
def assign(username: str, case_no: str, vault_dir: str | None, keyring: str | None) -> None:
    """Assign case CASE_NO to USERNAME: naming the case as the purpose of their work, they
    then read its records wherever they live. Logged."""
    _account_change(
        vault_dir, keyring, lambda v: v.assign_case(username, case_no), "assigned the case"
    )


@click.command("unassign")
@click.argument("username")
@click.argument("case_no")
@_vault_options
def unassign(username: str, case_no: str, vault_dir: str | None, keyring: str | None) -> None:
    """Take case CASE_NO from USERNAME: it opens no records to them any more. Logged."""
    _account_change(
        vault_dir,
        keyring,
        lambda v: v.unassign_case(username, case_no),
        "no longer assigned the case",
    )


def _account_change(
    vault_dir: str | None, keyring: str | None, change: Callable[[Any], None], done: str
) -> None:
    from custodes.cli import _open, out

    vault = _open(vault_dir, keyring)
    try:
        change(vault)
    finally:
        vault.close()
    out.print(f"account {done}")


@click.command("token")
@click.argument("username")
@_vault_options
@click.option(
    "--scope",
    type=click.Choice(["search", "read", "reveal", "audit"]),
    required=True,
    help="What the token may do: search; read (search and masked records); reveal; audit.",
)
@click.option("--days", type=click.IntRange(1, 365), default=30, show_default=True)
def token(username: str, vault_dir: str | None, keyring: str | None, scope: str, days: int) -> None:
    """Issue an API token for an integration acting as USERNAME. Printed once."""
    from custodes.cli import _open, out

    vault = _open(vault_dir, keyring)
    try:
        issued = vault.issue_api_token(username, scope, days=days)
    finally:
        vault.close()
    out.print(f"API token (shown once; send as 'Authorization: Bearer <token>'): {issued}")
