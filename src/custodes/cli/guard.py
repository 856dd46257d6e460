"""Host commands for the anomaly guard: guard score (every official active today, with
the explanation of each point), guard flag (a record whose first read by any account
raises an alert). Both act as the host operator and are on the access log.
"""

from __future__ import annotations

import sys

import click
import orjson
from rich.table import Table

from custodes.cli.common import open_host_vault, out, shown


@click.command("score")
@click.option("--vault", "vault_dir", type=click.Path(file_okay=False), help="Vault directory.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of a table.")
def guard_score(vault_dir: str | None, as_json: bool) -> None:
    """Every official active today, scored against their own past days and their role's,
    highest first, each point explained. Reads the log; acts on no one."""
    vault = open_host_vault(vault_dir, None)
    try:
        scores = vault.score_accounts(vault.operator)
    finally:
        vault.close()
    if as_json:
        document = [
            {
                "account": s.account,
                "role": s.role,
                "day": s.day,
                "score": s.points,
                "verdict": s.verdict.name.lower(),
                "signals": [
                    {"signal": c.signal.value, "points": c.points, "explanation": c.explanation}
                    for c in s.contributions
                ],
                "records": list(s.records),
            }
            for s in scores
        ]
        sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if not scores:
        out.print("no official has read anything today")
        return
    table = Table(title="anomaly scores today")
    for column in ("account", "role", "score", "verdict", "why"):
        table.add_column(column)
    for s in scores:
        table.add_row(
            shown(s.account),
            shown(s.role),
            f"{s.points:.1f}",
            s.verdict.name.lower(),
            shown("\n".join(s.explained()) or "-"),
        )
    out.print(table)


@click.command("flag")
@click.argument("record_id")
@click.option("--vault", "vault_dir", type=click.Path(file_okay=False), help="Vault directory.")
def guard_flag(record_id: str, vault_dir: str | None) -> None:
    """Flag a record (a public figure's, say): the first time any account reads it, the
    guard raises an alert. Logged."""
    vault = open_host_vault(vault_dir, None)
    try:
        added = vault.flag_record(vault.operator, record_id)
    finally:
        vault.close()
    out.print("flagged" if added else "already flagged")
