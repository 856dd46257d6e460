"""Bulk exports on the command line. Local commands, with no vault and no server: a
recipient's key pair (export keygen) and opening an export with it (export open). The
host's leak trace (trace) opens the vault with its keyring, like ingest.

The requests, approvals and fetching of an export are client commands (cli/client.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
import orjson
from rich.table import Table
from rich.text import Text

from custodes.cli.common import open_host_vault, out, shown, vault_options
from custodes.errors import ConfigurationError, InvalidInput
from custodes.export.envelope import keygen, open_sealed, private_key


def _write_private(path: Path, data: bytes) -> None:
    # Created owner-only, never replaced: a key file already there is someone's key.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigurationError(f"{path} exists already; choose another name") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


@click.command("keygen")
@click.argument("name", type=click.Path(dir_okay=False))
def export_keygen(name: str) -> None:
    """Make a recipient's key pair: NAME.key (private, owner-only; keep it) and NAME.pub
    (the public key, to give the official who asks for the export)."""
    private_pem, public_pem, public_b64 = keygen()
    _write_private(Path(f"{name}.key"), private_pem)
    Path(f"{name}.pub").write_bytes(public_pem)
    out.print(shown(f"private key: {name}.key (keep it; it alone opens the exports)"))
    out.print(shown(f"public key:  {name}.pub  {public_b64}"))


@click.command("open")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--key",
    "key_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="The recipient's private key file (from 'custodes export keygen').",
)
@click.option("--out", "out_file", type=click.Path(dir_okay=False), help="Write here, not stdout.")
def export_open(file: str, key_file: str, out_file: str | None) -> None:
    """Open an export sealed to your key: its rows as JSON Lines."""
    rows = open_sealed(private_key(Path(key_file).read_bytes()), Path(file).read_bytes())
    if out_file is None:
        sys.stdout.buffer.write(rows)
        return
    _write_private(Path(out_file), rows)


@click.command()
@click.argument("leaked", type=click.Path(exists=True, dir_okay=False))
@vault_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def trace(leaked: str, vault_dir: str | None, keyring: str | None, as_json: bool) -> None:
    """Trace a leaked sample (JSON Lines, JSON array or CSV) to the export it came from, by
    its canaries and watermark, or else to the accounts whose reads explain it. Logged."""
    from custodes.export.trace import read_leak

    try:
        rows = read_leak(Path(leaked).read_bytes())
    except UnicodeDecodeError:
        raise InvalidInput("the sample is not UTF-8 text") from None
    vault = open_host_vault(vault_dir, keyring)
    try:
        report = vault.exports.trace(vault.operator, rows)
    finally:
        vault.close()
    if as_json:
        sys.stdout.write(orjson.dumps(report.as_json()).decode() + "\n")
        return
    out.print(
        shown(
            f"{report.rows:,} rows; {len(report.records):,} records of the vault named "
            "(their ids with --json)"
        )
    )
    out.print(shown(f"columns the schema knows: {', '.join(report.columns) or 'none'}"))
    if report.export is not None:
        e = report.export
        out.print(Text(f"came from export {e.export_id}, produced by {e.requester}", style="bold"))
    elif report.accounts:
        out.print(
            Text("no export explains it; accounts whose reads explain it best:", style="bold")
        )
    else:
        out.print("neither an export nor any account's reads explain it")
    if report.exports:
        table = Table("export", "requester", "canaries", "watermark", "coverage", "confidence")
        for f in report.exports:
            table.add_row(
                f.export_id,
                shown(f.requester),
                f"{f.canaries_found} of {f.canaries}",
                f"{f.watermark_agree} of {f.watermark_rows}",
                f"{f.coverage:.1%}",
                f"{f.confidence:.6f}",
            )
        out.print(table)
    if report.accounts:
        table = Table("account", "records of the sample shown", "coverage", "of all it was shown")
        for a in report.accounts:
            table.add_row(
                shown(a.account), f"{a.covered:,}", f"{a.coverage:.1%}", f"{a.precision:.1%}"
            )
        out.print(table)
