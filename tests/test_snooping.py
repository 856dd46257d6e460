"""Threats 10 and 12: the curious insider and the enumerator stay under every budget; the
anomaly guard, reading the access log, scores them against their own history and their
role's, and alerts, ends sessions or locks, each act on the log and in the alert sent,
with no searched value anywhere.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from custodes.access import ANOMALY_ALERT
from custodes.alerts import Alert
from custodes.bootstrap import open_vault
from custodes.errors import AccessDenied, AuthenticationFailed
from custodes.policy import AccessPurpose, Action, Role
from custodes.records.idnumber import check_char
from custodes.vault import Session, Vault
from custodes.vault.guard import FLAGGED_KEY, STATE_KEY
from tests.conftest import (
    FAST_HASH,
    PASSPHRASE,
    PASSWORD,
    TOTP_SECRETS,
    MovableClock,
    login,
    make_vault,
    totp_now,
    write_jsonl,
)

PURPOSE = AccessPurpose("check a resident's address", "C-1")
SHANGHAI = dt.timezone(dt.timedelta(hours=8))


def resident_id(district: str, birth: str, sequence: str) -> str:
    first17 = district + birth + sequence
    return first17 + check_char(first17)


def person(number: str, name: str) -> dict[str, object]:
    return {
        "type": "person",
        "name": name,
        "national_id": number,
        "gender": "male" if int(number[16]) % 2 else "female",
        "birth_date": f"{number[6:10]}-{number[10:12]}-{number[12:14]}",
    }


SHANGHAI_PEOPLE = [resident_id("310104", f"1985{m:02d}{m + 10:02d}", "123") for m in range(1, 11)]
BEIJING_PEOPLE = [resident_id("110101", f"1990{m:02d}{m + 10:02d}", "111") for m in range(1, 11)]
CELEBRITY = resident_id("110101", "19700707", "777")
GIVEN = "甲乙丙丁戊己庚辛壬癸"
RECORDS = [
    *(person(n, f"沪测{GIVEN[i]}") for i, n in enumerate(SHANGHAI_PEOPLE)),
    *(person(n, f"京测{GIVEN[i]}") for i, n in enumerate(BEIJING_PEOPLE)),
    person(CELEBRITY, "明星测"),
]


class Moment:
    """The vault's clock, set by the test to a Shanghai wall-clock time (from before the
    records are stored: the guard's days follow the log's times)."""

    def __init__(self, vault: Vault) -> None:
        self.now = dt.datetime(2026, 12, 1, 8, 0, tzinfo=SHANGHAI).timestamp()
        vault._clock.moved = lambda: self.now  # type: ignore[attr-defined]
        vault._clock.moment = self  # type: ignore[attr-defined]

    def set(self, day: int, hour: int, minute: int = 0) -> None:
        self.now = dt.datetime(2026, 12, day, hour, minute, tzinfo=SHANGHAI).timestamp()

    def tick(self, seconds: float = 20) -> None:
        self.now += seconds


@pytest.fixture(params=["memory", "sqlite"])
def vault(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Vault]:
    v = make_vault(tmp_path, request.param)
    Moment(v)
    assert v.ingest(v.operator, write_jsonl(tmp_path / "people.jsonl", RECORDS)).rejected == 0
    yield v
    v.close()


@pytest.fixture
def moment(vault: Vault) -> Moment:
    found: Moment = vault._clock.moment  # type: ignore[attr-defined]
    return found


@pytest.fixture
def alerts(vault: Vault) -> list[Alert]:
    raised: list[Alert] = []
    vault._gate.send_alerts_to(raised.append)
    return raised


@pytest.fixture
def hook() -> Iterator[Any]:
    """A webhook receiver on loopback, answering every alert at once (test_alert_delivery's)."""
    import http.server
    import threading

    from tests.test_alert_delivery import _Receiver

    handler = type(
        "Receiver", (_Receiver,), {"answers": [], "received": [], "arrived": threading.Event()}
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{server.server_address[1]}/alerts"  # type: ignore[attr-defined]
    yield handler
    server.shutdown()
    server.server_close()


def search(vault: Vault, session: Session, number: str, moment: Moment) -> list[Any]:
    moment.tick()
    return vault.search(
        session, PURPOSE, record_type="person", index="national_id", values={"national_id": number}
    )


def again(vault: Vault, name: str) -> Session:
    return vault.login(name, PASSWORD, totp=totp_now(vault, TOTP_SECRETS[name]))


def guard_entries(vault: Vault) -> list[Any]:
    return [e for _, e in vault._log.entries() if e.action == Action.GUARD_ACT.value]


def stored_everywhere(vault: Vault) -> bytes:
    """Everything the guard and the log left where a thief or a reader could look."""
    parts = [orjson.dumps(e.encode().decode()) for _, e in vault._log.entries()]
    for key in (STATE_KEY, FLAGGED_KEY):
        parts.append(vault._storage.get_meta(key) or b"")
    return b"\n".join(parts)


def test_an_officer_walking_sequential_id_numbers_is_scored_and_locked(
    vault: Vault, moment: Moment, alerts: list[Alert], caplog: pytest.LogCaptureFixture
) -> None:
    walker = login(vault, Role.OFFICER, "o.walker")
    walked = [resident_id("310104", "19800101", f"{n:03d}") for n in range(100, 120)]
    for number in walked:
        assert search(vault, walker, number, moment) == []  # each under every budget
    with caplog.at_level("DEBUG"):
        [acted] = vault.guard_round()
    assert "o.walker" in caplog.text and "id_probes" in caplog.text
    assert "19800101" not in caplog.text  # the operational log names no number
    assert acted.account == "o.walker"
    assert "id_probes" in acted.signals
    # Locked, its session ended: the password and a fresh code open nothing.
    with pytest.raises(AuthenticationFailed):
        search(vault, walker, walked[0], moment)
    with pytest.raises(AuthenticationFailed):
        again(vault, "o.walker")
    [entry] = guard_entries(vault)
    assert entry.actor == "o.walker" and entry.detail["guard"] == "lock"
    assert entry.detail["alert"] == ANOMALY_ALERT and entry.detail["locked"] is True
    assert "id_probes" in entry.detail["signals"]
    assert any(line.startswith("id_probes: 19 ") for line in entry.detail["explained"])
    [alert] = alerts
    assert (alert.kind, alert.severity, alert.account) == (ANOMALY_ALERT, "critical", "o.walker")
    assert alert.action == Action.GUARD_ACT.value and "id_probes" in alert.signals
    assert alert.entry == next(i for i, e in vault._log.entries() if e == entry)
    # Nothing personal was kept or sent: not one number walked, nor its 14-digit stem.
    kept = stored_everywhere(vault) + orjson.dumps(alert.document())
    assert b"19800101" not in kept
    assert all(n.encode() not in kept for n in walked)
    # The watchers find it in the vault's alert book, by the same id.
    watcher = login(vault, Role.AUDITOR, "a.watch")
    [kept_alert] = [a for a in vault.alerts(watcher) if a.alert.kind == ANOMALY_ALERT]
    assert kept_alert.id == alert.id and kept_alert.alert.entry == alert.entry
    # The next round acts no more on what it acted on already.
    assert vault.guard_round() == []
    [locked] = [a for a in vault.admin.list_accounts(vault.operator) if a.username == "o.walker"]
    assert locked.locked


def test_an_officer_browsing_outside_their_district_at_three_in_the_morning_gets_an_alert(
    vault: Vault, moment: Moment, alerts: list[Alert]
) -> None:
    moment.set(4, 3)
    night = login(vault, Role.OFFICER, "o.night", district="110101")
    for number in SHANGHAI_PEOPLE[:5]:
        assert search(vault, night, number, moment) == []  # withheld: another district
    [acted] = vault.guard_round()
    assert set(acted.signals) == {"filtered", "off_hours"}
    [alert] = alerts
    assert alert.severity == "warning" and set(alert.signals) == {"filtered", "off_hours"}
    [entry] = guard_entries(vault)
    assert entry.detail["guard"] == "alert" and entry.detail["locked"] is False
    explained = " | ".join(entry.detail["explained"])
    assert "filtered: 5 today" in explained and "off_hours: 5 today" in explained
    # An alert only: the official works on.
    assert search(vault, night, BEIJING_PEOPLE[0], moment)


def test_a_stranger_of_a_normal_officer_with_steady_history_is_not_flagged(
    vault: Vault, moment: Moment, alerts: list[Alert]
) -> None:
    login(vault, Role.OFFICER, "o.steady", district="110101")
    for day in (1, 2, 3, 4):
        moment.set(day, 10)
        session = again(vault, "o.steady")
        for number in BEIJING_PEOPLE[day : day + 6]:
            assert search(vault, session, number, moment)
        if day < 4:
            vault.guard_round()
    assert vault.guard_round() == []
    assert not alerts and not guard_entries(vault)
    [steady] = vault.score_accounts(vault.operator)
    assert steady.account == "o.steady" and steady.points == 0 and not steady.contributions
    # Its past days are kept as counts, nothing more.
    state = orjson.loads(vault._storage.get_meta(STATE_KEY) or b"{}")["doc"]
    assert sorted(state["history"]["o.steady"]) == ["2026-12-01", "2026-12-02", "2026-12-03"]
    assert state["history"]["o.steady"]["2026-12-02"]["views"] == 6


def test_a_first_time_read_of_a_flagged_record_raises_an_alert(
    vault: Vault, moment: Moment, alerts: list[Alert]
) -> None:
    desk = login(vault, Role.SUPERVISOR, "s.desk")
    [star] = search(vault, desk, CELEBRITY, moment)
    assert vault.flag_record(vault.operator, star.record_id)
    assert not vault.flag_record(vault.operator, star.record_id)  # already
    vault.guard_round()  # a read before the flag is no first read of a flagged record
    assert not alerts
    curious = login(vault, Role.OFFICER, "o.curious")
    assert search(vault, curious, CELEBRITY, moment)
    [acted] = vault.guard_round()
    assert acted.signals == ["vip_first"] and acted.records == (star.record_id,)
    [alert] = alerts
    assert alert.severity == "warning" and list(alert.records) == [star.record_id]
    [entry] = guard_entries(vault)
    assert entry.records == (star.record_id,) and entry.actor == "o.curious"
    # A second read is no first read; another account's first read is.
    vault.record(curious, PURPOSE, star.record_id)
    vault.record(desk, PURPOSE, star.record_id)
    assert vault.guard_round() == []
    other = login(vault, Role.OFFICER, "o.other")
    vault.record(other, PURPOSE, star.record_id)
    assert [s.account for s in vault.guard_round()] == ["o.other"]
    flags = [e for _, e in vault._log.entries() if e.action == Action.GUARD_FLAG.value]
    assert [e.actor for e in flags] == ["operator", "operator"]


def test_only_the_host_operator_flags_and_officials_read_no_scores(vault: Vault) -> None:
    officer = login(vault, Role.OFFICER, "o.nosy")
    with pytest.raises(AccessDenied):
        vault.score_accounts(officer)
    with pytest.raises(AccessDenied):
        vault.flag_record(officer, "whatever")


def test_a_short_walk_ends_the_sessions_and_the_official_logs_in_again_with_the_second_factor(
    vault: Vault, moment: Moment, alerts: list[Alert]
) -> None:
    prober = login(vault, Role.OFFICER, "o.prober")
    for n in range(200, 210):
        assert search(vault, prober, resident_id("310104", "19800101", f"{n:03d}"), moment) == []
    [acted] = vault.guard_round()
    assert vault._guard_settings.step_up_at <= acted.points < vault._guard_settings.lock_at
    [alert] = alerts
    assert alert.severity == "high" and {"id_probes", "miss_ratio"} <= set(alert.signals)
    [entry] = guard_entries(vault)
    assert entry.detail["guard"] == "step_up" and entry.detail["sessions_ended"] is True
    with pytest.raises(AuthenticationFailed):
        search(vault, prober, BEIJING_PEOPLE[0], moment)
    # Not locked: a login, whose second factor every role must give, opens a session.
    assert search(vault, again(vault, "o.prober"), BEIJING_PEOPLE[0], moment)


def test_past_days_survive_a_restart_and_a_tampered_state_is_rebuilt_from_the_log(
    tmp_path: Path,
) -> None:
    vault = make_vault(tmp_path, "sqlite")
    moment = Moment(vault)
    vault.ingest(vault.operator, write_jsonl(tmp_path / "people.jsonl", RECORDS))
    login(vault, Role.OFFICER, "o.steady", district="110101")
    for day in (1, 2, 3, 4):
        moment.set(day, 10)
        session = again(vault, "o.steady")
        for number in BEIJING_PEOPLE[:5]:
            search(vault, session, number, moment)
    vault.guard_round()
    kept = vault._storage.get_meta(STATE_KEY)
    vault.close()

    clock = MovableClock()
    clock.moved = lambda: moment.now
    reopened = open_vault(
        tmp_path / "vault", passphrase=PASSPHRASE, hash_cost=FAST_HASH, clock=clock
    )
    try:
        [steady] = reopened.score_accounts(reopened.operator)
        assert steady.account == "o.steady" and steady.points == 0
        # Held against its own three past days, kept across the restart.
        guard = reopened._new_guard()
        assert sorted(guard._kept.history["o.steady"]) == ["2026-12-01", "2026-12-02", "2026-12-03"]
        assert reopened._storage.get_meta(STATE_KEY) == kept
        # A database writer raising its baselines (to hide a burst) breaks the tag: the
        # guard starts again from the log, which it cannot rewrite unnoticed.
        doc = orjson.loads(kept or b"")
        doc["doc"]["history"]["o.steady"]["2026-12-01"]["views"] = 100_000
        reopened._storage.set_meta(STATE_KEY, orjson.dumps(doc))
        rebuilt = reopened._new_guard()
        assert rebuilt._kept.history == {}
        rebuilt.catch_up(keep=False)
        assert rebuilt._kept.history["o.steady"]["2026-12-01"]["views"] == 5
    finally:
        reopened.close()


def test_guard_score_on_the_host_prints_each_account_with_its_explanation_and_no_value(
    tmp_path: Path,
) -> None:
    from tests.test_cli_client import run

    vault = make_vault(tmp_path, "sqlite")
    vault.ingest(vault.operator, write_jsonl(tmp_path / "people.jsonl", RECORDS))
    walker = login(vault, Role.OFFICER, "o.walker")
    walked = [resident_id("310104", "19800101", f"{n:03d}") for n in range(300, 312)]
    for number in walked:
        vault.search(
            walker,
            PURPOSE,
            record_type="person",
            index="national_id",
            values={"national_id": number},
        )
    [star] = vault.search(
        walker,
        PURPOSE,
        record_type="person",
        index="national_id",
        values={"national_id": CELEBRITY},
    )
    vault.close()
    env = {"CUSTODES_VAULT": str(tmp_path / "vault"), "CUSTODES_KEYRING_PASSPHRASE": PASSPHRASE}

    done = run("guard", "score", "--json", env=env)
    assert done.returncode == 0, done.stderr
    [scored] = orjson.loads(done.stdout)
    assert scored["account"] == "o.walker" and scored["verdict"] != "none"
    probes = next(s for s in scored["signals"] if s["signal"] == "id_probes")
    assert probes["explanation"].startswith("id_probes: 11 searched ID numbers")
    table = run("guard", "score", env=env)
    assert table.returncode == 0 and "o.walker" in table.stdout and "id_probes" in table.stdout
    assert all("19800101" not in text for text in (done.stdout, table.stdout, table.stderr))

    flagged = run("guard", "flag", star.record_id, env=env)
    assert flagged.returncode == 0 and "flagged" in flagged.stdout, flagged.stderr
    missing = run("guard", "flag", "no-such-record", env=env)
    assert missing.returncode != 0 and "no such record" in missing.stderr
    reopened = open_vault(tmp_path / "vault", passphrase=PASSPHRASE, hash_cost=FAST_HASH)
    try:
        actions = [e.action for _, e in reopened._log.entries()]
    finally:
        reopened.close()
    assert actions.count(Action.GUARD_SCORE.value) == 2
    assert actions.count(Action.GUARD_FLAG.value) == 2  # the refused one too


def test_a_guard_with_nothing_kept_reads_only_the_days_it_keeps_of_a_long_log(
    vault: Vault, moment: Moment
) -> None:
    old = login(vault, Role.OFFICER, "o.old", district="110101")
    for number in BEIJING_PEOPLE[:3]:
        search(vault, old, number, moment)  # 1 December
    moment.set(31, 10)
    late = again(vault, "o.old")
    for number in BEIJING_PEOPLE[3:6]:
        search(vault, late, number, moment)
    guard = vault._new_guard()
    first_late = next(
        i
        for i, e in vault._log.entries()
        if e.action == Action.SEARCH.value and e.records and e.time > moment.now - 3600
    )
    assert 0 < guard._cursor <= first_late
    guard.catch_up(keep=False)
    assert "2026-12-01" not in guard._kept.history.get("o.old", {})
    [today] = guard.scores(moment.now)
    assert today.account == "o.old" and today.day == "2026-12-31"


def test_the_guards_alert_reaches_a_webhook_signed_naming_the_entry_and_no_value(
    vault: Vault, moment: Moment, hook: Any
) -> None:
    from custodes.alerts import SIGNATURE_HEADER, TIMESTAMP_HEADER, Dispatcher, Webhook, signature
    from tests.test_alert_delivery import SECRET

    receiver = hook
    vault.send_alerts(Dispatcher([Webhook(receiver.url, SECRET)]))
    walker = login(vault, Role.OFFICER, "o.hook")
    walked = [resident_id("310104", "19800101", f"{n:03d}") for n in range(500, 520)]
    for number in walked:
        search(vault, walker, number, moment)
    vault.guard_round()
    assert receiver.arrived.wait(10), "the alert never arrived"
    [(headers, body)] = receiver.received
    assert headers[SIGNATURE_HEADER] == "sha256=" + signature(
        SECRET, headers[TIMESTAMP_HEADER], body
    )
    sent = orjson.loads(body)
    assert (sent["kind"], sent["severity"], sent["account"]) == (
        ANOMALY_ALERT,
        "critical",
        "o.hook",
    )
    assert sent["action"] == Action.GUARD_ACT.value and "id_probes" in sent["signals"]
    [(index, entry)] = [
        (i, e) for i, e in vault._log.entries() if e.action == Action.GUARD_ACT.value
    ]
    assert sent["entry"] == index and entry.detail["guard"] == "lock"
    assert all(number[:14] not in body.decode() for number in walked)


def test_an_account_whose_views_an_administrator_left_unlimited_is_alerted_on_not_stopped(
    vault: Vault, moment: Moment, alerts: list[Alert]
) -> None:
    from custodes.policy.budgets import NO_LIMITS

    drill = login(vault, Role.INVESTIGATOR, "t.drill", budget=NO_LIMITS)
    for n in range(600, 620):
        search(vault, drill, resident_id("310104", "19800101", f"{n:03d}"), moment)
    [acted] = vault.guard_round()
    assert acted.verdict.name == "LOCK"
    [entry] = guard_entries(vault)
    assert (entry.detail["guard"], entry.detail["called_for"]) == ("alert", "lock")
    assert entry.detail["locked"] is False and entry.detail["sessions_ended"] is False
    [alert] = alerts
    assert alert.severity == "warning" and "id_probes" in alert.signals
    assert search(vault, drill, BEIJING_PEOPLE[0], moment)  # still working
    assert vault.guard_round() == []  # told once


def test_a_vault_that_keeps_guarding_acts_on_its_own_and_closes_cleanly(
    vault: Vault, moment: Moment, alerts: list[Alert]
) -> None:
    import time

    walker = login(vault, Role.OFFICER, "o.timed")
    for n in range(700, 720):
        search(vault, walker, resident_id("310104", "19800101", f"{n:03d}"), moment)
    vault.keep_guarding(every=0.05)
    deadline = time.monotonic() + 10
    while not alerts and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [a.account for a in alerts] == ["o.timed"]
    with pytest.raises(AuthenticationFailed):
        search(vault, walker, BEIJING_PEOPLE[0], moment)


def test_a_server_with_two_workers_locks_an_id_walker_and_sends_the_alert_to_syslog(
    tmp_path: Path,
) -> None:
    import signal
    import socket
    import subprocess

    import httpx

    from custodes.bootstrap import create_vault
    from tests.conftest import FAST_KDF, enrol
    from tests.test_shared_vault import _serve_two_workers, _wait_up

    vault = create_vault(
        tmp_path / "vault",
        passphrase=PASSPHRASE,
        keyring_path=tmp_path / "keys" / "test.keyring",
        kdf=FAST_KDF,
        hash_cost=FAST_HASH,
    )
    try:
        vault.ingest(vault.operator, write_jsonl(tmp_path / "people.jsonl", RECORDS))
        vault.admin.add_account(vault.operator, "t.web", PASSWORD, Role.OFFICER, {"district": "*"})
        code = totp_now(vault, enrol(vault, "t.web"))
    finally:
        vault.close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as syslog:
        syslog.bind(("127.0.0.1", 0))
        syslog.settimeout(30)
        address = f"udp://127.0.0.1:{syslog.getsockname()[1]}"
        options = ("--alert-syslog", address, "--guard-every", "0.2")
        server, base = _serve_two_workers(tmp_path, subprocess.DEVNULL, *options)
        try:
            _wait_up(base, server)
            opened = httpx.post(
                f"{base}/api/v1/session",
                json={"username": "t.web", "password": PASSWORD, "totp": code},
                timeout=30,
            )
            auth = {"Authorization": f"Bearer {opened.json()['token']}"}
            walked = [resident_id("310104", "19800101", f"{n:03d}") for n in range(800, 820)]
            for number in walked:
                answer = httpx.post(
                    f"{base}/api/v1/search",
                    headers=auth,
                    json={
                        "record_type": "person",
                        "index": "national_id",
                        "values": {"national_id": number},
                        "purpose": PURPOSE.reason,
                        "case_ref": PURPOSE.case_ref,
                    },
                    timeout=30,
                )
                if answer.status_code != 200:
                    break  # stopped while still walking: the guard was quicker
            # A warning may come first; the alert that ended the session follows it.
            sent = []
            while not sent or sent[-1]["severity"] == "warning":
                message = syslog.recv(65536).decode()
                assert f" {ANOMALY_ALERT} - " in message and "19800101" not in message
                sent.append(orjson.loads(message.split(" - ", 1)[1]))
            refused = httpx.post(f"{base}/api/v1/search", headers=auth, json={}, timeout=30)
            assert refused.status_code == 401
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    assert {a["account"] for a in sent} == {"t.web"}
    assert sent[-1]["severity"] in ("high", "critical")  # sessions ended, or locked
    assert "id_probes" in sent[-1]["signals"]
