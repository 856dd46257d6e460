"""Threat 3: a thief copies the vault directory (database, WAL, journals, logs, rejects).

Every byte of the directory is searched for every personal value that went in, in the
encodings a reader might try. Nothing may be found.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import ahocorasick
import orjson
import pytest

from custodes.bootstrap import open_vault
from custodes.policy import Role
from custodes.synth import write_jsonl
from custodes.vault import Vault
from tests.conftest import FAST_HASH, PASSPHRASE, PURPOSE, login, make_vault

# A pattern shorter than this occurs in megabytes of ciphertext by chance (a 4-byte
# string about once per 4 GB per pattern, but there are tens of thousands of patterns);
# 6 bytes and more do not. Every UTF-8 name is at least 6 bytes.
MIN_PATTERN_BYTES = 6
TEXT_ENCODINGS = ("utf-8", "utf-16-le", "utf-16-be", "gb18030", "big5")


def personal_values(records: Iterable[dict[str, object]]) -> set[str]:
    values: set[str] = set()
    for r in records:
        for field in ("name", "recipient_name", "national_id", "phone", "address", "narrative"):
            value = r.get(field)
            if isinstance(value, str) and value:
                values.add(value)
    return values


def encodings_of(value: str) -> set[bytes]:
    forms: set[bytes] = set()
    for encoding in TEXT_ENCODINGS:
        try:
            forms.add(value.encode(encoding))
        except UnicodeEncodeError:
            continue
    if value.isdigit() and len(value) == 11:
        # A phone number stored as an integer: SQLite uses 6-byte big-endian for it.
        number = int(value)
        forms.add(number.to_bytes(6, "big"))
        forms.add(number.to_bytes(8, "big"))
        forms.add(number.to_bytes(8, "little"))
    return {f for f in forms if len(f) >= MIN_PATTERN_BYTES}


def scan_bytes(directory: Path, values: set[str]) -> list[tuple[str, str]]:
    automaton = ahocorasick.Automaton()
    for value in values:
        for form in encodings_of(value):
            automaton.add_word(form.decode("latin-1"), len(form))
    automaton.make_automaton()
    hits: list[tuple[str, str]] = []
    files = [p for p in directory.rglob("*") if p.is_file()]
    assert files, "nothing to scan"
    for path in files:
        for _end, length in automaton.iter(path.read_bytes().decode("latin-1")):
            hits.append((str(path.relative_to(directory)), f"{length}-byte pattern"))
    return hits


@pytest.mark.slow
def test_stolen_vault_directory_holds_no_plaintext(tmp_path: Path) -> None:
    source = tmp_path / "input" / "population.jsonl"
    source.parent.mkdir()
    with source.open("wb") as f:
        write_jsonl(f, 12_000, seed=20220701)
    records = [orjson.loads(line) for line in source.read_bytes().splitlines()]
    # Refused records carry personal values too; the rejects report must not.
    broken = [
        dict(r, national_id=str(r["national_id"])[:17] + "0")
        for r in records[:50]
        if r["type"] == "person"
    ]
    bad_source = tmp_path / "input" / "broken.jsonl"
    bad_source.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in broken))
    assert len(records) >= 20_000
    values = personal_values(records + broken)

    vault: Vault = make_vault(tmp_path, "sqlite")
    assert vault.directory is not None
    directory = vault.directory
    vault.close()
    # Ingest as an operator would, so that the operational log and the rejects report
    # are written where a thief would find them.
    env = {
        **os.environ,
        "CUSTODES_VAULT": str(directory),
        "CUSTODES_KEYRING_PASSPHRASE": PASSPHRASE,
    }
    for source_file in (source, bad_source):
        done = subprocess.run(
            [sys.executable, "-m", "custodes", "ingest", str(source_file), "--workers", "2"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode in (0, 5), done.stderr
    assert (directory / "logs" / "custodes.log").stat().st_size > 0
    assert any((directory / "rejects").iterdir())
    vault = open_vault(directory, passphrase=PASSPHRASE, hash_cost=FAST_HASH)
    assert vault.count() == len(records)
    session = login(vault, Role.SUPERVISOR)
    person = next(r for r in records if r["type"] == "person")
    [view] = vault.search(
        session,
        PURPOSE,
        record_type="person",
        index="national_id",
        values={"national_id": str(person["national_id"])},
    )
    vault.reveal(session, PURPOSE, view.record_id, "address")
    # Records stored by the open vault sit in its WAL until it is checkpointed.
    late = tmp_path / "input" / "late.jsonl"
    with late.open("wb") as f:
        write_jsonl(f, 500, seed=7)
    late_records = [orjson.loads(line) for line in late.read_bytes().splitlines()]
    late_report = vault.ingest(vault.operator, late)
    # Another seed draws some case numbers again, with other contents: those are refused
    # as conflicting with the stored cases (and their values must not leak either).
    assert late_report.accepted > 0 and late_report.rejected == late_report.conflicting
    values |= personal_values(late_records)

    # While the vault is open: the WAL and shared-memory files exist and are copied too.
    stolen_live = tmp_path / "stolen-live"
    shutil.copytree(directory, stolen_live)
    wal = [p for p in stolen_live.iterdir() if p.name.endswith("-wal")]
    assert wal and wal[0].stat().st_size > 500 * 512
    vault.close()
    stolen_closed = tmp_path / "stolen-closed"
    shutil.copytree(tmp_path / "vault", stolen_closed)

    assert scan_bytes(stolen_live, values) == []
    assert scan_bytes(stolen_closed, values) == []


def test_the_scanner_finds_plaintext_when_it_is_there(tmp_path: Path) -> None:
    """The scan itself must not be a test that cannot fail."""
    directory = tmp_path / "plain"
    directory.mkdir()
    (directory / "leak.db").write_bytes(
        os.urandom(1000) + "张伟明".encode("gb18030") + os.urandom(10)
    )
    (directory / "other").write_bytes("13812345678".encode("utf-16-le"))
    hits = scan_bytes(directory, {"张伟明", "13812345678"})
    assert {h[0] for h in hits} == {"leak.db", "other"}
