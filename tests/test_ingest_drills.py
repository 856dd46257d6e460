"""What crash drills found in ingest, held as attacks: workers that outlive a killed
ingest with the keys, a record under a stored key silently dropped, and records written
with no access-log entry naming them.
"""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from custodes import access
from custodes.access import ids_digest
from custodes.audit import AccessEntry, Outcome
from custodes.bootstrap import open_vault
from custodes.errors import AccessDenied, StorageError
from custodes.policy import AccessPurpose, Action, Role, authorise
from custodes.policy.decisions import ACCOUNT_ROLES
from custodes.settings import VaultLayout
from custodes.synth import write_jsonl as synth_jsonl
from custodes.vault import Vault
from tests.conftest import (
    FAST_HASH,
    PASSPHRASE,
    login,
    make_vault,
    read_records,
    write_jsonl,
)
from tests.test_ingest_bad_input import national_id, person

STORE = Action.INGEST_BATCH.value


def batch_entries(vault: Vault, outcome: Outcome | None = None) -> list[AccessEntry]:
    return [entry for _, entry in batches(vault, outcome)]


def batches(vault: Vault, outcome: Outcome | None = None) -> list[tuple[int, AccessEntry]]:
    return [
        (index, entry)
        for index, entry in vault._log.entries()
        if entry.action == STORE and (outcome is None or entry.outcome is outcome)
    ]


def batch_ids(vault: Vault, index: int, entry: AccessEntry) -> tuple[str, ...]:
    """The ids a batch's entry stands for: sealed beside it, and held against the digest
    its leaf carries."""
    details = vault._log.private_details(index)
    assert details is not None
    ids = tuple(details["records"])
    assert entry.detail["ids_digest"] == ids_digest(ids)
    assert entry.records == () and entry.result_count == len(ids)
    return ids


def stored_ids(vault: Vault) -> set[str]:
    return {record_id for _, record_id, _ in vault._storage.record_tokens(0, 1_000_000)}


def stored_person(vault: Vault, seq: int) -> dict[str, object]:
    record_id = vault._codec.record_id("person", [national_id(seq)])
    return dict(vault._codec.open(vault._storage.get_records([record_id])[record_id]))


def rejects_text(path: Path | None) -> str:
    return path.read_text("utf-8") if path is not None else ""


# -- a killed ingest leaves no worker holding the keys ----------------------------------


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(state, parent, start time) of a process, or None once it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may hold spaces: split after the last one.
    fields = data[data.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), fields[19]


def _descendants(pid: int) -> dict[int, str]:
    """Every live descendant of a process, by pid, with its start time."""
    found: dict[int, str] = {}
    parents = [pid]
    while parents:
        parent = parents.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            for child in map(int, children):
                stat = _stat(child)
                if stat is not None and child not in found:
                    found[child] = stat[2]
                    parents.append(child)
    return found


def _still_running(pid: int, started: str) -> bool:
    stat = _stat(pid)
    # A zombie holds no memory; a new process under a reused pid is another process.
    return stat is not None and stat[0] != "Z" and stat[2] == started


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_ingest_leaves_no_worker_holding_the_keys(tmp_path: Path) -> None:
    make_vault(tmp_path, "sqlite").close()
    source = tmp_path / "population.jsonl"
    with source.open("wb") as f:
        synth_jsonl(f, 40_000, seed=11)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTODES_")}
    env |= {"CUSTODES_VAULT": str(tmp_path / "vault"), "CUSTODES_KEYRING_PASSPHRASE": PASSPHRASE}
    ingest = subprocess.Popen(
        [sys.executable, "-m", "custodes", "ingest", str(source), "--workers", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    tree: dict[int, str] = {}
    try:
        # Workers hold the keys once they have sealed a batch: wait until one is stored.
        database = f"file:{tmp_path / 'vault' / 'vault.db'}?mode=ro"
        deadline = time.monotonic() + 60
        stored = 0
        while stored == 0:
            assert ingest.poll() is None, "the ingest ended before it could be killed"
            assert time.monotonic() < deadline, "no batch was stored within a minute"
            time.sleep(0.05)
            try:
                with sqlite3.connect(database, uri=True, timeout=1) as db:
                    (stored,) = db.execute("SELECT count(*) FROM records").fetchone()
            except sqlite3.OperationalError:
                continue  # busy or not created yet
        tree = _descendants(ingest.pid)
        workers = [pid for pid in tree if b"resource_tracker" not in _cmdline(pid)]
        assert len(workers) >= 2, "the ingest runs without its two workers"

        ingest.send_signal(signal.SIGKILL)
        ingest.wait(timeout=10)
        deadline = time.monotonic() + 5
        alive = dict(tree)
        while alive and time.monotonic() < deadline:
            alive = {pid: t for pid, t in alive.items() if _still_running(pid, t)}
            time.sleep(0.05)
        assert not alive, f"{len(alive)} of the ingest's processes outlived it"
    finally:
        if ingest.poll() is None:
            ingest.kill()
            ingest.wait()
        for pid, started in tree.items():
            if _still_running(pid, started):
                os.kill(pid, signal.SIGKILL)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return b""


# -- a record under a stored key is refused, never dropped --------------------------------


def test_rerunning_an_ingest_is_idempotent_and_refuses_nothing(
    vault: Vault, population_file: Path, tmp_path: Path
) -> None:
    total = len(read_records(population_file))
    first = vault.ingest(vault.operator, population_file, batch_size=64)
    entries = len(batch_entries(vault))
    again = vault.ingest(
        vault.operator, population_file, batch_size=64, rejects_dir=tmp_path / "rejects"
    )
    assert (first.accepted, first.rejected) == (total, 0)
    assert (again.accepted, again.already_present, again.rejected) == (0, total, 0)
    assert again.conflicting == 0 and again.rejects_path is None
    assert vault.count() == total
    # Nothing was written, so no batch was announced.
    assert len(batch_entries(vault)) == entries


def test_an_edited_record_under_a_stored_key_is_refused_by_line_not_dropped(
    vault: Vault, tmp_path: Path
) -> None:
    vault.ingest(
        vault.operator, write_jsonl(tmp_path / "first.jsonl", [person(i) for i in (1, 2, 3)])
    )
    before = {seq: stored_person(vault, seq) for seq in (1, 2, 3)}
    edited = [
        person(1),
        person(2, phone="13905719999"),
        person(3, name="司马相如", address="四川省成都市锦江区红星路二段1号"),
        person(4),
    ]
    report = vault.ingest(
        vault.operator,
        write_jsonl(tmp_path / "edited.jsonl", edited),
        rejects_dir=tmp_path / "rejects",
    )
    assert (report.accepted, report.already_present) == (1, 1)
    assert (report.rejected, report.conflicting) == (2, 2)
    text = rejects_text(report.rejects_path)
    rejects = [orjson.loads(line) for line in text.splitlines()]
    assert [(r["line"], r["field"]) for r in rejects] == [(2, "phone"), (3, None)]
    assert all("conflicts with the record stored" in r["reason"] for r in rejects)
    assert "name, address" in rejects[1]["reason"]
    assert report.first_rejects == [(r["line"], r["field"], r["reason"]) for r in rejects]
    # The stored records are kept as they were.
    assert {seq: stored_person(vault, seq) for seq in (1, 2, 3)} == before
    for value in ("13905719999", "司马相如", "四川省", national_id(2), national_id(3)):
        assert value not in text
    for value in (before[2]["phone"], before[3]["name"], before[3]["address"]):
        assert str(value) not in text


@pytest.mark.parametrize("batch_size", [1, 100])
def test_a_key_repeated_with_other_fields_in_one_input_is_refused_not_dropped(
    vault: Vault, tmp_path: Path, batch_size: int
) -> None:
    source = write_jsonl(
        tmp_path / "in.jsonl",
        [person(7), person(8), person(7, phone="13905718888"), person(7)],
    )
    report = vault.ingest(
        vault.operator, source, batch_size=batch_size, rejects_dir=tmp_path / "rejects"
    )
    assert (report.accepted, report.already_present, report.conflicting) == (2, 1, 1)
    [reject] = [orjson.loads(line) for line in rejects_text(report.rejects_path).splitlines()]
    assert (reject["line"], reject["field"]) == (3, "phone")
    assert stored_person(vault, 7)["phone"] == person(7)["phone"]


def test_strict_mode_stores_nothing_when_a_record_conflicts_with_a_stored_one(
    vault: Vault, tmp_path: Path
) -> None:
    vault.ingest(vault.operator, write_jsonl(tmp_path / "first.jsonl", [person(1)]))
    source = write_jsonl(tmp_path / "in.jsonl", [person(2), person(1, phone="13905717777")])
    report = vault.ingest(vault.operator, source, strict=True, rejects_dir=tmp_path / "rejects")
    assert report.strict_refused and report.conflicting == 1 and report.accepted == 0
    assert vault.count() == 1
    [reject] = [orjson.loads(line) for line in rejects_text(report.rejects_path).splitlines()]
    assert (reject["line"], reject["field"]) == (2, "phone")


@pytest.mark.parametrize("rival_differs", [True, False])
def test_a_rival_ingest_storing_the_same_key_between_check_and_write_is_caught(
    sqlite_vault: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rival_differs: bool
) -> None:
    vault = sqlite_vault
    rival = open_vault(tmp_path / "vault", passphrase=PASSPHRASE, hash_cost=FAST_HASH)
    theirs = person(1, phone="13905716666") if rival_differs else person(1)
    rival_file = write_jsonl(tmp_path / "rival.jsonl", [theirs])
    real_get_records = vault._storage.get_records
    raced: list[bool] = []

    def get_records_then_race(record_ids: list[str]) -> object:
        found = real_get_records(record_ids)
        if not raced:
            # The rival stores the same key just after this ingest looked for it.
            raced.append(True)
            assert rival.ingest(rival.operator, rival_file).accepted == 1
        return found

    monkeypatch.setattr(vault._storage, "get_records", get_records_then_race)
    try:
        report = vault.ingest(
            vault.operator,
            write_jsonl(tmp_path / "ours.jsonl", [person(1), person(2)]),
            rejects_dir=tmp_path / "rejects",
        )
    finally:
        rival.close()
    assert raced and report.accepted == 1
    if rival_differs:
        assert (report.conflicting, report.already_present) == (1, 0)
        [reject] = [orjson.loads(line) for line in rejects_text(report.rejects_path).splitlines()]
        assert (reject["line"], reject["field"]) == (1, "phone")
    else:
        assert (report.conflicting, report.already_present) == (0, 1)
    assert stored_person(vault, 1)["phone"] == theirs["phone"]
    # Announced by this ingest, stored by the rival: the log says this write did not land.
    rid = vault._codec.record_id("person", [national_id(1)])
    [(index, unwritten)] = batches(vault, Outcome.ERROR)
    assert batch_ids(vault, index, unwritten) == (rid,)
    assert unwritten.detail["error"] == "not_written"
    granted = [e for i, e in batches(vault, Outcome.GRANTED) if rid in batch_ids(vault, i, e)]
    assert len(granted) == 2  # the rival's, which stored it, and this ingest's


def test_a_conflict_reaches_the_terminal_by_line_and_field_never_by_value(
    tmp_path: Path,
) -> None:
    make_vault(tmp_path, "sqlite").close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTODES_")}
    env |= {"CUSTODES_VAULT": str(tmp_path / "vault"), "CUSTODES_KEYRING_PASSPHRASE": PASSPHRASE}
    env["COLUMNS"] = "300"  # one refusal a line, as a wide terminal shows it

    def ingest(source: Path) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "custodes", "ingest", str(source)]
        return subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=120, check=False
        )

    assert ingest(write_jsonl(tmp_path / "a.jsonl", [person(1), person(2)])).returncode == 0
    done = ingest(write_jsonl(tmp_path / "b.jsonl", [person(3), person(2, phone="13905715555")]))
    assert done.returncode == 0, done.stderr
    shown = done.stdout + done.stderr
    assert "refused line 2, field 'phone': conflicts with the record stored" in shown
    assert "conflict with a stored record" in shown
    [rejects_file] = VaultLayout(tmp_path / "vault").rejects.glob("*.jsonl")
    written = shown + rejects_file.read_text("utf-8")
    for value in ("13905715555", person(2)["phone"], national_id(2), person(2)["name"]):
        assert str(value) not in written


# -- every batch is on the access log before it is written ---------------------------------


def test_every_stored_record_is_counted_by_the_entry_of_its_batch(
    vault: Vault, population_file: Path
) -> None:
    report = vault.ingest(vault.operator, population_file, batch_size=50)
    assert report.rejected == 0
    found = batches(vault)
    assert len(found) == math.ceil(report.accepted / 50)
    assert all(e.outcome is Outcome.GRANTED and e.actor == "operator" for _, e in found)
    named = [rid for index, e in found for rid in batch_ids(vault, index, e)]
    assert all(0 < e.result_count <= 50 for _, e in found)
    assert len(named) == len(set(named)) == report.accepted
    assert set(named) == stored_ids(vault)
    # The run is still logged once, after its batches, with its counts.
    _, last = list(vault._log.entries())[-1]
    assert last.action == Action.INGEST.value and last.detail["accepted"] == report.accepted


def test_a_batch_whose_write_fails_leaves_an_entry_saying_so_and_no_records(
    sqlite_vault: Vault, tmp_path: Path
) -> None:
    vault = sqlite_vault
    assert vault.directory is not None
    with sqlite3.connect(vault.directory / "vault.db") as db:
        db.execute(
            "CREATE TRIGGER refuse_records BEFORE INSERT ON records "
            "BEGIN SELECT RAISE(ABORT, 'the disk refused the write'); END"
        )
    source = write_jsonl(tmp_path / "in.jsonl", [person(i) for i in range(1, 6)])
    with pytest.raises(StorageError):
        vault.ingest(vault.operator, source)
    assert vault.count() == 0
    (first, announced), (second, failed) = batches(vault)
    assert announced.outcome is Outcome.GRANTED and announced.result_count == 5
    assert failed.outcome is Outcome.ERROR
    assert batch_ids(vault, second, failed) == batch_ids(vault, first, announced)
    assert failed.detail["error"] == "StorageError"
    _, last = list(vault._log.entries())[-1]
    assert (last.action, last.outcome) == (Action.INGEST.value, Outcome.ERROR)


def test_a_large_batch_is_announced_in_bounded_entries(
    vault: Vault, population_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(access, "MAX_ENTRY_RECORDS", 40)
    report = vault.ingest(vault.operator, population_file, batch_size=1000)
    found = batches(vault)
    assert all(e.result_count <= 40 for _, e in found)
    assert len(found) == math.ceil(report.accepted / 40)
    assert {rid for i, e in found for rid in batch_ids(vault, i, e)} == stored_ids(vault)


def test_a_subject_report_is_not_swollen_by_the_batch_that_stored_the_person(
    vault: Vault, tmp_path: Path
) -> None:
    # A batch names its records only in its sealed details: each of its people's subject
    # reports (and their bundles) would otherwise carry every other record of the batch.
    vault.ingest(
        vault.operator, write_jsonl(tmp_path / "in.jsonl", [person(i) for i in range(1, 30)])
    )
    auditor = login(vault, Role.AUDITOR, "ombudsman.li")
    subject = vault._codec.record_id("person", [national_id(1)])
    report = vault.subject_report(auditor, AccessPurpose("subject access request"), subject)
    assert [a for a in report.accesses if a.action == STORE] == []
    assert len(report.bundle()) < 4096


@pytest.mark.parametrize("role", ACCOUNT_ROLES)
def test_no_officials_account_may_store_a_batch(role: Role) -> None:
    with pytest.raises(AccessDenied, match="only the host operator stores records"):
        authorise(role, Action.INGEST_BATCH)
    authorise(Role.OPERATOR, Action.INGEST_BATCH)
