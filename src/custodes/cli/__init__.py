"""The command line: one command per verb. Parse, call the vault or the server, print.

Host commands (init, ingest, account, serve, doctor, witness, audit verify ...) run where
the vault lives and need its keyring; client commands (login, search, show, reveal, audit
log, audit subject) ask a running server and need only the session 'custodes login' opened.
Commands are imported when run, so a client command never loads the host's key code.

The library raises typed errors; only the CLI prints them (one line, no value) and
chooses the exit code.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from typing import Any

import click
from rich.text import Text

from custodes import __version__
from custodes.cli.common import err
from custodes.errors import CustodesError

__all__ = ["cli", "main"]


class _LazyGroup(click.Group):
    """A group whose commands live in modules named by `lazy`, imported on first use."""

    def __init__(self, *args: Any, lazy: Mapping[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self.lazy.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module, _, name = target.partition(":")
        command = getattr(importlib.import_module(module), name)
        if not isinstance(command, click.Command):
            raise TypeError(f"{target} is not a command")
        return command


_HOST = "custodes.cli.host"
_CLIENT = "custodes.cli.client"
_AUDIT = "custodes.cli.audit"
_BACKUP = "custodes.cli.backup"
_DATABASE = "custodes.cli.database"
_EXPORTS = "custodes.cli.exports"


@click.group(
    cls=_LazyGroup,
    lazy={
        "verify": f"{_AUDIT}:audit_verify",
        "key": f"{_AUDIT}:audit_key",
        "checkpoint": f"{_AUDIT}:audit_checkpoint",
        "witness": f"{_AUDIT}:audit_witness",
        "acknowledge-loss": f"{_AUDIT}:audit_acknowledge_loss",
        "verify-bundle": f"{_AUDIT}:audit_verify_bundle",
        "log": f"{_CLIENT}:audit_log",
        "subject": f"{_CLIENT}:audit_subject",
    },
)
def audit() -> None:
    """The access log: verify it, sign a checkpoint, read it, report on a person."""


@click.group(
    cls=_LazyGroup,
    lazy={
        "create": f"{_BACKUP}:backup_create",
        "verify": f"{_BACKUP}:backup_verify",
        "restore-keys": f"{_BACKUP}:backup_restore_keys",
    },
)
def backup() -> None:
    """Backups: create one, verify one where it lies, put lost key files back from one.
    A whole vault is restored with 'custodes restore'."""


@click.group(
    cls=_LazyGroup,
    lazy={
        "init": f"{_HOST}:init",
        "synth": f"{_HOST}:synth",
        "ingest": f"{_HOST}:ingest",
        "demo": f"{_HOST}:demo",
        "upgrade": f"{_HOST}:upgrade",
        "account": "custodes.cli.accounts:account",
        "serve": "custodes.cli.server:serve",
        "unseal": "custodes.cli.server:unseal",
        "seal": "custodes.cli.server:seal",
        "seal-status": "custodes.cli.server:seal_status",
        "doctor": "custodes.cli.doctor:doctor",
        "witness": f"{_AUDIT}:witness",
        "login": f"{_CLIENT}:login",
        "logout": f"{_CLIENT}:logout",
        "search": f"{_CLIENT}:search",
        "show": f"{_CLIENT}:show",
        "reveal": f"{_CLIENT}:reveal",
        "restore": f"{_BACKUP}:restore",
        "trace": f"{_EXPORTS}:trace",
    },
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(__version__, prog_name="custodes")
def cli() -> None:
    """custodes: an encrypted, searchable, accountable vault of personal records."""


@click.group(
    cls=_LazyGroup,
    lazy={"score": "custodes.cli.guard:guard_score", "flag": "custodes.cli.guard:guard_flag"},
)
def guard() -> None:
    """The anomaly guard: officials' scores today, records flagged for an alert."""


@click.group(cls=_LazyGroup, lazy={"grant": f"{_DATABASE}:database_grant"})
def database() -> None:
    """A vault's PostgreSQL database: grant the server's own least-privileged role."""


@click.group(
    cls=_LazyGroup,
    lazy={
        "keygen": f"{_EXPORTS}:export_keygen",
        "open": f"{_EXPORTS}:export_open",
        "request": f"{_CLIENT}:export_request",
        "approve": f"{_CLIENT}:export_approve",
        "status": f"{_CLIENT}:export_status",
        "fetch": f"{_CLIENT}:export_fetch",
    },
)
def export() -> None:
    """Bulk exports: ask for one, approve another's, fetch yours (from the server); make a
    recipient's key pair and open an export with it (here, no server)."""


@click.group(
    cls=_LazyGroup,
    lazy={
        "status": "custodes.cli.keys:keys_status",
        "rotate": "custodes.cli.keys:keys_rotate",
        "reshare": "custodes.cli.keys:keys_reshare",
    },
)
def keys() -> None:
    """The vault's keys: their versions, rotating them online, new unseal shares."""


@click.group(
    cls=_LazyGroup,
    lazy={
        "request": f"{_CLIENT}:erase_request",
        "approve": f"{_CLIENT}:erase_approve",
        "status": f"{_CLIENT}:erase_status",
    },
)
def erase() -> None:
    """Erasure on two officials' word: ask for a record's, approve another's (which
    erases it), see where one stands (a client of the server: log in first)."""


@click.group(cls=_LazyGroup, lazy={"run": f"{_HOST}:retention_run"})
def retention() -> None:
    """The schema's retention rules: erase every record past its time (on the host)."""


@click.group(cls=_LazyGroup, lazy={"plant": f"{_HOST}:canary_plant"})
def canary() -> None:
    """Canary records: synthetic people whose every read raises an alarm."""


@click.group(
    cls=_LazyGroup,
    lazy={
        "list": f"{_CLIENT}:alerts_list",
        "acknowledge": f"{_CLIENT}:alerts_acknowledge",
        "resolve": f"{_CLIENT}:alerts_resolve",
    },
)
def alerts() -> None:
    """Alerts on officials' use of the vault, for supervisors and auditors (a client of
    the server: log in first)."""


cli.add_command(alerts)
cli.add_command(audit)
cli.add_command(canary)
cli.add_command(erase)
cli.add_command(export)
cli.add_command(backup)
cli.add_command(database)
cli.add_command(guard)
cli.add_command(keys)
cli.add_command(retention)


def main() -> None:
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        err.print("custodes: aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except CustodesError as exc:
        err.print(Text(f"custodes: error: {exc}"))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("custodes: interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
