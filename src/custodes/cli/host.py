"""Host commands that build and fill a vault: init, synth, ingest, demo.

They run where the vault lives and need the keyring passphrase (synth needs nothing).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import orjson
import pyotp
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from custodes import settings
from custodes.bootstrap import DEFAULT_POPULATION, create_vault, unlock_vault
from custodes.cli.common import (
    err,
    log,
    log_to,
    open_host_vault,
    out,
    print_record,
    secret,
    unlock_host_vault,
    vault_options,
)
from custodes.errors import ConfigurationError
from custodes.ingest import FORMATS, IngestReport
from custodes.ingest import Progress as IngestProgress
from custodes.policy import AccessPurpose, Role
from custodes.vault import Vault

if TYPE_CHECKING:
    from custodes.accounts import Enrolment


@click.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--keyring", type=click.Path(dir_okay=False), help="Where to keep the keyring.")
@click.option("--schema", type=click.Path(exists=True, dir_okay=False), help="A schema file.")
@click.option(
    "--population",
    type=click.IntRange(min=1),
    default=DEFAULT_POPULATION,
    show_default=True,
    help="Expected number of records at full scale; sets the blind-index token length.",
)
@click.option(
    "--database",
    metavar="URL",
    help="Keep the records and the access log in PostgreSQL (postgresql://USER@HOST:PORT/DB, "
    "no password: libpq reads it from ~/.pgpass) instead of a SQLite file in DIRECTORY. "
    "Every later command finds it in the vault's settings (CUSTODES_DATABASE overrides).",
)
@click.option(
    "--app-role",
    metavar="NAME",
    help="With --database naming the schema's owner: grant the existing database role NAME "
    "exactly what the server needs (append and read; never update, delete, truncate or "
    "drop history) and record the URL with NAME as its user, never the owner's.",
)
@click.option(
    "--replica",
    "replicas",
    multiple=True,
    metavar="URL",
    help="With --database: a streaming replica of it (repeatable) that serves reads of "
    "records and tokens while within --replica-max-lag of the primary; never written to. "
    "CUSTODES_REPLICAS (URLs separated by ';', or 'none') overrides.",
)
@click.option(
    "--replica-max-lag",
    type=click.FloatRange(min=0.01, max=3600.0),
    default=settings.DEFAULT_REPLICA_MAX_LAG,
    show_default=True,
    metavar="SECONDS",
    help="How far behind the primary a replica may be and still serve reads.",
)
@click.option(
    "--log-database",
    metavar="URL",
    help="With --database: the access log's own database (default: the primary). "
    "CUSTODES_LOG_DATABASE overrides.",
)
@click.option(
    "--partitions",
    type=click.IntRange(min=1, max=1024),
    help="With --database: how many hash partitions the records, data keys and tokens "
    "get (default 16; 256 for a population of 10^9). Fixed once the schema is made.",
)
@click.option(
    "--shares",
    type=click.IntRange(min=2, max=255),
    help="Seal the keyring under a random key split among N officers (M-of-N unseal) "
    "instead of a passphrase; no one person can open it.",
)
@click.option(
    "--threshold",
    type=click.IntRange(min=2, max=255),
    help="With --shares: how many officers' shares open the keyring (M).",
)
@click.option(
    "--officer",
    "officers",
    multiple=True,
    metavar="NAME",
    help="With --shares: an officer's name, once per share (default officer-1..N).",
)
@click.option(
    "--share-dir",
    type=click.Path(file_okay=False),
    help="With --shares: where to write the share files (outside DIRECTORY).",
)
@click.option(
    "--seal-shares",
    is_flag=True,
    help="With --shares: seal each share file under its officer's passphrase (asked for "
    "each officer, or CUSTODES_SHARE_PASSPHRASE).",
)
@click.option(
    "--pkcs11-module",
    metavar="PATH",
    help="Keep the key-encryption key in a PKCS#11 token, made there and never extractable: "
    "the token's module (a .so file). The keyring then holds no KEK.",
)
@click.option(
    "--pkcs11-token",
    metavar="LABEL",
    help="With --pkcs11-module: the label of the token; its user PIN is read from "
    "CUSTODES_PKCS11_PIN, never a flag.",
)
def init(
    directory: str,
    keyring: str | None,
    schema: str | None,
    population: int,
    database: str | None,
    app_role: str | None,
    replicas: tuple[str, ...],
    replica_max_lag: float,
    log_database: str | None,
    partitions: int | None,
    shares: int | None,
    threshold: int | None,
    officers: tuple[str, ...],
    share_dir: str | None,
    seal_shares: bool,
    pkcs11_module: str | None,
    pkcs11_token: str | None,
) -> None:
    """Create a vault in DIRECTORY and its keyring outside it."""
    if (replicas or log_database is not None) and database is None:
        raise click.UsageError("--replica and --log-database go with --database")
    settings.check_replicas(list(replicas))
    if log_database is not None:
        settings.check_database_url(log_database)
    topology = {
        "replicas": replicas,
        "replica_max_lag": replica_max_lag,
        "log_database": log_database,
    }
    if partitions is not None and database is None:
        raise click.UsageError("--partitions goes with --database")
    if shares is not None or threshold is not None:
        if pkcs11_module is not None or pkcs11_token is not None:
            raise click.UsageError("--shares and --pkcs11-module: one or the other, for now")
        _init_shared(
            directory,
            keyring,
            schema,
            population,
            database,
            app_role,
            partitions,
            shares,
            threshold,
            officers,
            share_dir,
            seal_shares,
            topology,
        )
        return
    if officers or share_dir or seal_shares:
        raise click.UsageError("--officer, --share-dir and --seal-shares go with --shares")
    if app_role is not None and database is None:
        raise click.UsageError("--app-role goes with --database")
    if (pkcs11_module is None) != (pkcs11_token is None):
        raise click.UsageError("--pkcs11-module and --pkcs11-token go together")
    if database is not None:
        # Before the passphrase is asked for: a wrong URL is the caller's to fix first.
        settings.check_database_url(database)
    if app_role is not None:
        settings.check_role_name(app_role)
    passphrase = secret(settings.ENV_KEYRING_PASSPHRASE, "New keyring passphrase", confirm=True)
    vault = create_vault(
        Path(directory),
        passphrase=passphrase,
        keyring_path=Path(keyring) if keyring else None,
        schema_path=Path(schema) if schema else None,
        expected_population=population,
        database=database,
        app_role=app_role,
        replicas=replicas,
        replica_max_lag=replica_max_lag,
        log_database=log_database,
        pkcs11_module=pkcs11_module,
        pkcs11_token=pkcs11_token,
        partitions=partitions,
    )
    recorded = settings.VaultLayout(Path(directory)).read()
    vault.close()
    out.print(f"Vault created in {directory}")
    if recorded.database is not None:
        out.print("Records and access log: in the PostgreSQL database named by --database")
    if recorded.replicas:
        out.print(
            f"Reads of records and tokens: also from {len(recorded.replicas)} replica(s) while "
            f"within {recorded.replica_max_lag:g} s of the primary"
        )
    if recorded.app_role is not None:
        out.print(
            Text(
                f"The server connects as the database role {recorded.app_role!r}, granted only "
                "what it needs; the owner's URL was not recorded"
            )
        )
    elif recorded.database is not None:
        out.print(
            "The server will connect as the role --database names, the schema's owner: give "
            "it a role of its own with 'custodes database grant --owner-database URL "
            "--app-role NAME'"
        )
    out.print(f"Keyring: {recorded.keyring}  (keep it and its passphrase apart from the vault)")
    if pkcs11_token is not None:
        out.print(
            Text(f"Key-encryption key: inside the PKCS#11 token {pkcs11_token!r}, not extractable")
        )
    out.print(f"Access-log signing key: {recorded.log_key}")


def _init_shared(
    directory: str,
    keyring: str | None,
    schema: str | None,
    population: int,
    database: str | None,
    app_role: str | None,
    partitions: int | None,
    shares: int | None,
    threshold: int | None,
    officers: tuple[str, ...],
    share_dir: str | None,
    seal_shares: bool,
    topology: dict[str, Any],
) -> None:
    from custodes.bootstrap import create_shared_vault
    from custodes.crypto.keyring import ShareMode

    if shares is None or threshold is None:
        raise click.UsageError("--shares and --threshold go together")
    if threshold > shares:
        raise click.UsageError("--threshold cannot exceed --shares")
    if app_role is not None and database is None:
        raise click.UsageError("--app-role goes with --database")
    if database is not None:
        settings.check_database_url(database)
    names = list(officers) or [f"officer-{n}" for n in range(1, shares + 1)]
    if len(names) != shares:
        raise click.UsageError(f"--shares {shares} needs {shares} --officer names (or none)")
    paths = [Path(share_dir) / f"{name}.share" for name in names] if share_dir else None
    passphrases: list[str | None] = [
        secret(settings.ENV_SHARE_PASSPHRASE, f"New passphrase for {name}'s share", confirm=True)
        if seal_shares
        else None
        for name in names
    ]
    vault, written = create_shared_vault(
        Path(directory),
        mode=ShareMode(shares, threshold),
        officers=names,
        share_paths=paths,
        share_passphrases=passphrases,
        keyring_path=Path(keyring) if keyring else None,
        schema_path=Path(schema) if schema else None,
        expected_population=population,
        database=database,
        app_role=app_role,
        **topology,
        partitions=partitions,
    )
    recorded = settings.VaultLayout(Path(directory)).read()
    vault.close()
    out.print(f"Vault created in {directory}")
    out.print(
        f"Keyring: {recorded.keyring}  (sealed {threshold} of {shares}: any {threshold} "
        "officers' shares open it, fewer open nothing)"
    )
    out.print(f"Access-log signing key: {recorded.log_key}")
    for name, path in zip(names, written, strict=True):
        out.print(Text(f"Share of {name}: {path}"))
    out.print("Hand each share file to its officer and delete it from this host.")


@click.command()
@vault_options
@click.option(
    "--schema", type=click.Path(exists=True, dir_okay=False), help="The vault's schema file."
)
@click.option(
    "--population",
    type=click.IntRange(min=1),
    default=DEFAULT_POPULATION,
    show_default=True,
    help="The expected population the vault was created for.",
)
def upgrade(
    vault_dir: str | None, keyring: str | None, schema: str | None, population: int
) -> None:
    """Seal the settings and accounts of a vault made before they were sealed (once).

    Refused unless the stored schema is exactly the text of the vault's schema file (the
    shipped one without --schema) and the token sizes those planned for --population, so
    that nothing a database writer edited is ever sealed as genuine.
    """
    from custodes.bootstrap import seal_settings

    unlocked = unlock_host_vault(vault_dir, keyring)
    sealed = seal_settings(
        unlocked, schema_path=Path(schema) if schema else None, expected_population=population
    )
    out.print("the vault's settings are sealed")
    if sealed:
        out.print(
            f"{len(sealed)} account(s) had no seal and were sealed as they are: check them "
            "with 'custodes account list' and disable any you did not create:"
        )
        for name in sealed:
            out.print(Text(f"  {name}"))


@click.command()
@click.option("--count", type=click.IntRange(min=0), default=1000, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option(
    "--out", "out_path", type=click.Path(dir_okay=False), help="Output file (default stdout)."
)
@click.option("--cases-per-person", type=click.FloatRange(0, 10), default=0.2, show_default=True)
@click.option(
    "--deliveries-per-person", type=click.FloatRange(0, 10), default=0.5, show_default=True
)
def synth(
    count: int,
    seed: int,
    out_path: str | None,
    cases_per_person: float,
    deliveries_per_person: float,
) -> None:
    """Write a synthetic population as JSON Lines: fake people, cases and deliveries."""
    from custodes.synth import write_jsonl

    options = {"cases_per_person": cases_per_person, "deliveries_per_person": deliveries_per_person}
    if out_path is None:
        write_jsonl(sys.stdout.buffer, count, seed=seed, **options)
        sys.stdout.buffer.flush()
        return
    with open(out_path, "wb") as f:
        lines = write_jsonl(f, count, seed=seed, **options)
    err.print(f"wrote {lines} records to {out_path}")


class _RecordRate(ProgressColumn):
    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0
        records = task.fields.get("records", 0)
        rate = records / elapsed if elapsed > 0 else 0
        return Text(f"{records:,} records  {rate:,.0f} rec/s", style="progress.data.speed")


@click.command()
@click.argument("source", type=click.Path(dir_okay=False, allow_dash=True))
@vault_options
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    help="Input format (default: from the file name).",
)
@click.option("--type", "record_type", help="Record type of records that do not name one.")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Encrypting processes.",
)
@click.option(
    "--batch-size", type=click.IntRange(min=1, max=100_000), default=2000, show_default=True
)
@click.option("--strict", is_flag=True, help="Store nothing if any record is refused.")
def ingest(
    source: str,
    vault_dir: str | None,
    keyring: str | None,
    fmt: str | None,
    record_type: str | None,
    workers: int,
    batch_size: int,
    strict: bool,
) -> None:
    """Ingest SOURCE (JSON Lines, JSON array or CSV; '-' for stdin) into the vault."""
    vault = open_host_vault(vault_dir, keyring)
    try:
        report = _ingest_with_progress(
            vault,
            source,
            fmt=fmt,
            record_type=record_type,
            workers=workers,
            batch_size=batch_size,
            strict=strict,
        )
    finally:
        vault.close()
    _print_report(report)
    if report.strict_refused or (report.rejected and not report.valid):
        sys.exit(5)


@click.command("plant")
@vault_options
@click.option(
    "--count",
    type=click.IntRange(min=1, max=10_000),
    default=20,
    show_default=True,
    help="How many canary records to plant.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def canary_plant(vault_dir: str | None, keyring: str | None, count: int, as_json: bool) -> None:
    """Plant synthetic people as canary records: stored exactly like real people, none
    sharing an indexed value with anyone stored, listed only in a sealed list. Any read
    that returns one locks the reading account and raises a critical alert."""
    vault = open_host_vault(vault_dir, keyring)
    try:
        held = vault.plant_canaries(vault.operator, count)
    finally:
        vault.close()
    if as_json:
        click.echo(orjson.dumps({"planted": count, "canaries": held}).decode())
    else:
        out.print(f"{count} canary records planted ({held} in the vault)")


@click.command("run")
@vault_options
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def retention_run(vault_dir: str | None, keyring: str | None, as_json: bool) -> None:
    """Erase every record past its type's retention rule (the schema's): each on the
    erasure ledger and the access log, its data key, sealed fields and tokens destroyed.
    A server runs the same pass on its own (serve --retention-every)."""
    vault = open_host_vault(vault_dir, keyring)
    try:
        report = vault.erasures.retention_round(vault.operator)
    finally:
        vault.close()
    if as_json:
        click.echo(orjson.dumps({"scanned": report.scanned, "erased": report.erased}).decode())
        return
    erased = ", ".join(f"{n} {name}" for name, n in sorted(report.erased.items())) or "none"
    out.print(f"{report.scanned} records read; erased: {erased}")


def _ingest_with_progress(vault: Vault, source: str, **options: Any) -> IngestReport:
    assert vault.directory is not None
    rejects_dir = settings.VaultLayout(vault.directory).rejects
    with Progress(
        TextColumn("ingest"),
        BarColumn(),
        TaskProgressColumn(),
        _RecordRate(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
        disable=not err.is_terminal and os.environ.get("CUSTODES_PROGRESS") != "1",
    ) as bar:
        task = bar.add_task("ingest", total=None, records=0)

        def on_progress(p: IngestProgress) -> None:
            bar.update(task, completed=p.bytes_read, total=p.bytes_total, records=p.records)

        report = vault.ingest(
            vault.operator, source, rejects_dir=rejects_dir, progress=on_progress, **options
        )
    log.info(
        "ingest accepted=%d already_present=%d rejected=%d conflicting=%d seconds=%.2f",
        report.accepted,
        report.already_present,
        report.rejected,
        report.conflicting,
        report.seconds,
    )
    return report


def _print_report(report: IngestReport) -> None:
    table = Table(title="Ingest summary", show_header=False)
    table.add_row("stored", f"{report.accepted:,}")
    table.add_row("already present", f"{report.already_present:,}")
    table.add_row("refused", f"{report.rejected:,}")
    if report.conflicting:
        # Never dropped as if present: a stored record under the same key holds other fields.
        table.add_row("  of which conflict with a stored record", f"{report.conflicting:,}")
    table.add_row("time", f"{report.seconds:.2f} s")
    table.add_row("rate", f"{report.rate:,.0f} records/s")
    if report.rejects_path is not None:
        table.add_row("refusals listed in", str(report.rejects_path))
    out.print(table)
    for line, field, reason in report.first_rejects:
        where = f"line {line}" + (f", field {field!r}" if field else "")
        out.print(Text(f"  refused {where}: {reason}"))
    if report.strict_refused:
        out.print("strict mode: nothing was stored because some records were refused")


@click.command()
@click.option(
    "--dir",
    "demo_dir",
    type=click.Path(file_okay=False),
    default="custodes-demo",
    show_default=True,
)
@click.option(
    "--count",
    type=click.IntRange(min=10),
    default=100_000,
    show_default=True,
    help="Synthetic people.",
)
@click.option("--seed", type=int, default=2022, show_default=True)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=max(1, min(4, os.cpu_count() or 1)),
    show_default=True,
)
@click.option(
    "--serve/--no-serve",
    default=True,
    show_default=True,
    help="Then serve the dashboard on 127.0.0.1 until interrupted.",
)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option(
    "--force", is_flag=True, help="Replace a demo already in DIR without asking (its secrets too)."
)
def demo(
    demo_dir: str, count: int, seed: int, workers: int, serve: bool, port: int, force: bool
) -> None:
    """Build a demo vault of synthetic people, run a sample search, serve the dashboard.

    Everything it makes stays in DIR: the vault in DIR/vault and its keys in DIR/keys
    (apart, as in production), nothing in your configuration directory. A random keyring
    passphrase and random passwords for an investigator and an auditor are printed for
    you to try things with. A demo already in DIR is replaced only once you confirm it
    (or with --force).
    """
    from custodes.synth import write_jsonl

    root = Path(demo_dir)
    if root.exists() and not _replace_demo(root, demo_dir, force):
        out.print(Text(f"the demo in {demo_dir} is kept as it was"))
        return
    root.mkdir(mode=0o700, parents=True)
    (root / DEMO_MARKER).write_text(
        "Made by 'custodes demo'. Synthetic people only. Safe to delete.\n"
    )
    passphrase = secrets.token_urlsafe(24)
    password = secrets.token_urlsafe(18)
    auditor_password = secrets.token_urlsafe(18)
    population = root / "population.jsonl"

    out.print(f"[bold]1.[/] generating {count:,} synthetic people (seed {seed}) ...")
    with open(population, "wb") as f:
        lines = write_jsonl(f, count, seed=seed)
    out.print(f"   {lines:,} records (people, cases, deliveries) in {population}")

    out.print("[bold]2.[/] creating an encrypted vault; the keyring lives apart from it ...")
    vault_path = root / "vault"
    keyring_path = root / "keys" / "demo.keyring"
    vault = create_vault(
        vault_path,
        passphrase=passphrase,
        keyring_path=keyring_path,
        log_key_path=root / "keys" / "demo-log.key",
    )
    log_to(vault)
    try:
        out.print(f"[bold]3.[/] ingesting with {workers} worker(s) ...")
        report = _ingest_with_progress(vault, str(population), workers=workers)
        _print_report(report)
        out.print("[bold]4.[/] adding an investigator and an auditor account ...")
        operator = vault.operator
        vault.admin.add_account(
            operator, "demo.investigator", password, Role.INVESTIGATOR, {"district": "*"}
        )
        vault.admin.add_account(operator, "demo.auditor", auditor_password, Role.AUDITOR)
        # The demo enrols the second factors itself; a real official scans the QR code.
        enrolment = _enrol_demo_account(vault, "demo.investigator")
        auditor_enrolment = _enrol_demo_account(vault, "demo.auditor")
        totp = pyotp.TOTP(enrolment.secret)
        first = orjson.loads(population.open("rb").readline())
        # The next time step's code: the one that confirmed the enrolment is used up.
        session = vault.login("demo.investigator", password, totp=totp.at(time.time() + 30))
        stated = AccessPurpose("demo: sample search", "DEMO-1")
        out.print("[bold]5.[/] a sample search by national ID (masked), and one reveal:")
        views = vault.search(
            session,
            stated,
            record_type="person",
            index="national_id",
            values={"national_id": first["national_id"]},
        )
        record_id = views[0].record_id if views else "RECORD_ID"
        for view in views:
            full = vault.record(session, stated, view.record_id)
            print_record(full.as_dict())
            phone = vault.reveal(session, stated, view.record_id, "phone")
            out.print(Text(f"   revealed phone: {phone}  (this reveal is on the access log)"))
        vault.logout(session)
        out.print("[bold]6.[/] signing a checkpoint of the access log and verifying it:")
        vault.checkpoint(operator)
        checked = vault.verify_log(operator)
        out.print(
            f"   {checked.entries} access-log entries match {checked.checkpoints} signed "
            "checkpoint(s); every search, read and reveal above is among them"
        )
    finally:
        vault.close()
    # Show the command as it was invoked (e.g. .venv/bin/custodes) so it can be pasted.
    me = sys.argv[0] if Path(sys.argv[0]).name == "custodes" else "custodes"
    server = f"http://127.0.0.1:{port}"
    name, born = first["name"], first["birth_date"]
    asked = "--purpose 'demo' --case DEMO-1"
    out.print("\n[bold]Try next[/] (these secrets belong to this demo only).")
    out.print("On the host, with the keyring passphrase:")
    out.print(f"  export CUSTODES_VAULT={vault_path}")
    out.print(f"  export CUSTODES_KEYRING_PASSPHRASE={passphrase}")
    if not serve:
        out.print(f"  {me} serve --port {port}   # the server the official logs in to")
    out.print(f"  {me} audit verify   # recompute the access log and check its signatures")
    out.print(f"  grep -c '{first['name']}' {vault_path}/vault.db   # 0: no plaintext on disk")
    where = "the dashboard below" if serve else "the server"
    out.print(f"As the official, in another terminal while {where} runs (no keyring needed):")
    out.print("  export CUSTODES_USER=demo.investigator")
    out.print(f"  export CUSTODES_PASSWORD={password}")
    out.print(f"  # add to an authenticator app: {enrolment.uri}")
    out.print(f"  {me} login --server {server}   # asks for the app's current code, once")
    out.print(f"  {me} search --national-id {first['national_id']} {asked}")
    out.print(f"  {me} search --name {name} --birth-date {born} {asked}")
    out.print(f"  {me} show {record_id} {asked}")
    out.print(f"  {me} reveal {record_id} address {asked}")
    out.print(f"  {me} logout")
    out.print("As the auditor, who reads the access log and no record:")
    out.print("  export CUSTODES_USER=demo.auditor")
    out.print(f"  export CUSTODES_PASSWORD={auditor_password}")
    out.print(f"  # add to an authenticator app: {auditor_enrolment.uri}")
    out.print(f"  {me} login --server {server}")
    out.print(f"  {me} audit log --purpose 'demo: who looked'")
    out.print(f"  {me} audit subject {record_id} --purpose 'demo: a subject access request'")
    if not serve:
        return
    from custodes.web.serve import serve as serve_dashboard

    code_command = f"{sys.executable} -c \"import pyotp; print(pyotp.TOTP('{totp.secret}').now())\""
    out.print(f"\n[bold]7.[/] the dashboard: {server}/  (Ctrl-C stops it)")
    auditor_code = code_command.replace(totp.secret, auditor_enrolment.secret)
    out.print(
        "   log in (here or with 'custodes login') as demo.investigator or demo.auditor with "
        "the password above and the current code (each code works once; if one is refused, "
        "wait half a minute for the next):"
    )
    out.print(f"   {code_command}   # demo.investigator")
    out.print(f"   {auditor_code}   # demo.auditor")
    unlocked = unlock_vault(vault_path, passphrase=passphrase, keyring_path=keyring_path)
    # Ctrl-C is how the demo's server is meant to end: not an abort.
    with contextlib.suppress(KeyboardInterrupt):
        serve_dashboard(unlocked, host="127.0.0.1", port=port)
    out.print(
        Text(
            f"the demo's server stopped; the demo stays in {demo_dir} (run it again to replace it)"
        )
    )


DEMO_MARKER = "CUSTODES-DEMO"


def _replace_demo(root: Path, demo_dir: str, force: bool) -> bool:
    """Whether to replace the demo in `root`: yes with --force, else only when a person at a
    terminal says so. A folder that is not a demo is never touched."""
    if not (root / DEMO_MARKER).exists():
        raise ConfigurationError(f"{demo_dir} exists and is not a custodes demo; choose --dir")
    why = (
        f"{demo_dir} already holds a demo: replacing it deletes its vault, keys and accounts "
        "(their passwords stop working)"
    )
    if not force:
        if not sys.stdin.isatty():
            raise ConfigurationError(f"{why}; rerun with --force to replace it, or choose --dir")
        if not click.confirm(f"{why}. Replace it?", default=False):
            return False
    shutil.rmtree(root)
    return True


def _enrol_demo_account(vault: Vault, username: str) -> Enrolment:
    code = vault.admin.issue_enrolment(vault.operator, username)
    enrolment = vault.enrolment(code)
    vault.complete_enrolment(code, pyotp.TOTP(enrolment.secret).now())
    return enrolment
