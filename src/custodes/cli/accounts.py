"""Host commands for officials' accounts: account add, list, enrol, mfa, passwd, disable,
enable, unlock, assign, unassign, token. Run on the host, with the keyring passphrase.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click
import orjson
from rich.table import Table

from custodes import settings
from custodes.cli.common import log, open_host_vault, out, secret, vault_options
from custodes.policy import (
    ACCOUNT_ROLES,
    API_SCOPES,
    Role,
    assigned_cases,
    district_prefix,
    reads_records,
)
from custodes.policy.budgets import MAX_LIMIT, SETTING_NAMES


@click.group()
def account() -> None:
    """Manage officials' accounts (on the host, with the keyring passphrase)."""


def _district(value: str | None) -> str | None:
    if value is not None and district_prefix(value) is None:
        raise click.BadParameter("a district is * or a division code of 2, 4 or 6 digits")
    return value


@account.command("add")
@click.argument("username")
@vault_options
@click.option("--role", type=click.Choice([r.value for r in ACCOUNT_ROLES]), required=True)
@click.option(
    "--district",
    callback=lambda _ctx, _param, value: _district(value),
    help=(
        "The administrative division whose records the account reads: a division-code "
        "prefix of 2 (province), 4 (city) or 6 digits (county), e.g. 3101 for a whole "
        "city; or * for a national unit. Records outside it stay hidden, as if absent, "
        "unless a stated case is one the account is assigned to. Without it the account "
        "reads no personal records."
    ),
)
def account_add(
    username: str, vault_dir: str | None, keyring: str | None, role: str, district: str | None
) -> None:
    """Create an account. Its password comes from $CUSTODES_NEW_PASSWORD or a prompt."""
    vault = open_host_vault(vault_dir, keyring)
    try:
        password = secret(settings.ENV_NEW_PASSWORD, f"Password for {username}", confirm=True)
        attributes = {"district": district} if district else {}
        vault.admin.add_account(vault.operator, username, password, Role(role), attributes)
        code = vault.admin.issue_enrolment(vault.operator, username)
    finally:
        vault.close()
    log.info("account added role=%s", role)
    out.print(f"account {username} ({role}) created")
    if district is None and reads_records(Role(role)):
        out.print(
            f"  it has no district, so it reads no records until it has one: "
            f"'custodes account district {username} CODE' (or '*' for a national unit)"
        )
    out.print(f"enrolment code (one use, valid 24 h): {code}")
    out.print("  the account's holder opens /enrol?code=<code> on the dashboard, or runs")
    out.print("  'custodes account mfa' on this host, to add the second factor it needs to log in")


@account.command("district")
@click.argument("username")
@click.argument("district")
@vault_options
def account_district(
    username: str, district: str, vault_dir: str | None, keyring: str | None
) -> None:
    """Move USERNAME to DISTRICT: a division-code prefix of 2, 4 or 6 digits, * for a
    national unit, or 'none' to take the district away (it then reads only its assigned
    cases' records). Holds at the account's next access. Logged."""
    chosen = None if district.lower() == "none" else _district(district)
    _account_change(
        vault_dir,
        keyring,
        lambda v: v.admin.set_district(v.operator, username, chosen),
        f"{username} moved to district {chosen}" if chosen else f"{username} left with no district",
    )


@account.command("list")
@vault_options
@click.option("--json", "as_json", is_flag=True)
def account_list(vault_dir: str | None, keyring: str | None, as_json: bool) -> None:
    """List accounts (names, roles, districts, assigned cases, state; never hashes)."""
    vault = open_host_vault(vault_dir, keyring)
    try:
        accounts = vault.admin.list_accounts(vault.operator)
    finally:
        vault.close()
    if as_json:
        rows = [
            {
                "username": a.username,
                "role": a.role.value,
                "disabled": a.disabled,
                "locked": a.locked,
                **a.attributes,
            }
            for a in accounts
        ]
        sys.stdout.write(orjson.dumps(rows).decode() + "\n")
        return
    table = Table("account", "role", "district", "cases", "state")
    for a in accounts:
        table.add_row(
            a.username,
            a.role.value,
            str(a.attributes.get("district", "")),
            ", ".join(sorted(assigned_cases(a.attributes.get("cases")))),
            "disabled" if a.disabled else "locked" if a.locked else "active",
        )
    out.print(table)


@account.command("enrol")
@click.argument("username")
@vault_options
def enrol(username: str, vault_dir: str | None, keyring: str | None) -> None:
    """Issue a new one-time enrolment code for USERNAME's second factor (24 h)."""
    vault = open_host_vault(vault_dir, keyring)
    try:
        code = vault.admin.issue_enrolment(vault.operator, username)
    finally:
        vault.close()
    out.print(f"enrolment code (one use, valid 24 h): {code}")
    out.print("  open /enrol?code=<code> on the dashboard, or run 'custodes account mfa'")


@account.command("mfa")
@click.argument("username", required=False)
@vault_options
def mfa(username: str | None, vault_dir: str | None, keyring: str | None) -> None:
    """Enrol a second factor in this terminal, with an enrolment code (prompted). The
    code names its account; USERNAME, if given, must be that account."""
    import segno

    code = secret(settings.ENV_ENROLMENT_CODE, "Enrolment code")
    vault = open_host_vault(vault_dir, keyring)
    try:
        enrolment = vault.enrolment(code)
        if username is not None and username != enrolment.username:
            raise click.UsageError(
                f"that enrolment code is not {username}'s: ask an administrator for "
                f"'custodes account enrol {username}'"
            )
        segno.make(enrolment.uri, error="m").terminal(compact=True)
        out.print(f"account: {enrolment.username}")
        out.print(f"key (to type instead of scanning): {enrolment.secret}")
        totp = str(click.prompt("Code the app shows now"))
        vault.complete_enrolment(code, totp)
    finally:
        vault.close()
    out.print("second factor enrolled: log in with the password and the app's code")


@account.command("passwd")
@click.argument("username")
@vault_options
def passwd(username: str, vault_dir: str | None, keyring: str | None) -> None:
    """Set a new password (from $CUSTODES_NEW_PASSWORD or a prompt); ends every session."""
    vault = open_host_vault(vault_dir, keyring)
    try:
        password = secret(settings.ENV_NEW_PASSWORD, f"New password for {username}", confirm=True)
        vault.admin.change_password(vault.operator, username, password)
    finally:
        vault.close()
    out.print(f"password of {username} changed; its sessions are ended")


@account.command("disable")
@click.argument("username")
@vault_options
def disable(username: str, vault_dir: str | None, keyring: str | None) -> None:
    """Disable an account: its sessions and API tokens stop working at once."""
    _account_change(
        vault_dir, keyring, lambda v: v.admin.disable_account(v.operator, username), "disabled"
    )


@account.command("enable")
@click.argument("username")
@vault_options
def enable(username: str, vault_dir: str | None, keyring: str | None) -> None:
    """Enable a disabled account again."""
    _account_change(
        vault_dir, keyring, lambda v: v.admin.enable_account(v.operator, username), "enabled"
    )


@account.command("unlock")
@click.argument("username")
@vault_options
def unlock(username: str, vault_dir: str | None, keyring: str | None) -> None:
    """Unlock an account locked by repeated failed logins or by a budget it crossed."""
    _account_change(
        vault_dir, keyring, lambda v: v.admin.unlock_account(v.operator, username), "unlocked"
    )


def _limit(_ctx: object, param: click.Parameter, value: str | None) -> int | str | None:
    """A budget limit as typed: a whole number, or 'none' for no limit of that kind."""
    if value is None:
        return _UNSET
    if value.strip().lower() == "none":
        return None
    try:
        number = int(value)
    except ValueError:
        raise click.BadParameter("a whole number, or none", param=param) from None
    if not 0 <= number <= MAX_LIMIT:
        raise click.BadParameter(f"0 to {MAX_LIMIT:,}, or none", param=param)
    return number


_UNSET = "unset"


def _limit_options(command: Callable[..., None]) -> Callable[..., None]:
    for name in reversed(SETTING_NAMES):
        what = {
            "sessions": "sessions open at once",
            "subjects_per_day": "different records shown per day",
            "page_size": "records on one page of a search",
            "search_depth": "records a search may page through",
        }.get(name, f"record {name.replace('_', ' ')}")
        command = click.option(
            f"--{name.replace('_', '-')}",
            name,
            callback=_limit,
            metavar="N|none",
            help=f"At most N {what} (none: no limit of this kind).",
        )(command)
    return command


@account.command("budget")
@click.argument("username")
@vault_options
@_limit_options
@click.option(
    "--role-default",
    is_flag=True,
    help="Drop the account's own limits: its role's budget holds again.",
)
def budget(
    username: str, vault_dir: str | None, keyring: str | None, role_default: bool, **limits: Any
) -> None:
    """Set USERNAME's own budget limits, over its role's: record views per minute, hour
    and day, different records (subjects) shown per day, misses (searches that found
    nothing) per hour and day, sessions open at once, and how far a search pages (its
    page size and depth). A read that crosses a limit returns nothing and locks the
    account; a login beyond the sessions, or a page beyond the paging limits, is
    refused. Logged."""
    given = {name: value for name, value in limits.items() if value != _UNSET}
    if role_default == bool(given):
        raise click.UsageError("give the limits to set, or --role-default, not both")
    _account_change(
        vault_dir,
        keyring,
        lambda v: v.admin.set_budget(v.operator, username, None if role_default else given),
        "given its role's budget" if role_default else "given its own budget",
    )


@account.command("role-budget")
@click.argument("role", type=click.Choice([r.value for r in ACCOUNT_ROLES]))
@vault_options
@_limit_options
@click.option(
    "--defaults",
    is_flag=True,
    help="Drop the role's limits in this vault: the built-in defaults hold again.",
)
def role_budget(
    role: str, vault_dir: str | None, keyring: str | None, defaults: bool, **limits: Any
) -> None:
    """Set ROLE's budget limits in this vault, over the built-in defaults, for every
    account of the role (an account's own limits still win). Same limits as 'account
    budget'. Holds within seconds in every running server. Logged."""
    given = {name: value for name, value in limits.items() if value != _UNSET}
    if defaults == bool(given):
        raise click.UsageError("give the limits to set, or --defaults, not both")
    vault = open_host_vault(vault_dir, keyring)
    try:
        now = vault.admin.set_role_budget(vault.operator, Role(role), None if defaults else given)
    finally:
        vault.close()
    if defaults:
        out.print(f"The {role} role is back on the default budget")
    else:
        shown = ", ".join(f"{k} {'none' if v is None else v}" for k, v in sorted(now.items()))
        out.print(f"The {role} role's own limits in this vault: {shown}")


@account.command("assign")
@click.argument("username")
@click.argument("case_no")
@vault_options
def assign(username: str, case_no: str, vault_dir: str | None, keyring: str | None) -> None:
    """Assign case CASE_NO to USERNAME: naming the case as the purpose of their work, they
    then read its records wherever they live. Logged."""
    _account_change(
        vault_dir,
        keyring,
        lambda v: v.admin.assign_case(v.operator, username, case_no),
        "assigned the case",
    )


@account.command("unassign")
@click.argument("username")
@click.argument("case_no")
@vault_options
def unassign(username: str, case_no: str, vault_dir: str | None, keyring: str | None) -> None:
    """Take case CASE_NO from USERNAME: it opens no records to them any more. Logged."""
    _account_change(
        vault_dir,
        keyring,
        lambda v: v.admin.unassign_case(v.operator, username, case_no),
        "no longer assigned the case",
    )


def _account_change(
    vault_dir: str | None, keyring: str | None, change: Callable[[Any], None], done: str
) -> None:
    vault = open_host_vault(vault_dir, keyring)
    try:
        change(vault)
    finally:
        vault.close()
    out.print(f"account {done}")


@account.command("token")
@click.argument("username")
@vault_options
@click.option(
    "--scope",
    type=click.Choice(list(API_SCOPES)),
    required=True,
    help="What the token may do: search; read (search and masked records); reveal; audit.",
)
@click.option("--days", type=click.IntRange(1, 365), default=30, show_default=True)
def token(username: str, vault_dir: str | None, keyring: str | None, scope: str, days: int) -> None:
    """Issue an API token for an integration acting as USERNAME. Printed once."""
    vault = open_host_vault(vault_dir, keyring)
    try:
        issued = vault.admin.issue_api_token(vault.operator, username, scope, days=days)
    finally:
        vault.close()
    out.print(f"API token (shown once; send as 'Authorization: Bearer <token>'): {issued}")
