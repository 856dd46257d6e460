"""Command line for the access log and for witnesses: verify, checkpoint, read, report, witness.

`audit verify` needs no key but the log's public one, so an outside auditor can run it on
a copy of the vault directory. Reading the log and reporting on a subject need an
auditor's account, and are themselves logged.
"""

from __future__ import annotations

import contextlib
import sys
from datetime import UTC, datetime
from pathlib import Path

import click
import orjson
from rich.text import Text

from custodes import settings
from custodes.audit.verify import OutsideCheckpoint, verify_log
from custodes.errors import ConfigurationError
from custodes.policy import AccessPurpose
from custodes.storage import SQLiteStorage

ENV_WITNESS_PASSPHRASE = "CUSTODES_WITNESS_PASSPHRASE"  # noqa: S105 - a variable name


def register(cli: click.Group) -> None:
    cli.add_command(audit)
    cli.add_command(witness)


@click.group()
def audit() -> None:
    """The access log: verify it, sign a checkpoint, read it, report on a person."""


@audit.command("verify")
@click.option("--vault", "vault_dir", type=click.Path(file_okay=False), help="Vault directory.")
@click.option(
    "--log-key",
    help="The log's verifier key, as published. Without it, the key stored in the vault is "
    "used, which an operator could have replaced.",
)
@click.option(
    "--checkpoint",
    "checkpoints",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="A signed checkpoint held outside the vault (repeatable).",
)
@click.option(
    "--witness-dir",
    "witness_dirs",
    multiple=True,
    type=click.Path(exists=True, file_okay=False),
    help="A witness's directory: its latest cosigned checkpoint of this log (repeatable).",
)
@click.option("--json", "as_json", is_flag=True)
def audit_verify(
    vault_dir: str | None,
    log_key: str | None,
    checkpoints: tuple[str, ...],
    witness_dirs: tuple[str, ...],
    as_json: bool,
) -> None:
    """Recompute the log from its entries and check every signed checkpoint against it.

    Exits non-zero, naming the first bad position, on an edited, deleted, reordered or
    truncated log, a replaced checkpoint, or a fork from a checkpoint held outside.
    """
    from custodes.audit.witness import latest_checkpoint
    from custodes.cli import err, out

    layout = settings.VaultLayout(Path(vault_dir or settings.env(settings.ENV_VAULT) or "."))
    layout.read()
    storage = SQLiteStorage(layout.database)
    try:
        stored_key = storage.get_meta("log_verifier_key")
        key = log_key or (stored_key.decode() if stored_key else None)
        if key is None:
            raise ConfigurationError("no log verifier key: pass --log-key")
        if log_key is None:
            err.print(
                "note: using the verifier key stored in the vault; pass --log-key to "
                "check against the published one"
            )
        origin = key.split("+", 1)[0]
        outside = [OutsideCheckpoint(p, Path(p).read_bytes()) for p in checkpoints]
        for directory in witness_dirs:
            note = latest_checkpoint(Path(directory), origin)
            if note is not None:
                outside.append(OutsideCheckpoint(f"witness {directory}", note))
        report = verify_log(storage, key, origin=origin, outside=outside)
    finally:
        storage.close()
    if as_json:
        doc = {
            "ok": True,
            "entries": report.entries,
            "root": report.root.hex(),
            "checkpoints": report.checkpoints,
            "outside_checkpoints": report.outside,
            "latest_signed": report.latest_signed,
            "notes": report.notes,
        }
        sys.stdout.write(orjson.dumps(doc).decode() + "\n")
        return
    out.print(
        f"access log verified: {report.entries:,} entries, {report.checkpoints} stored "
        f"checkpoints and {report.outside} outside checkpoints consistent"
    )
    for remark in report.notes:
        out.print(f"note: {remark}")


@audit.command("checkpoint")
@click.option("--vault", "vault_dir", type=click.Path(file_okay=False))
@click.option(
    "--out", "out_path", type=click.Path(dir_okay=False), help="Also write the note here."
)
def audit_checkpoint(vault_dir: str | None, out_path: str | None) -> None:
    """Sign a checkpoint of the log as it is now and print the signed note."""
    from custodes.cli import _open

    vault = _open(vault_dir, None)
    try:
        note = vault.access_log.checkpoint()
    finally:
        vault.close()
    if out_path:
        Path(out_path).write_bytes(note)
    sys.stdout.write(note.decode("utf-8"))


@audit.command("witness")
@click.option("--vault", "vault_dir", type=click.Path(file_okay=False))
@click.option("--url", required=True, help="The witness's address, e.g. http://127.0.0.1:7380/")
def audit_witness(vault_dir: str | None, url: str) -> None:
    """Send the latest checkpoint to a witness and store its cosignature with it."""
    from custodes.audit.witness import Conflict, submit_checkpoint
    from custodes.cli import _open, out

    vault = _open(vault_dir, None)
    try:
        log = vault.access_log
        note = log.checkpoint()
        size = log.size
        old_size = 0
        for _ in range(2):
            proof = log.consistency_proof(old_size, size) if 0 < old_size < size else []
            try:
                lines = submit_checkpoint(url, note, old_size, proof)
                break
            except Conflict as conflict:
                # The witness says which size it holds; prove consistency from there.
                old_size = conflict.size
        else:
            raise ConfigurationError("the witness keeps changing its size; try again")
        cosigned = (
            note + "".join(line if line.endswith("\n") else line + "\n" for line in lines).encode()
        )
        vault.storage.put_checkpoint(size, cosigned)
    finally:
        vault.close()
    out.print(f"checkpoint of size {size:,} cosigned by the witness")


@audit.command("log")
@click.option("--vault", "vault_dir", type=click.Path(file_okay=False))
@click.option("--user", help=f"Auditor account (default: ${settings.ENV_USER}).")
@click.option("--purpose", required=True, help="Why you are reading the log; it is logged too.")
@click.option("--case", "case_ref", help="The case or inquiry this reading serves.")
@click.option("--actor", help="Only entries by this account.")
@click.option("--action", help="Only actions starting with this tag, e.g. record:field.")
@click.option("--since", help="From this time (ISO 8601, UTC if no zone).")
@click.option("--until", help="Before this time (ISO 8601).")
@click.option("--purpose-contains", help="Only entries whose stated purpose contains this text.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def audit_log(
    vault_dir: str | None,
    user: str | None,
    purpose: str,
    case_ref: str | None,
    actor: str | None,
    action: str | None,
    since: str | None,
    until: str | None,
    purpose_contains: str | None,
    as_json: bool,
) -> None:
    """Stream access-log entries, filtered. For auditors."""
    from custodes.cli import _session, out

    stated = AccessPurpose(purpose, case_ref)
    with _session(vault_dir, None, user) as (vault, session):
        entries = vault.read_log(
            session,
            stated,
            actor=actor,
            action=action,
            since=_time(since),
            until=_time(until),
            purpose_contains=purpose_contains,
        )
        count = 0
        for index, entry in entries:
            count += 1
            if as_json:
                doc = orjson.loads(entry.encode())
                doc["index"] = index
                sys.stdout.write(orjson.dumps(doc).decode() + "\n")
                continue
            when = datetime.fromtimestamp(entry.time, UTC).strftime("%Y-%m-%d %H:%M:%S")
            records = ",".join(entry.records[:3]) + ("…" if len(entry.records) > 3 else "")
            out.print(
                Text(
                    f"{index:>8} {when} {entry.actor:<18} {entry.role:<12} {entry.action:<22} "
                    f"{entry.outcome.value:<7} {entry.purpose or '':<30} "
                    f"{entry.case_ref or '':<10} {records}"
                )
            )
    if not as_json:
        out.print(f"{count:,} entries")


def _time(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter("use ISO 8601, e.g. 2026-11-28T09:00") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


@click.group()
def witness() -> None:
    """Run a witness: an outside body that cosigns a log's checkpoints while they stay
    consistent, and refuses rollbacks and forks."""


@witness.command("init")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", required=True, help="The witness's name, e.g. dpa.example/witness.")
def witness_init(directory: str, name: str) -> None:
    """Create a witness directory with its own key (passphrase from the environment)."""
    from custodes.audit.witness import Witness
    from custodes.cli import _secret, out

    passphrase = _secret(ENV_WITNESS_PASSPHRASE, "New witness passphrase", confirm=True)
    created = Witness.init(Path(directory), name=name, passphrase=passphrase)
    out.print(f"witness {created.name} created")
    out.print(f"verifier key: {created.verifier_key}")


@witness.command("add-log")
@click.argument("directory", type=click.Path(file_okay=False, exists=True))
@click.option("--log-key", required=True, help="The log's verifier key (its origin is its name).")
def witness_add_log(directory: str, log_key: str) -> None:
    """Accept checkpoints from a log, identified by its verifier key."""
    from custodes.audit.witness import add_log
    from custodes.cli import out

    origin = log_key.split("+", 1)[0]
    add_log(Path(directory), origin=origin, log_vkey=log_key)
    out.print(f"witnessing {origin}")


@witness.command("serve")
@click.argument("directory", type=click.Path(file_okay=False, exists=True))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=7380, show_default=True, type=click.IntRange(0, 65535))
def witness_serve(directory: str, host: str, port: int) -> None:
    """Serve add-checkpoint requests (C2SP tlog-witness) on a loopback address."""
    from custodes.audit.witness_server import serve
    from custodes.cli import _secret, out

    passphrase = _secret(ENV_WITNESS_PASSPHRASE, "Witness passphrase")

    def ready(bound_host: str, bound_port: int) -> None:
        out.print(f"witness listening on http://{bound_host}:{bound_port}/")

    with contextlib.suppress(KeyboardInterrupt):
        serve(Path(directory), passphrase, host, port, ready=ready)


@audit.command("subject")
@click.argument("record_id")
@click.option("--vault", "vault_dir", type=click.Path(file_okay=False))
@click.option("--user", help=f"Auditor account (default: ${settings.ENV_USER}).")
@click.option("--purpose", default="subject access request", show_default=True)
@click.option("--case", "case_ref", help="The request or inquiry this report answers.")
@click.option(
    "--bundle",
    "bundle_path",
    type=click.Path(dir_okay=False),
    help="Also write a bundle that verifies offline with only the log's public key.",
)
@click.option("--json", "as_json", is_flag=True)
def audit_subject(
    record_id: str,
    vault_dir: str | None,
    user: str | None,
    purpose: str,
    case_ref: str | None,
    bundle_path: str | None,
    as_json: bool,
) -> None:
    """Every access to one person's records (RECORD_ID is the person's), with proofs."""
    from custodes.audit.report import as_json as report_json
    from custodes.audit.report import build_report, render_text
    from custodes.cli import _session, out
    from custodes.policy import Action

    stated = AccessPurpose(purpose, case_ref)
    with _session(vault_dir, None, user) as (vault, session):
        live = vault.require(session, stated, Action.SUBJECT_REPORT)
        report = build_report(vault, record_id, actor=live.username, purpose=stated)
    if bundle_path:
        Path(bundle_path).write_bytes(report.bundle())
    if as_json:
        sys.stdout.write(orjson.dumps(report_json(report)).decode() + "\n")
    else:
        out.print(Text(render_text(report)))
        if bundle_path:
            out.print(
                f"bundle written to {bundle_path}; check it with 'custodes audit verify-bundle'"
            )


@audit.command("verify-bundle")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False))
@click.option("--log-key", required=True, help="The log's published verifier key.")
def audit_verify_bundle(bundle: str, log_key: str) -> None:
    """Check a subject-report bundle offline: signature, and every entry's inclusion proof."""
    from custodes.audit.report import verify_bundle
    from custodes.cli import out

    verified = verify_bundle(Path(bundle).read_bytes(), log_key)
    out.print(
        f"bundle verified: {len(verified.entries)} entries about {verified.subject} are in the "
        f"log signed at size {verified.checkpoint.size:,}"
    )
