"""Host commands for the access log and for witnesses: audit verify, checkpoint, witness,
verify-bundle; witness init, add-log, serve.

`audit verify` needs no key but the log's public one, so an outside auditor can run it on
a copy of the vault directory; `audit verify-bundle` needs only a bundle and that key.
Reading the log and reporting on a subject are client commands (`custodes.cli.client`).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
import orjson

from custodes.audit.verify import OutsideCheckpoint
from custodes.cli.common import (
    err,
    open_host_vault,
    out,
    secret,
    shown,
    unlock_host_vault,
    vault_directory,
    vault_options,
)
from custodes.errors import ConfigurationError, CustodesError, TamperDetected

if TYPE_CHECKING:
    from custodes.vault import IndexCheck

ENV_WITNESS_PASSPHRASE = "CUSTODES_WITNESS_PASSPHRASE"  # noqa: S105 - a variable name


@click.command("verify")
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
@click.option(
    "--records",
    is_flag=True,
    help="Also re-derive every record's search tokens and compare them with the stored "
    "index (needs the keyring; opens every record in memory, prints counts only).",
)
@click.option("--json", "as_json", is_flag=True)
def audit_verify(
    vault_dir: str | None,
    log_key: str | None,
    checkpoints: tuple[str, ...],
    witness_dirs: tuple[str, ...],
    records: bool,
    as_json: bool,
) -> None:
    """Recompute the log from its entries and check every signed checkpoint against it,
    and the log's subject index against the entries.

    Exits non-zero, naming the first bad position, on an edited, deleted, reordered or
    truncated log, a subject index row missing, added or changed, a replaced checkpoint,
    or a fork from a checkpoint held outside. With --records, also on a search-index row
    missing, added or repointed.
    """
    from custodes.audit.witness import latest_checkpoint
    from custodes.bootstrap import stored_verifier_key, verify_log_files

    directory = vault_directory(vault_dir)
    key = log_key or stored_verifier_key(directory)
    if key is None:
        raise ConfigurationError("no log verifier key: pass --log-key")
    if log_key is None:
        err.print(
            "note: using the verifier key stored in the vault; pass --log-key to "
            "check against the published one"
        )
    origin = key.split("+", 1)[0]
    outside = [OutsideCheckpoint(p, Path(p).read_bytes()) for p in checkpoints]
    for witness_dir in witness_dirs:
        note = latest_checkpoint(Path(witness_dir), origin)
        if note is not None:
            outside.append(OutsideCheckpoint(f"witness {witness_dir}", note))
    signer_notes = _signer_evidence(directory, key, outside)
    report = verify_log_files(directory, log_key=key, outside=outside)
    report.notes[:0] = signer_notes
    index = _verify_records(vault_dir) if records else None
    if as_json:
        doc: dict[str, object] = {
            "ok": index is None or index.ok,
            "entries": report.entries,
            "root": report.root.hex(),
            "checkpoints": report.checkpoints,
            "outside_checkpoints": report.outside,
            "latest_signed": report.latest_signed,
            "notes": report.notes,
        }
        if index is not None:
            doc["records"] = index.counts()
        sys.stdout.write(orjson.dumps(doc).decode() + "\n")
    else:
        out.print(
            f"access log verified: {report.entries:,} entries, {report.checkpoints} stored "
            f"checkpoints and {report.outside} outside checkpoints consistent"
        )
        for remark in report.notes:
            out.print(shown(f"note: {remark}"))
        if index is not None and index.ok:
            out.print(
                f"search index verified: {index.records:,} records, {index.tokens:,} tokens "
                "re-derived and all stored"
            )
            if index.partial:
                out.print(
                    f"note: {index.partial:,} records link to records not stored; those "
                    "links' tokens were not re-derived"
                )
    if index is not None and not index.ok:
        raise TamperDetected(
            f"the search index does not match the records: {index.missing} rows missing, "
            f"{index.extra} extra ({index.repointed} repointed), {index.unreadable} records "
            "do not open"
        )


def _signer_evidence(directory: Path, key: str, outside: list[OutsideCheckpoint]) -> list[str]:
    """On the host, the log signer's own last checkpoint is held outside the database: a
    log rolled back to an older copy, cut or replaced fails against it, even when the
    copy's own checkpoints agree with it. Adds it to `outside`; returns notes for the
    report (the signer's state not found, losses the operator acknowledged)."""
    from custodes.audit.checkpoint import signed_losses, signed_state, signed_state_note
    from custodes.settings import VaultLayout

    try:
        key_path = VaultLayout(directory).read().log_key
        signer_key, _ = signed_state(key_path)
        note = signed_state_note(key_path)
        losses = signed_losses(key_path)
    except (CustodesError, OSError, ValueError):
        return [
            "the log signer's state was not readable here: a copy rolled back with its own "
            "checkpoints would pass; pass --checkpoint or --witness-dir to rule that out"
        ]
    if signer_key != key:
        return ["the log signer's state is for another key than the one given"]
    outside.append(OutsideCheckpoint("the log signer's state", note))
    return [
        f"the host operator acknowledged a loss of the log: the signer had signed "
        f"{loss.signed.size:,} entries, the log went on from {loss.resumed.size:,} "
        f"(reason: {loss.reason})"
        for loss in losses
    ]


def _verify_records(vault_dir: str | None) -> IndexCheck:
    # The host operator's act, on the access log like any other: unlike the log's check,
    # it needs the keys, to open the records and make their tokens again.
    vault = open_host_vault(vault_dir, None)
    try:
        return vault.verify_records(vault.operator)
    finally:
        vault.close()


@click.command("checkpoint")
@click.option("--vault", "vault_dir", type=click.Path(file_okay=False))
@click.option(
    "--out", "out_path", type=click.Path(dir_okay=False), help="Also write the note here."
)
def audit_checkpoint(vault_dir: str | None, out_path: str | None) -> None:
    """Sign a checkpoint of the log as it is now and print the signed note."""
    vault = open_host_vault(vault_dir, None)
    try:
        note = vault.checkpoint(vault.operator)
    finally:
        vault.close()
    if out_path:
        Path(out_path).write_bytes(note)
    sys.stdout.write(note.decode("utf-8"))


@click.command("key")
@click.option("--vault", "vault_dir", type=click.Path(file_okay=False))
def audit_key(vault_dir: str | None) -> None:
    """Print the access log's public key: what 'audit verify --log-key',
    'backup verify --log-key' and 'verify-bundle --log-key' check signatures against, and
    what to publish for auditors and witnesses. Read from the log signer's own record
    beside its key, with no passphrase; publish it once, then compare, never re-read."""
    from custodes.audit.checkpoint import signed_state
    from custodes.settings import VaultLayout

    recorded = VaultLayout(vault_directory(vault_dir)).read()
    key, _ = signed_state(recorded.log_key)
    click.echo(key)


@click.command("witness")
@click.option("--vault", "vault_dir", type=click.Path(file_okay=False))
@click.option("--url", required=True, help="The witness's address, e.g. http://127.0.0.1:7380/")
def audit_witness(vault_dir: str | None, url: str) -> None:
    """Send the latest checkpoint to a witness and store its cosignature with it."""
    vault = open_host_vault(vault_dir, None)
    try:
        size = vault.publish_checkpoint(vault.operator, url)
    finally:
        vault.close()
    out.print(f"checkpoint of size {size:,} cosigned by the witness")


@click.command("acknowledge-loss")
@vault_options
@click.option(
    "--reason",
    required=True,
    help="Why the lost entries cannot be put back (kept with the signed record of the loss "
    "and on the log; one line, no personal value).",
)
def audit_acknowledge_loss(vault_dir: str | None, keyring: str | None, reason: str) -> None:
    """Accept that the access log lost entries its signer had signed, so that the vault
    serves again.

    Only for a log rolled back, cut or replaced that cannot be restored from a copy:
    restore it if you can. The loss is kept, signed, beside the log key and is the log's
    next entry; doctor and audit verify report it ever after, and checkpoints of the lost
    entries held by witnesses and auditors keep failing against the log.
    """
    from custodes.bootstrap import acknowledge_log_loss

    loss = acknowledge_log_loss(unlock_host_vault(vault_dir, keyring), reason=reason)
    out.print(
        f"loss acknowledged: the signer had signed {loss.signed.size:,} entries; the log "
        f"goes on from {loss.resumed.size:,}"
    )
    out.print(
        "witnesses that cosigned the lost entries will refuse this log's checkpoints: tell "
        "their operators, with this record"
    )


@click.command("verify-bundle")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False))
@click.option("--log-key", required=True, help="The log's published verifier key.")
def audit_verify_bundle(bundle: str, log_key: str) -> None:
    """Check a subject-report bundle offline: signature, and every entry's inclusion proof."""
    from custodes.audit.report import verify_bundle

    verified = verify_bundle(Path(bundle).read_bytes(), log_key)
    out.print(
        f"bundle verified: {len(verified.entries)} entries about {verified.subject} are in the "
        f"log signed at size {verified.checkpoint.size:,}"
    )


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

    passphrase = secret(ENV_WITNESS_PASSPHRASE, "New witness passphrase", confirm=True)
    created = Witness.init(Path(directory), name=name, passphrase=passphrase)
    out.print(f"witness {created.name} created")
    out.print(f"verifier key: {created.verifier_key}")


@witness.command("add-log")
@click.argument("directory", type=click.Path(file_okay=False, exists=True))
@click.option("--log-key", required=True, help="The log's verifier key (its origin is its name).")
def witness_add_log(directory: str, log_key: str) -> None:
    """Accept checkpoints from a log, identified by its verifier key."""
    from custodes.audit.witness import add_log

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

    passphrase = secret(ENV_WITNESS_PASSPHRASE, "Witness passphrase")

    def ready(bound_host: str, bound_port: int) -> None:
        out.print(f"witness listening on http://{bound_host}:{bound_port}/")

    with contextlib.suppress(KeyboardInterrupt):
        serve(Path(directory), passphrase, host, port, ready=ready)
