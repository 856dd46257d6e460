"""Host commands for the vault's keys: keys status (current versions, and the rows still
under older ones), keys rotate (a new KEK, with --data new data keys, with --index a new
blind-index key; --resume finishes one that stopped). Online: a server keeps serving.
"""

from __future__ import annotations

import click
import orjson
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from custodes.cli.common import err, open_host_vault, out, vault_options
from custodes.vault.rotation import RotationState


def _show(state: RotationState, as_json: bool) -> None:
    if as_json:
        click.echo(orjson.dumps({"finished": state.finished, **state.counts()}).decode())
        return
    out.print(
        f"KEK version {state.kek_version}, data key generation {state.data_generation}, "
        f"index key version {state.token_version}"
    )
    if state.finished:
        out.print("no older key is live and no record uses one")
        return
    out.print(
        f"older versions still live: {len(state.old_keks)} KEK, "
        f"{len(state.old_token_versions)} index key; records under an older KEK: "
        f"{state.behind_kek:,}, under older data keys: {state.behind_data:,}; "
        f"token rows under an older index key: {state.old_tokens:,}"
    )
    out.print("a rotation is unfinished: 'custodes keys rotate --resume' finishes it")


@click.command("status")
@vault_options
@click.option("--json", "as_json", is_flag=True, help="Print the state as JSON.")
def keys_status(vault_dir: str | None, keyring: str | None, as_json: bool) -> None:
    """The vault's key versions, and how many records are still under older ones."""
    vault = open_host_vault(vault_dir, keyring)
    try:
        state = vault.key_state(vault.operator)
    finally:
        vault.close()
    _show(state, as_json)


@click.command("rotate")
@vault_options
@click.option("--data", is_flag=True, help="Also re-encrypt every record under new data keys.")
@click.option("--index", is_flag=True, help="Also rebuild every blind-index token under a new key.")
@click.option("--resume", is_flag=True, help="Finish a rotation that stopped, with no new key.")
@click.option("--json", "as_json", is_flag=True, help="Print the final state as JSON.")
def keys_rotate(
    vault_dir: str | None, keyring: str | None, data: bool, index: bool, resume: bool, as_json: bool
) -> None:
    """Rotate the vault's keys while it serves: a new key-encryption key rewraps every
    record's data key (no record is re-encrypted); --data re-encrypts every record under
    new data keys, --index rebuilds the blind-index tokens under a new index key. The old
    keys are destroyed once nothing uses them. Killed or stopped, it resumes with
    --resume. Every step is on the access log."""
    if resume and (data or index):
        raise click.UsageError(
            "--resume finishes the rotation already begun; it takes no --data or --index"
        )
    vault = open_host_vault(vault_dir, keyring)
    try:
        with Progress(
            TextColumn("rotate"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.completed:,.0f}/{task.total:,.0f} records"),
            TimeElapsedColumn(),
            console=err,
            transient=as_json,
        ) as bar:
            task = bar.add_task("rotate", total=0)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=max(total, done))

            state = vault.rotate_keys(
                vault.operator, data=data, index=index, resume=resume, progress=progress
            )
    finally:
        vault.close()
    if not as_json:
        out.print("rotation finished: the old keys are destroyed")
    _show(state, as_json)


@click.command("reshare")
@vault_options
@click.option(
    "--shares",
    "parts",
    type=click.IntRange(min=2, max=255),
    required=True,
    help="How many officers get a new share (N).",
)
@click.option(
    "--threshold",
    type=click.IntRange(min=2, max=255),
    required=True,
    help="How many new shares open the keyring (M).",
)
@click.option(
    "--officer",
    "officers",
    multiple=True,
    metavar="NAME",
    help="An officer's name, once per new share (default officer-1..N).",
)
@click.option(
    "--share-dir",
    type=click.Path(file_okay=False),
    required=True,
    help="Where to write the new share files (outside the vault).",
)
@click.option(
    "--seal-shares",
    is_flag=True,
    help="Seal each new share file under its officer's passphrase (asked for each "
    "officer, or CUSTODES_SHARE_PASSPHRASE).",
)
def keys_reshare(
    vault_dir: str | None,
    keyring: str | None,
    parts: int,
    threshold: int,
    officers: tuple[str, ...],
    share_dir: str,
    seal_shares: bool,
) -> None:
    """Rekey a vault sealed M-of-N: its officers give the threshold of their current
    shares (--share FILE, M times), and the same keys are sealed under a new key split
    among the officers named here; every old share opens nothing after. No record
    changes. On the access log before anything changes."""
    from pathlib import Path

    from custodes import settings
    from custodes.bootstrap import reshare_vault
    from custodes.cli.common import read_shares, secret, vault_directory
    from custodes.crypto.keyring import ShareMode

    if keyring is not None:
        raise click.UsageError("reshare works on the keyring the vault recorded")
    if threshold > parts:
        raise click.UsageError("--threshold cannot exceed --shares")
    names = list(officers) or [f"officer-{n}" for n in range(1, parts + 1)]
    if len(names) != parts:
        raise click.UsageError(f"--shares {parts} needs {parts} --officer names (or none)")
    directory = vault_directory(vault_dir)
    old = read_shares()
    passphrases: list[str | None] = [
        secret(settings.ENV_SHARE_PASSPHRASE, f"New passphrase for {name}'s share", confirm=True)
        if seal_shares
        else None
        for name in names
    ]
    written = reshare_vault(
        directory,
        old_shares=old,
        mode=ShareMode(parts, threshold),
        officers=names,
        share_paths=[Path(share_dir) / f"{name}.share" for name in names],
        share_passphrases=passphrases,
    )
    out.print(
        f"Keyring and log key sealed {threshold} of {parts} under a new key: the old shares "
        "open nothing now"
    )
    for name, path in zip(names, written, strict=True):
        out.print(f"Share of {name}: {path}")
    out.print("Hand each share file to its officer and delete it from this host.")
