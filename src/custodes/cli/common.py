"""What the command modules share: the consoles, secrets from the environment or a hidden
prompt, the vault directory options, opening a host's vault, the operational log, and
printing a record.

The client commands import this module too, so it loads no key code of its own: opening
a vault imports `custodes.bootstrap` only when a host command asks for it.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from custodes import settings
from custodes.errors import ConfigurationError
from custodes.freetext import escape_hidden

if TYPE_CHECKING:
    from custodes.bootstrap import UnlockedVault
    from custodes.vault import Vault

__all__ = [
    "err",
    "keyring_passphrase",
    "log",
    "log_to",
    "log_to_directory",
    "open_host_vault",
    "out",
    "print_record",
    "read_shares",
    "secret",
    "shown",
    "unlock_host_vault",
    "vault_directory",
    "vault_options",
]

F = TypeVar("F", bound=Callable[..., Any])

# No emoji codes: a certificate fingerprint such as "AB:CD:..." holds ":cd:", which rich
# would print as a disc; nothing custodes prints is meant as an emoji.
out = Console(highlight=False, soft_wrap=True, emoji=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
log = logging.getLogger("custodes")


def secret(env_name: str, prompt: str, *, confirm: bool = False) -> str:
    """A secret from the environment, else a hidden prompt; never from an argument, which
    other users of the host could read."""
    value = settings.env(env_name)
    if value is not None:
        return value
    if not sys.stdin.isatty():
        raise ConfigurationError(f"set {env_name} or run in a terminal to be prompted")
    return str(click.prompt(prompt, hide_input=True, confirmation_prompt=confirm))


def vault_directory(value: str | None) -> Path:
    return Path(value or settings.env(settings.ENV_VAULT) or ".")


_DATABASE = "custodes.database"  # where --database is kept for this command's run


def _remember_database(ctx: click.Context, _: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.meta[_DATABASE] = settings.check_database_url(value)


_SHARES = "custodes.shares"  # the --share files given for this run


def _remember_shares(ctx: click.Context, _: click.Parameter, value: tuple[str, ...]) -> None:
    ctx.meta[_SHARES] = [Path(v) for v in value]


def vault_options(fn: F) -> F:
    fn = click.option(
        "--share",
        "shares",
        multiple=True,
        metavar="FILE",
        type=click.Path(dir_okay=False),
        expose_value=False,
        callback=_remember_shares,
        help="An officer's key share file, for a keyring sealed M-of-N (repeat: M distinct "
        "shares); a sealed share's passphrase comes from CUSTODES_SHARE_PASSPHRASE or a prompt.",
    )(fn)
    fn = click.option(
        "--database",
        metavar="URL",
        expose_value=False,
        callback=_remember_database,
        help="The vault's PostgreSQL database for this run, if not the one it recorded "
        "(e.g. another role's); also CUSTODES_DATABASE.",
    )(fn)
    fn = click.option(
        "--keyring",
        type=click.Path(dir_okay=False),
        help="Keyring file, if not where the vault recorded it.",
    )(fn)
    fn = click.option(
        "--vault",
        "vault_dir",
        type=click.Path(file_okay=False),
        help=f"Vault directory (default: ${settings.ENV_VAULT} or the current directory).",
    )(fn)
    return fn


def database_override() -> str | None:
    """The --database given for this run (vault_options), if any."""
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get(_DATABASE) if ctx is not None else None


def unlock_host_vault(vault: str | None, keyring: str | None) -> UnlockedVault:
    """The vault's keys, unlocked with the keyring passphrase or, for a keyring sealed
    M-of-N, the officers' --share files: host commands only."""
    from custodes.bootstrap import keyring_share_mode, unlock_vault

    directory = vault_directory(vault)
    settings.VaultLayout(directory).read()  # a clear error before any prompt
    keyring_path = Path(keyring) if keyring else None
    if keyring_share_mode(directory, keyring_path) is None:
        passphrase = secret(settings.ENV_KEYRING_PASSPHRASE, "Keyring passphrase")
        return unlock_vault(
            directory,
            passphrase=passphrase,
            keyring_path=keyring_path,
            database=database_override(),
        )
    return unlock_vault(
        directory,
        shares=read_shares(),
        keyring_path=keyring_path,
        database=database_override(),
    )


def keyring_passphrase(directory: Path, keyring: str | None) -> str:
    """What opens the vault's keyring: its passphrase, or for a keyring sealed M-of-N the
    key its --share files rebuild (host commands only: this loads key code)."""
    from custodes.bootstrap import keyring_passphrase_from_shares, keyring_share_mode

    if keyring_share_mode(directory, Path(keyring) if keyring else None) is None:
        return secret(settings.ENV_KEYRING_PASSPHRASE, "Keyring passphrase")
    return keyring_passphrase_from_shares(directory, read_shares())


def read_shares() -> list[Any]:
    """The --share files given for this run, each opened with its officer's passphrase
    if sealed (host commands only: this loads key code)."""
    from custodes.crypto.key_shares import is_sealed, parse_share
    from custodes.crypto.sealed_file import read_sealed_file

    ctx = click.get_current_context(silent=True)
    paths: list[Path] = ctx.meta.get(_SHARES, []) if ctx is not None else []
    if not paths:
        raise ConfigurationError(
            "this vault's keyring is sealed M-of-N: give its officers' shares with --share FILE"
        )
    shares = []
    for path in paths:
        data = read_sealed_file(path, what="key share file")
        passphrase = None
        if is_sealed(data):
            passphrase = secret(settings.ENV_SHARE_PASSPHRASE, f"Passphrase for share {path.name}")
        shares.append(parse_share(data, passphrase=passphrase))
    return shares


def open_host_vault(vault: str | None, keyring: str | None) -> Vault:
    """The host's vault, opened with its keys and its host operator (the passphrase's
    holder, who acts through these commands), logging operations to its logs/ directory."""
    from custodes.bootstrap import assemble_vault

    opened = assemble_vault(unlock_host_vault(vault, keyring), host=True)
    log_to(opened)
    return opened


def log_to(vault: Vault) -> None:
    """Operational log in the vault's logs/ directory: counts and outcomes, never values."""
    if vault.directory is not None:
        log_to_directory(vault.directory)


def log_to_directory(directory: Path) -> None:
    """Operational log in the logs/ directory of the vault at `directory`."""
    if log.handlers:
        return
    logs = settings.VaultLayout(directory).logs
    logs.mkdir(mode=0o700, exist_ok=True)
    path = logs / "custodes.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.close(fd)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def shown(text: object) -> Text:
    """Text from outside this process (a server's answer, a stored entry, a record) as the
    terminal is to show it: rich markup left as typed, and every control, formatting or
    unassigned character spelt out (`\\u202e`), so that nothing printed can move the cursor,
    erase a line or reorder what the reader sees."""
    return Text(escape_hidden(str(text)))


def print_record(record: Mapping[str, Any]) -> None:
    """One masked record as a table, then its links: a record in the API's JSON shape
    (record_id, type, fields, links), the same whether a vault or a server returned it."""
    table = Table(
        title=shown(f"{record['type']} {record['record_id']}"),
        show_header=False,
        title_justify="left",
    )
    for name, value in record["fields"].items():
        table.add_row(shown(name), shown(value))
    out.print(table)
    for link in record["links"]:
        out.print(
            shown(f"  {link['role']:<10} {link['type']:<9} {link['record_id']}  {link['label']}")
        )
