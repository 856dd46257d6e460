"""Host commands for a vault's PostgreSQL database: database grant.

Run by whoever holds the schema owner's credentials, which the vault never records: they
need no keyring, and touch no record.
"""

from __future__ import annotations

import click
from rich.text import Text

from custodes import settings
from custodes.cli.common import out, vault_directory


@click.command("grant")
@click.option(
    "--owner-database",
    metavar="URL",
    required=True,
    help="The schema owner's URL (postgresql://OWNER@HOST:PORT/DB?options=-csearch_path%3DSCHEMA,"
    " no password: libpq reads it from ~/.pgpass). Used for this run only, never recorded.",
)
@click.option(
    "--app-role",
    metavar="NAME",
    required=True,
    help="The existing database role the server connects as: a plain role of its own, not "
    "a superuser, not allowed to create roles, not a member of the owner.",
)
@click.option(
    "--vault",
    "vault_dir",
    type=click.Path(file_okay=False),
    help=f"Vault directory (default: ${settings.ENV_VAULT} or the current directory).",
)
def database_grant(owner_database: str, app_role: str, vault_dir: str | None) -> None:
    """Migrate the vault's schema as its owner and grant the server's role exactly what it
    needs: append to and read the records and the access log, never update, delete,
    truncate or drop them, never change the schema.

    Run it after an upgrade, and to move a vault to a least-privileged role: if the vault's
    settings name the owner, they are changed to name NAME. Granting again revokes
    whatever the role held beyond that. A vault whose access log has a database of its
    own (init --log-database) is granted in each: run it again with the log schema
    owner's URL.
    """
    from custodes.bootstrap import grant_database_role

    # Before any connection: a URL with a password is refused without being repeated.
    settings.check_database_url(owner_database)
    granted = grant_database_role(
        vault_directory(vault_dir), owner_database=owner_database, app_role=app_role
    )
    where = " in the vault's access log database" if granted.log else ""
    out.print(
        Text(f"the database role {granted.app_role!r} holds what the server needs{where}, no more")
    )
    if granted.rerecorded:
        out.print(
            Text(
                f"the vault's settings named the schema's owner: the server now connects as "
                f"{granted.app_role!r}"
            )
        )
    elif granted.other_role is not None:
        out.print(
            Text(
                f"the vault's settings name another role, {granted.other_role!r}, and were "
                f"left as they are: the server connects as that role, not as "
                f"{granted.app_role!r}"
            )
        )
