"""The command line: one command per verb. Parse, call the vault, print.

The library raises typed errors; only this module prints them (one line, no value) and
chooses the exit code. Secrets come from the environment or a hidden prompt, never from
arguments, which other users of the host could read.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
import orjson
import pyotp
from rich.console import Console
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

from custodes import __version__, settings
from custodes.bootstrap import (
    DEFAULT_POPULATION,
    UnlockedVault,
    assemble_vault,
    create_vault,
    unlock_vault,
)
from custodes.errors import ConfigurationError, CustodesError
from custodes.ingest import FORMATS, IngestReport
from custodes.ingest import Progress as IngestProgress
from custodes.policy import AccessPurpose, Role, assigned_cases, district_prefix
from custodes.vault import RecordView, Session, Vault

F = TypeVar("F", bound=Callable[..., Any])

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
log = logging.getLogger("custodes")


# -- plumbing -------------------------------------------------------------------------


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


def _secret(env_name: str, prompt: str, *, confirm: bool = False) -> str:
    value = settings.env(env_name)
    if value is not None:
        return value
    if not sys.stdin.isatty():
        raise ConfigurationError(f"set {env_name} or run in a terminal to be prompted")
    return str(click.prompt(prompt, hide_input=True, confirmation_prompt=confirm))


def _vault_dir(value: str | None) -> Path:
    chosen = value or settings.env(settings.ENV_VAULT) or "."
    return Path(chosen)


def _open(vault: str | None, keyring: str | None) -> Vault:
    opened = assemble_vault(_unlock(vault, keyring))
    _log_to(opened)
    return opened


def _unlock(vault: str | None, keyring: str | None) -> UnlockedVault:
    directory = _vault_dir(vault)
    settings.VaultLayout(directory).read()  # a clear error before any prompt
    passphrase = _secret(settings.ENV_KEYRING_PASSPHRASE, "Keyring passphrase")
    return unlock_vault(
        directory, passphrase=passphrase, keyring_path=Path(keyring) if keyring else None
    )


def _log_to(vault: Vault) -> None:
    """Operational log in the vault's logs/ directory: counts and outcomes, never values."""
    if vault.directory is None or log.handlers:
        return
    logs = settings.VaultLayout(vault.directory).logs
    logs.mkdir(mode=0o700, exist_ok=True)
    path = logs / "custodes.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.close(fd)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def _login(vault: Vault, user: str | None) -> Session:
    username = user or settings.env(settings.ENV_USER)
    if username is None:
        if not sys.stdin.isatty():
            raise ConfigurationError(f"pass --user or set {settings.ENV_USER}")
        username = str(click.prompt("Account"))
    password = _secret(settings.ENV_PASSWORD, "Password")
    totp = _secret(settings.ENV_TOTP, "One-time code from your authenticator")
    return vault.login(username, password, totp=totp)


@contextmanager
def _session(
    vault_dir: str | None, keyring: str | None, user: str | None
) -> Iterator[tuple[Vault, Session]]:
    vault = _open(vault_dir, keyring)
    try:
        session = _login(vault, user)
        try:
            yield vault, session
        finally:
            vault.logout(session)
    finally:
        vault.close()


def vault_options(fn: F) -> F:
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


def reader_options(fn: F) -> F:
    fn = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(fn)
    fn = click.option("--case", "case_ref", help="The case this access serves.")(fn)
    fn = click.option(
        "--purpose", required=True, help="Why you are looking; recorded on the access log."
    )(fn)
    fn = click.option("--user", help=f"Account name (default: ${settings.ENV_USER}).")(fn)
    return vault_options(fn)


# -- commands -------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="custodes")
def cli() -> None:
    """custodes: an encrypted, searchable, accountable vault of personal records."""


@cli.command()
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
def init(directory: str, keyring: str | None, schema: str | None, population: int) -> None:
    """Create a vault in DIRECTORY and its keyring outside it."""
    passphrase = _secret(settings.ENV_KEYRING_PASSPHRASE, "New keyring passphrase", confirm=True)
    vault = create_vault(
        Path(directory),
        passphrase=passphrase,
        keyring_path=Path(keyring) if keyring else None,
        schema_path=Path(schema) if schema else None,
        expected_population=population,
    )
    recorded = settings.VaultLayout(Path(directory)).read()
    vault.close()
    out.print(f"Vault created in {directory}")
    out.print(f"Keyring: {recorded.keyring}  (keep it and its passphrase apart from the vault)")
    out.print(f"Access-log signing key: {recorded.log_key}")


@cli.command()
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


@cli.command()
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
    vault = _open(vault_dir, keyring)
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

        report = vault.ingest(source, rejects_dir=rejects_dir, progress=on_progress, **options)
    log.info(
        "ingest accepted=%d already_present=%d rejected=%d seconds=%.2f",
        report.accepted,
        report.already_present,
        report.rejected,
        report.seconds,
    )
    return report


def _print_report(report: IngestReport) -> None:
    table = Table(title="Ingest summary", show_header=False)
    table.add_row("stored", f"{report.accepted:,}")
    table.add_row("already present", f"{report.already_present:,}")
    table.add_row("refused", f"{report.rejected:,}")
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


@cli.command()
@reader_options
@click.option(
    "--type",
    "record_type",
    default=None,
    help="Record type (default: person, or case for --case-no).",
)
@click.option("--national-id", help="Find by resident ID number.")
@click.option("--phone", help="Find by mobile number.")
@click.option("--name", help="Find by name (Han characters or pinyin); needs --birth-date.")
@click.option("--birth-date", help="Birth date YYYY-MM-DD, with --name.")
@click.option("--case-no", help="Find a case by its number.")
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True)
def search(
    vault_dir: str | None,
    keyring: str | None,
    user: str | None,
    purpose: str,
    case_ref: str | None,
    as_json: bool,
    record_type: str | None,
    national_id: str | None,
    phone: str | None,
    name: str | None,
    birth_date: str | None,
    case_no: str | None,
    limit: int,
) -> None:
    """Find records by an indexed value. Results are masked; use 'reveal' for a field."""
    stated = AccessPurpose(purpose, case_ref)
    index, values, default_type = _choose_index(national_id, phone, name, birth_date, case_no)
    with _session(vault_dir, keyring, user) as (vault, session):
        views = vault.search(
            session,
            stated,
            record_type=record_type or default_type,
            index=index,
            values=values,
            limit=limit,
        )
    if as_json:
        sys.stdout.write(orjson.dumps([v.as_dict() for v in views]).decode() + "\n")
        return
    if not views:
        out.print("no match")
        return
    for view in views:
        _print_view(view)


def _choose_index(
    national_id: str | None,
    phone: str | None,
    name: str | None,
    birth_date: str | None,
    case_no: str | None,
) -> tuple[str, dict[str, str], str]:
    given = [x for x in (national_id, phone, name or birth_date, case_no) if x]
    if len(given) != 1:
        raise click.UsageError(
            "give exactly one of --national-id, --phone, --name with --birth-date, --case-no"
        )
    if national_id:
        return "national_id", {"national_id": national_id}, "person"
    if phone:
        return "phone", {"phone": phone}, "person"
    if case_no:
        return "case_no", {"case_no": case_no}, "case"
    if not (name and birth_date):
        raise click.UsageError("--name and --birth-date go together")
    return "name_birth", {"name": name, "birth_date": birth_date}, "person"


def _print_view(view: RecordView) -> None:
    table = Table(
        title=f"{view.record_type} {view.record_id}", show_header=False, title_justify="left"
    )
    for name, value in view.fields.items():
        table.add_row(name, Text(value))
    out.print(table)
    for link in view.links:
        out.print(Text(f"  {link.role:<10} {link.record_type:<9} {link.record_id}  {link.label}"))


@cli.command()
@click.argument("record_id")
@reader_options
def show(
    record_id: str,
    vault_dir: str | None,
    keyring: str | None,
    user: str | None,
    purpose: str,
    case_ref: str | None,
    as_json: bool,
) -> None:
    """Show one record, masked, with the records linked to it."""
    stated = AccessPurpose(purpose, case_ref)
    with _session(vault_dir, keyring, user) as (vault, session):
        view = vault.record(session, stated, record_id)
    if as_json:
        sys.stdout.write(orjson.dumps(view.as_dict()).decode() + "\n")
    else:
        _print_view(view)


@cli.command()
@click.argument("record_id")
@click.argument("field")
@reader_options
def reveal(
    record_id: str,
    field: str,
    vault_dir: str | None,
    keyring: str | None,
    user: str | None,
    purpose: str,
    case_ref: str | None,
    as_json: bool,
) -> None:
    """Show one FIELD of one record in the clear. Logged with its purpose."""
    stated = AccessPurpose(purpose, case_ref)
    with _session(vault_dir, keyring, user) as (vault, session):
        value = vault.reveal(session, stated, record_id, field)
    if as_json:
        doc = {"record_id": record_id, "field": field, "value": value}
        sys.stdout.write(orjson.dumps(doc).decode() + "\n")
    else:
        out.print(Text("(empty)" if value is None else value))


def _district(value: str | None) -> str | None:
    if value is not None and district_prefix(value) is None:
        raise click.BadParameter("a district is * or a division code of 2, 4 or 6 digits")
    return value


@cli.group()
def account() -> None:
    """Manage officials' accounts (on the host, with the keyring passphrase)."""


@account.command("add")
@click.argument("username")
@vault_options
@click.option("--role", type=click.Choice([r.value for r in Role]), required=True)
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
    vault = _open(vault_dir, keyring)
    try:
        password = _secret(settings.ENV_NEW_PASSWORD, f"Password for {username}", confirm=True)
        attributes = {"district": district} if district else {}
        vault.add_account(username, password, Role(role), attributes)
        code = vault.issue_enrolment(username)
    finally:
        vault.close()
    log.info("account added role=%s", role)
    out.print(f"account {username} ({role}) created")
    out.print(f"enrolment code (one use, valid 24 h): {code}")
    out.print("  the account's holder opens /enrol?code=<code> on the dashboard, or runs")
    out.print("  'custodes account mfa' on this host, to add the second factor it needs to log in")


@account.command("list")
@vault_options
@click.option("--json", "as_json", is_flag=True)
def account_list(vault_dir: str | None, keyring: str | None, as_json: bool) -> None:
    """List accounts (names, roles, districts, assigned cases, state; never hashes)."""
    vault = _open(vault_dir, keyring)
    try:
        accounts = vault.accounts.list()
    finally:
        vault.close()
    if as_json:
        rows = [
            {"username": a.username, "role": a.role.value, "disabled": a.disabled, **a.attributes}
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
            "disabled" if a.disabled else "active",
        )
    out.print(table)


@cli.command()
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
def demo(demo_dir: str, count: int, seed: int, workers: int, serve: bool, port: int) -> None:
    """Build a demo vault of synthetic people, run a sample search, serve the dashboard.

    Creates DIR/vault and DIR/keys (apart, as in production), a random keyring
    passphrase and a random account password, both printed for you to try things with.
    """
    from custodes.synth import write_jsonl

    root = Path(demo_dir)
    marker = root / "CUSTODES-DEMO"
    if root.exists():
        if not marker.exists():
            raise ConfigurationError(f"{demo_dir} exists and is not a custodes demo; choose --dir")
        shutil.rmtree(root)
    root.mkdir(mode=0o700, parents=True)
    marker.write_text("Made by 'custodes demo'. Synthetic people only. Safe to delete.\n")
    passphrase = secrets.token_urlsafe(24)
    password = secrets.token_urlsafe(18)
    population = root / "population.jsonl"

    out.print(f"[bold]1.[/] generating {count:,} synthetic people (seed {seed}) ...")
    with open(population, "wb") as f:
        lines = write_jsonl(f, count, seed=seed)
    out.print(f"   {lines:,} records (people, cases, deliveries) in {population}")

    out.print("[bold]2.[/] creating an encrypted vault; the keyring lives apart from it ...")
    vault_path = root / "vault"
    keyring_path = root / "keys" / "demo.keyring"
    vault = create_vault(vault_path, passphrase=passphrase, keyring_path=keyring_path)
    _log_to(vault)
    try:
        out.print(f"[bold]3.[/] ingesting with {workers} worker(s) ...")
        report = _ingest_with_progress(vault, str(population), workers=workers)
        _print_report(report)
        out.print("[bold]4.[/] adding an investigator account ...")
        vault.add_account("demo.investigator", password, Role.INVESTIGATOR, {"district": "*"})
        # The demo enrols the second factor itself; a real official scans the QR code.
        code = vault.issue_enrolment("demo.investigator")
        enrolment = vault.enrolment(code)
        totp = pyotp.TOTP(enrolment.secret)
        vault.complete_enrolment(code, totp.now())
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
            _print_view(full)
            phone = vault.reveal(session, stated, view.record_id, "phone")
            out.print(Text(f"   revealed phone: {phone}  (this reveal is on the access log)"))
        vault.logout(session)
        out.print("[bold]6.[/] signing a checkpoint of the access log and verifying it:")
        from custodes.audit.verify import verify_log

        vault.access_log.checkpoint()
        checked = verify_log(vault.storage, vault.access_log.verifier_key)
        out.print(
            f"   {checked.entries} access-log entries match {checked.checkpoints} signed "
            "checkpoint(s); every search, read and reveal above is among them"
        )
    finally:
        vault.close()
    out.print("\n[bold]Try next[/] (these secrets belong to this demo only):")
    out.print(f"  export CUSTODES_VAULT={vault_path}")
    out.print(f"  export CUSTODES_KEYRING_PASSPHRASE={passphrase}")
    out.print("  export CUSTODES_USER=demo.investigator")
    out.print(f"  export CUSTODES_PASSWORD={password}")
    out.print(f"  # add to an authenticator app: {enrolment.uri}")
    out.print("  export CUSTODES_TOTP=<the app's current code>  # each code works once")
    # Show the command as it was invoked (e.g. .venv/bin/custodes) so it can be pasted.
    me = sys.argv[0] if Path(sys.argv[0]).name == "custodes" else "custodes"
    out.print(f"  {me} search --national-id {first['national_id']} --purpose 'demo'")
    name, born = first["name"], first["birth_date"]
    out.print(f"  {me} search --name {name} --birth-date {born} --purpose 'demo'")
    out.print(f"  {me} show {record_id} --purpose 'demo'")
    out.print(f"  {me} reveal {record_id} address --purpose 'demo' --case DEMO-1")
    out.print(f"  {me} audit verify   # recompute the access log and check its signatures")
    out.print(f"  grep -c '{first['name']}' {vault_path}/vault.db   # 0: no plaintext on disk")
    if not serve:
        return
    from custodes.web.serve import serve as serve_dashboard

    code_command = f"{sys.executable} -c \"import pyotp; print(pyotp.TOTP('{totp.secret}').now())\""
    out.print(f"\n[bold]7.[/] the dashboard: http://127.0.0.1:{port}/  (Ctrl-C stops it)")
    out.print(
        "   log in as demo.investigator with the password above and the current code "
        "(each code works once; if one is refused, wait half a minute for the next):"
    )
    out.print(f"   {code_command}")
    unlocked = unlock_vault(vault_path, passphrase=passphrase, keyring_path=keyring_path)
    serve_dashboard(unlocked, host="127.0.0.1", port=port)


def _register_groups() -> None:
    from custodes.cli_audit import register as register_audit
    from custodes.cli_doctor import register as register_doctor
    from custodes.cli_web import register as register_web

    register_audit(cli)
    register_web(cli)
    register_doctor(cli)


_register_groups()


if __name__ == "__main__":
    main()
