"""Bulk exports: two people, sealed to one recipient, nothing beyond the purpose class.

Runs on the in-memory and the SQLite backend alike.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from custodes.audit import Outcome
from custodes.errors import AccessDenied, InvalidInput, InvalidQuery, TamperDetected
from custodes.export.envelope import keygen, open_sealed, private_key, public_key_bytes, seal_for
from custodes.export.requests import ExportState
from custodes.policy import AccessPurpose, Action, Role
from custodes.vault import Session, Vault
from tests.conftest import login
from tests.postgres import (  # noqa: F401 - fixtures, asked for by name
    postgres_dsn_fixture,
    postgres_server_fixture,
)
from tests.test_cli_client import (  # noqa: F401 - served is a fixture, used by name
    Served,
    run,
    served,
)

PURPOSE = AccessPurpose("census of marital status by county", "STAT-2026")


@pytest.fixture
def loaded(vault: Vault, population_file: Path) -> Vault:
    report = vault.ingest(vault.operator, population_file)
    assert report.rejected == 0
    return vault


@pytest.fixture
def recipient() -> tuple[bytes, str]:
    private_pem, _public_pem, public_b64 = keygen()
    return private_pem, public_b64


def _officials(vault: Vault) -> tuple[Session, Session]:
    asker = login(vault, Role.INVESTIGATOR, "an.investigator")
    second = login(vault, Role.SUPERVISOR, "a.supervisor")
    return asker, second


def _entries(vault: Vault, action: Action) -> list[tuple[int, object]]:
    return [(i, e) for i, e in vault._log.entries() if e.action == action.value]


def _rows(blob: bytes, private_pem: bytes) -> list[dict[str, str]]:
    plain = open_sealed(private_key(private_pem), blob)
    return [orjson.loads(line) for line in plain.splitlines()]


def test_an_unapproved_export_is_refused_and_logged(
    loaded: Vault, recipient: tuple[bytes, str]
) -> None:
    asker, _ = _officials(loaded)
    export_id = loaded.exports.request(
        asker, PURPOSE, record_type="person", purpose_class="statistics", recipient=recipient[1]
    )
    with pytest.raises(AccessDenied, match="not been approved"):
        loaded.exports.produce(asker, export_id)
    [(_, entry)] = _entries(loaded, Action.EXPORT_CREATE)
    assert entry.outcome is Outcome.DENIED and entry.detail["export"] == export_id


def test_self_approval_is_refused_and_logged(loaded: Vault, recipient: tuple[bytes, str]) -> None:
    supervisor = login(loaded, Role.SUPERVISOR, "a.supervisor")
    export_id = loaded.exports.request(
        supervisor,
        PURPOSE,
        record_type="person",
        purpose_class="statistics",
        recipient=recipient[1],
    )
    with pytest.raises(AccessDenied, match="approved by the official who asked"):
        loaded.exports.approve(supervisor, export_id)
    [(_, entry)] = _entries(loaded, Action.EXPORT_APPROVE)
    assert entry.outcome is Outcome.DENIED and entry.actor == "a.supervisor"
    assert loaded.exports.status(supervisor, export_id).state == ExportState.REQUESTED


def test_only_a_supervisor_approves_and_an_officer_cannot_ask(
    loaded: Vault, recipient: tuple[bytes, str]
) -> None:
    asker = login(loaded, Role.INVESTIGATOR, "an.investigator")
    colleague = login(loaded, Role.INVESTIGATOR, "another.investigator")
    officer = login(loaded, Role.OFFICER, "an.officer")
    with pytest.raises(AccessDenied):
        loaded.exports.request(
            officer,
            PURPOSE,
            record_type="person",
            purpose_class="statistics",
            recipient=recipient[1],
        )
    export_id = loaded.exports.request(
        asker, PURPOSE, record_type="person", purpose_class="statistics", recipient=recipient[1]
    )
    with pytest.raises(AccessDenied):
        loaded.exports.approve(colleague, export_id)
    outcomes = [e.outcome for _, e in _entries(loaded, Action.EXPORT_REQUEST)]
    assert outcomes == [Outcome.DENIED, Outcome.GRANTED]


def test_an_approved_export_opens_only_with_the_recipients_key_and_holds_only_its_class(
    loaded: Vault, recipient: tuple[bytes, str], people: list[dict[str, object]]
) -> None:
    asker, second = _officials(loaded)
    export_id = loaded.exports.request(
        asker, PURPOSE, record_type="person", purpose_class="statistics", recipient=recipient[1]
    )
    assert loaded.exports.approve(second, export_id).state == ExportState.APPROVED
    made = loaded.exports.produce(asker, export_id)
    rows = _rows(made.sealed, recipient[0])
    assert len(rows) == made.rows == len(people) + 3  # every person, and 3 canaries
    allowed = set(loaded.schema.export_rules("statistics", "person"))
    assert set().union(*rows) <= allowed
    assert {"name", "phone", "ethnicity"}.isdisjoint(set().union(*rows))
    sealed = made.sealed.decode("latin-1")
    text = "\n".join(orjson.dumps(r).decode() for r in rows)
    for person in people[:50]:
        for name in ("name", "national_id", "phone"):
            if name in person:
                assert str(person[name]) not in text and str(person[name]) not in sealed
    assert all(len(r["birth_date"]) == 4 for r in rows if "birth_date" in r)

    other_key, _, _ = keygen()
    with pytest.raises(TamperDetected):
        _rows(made.sealed, other_key)
    flipped = bytearray(made.sealed)
    flipped[-1] ^= 1
    with pytest.raises(TamperDetected):
        _rows(bytes(flipped), recipient[0])


def test_every_step_is_on_the_log_and_its_public_detail_names_no_one(
    loaded: Vault, recipient: tuple[bytes, str], people: list[dict[str, object]]
) -> None:
    asker, second = _officials(loaded)
    export_id = loaded.exports.request(
        asker, PURPOSE, record_type="person", purpose_class="research", recipient=recipient[1]
    )
    loaded.exports.approve(second, export_id)
    made = loaded.exports.produce(asker, export_id)
    steps = [
        (e.action, e.actor, e.outcome, e.purpose, e.case_ref)
        for _, e in loaded._log.entries()
        if e.action.startswith("export:")
    ]
    assert steps == [
        (Action.EXPORT_REQUEST, "an.investigator", Outcome.GRANTED, PURPOSE.reason, "STAT-2026"),
        (Action.EXPORT_APPROVE, "a.supervisor", Outcome.GRANTED, PURPOSE.reason, "STAT-2026"),
        (Action.EXPORT_CREATE, "an.investigator", Outcome.GRANTED, PURPOSE.reason, "STAT-2026"),
    ]
    [(index, created)] = _entries(loaded, Action.EXPORT_CREATE)
    assert created.detail["export"] == export_id and created.detail["rows"] == made.rows
    assert created.detail["recipient"] == made.recipient and created.detail["class"] == "research"
    assert created.records == ()
    sealed = loaded._log.private_details(index)
    assert sealed is not None and len(sealed["records"]) == len(people)
    assert len(sealed["canaries"]) == len(sealed["canary_ids"]) == 3
    leaf = created.encode()
    for person in people:
        assert str(person["national_id"]).encode() not in leaf
    with pytest.raises(AccessDenied, match="produced already"):
        loaded.exports.produce(asker, export_id)


def test_a_forged_approval_written_straight_into_storage_is_refused(
    loaded: Vault, recipient: tuple[bytes, str]
) -> None:
    asker, _ = _officials(loaded)
    export_id = loaded.exports.request(
        asker, PURPOSE, record_type="person", purpose_class="statistics", recipient=recipient[1]
    )
    storage = loaded._storage
    key = f"export/{export_id}"
    fields, tag = orjson.loads(storage.get_meta(key) or b"")
    fields[10], fields[11] = "approved", "a.supervisor"  # state and approver
    storage.set_meta(key, orjson.dumps([fields, tag]))
    with pytest.raises(TamperDetected):
        loaded.exports.produce(asker, export_id)
    # A row with a tag of its own making is refused alike.
    storage.set_meta(key, orjson.dumps([fields, "00" * 32]))
    with pytest.raises(TamperDetected):
        loaded.exports.produce(asker, export_id)
    refused = [e for _, e in _entries(loaded, Action.EXPORT_CREATE)]
    assert [e.outcome for e in refused] == [Outcome.ERROR, Outcome.ERROR]
    assert {e.detail["error"] for e in refused} == {"TamperDetected"}


def test_an_export_is_limited_to_its_district_and_named_records(
    loaded: Vault, recipient: tuple[bytes, str], people: list[dict[str, object]]
) -> None:
    asker, second = _officials(loaded)
    district = str(people[0]["national_id"])[:2]
    export_id = loaded.exports.request(
        asker,
        PURPOSE,
        record_type="person",
        purpose_class="statistics",
        recipient=recipient[1],
        district=district,
    )
    loaded.exports.approve(second, export_id)
    rows = _rows(loaded.exports.produce(asker, export_id).sealed, recipient[0])
    expected = sum(1 for p in people if str(p["national_id"]).startswith(district))
    assert len(rows) == expected + 3


def test_bad_requests_are_refused_without_repeating_the_input(
    loaded: Vault, recipient: tuple[bytes, str]
) -> None:
    asker, _ = _officials(loaded)
    with pytest.raises(InvalidQuery) as unknown:
        loaded.exports.request(
            asker, PURPOSE, record_type="person", purpose_class="王小明", recipient=recipient[1]
        )
    assert "王小明" not in str(unknown.value)
    with pytest.raises(InvalidQuery) as bad_id:
        loaded.exports.request(
            asker,
            PURPOSE,
            record_type="person",
            purpose_class="statistics",
            recipient=recipient[1],
            record_ids=["王小明 11010119900307003X"],
        )
    assert "王小明" not in str(bad_id.value)
    with pytest.raises(InvalidQuery, match="does not export records of type 'case'"):
        loaded.exports.request(
            asker, PURPOSE, record_type="case", purpose_class="statistics", recipient=recipient[1]
        )
    with pytest.raises(InvalidQuery, match="32 bytes"):
        loaded.exports.request(
            asker,
            PURPOSE,
            record_type="person",
            purpose_class="statistics",
            recipient=base64.b64encode(b"short").decode(),
        )


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=300), st.data())
def test_any_bit_flipped_in_a_sealed_export_is_refused(plain: bytes, data: st.DataObject) -> None:
    private_pem, public_pem, _ = keygen()
    sealed = seal_for(public_key_bytes(public_pem), plain)
    assert open_sealed(private_key(private_pem), sealed) == plain
    bit = data.draw(st.integers(0, len(sealed) * 8 - 1))
    flipped = bytearray(sealed)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises((TamperDetected, InvalidInput)):
        open_sealed(private_key(private_pem), bytes(flipped))


# -- the adapters: the API, the client and local commands, the host's trace -------------


def test_the_api_asks_approves_and_produces_once_and_refuses_self_approval(
    tmp_path: Path, population_file: Path, recipient: tuple[bytes, str]
) -> None:
    from tests.test_web_api import TestClient, build_app, headers_for, make_vault

    vault = make_vault(tmp_path, "memory")
    try:
        vault.ingest(vault.operator, population_file)
        with TestClient(build_app(vault)) as client:
            asker = headers_for(client, vault, Role.INVESTIGATOR)
            second = headers_for(client, vault, Role.SUPERVISOR)
            body = {
                "record_type": "person",
                "purpose_class": "statistics",
                "recipient": recipient[1],
                "purpose": PURPOSE.reason,
                "case_ref": PURPOSE.case_ref,
            }
            asked = client.post("/api/v1/exports", json=body, headers=asker)
            assert asked.status_code == 201, asked.text
            export_id = asked.json()["export_id"]
            path = f"/api/v1/exports/{export_id}"
            unapproved = client.post(path + "/produce", headers=asker)
            assert unapproved.status_code == 403
            assert unapproved.json()["error"]["code"] == "access_denied"
            assert client.post(path + "/approve", headers=asker).status_code == 403
            approved = client.post(path + "/approve", headers=second)
            assert approved.status_code == 200 and approved.json()["state"] == "approved"
            assert client.post(path + "/produce", headers=second).status_code == 403
            made = client.post(path + "/produce", headers=asker)
            assert made.status_code == 200
            assert made.headers["content-type"] == "application/octet-stream"
            assert _rows(made.content, recipient[0])
            assert client.post(path + "/produce", headers=asker).status_code == 403
            assert client.get(path, headers=asker).json()["state"] == "produced"
            bad = client.post("/api/v1/exports", json={**body, "recipient": "AAAA"}, headers=asker)
            assert bad.status_code == 422
    finally:
        vault.close()


def test_the_client_asks_and_fetches_the_supervisor_approves_and_only_the_recipient_opens(
    served: Served,  # noqa: F811 - the fixture
) -> None:
    asker = served.official("ex.asker", Role.INVESTIGATOR)
    approver = served.official("ex.approver", Role.SUPERVISOR)
    keys = served.root / "recipient"
    assert run("export", "keygen", str(keys)).returncode == 0
    assert (keys.parent / "recipient.key").stat().st_mode & 0o077 == 0
    for env in (asker, approver):
        assert run("login", "--server", served.url, env=env).returncode == 0, "login"
    asked = run(
        "export", "request", "--class", "research", "--recipient", f"{keys}.pub",
        "--purpose", PURPOSE.reason, "--case", "STAT-2026", "--json", env=asker,
    )  # fmt: skip
    assert asked.returncode == 0, asked.stderr
    export_id = orjson.loads(asked.stdout)["export_id"]
    sealed = served.root / "out.export"
    refused = run("export", "fetch", export_id, "--out", str(sealed), env=asker)
    assert refused.returncode == AccessDenied.exit_code and not sealed.exists()
    assert "not been approved" in refused.stderr
    assert run("export", "approve", export_id, env=asker).returncode == AccessDenied.exit_code
    assert run("export", "approve", export_id, env=approver).returncode == 0
    fetched = run("export", "fetch", export_id, "--out", str(sealed), env=asker)
    assert fetched.returncode == 0, fetched.stderr
    opened = run("export", "open", str(sealed), "--key", f"{keys}.key")
    assert opened.returncode == 0, opened.stderr
    rows = [orjson.loads(line) for line in opened.stdout.splitlines()]
    assert len(rows) == len(served.people) + 3
    assert set().union(*rows) <= set(served.vault.schema.export_rules("research", "person"))
    assert run("export", "keygen", str(served.root / "other")).returncode == 0
    wrong = run("export", "open", str(sealed), "--key", str(served.root / "other.key"))
    assert wrong.returncode == TamperDetected.exit_code and not wrong.stdout


def test_the_host_traces_a_leaked_csv_to_its_export(
    tmp_path: Path, population_file: Path, recipient: tuple[bytes, str]
) -> None:
    from tests.conftest import PASSPHRASE, make_vault

    vault = make_vault(tmp_path, "sqlite")
    vault.ingest(vault.operator, population_file)
    asker, second = _officials(vault)
    export_id = vault.exports.request(
        asker, PURPOSE, record_type="person", purpose_class="research", recipient=recipient[1]
    )
    vault.exports.approve(second, export_id)
    rows = _rows(vault.exports.produce(asker, export_id).sealed, recipient[0])
    vault.close()
    leaked = tmp_path / "leak.csv"
    columns = [c for c in rows[0] if c not in ("national_id", "gender")]
    lines = [",".join(reversed(columns))]
    lines += [",".join(r.get(c, "") for c in reversed(columns)) for r in rows[::-1][:250]]
    leaked.write_text("\n".join(lines) + "\n", "utf-8")
    env = {"CUSTODES_VAULT": str(tmp_path / "vault"), "CUSTODES_KEYRING_PASSPHRASE": PASSPHRASE}
    done = run("trace", str(leaked), "--json", env=env)
    assert done.returncode == 0, done.stderr
    report = orjson.loads(done.stdout)
    assert report["verdict"] == "export" and report["export"]["export"] == export_id
    assert report["export"]["requester"] == "an.investigator"
    text = run("trace", str(leaked), env=env)
    assert text.returncode == 0 and export_id in text.stdout


def test_on_postgresql_an_export_is_produced_once_and_a_forged_approval_is_refused(
    tmp_path: Path,
    postgres_dsn: Callable[[], str],
    population_file: Path,
    recipient: tuple[bytes, str],
) -> None:
    from custodes.bootstrap import create_vault
    from tests.conftest import FAST_HASH, FAST_KDF, PASSPHRASE

    vault = create_vault(
        tmp_path / "vault",
        passphrase=PASSPHRASE,
        keyring_path=tmp_path / "keys" / "vault.keyring",
        log_key_path=tmp_path / "keys" / "log.key",
        kdf=FAST_KDF,
        hash_cost=FAST_HASH,
        database=postgres_dsn(),
    )
    try:
        assert type(vault._storage).__name__ == "PostgresStorage"
        vault.ingest(vault.operator, population_file, workers=1)
        asker, second = _officials(vault)
        forged = vault.exports.request(
            asker, PURPOSE, record_type="person", purpose_class="statistics", recipient=recipient[1]
        )
        key = f"export/{forged}"
        fields, tag = orjson.loads(vault._storage.get_meta(key) or b"")
        fields[10] = "approved"
        vault._storage.set_meta(key, orjson.dumps([fields, tag]))
        with pytest.raises(TamperDetected):
            vault.exports.produce(asker, forged)
        export_id = vault.exports.request(
            asker, PURPOSE, record_type="person", purpose_class="statistics", recipient=recipient[1]
        )
        vault.exports.approve(second, export_id)
        assert _rows(vault.exports.produce(asker, export_id).sealed, recipient[0])
        with pytest.raises(AccessDenied):
            vault.exports.produce(asker, export_id)
    finally:
        vault.close()


# -- the schema's export classes and the redaction they make -----------------------------


def _schema_with(exports: str) -> str:
    from importlib import resources

    text = resources.files("custodes").joinpath("schemas/population.toml").read_text("utf-8")
    return text.split("\n[exports.", 1)[0] + "\n" + exports


@pytest.mark.parametrize(
    ("exports", "says"),
    [
        ('[exports.s.person]\nnational_id = "pseudonym"\nshoe_size = "keep"\n', "no such field"),
        ('[exports.s.person]\nnational_id = "pseudonym"\ngender = "generalise"\n', "no general"),
        ('[exports.s.person]\nnational_id = "pseudonym"\nname = "blur"\n', "the rule is one of"),
        ('[exports.s.person]\ngender = "keep"\n', "needs one field as a pseudonym"),
        ('[exports.s.case]\ncase_no = "pseudonym"\npersons = "keep"\n', "never exported"),
        ('[exports.s.pet]\nname = "pseudonym"\n', "unknown record type"),
    ],
)
def test_an_export_class_that_could_leak_more_than_it_says_is_refused(
    exports: str, says: str
) -> None:
    from custodes.errors import SchemaError
    from custodes.schema import parse_schema

    with pytest.raises(SchemaError, match=says):
        parse_schema(_schema_with(exports))


def test_redaction_coarsens_keeps_and_pseudonymises_as_the_class_says() -> None:
    from custodes.export.pseudonymise import ExportKeys, pseudonym, redact
    from custodes.schema import load_schema

    schema = load_schema()
    rt = schema.types["person"]
    person = {
        "name": "王小明",
        "national_id": "11010119900307003X",
        "phone": "13812345678",
        "gender": "male",
        "birth_date": "1990-03-07",
        "address": "北京市东城区东华门街道100号",
        "ethnicity": "汉族",
    }
    keys = ExportKeys(b"p" * 32, b"w" * 32)
    row = redact(rt, schema.export_rules("research", "person"), person, "rid-1", keys)
    assert row["national_id"] == pseudonym(b"p" * 32, "rid-1") != pseudonym(b"q" * 32, "rid-1")
    assert row["phone"] == "138" and row["birth_date"] == "1990-03-07"  # research keeps it
    assert row["address"] in ("北京市东城区", "北京市东城区东")
    assert "name" not in row
    stats = redact(rt, schema.export_rules("statistics", "person"), person, "rid-1", keys)
    assert stats["birth_date"] == "1990" and "phone" not in stats and "ethnicity" not in stats


def test_an_export_holds_only_records_its_asker_may_see_and_counts_the_rest(
    loaded: Vault, recipient: tuple[bytes, str], people: list[dict[str, object]]
) -> None:
    district = str(people[0]["national_id"])[:2]
    asker = login(loaded, Role.INVESTIGATOR, "a.district.investigator", district=district)
    second = login(loaded, Role.SUPERVISOR, "a.supervisor")
    export_id = loaded.exports.request(
        asker, PURPOSE, record_type="person", purpose_class="statistics", recipient=recipient[1]
    )
    loaded.exports.approve(second, export_id)
    made = loaded.exports.produce(asker, export_id)
    inside = sum(1 for p in people if str(p["national_id"]).startswith(district))
    assert made.rows == inside + 3 < len(people)
    [(_, entry)] = _entries(loaded, Action.EXPORT_CREATE)
    assert entry.detail["filtered"] == len(people) - inside


def test_planted_canaries_stay_out_of_a_swept_export_and_named_by_id_they_trip_the_alarm(
    loaded: Vault, recipient: tuple[bytes, str], people: list[dict[str, object]]
) -> None:
    from custodes.access import CANARY_ALERT
    from custodes.errors import AuthenticationFailed

    loaded.plant_canaries(loaded.operator, 4)
    planted = sorted(loaded._canaries.ids())
    asker, second = _officials(loaded)
    swept = loaded.exports.request(
        asker, PURPOSE, record_type="person", purpose_class="statistics", recipient=recipient[1]
    )
    loaded.exports.approve(second, swept)
    assert loaded.exports.produce(asker, swept).rows == len(people) + 3  # no planted one
    [(_, entry)] = _entries(loaded, Action.EXPORT_CREATE)
    assert "alert" not in entry.detail

    ids = [loaded._codec.record_id("person", [str(p["national_id"])]) for p in people[:20]]
    dumped = loaded.exports.request(
        asker,
        PURPOSE,
        record_type="person",
        purpose_class="statistics",
        recipient=recipient[1],
        record_ids=[*ids, planted[0]],
    )
    loaded.exports.approve(second, dumped)
    made = loaded.exports.produce(asker, dumped)  # answered as any other export
    assert made.rows == 21 + 3
    auditor = login(loaded, Role.AUDITOR, "an.auditor")
    [alert] = loaded.alerts(auditor)
    assert alert.alert.kind == CANARY_ALERT and alert.alert.account == "an.investigator"
    assert alert.alert.action == Action.EXPORT_CREATE and planted[0] in alert.alert.records
    with pytest.raises(AuthenticationFailed):  # locked: its session ended
        loaded.exports.status(asker, dumped)


def test_the_recipients_and_officials_export_commands_load_no_key_code(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from tests.test_cli_client import KEY_CODE, client_env

    probe = (
        "import atexit, sys\n"
        f"KEY_CODE = {KEY_CODE!r}\n"
        "atexit.register(lambda: sys.stderr.write('loaded: ' + ','.join(sorted(\n"
        "    m for m in sys.modules if m.startswith(KEY_CODE))) + '\\n'))\n"
        "from custodes.cli import main\n"
        "sys.argv[0] = 'custodes'\n"
        "main()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTODES_")}
    env.update(client_env(tmp_path / "home"))
    keys, sealed = tmp_path / "lab", tmp_path / "x.export"
    private_pem, public_pem, _ = keygen()
    sealed.write_bytes(seal_for(public_key_bytes(public_pem), b'{"gender": "female"}\n'))
    for args, code in (
        (["export", "keygen", str(keys)], 0),
        (["export", "open", str(sealed), "--key", f"{keys}.key"], TamperDetected.exit_code),
        (["export", "status", "0" * 32], 1),
    ):
        done = subprocess.run(
            [sys.executable, "-c", probe, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        assert done.stderr.endswith("loaded: \n"), (args, done.stderr)
        assert (done.returncode == 0) is (code == 0), (args, done.stderr)
    assert (tmp_path / "lab.key").exists() and (tmp_path / "lab.pub").exists()
    (tmp_path / "mine.key").write_bytes(private_pem)
    opened = subprocess.run(
        [
            sys.executable,
            "-m",
            "custodes",
            "export",
            "open",
            str(sealed),
            "--key",
            str(tmp_path / "mine.key"),
        ],
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert opened.returncode == 0 and opened.stdout == b'{"gender": "female"}\n'


def test_an_approved_row_put_back_after_its_export_was_made_does_not_make_it_again(
    loaded: Vault, recipient: tuple[bytes, str]
) -> None:
    asker, second = _officials(loaded)
    export_id = loaded.exports.request(
        asker, PURPOSE, record_type="person", purpose_class="statistics", recipient=recipient[1]
    )
    loaded.exports.approve(second, export_id)
    key = f"export/{export_id}"
    approved = loaded._storage.get_meta(key) or b""
    loaded.exports.produce(asker, export_id)
    loaded._storage.set_meta(key, approved)  # a validly tagged, older copy
    with pytest.raises(AccessDenied, match="produced already"):
        loaded.exports.produce(asker, export_id)
    outcomes = [e.outcome for _, e in _entries(loaded, Action.EXPORT_CREATE)]
    assert outcomes == [Outcome.GRANTED, Outcome.DENIED]
