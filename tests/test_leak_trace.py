"""Leak tracing: a sample sold on is matched back to the export, or the account, it left by.

Blind: the trace is handed the leaked rows alone, never the export's id or the leaker.
"""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Iterator
from dataclasses import dataclass

import orjson
import pytest

from custodes.audit import Outcome
from custodes.bootstrap import memory_vault
from custodes.export.envelope import keygen, open_sealed, private_key
from custodes.export.trace import read_leak
from custodes.policy import AccessPurpose, Action, Role
from custodes.policy.budgets import NO_LIMITS
from custodes.synth import generate
from custodes.vault import Session, Vault
from tests.conftest import FAST_HASH, login, memory_keys, write_jsonl

PEOPLE = 2_500
EXPORTS = 10
EXPORT_SIZE = 1_100  # records in each export's scope; windows overlap by 1,000
VIEWED = 60  # people each account looks at, windows overlapping by 40
PURPOSE = AccessPurpose("cohort study of schooling and marriage", "RES-7")


@dataclass
class World:
    vault: Vault
    people: list[dict[str, object]]
    ids: list[str]
    accounts: list[str]
    exports: list[str]  # export ids, by account
    rows: list[list[dict[str, str]]]  # each export as its recipient opened it


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("leak")
    vault = memory_vault(*memory_keys(tmp), hash_cost=FAST_HASH)
    people = [
        {k: v for k, v in r.items()}
        for r in generate(PEOPLE, seed=2026, cases_per_person=0, deliveries_per_person=0)
    ]
    vault.ingest(vault.operator, write_jsonl(tmp / "people.jsonl", people))
    ids = [vault._codec.record_id("person", [str(p["national_id"])]) for p in people]
    supervisor = login(vault, Role.SUPERVISOR, "sup.approver", budget=NO_LIMITS)
    private_pem, _, public = keygen()
    accounts, exports, opened = [], [], []
    sessions: list[Session] = []
    for n in range(EXPORTS):
        name = f"inv.{n}"
        session = login(vault, Role.INVESTIGATOR, name, budget=NO_LIMITS)
        scope = ids[n * 100 : n * 100 + EXPORT_SIZE]
        export_id = vault.exports.request(
            session,
            PURPOSE,
            record_type="person",
            purpose_class="research",
            recipient=public,
            record_ids=scope,
        )
        vault.exports.approve(supervisor, export_id)
        made = vault.exports.produce(session, export_id)
        plain = open_sealed(private_key(private_pem), made.sealed)
        opened.append([orjson.loads(line) for line in plain.splitlines()])
        accounts.append(name)
        exports.append(export_id)
        sessions.append(session)
    # Beyond the exports, each account looks people up one by one, windows overlapping.
    looked = AccessPurpose("checking addresses of witnesses", "CASE-9")
    for n, session in enumerate(sessions):
        start = 2_000 + n * 20
        for record_id in ids[start : start + VIEWED]:
            vault.record(session, looked, record_id)
    yield World(vault, people, ids, accounts, exports, opened)
    vault.close()


def _sample(rows: list[dict[str, object]], seed: int, size: int) -> list[dict[str, object]]:
    rng = random.Random(seed)
    picked = rng.sample(rows, min(size, len(rows)))
    kept = rng.sample(picked, len(picked) - len(picked) // 10)  # 10% dropped, shuffled
    return [dict(r) for r in kept]


def _as_csv(rows: list[dict[str, object]], columns: list[str]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def test_a_sample_of_an_export_is_traced_to_that_export_by_its_canaries_and_watermark(
    world: World,
) -> None:
    leaked_from = 4
    rows = world.rows[leaked_from]
    assert len(rows) > 1_000
    sample = _sample(rows, seed=99, size=1_000)
    assert len(sample) == 900
    for row in sample[:25]:  # a few rows edited by the seller
        row["education"] = "博士"
    # The pseudonym column removed: the hardest field to lose, since it alone is unique.
    columns = [c for c in rows[0] if c != "national_id"]
    random.Random(5).shuffle(columns)  # columns reordered
    leak = read_leak(_as_csv(sample, columns))

    report = world.vault.exports.trace(world.vault.operator, leak)

    assert report.verdict == "export"
    assert report.export is not None
    assert report.export.export_id == world.exports[leaked_from]
    assert report.export.requester == world.accounts[leaked_from]
    assert report.export.canaries_found >= 1
    assert report.export.confidence >= 0.999
    assert report.export.watermark_agree / report.export.watermark_rows > 0.95
    # Whose data left, by record id: the export's own records, nearly every row's.
    scope = set(world.ids[leaked_from * 100 : leaked_from * 100 + EXPORT_SIZE])
    assert len(report.records) > 800 and set(report.records) <= scope
    # Its neighbours hold most of the same people, yet the watermark tells them apart.
    neighbour = next(e for e in report.exports if e.export_id == world.exports[leaked_from + 1])
    assert neighbour.confidence < 0.99 and neighbour.canaries_found == 0
    [(_, entry)] = [
        (i, e) for i, e in world.vault._log.entries() if e.action == Action.LEAK_TRACE.value
    ][-1:]
    assert entry.outcome is Outcome.GRANTED and entry.detail["export"] == report.export.export_id


def test_a_sample_with_its_pseudonyms_is_traced_whatever_else_is_removed(world: World) -> None:
    rows = world.rows[7]
    sample = _sample(rows, seed=3, size=1_000)
    for row in sample:
        row.pop("address", None)  # the watermark's carrier removed instead
    for row in sample[:100]:  # and some rows edited
        row["education"], row["marital_status"] = "博士", "single"
    report = world.vault.exports.trace(world.vault.operator, read_leak(_jsonl(sample)))
    assert report.export is not None and report.export.export_id == world.exports[7]
    assert report.export.coverage > 0.95


def test_a_sample_of_records_an_account_viewed_ranks_that_account_first(world: World) -> None:
    viewer = 3
    start = 2_000 + viewer * 20
    viewed = [p for p in world.people[start : start + VIEWED]]
    sample = _sample(viewed, seed=8, size=VIEWED)
    for row in sample:
        row.pop("type", None)
        row.pop("phone", None)  # a field removed
    report = world.vault.exports.trace(world.vault.operator, read_leak(_jsonl(sample)))

    assert report.verdict == "accounts" and report.export is None
    assert report.records_matched == len(sample)
    ids = {
        world.ids[world.people.index(p)]
        for p in viewed
        if p["national_id"] in {r["national_id"] for r in sample}
    }
    assert set(report.records) == ids
    first, second = report.accounts[0], report.accounts[1]
    assert first.account == world.accounts[viewer] and first.coverage == 1.0
    assert second.coverage < first.coverage


def test_the_report_names_records_and_accounts_never_a_value(world: World) -> None:
    start = 2_000 + 5 * 20
    sample = [dict(p) for p in world.people[start : start + 30]]
    for row in sample:
        row[str(row["name"])] = "a name used as a column"
    report = world.vault.exports.trace(world.vault.operator, read_leak(_jsonl(sample)))
    text = orjson.dumps(report.as_json()).decode()
    for person in sample:
        for name in ("name", "national_id", "phone", "address"):
            if name in person:
                assert str(person[name]) not in text


def _jsonl(rows: list[dict[str, object]]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in rows)


def test_a_leak_is_traced_only_by_the_host_operator(world: World) -> None:
    from custodes.errors import AccessDenied

    session = login(world.vault, Role.SUPERVISOR, "sup.curious")
    with pytest.raises(AccessDenied):
        world.vault.exports.trace(session, [])


def test_a_broken_sample_is_refused_by_line_without_its_value() -> None:
    from custodes.errors import InvalidInput

    with pytest.raises(InvalidInput) as refused:
        read_leak(b'{"name": "x"}\n{"name": "\xe7\x8e\x8b\n')
    assert "line 2" in str(refused.value) and "\u738b" not in str(refused.value)
