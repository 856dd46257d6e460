"""Several processes serving one vault: the access log stays one unforked tree with every
entry, and a session, a logout or a lockout holds in every process at once.

`custodes serve --workers N` runs N such processes; a flaw here would let a busy server
lose access-log entries, sign a fork, or keep a stolen session alive in one worker after
the official logged out in another.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest

from custodes.audit.verify import verify_log
from custodes.bootstrap import create_vault, open_vault
from custodes.errors import AuthenticationFailed, LoginThrottled
from custodes.policy import AccessPurpose, Action, Role
from custodes.policy.budgets import NO_LIMITS
from custodes.records.idnumber import check_char
from custodes.sessions import Session, token_key
from custodes.synth import write_jsonl
from custodes.vault import Vault
from custodes.web import serve
from tests.conftest import FAST_HASH, FAST_KDF, PASSPHRASE, PASSWORD, enrol, login, totp_now

SEARCHES_PER_THREAD = 25
THREADS = 3
CHECKPOINT_EVERY = 7  # small, so that both processes sign checkpoints many times


def _vault_dir(tmp: Path) -> Path:
    return tmp / "vault"


def _open(tmp: Path) -> Vault:
    return open_vault(
        _vault_dir(tmp),
        passphrase=PASSPHRASE,
        hash_cost=FAST_HASH,
        checkpoint_every=CHECKPOINT_EVERY,
    )


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    """A vault on disk with a small population, closed: each test opens it as it needs."""
    vault = create_vault(
        _vault_dir(tmp_path),
        passphrase=PASSPHRASE,
        keyring_path=tmp_path / "keys" / "shared.keyring",
        log_key_path=tmp_path / "keys" / "shared.logkey",
        kdf=FAST_KDF,
        hash_cost=FAST_HASH,
        checkpoint_every=CHECKPOINT_EVERY,
    )
    try:
        source = tmp_path / "people.jsonl"
        with source.open("wb") as f:
            write_jsonl(f, 60, seed=11)
        vault.ingest(vault.operator, source, workers=1)
    finally:
        vault.close()
    return tmp_path


def _search_worker(tmp: str, token: str, ids: list[str], results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """One server process: searches from several threads with a session opened elsewhere."""
    vault = _open(Path(tmp))
    try:
        session = vault.session_for(token)
        purpose = AccessPurpose("test of several server processes", "T-2")
        found: list[int] = []

        def search(n: int) -> None:
            for i in range(SEARCHES_PER_THREAD):
                nid = ids[(n * SEARCHES_PER_THREAD + i) % len(ids)]
                views = vault.search(
                    session,
                    purpose,
                    record_type="person",
                    index="national_id",
                    values={"national_id": nid},
                )
                found.append(len(views))

        threads = [threading.Thread(target=search, args=(n,)) for n in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results.put(("ok", sum(found), len(found)))
    except BaseException as exc:  # reported to the test, which fails on it
        results.put(("error", type(exc).__name__, str(exc)))
    finally:
        vault.close()


def _national_ids(tmp: Path) -> list[str]:
    import orjson

    ids = []
    for line in (tmp / "people.jsonl").read_bytes().splitlines():
        doc = orjson.loads(line)
        if doc.get("type") == "person":
            ids.append(str(doc["national_id"]))
    return ids


def test_two_processes_appending_at_once_lose_no_entry_and_sign_no_fork(shared: Path) -> None:
    vault = _open(shared)
    try:
        # 150 searches from two processes at once: a load, not an official's day.
        session = login(vault, Role.INVESTIGATOR, "t.shared", budget=NO_LIMITS)
        before = vault._storage.log_size()
    finally:
        vault.close()
    ids = _national_ids(shared)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [
        context.Process(target=_search_worker, args=(str(shared), session.token, ids, results))
        for _ in range(2)
    ]
    for w in workers:
        w.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=60)
    assert all(o[0] == "ok" for o in outcomes), outcomes
    searches = 2 * THREADS * SEARCHES_PER_THREAD
    assert sum(o[2] for o in outcomes) == searches
    assert sum(o[1] for o in outcomes) == searches  # every searched person was found

    vault = _open(shared)
    try:
        # One entry per search, none lost and none doubled, in one tree.
        assert vault._storage.log_size() == before + searches
        entries = list(vault._log.entries(before))
        assert [e.action for _, e in entries] == [Action.SEARCH.value] * searches
        report = verify_log(vault._storage, vault._log.verifier_key)
        assert report.entries == before + searches
        # Both processes signed checkpoints along the way, each extending the last.
        assert len(vault._storage.checkpoints()) >= searches // CHECKPOINT_EVERY // 2
    finally:
        vault.close()


def test_logout_in_one_process_ends_the_session_in_every_other(shared: Path) -> None:
    first, second = _open(shared), _open(shared)
    try:
        session = login(first, Role.INVESTIGATOR, "t.shared")
        seen = second.session_for(session.token)
        assert (seen.username, seen.role) == ("t.shared", Role.INVESTIGATOR)
        assert second.csrf_token(seen) == first.csrf_token(session)
        second.logout(seen)
        with pytest.raises(AuthenticationFailed):
            first.session_for(session.token)
        with pytest.raises(AuthenticationFailed):
            first.csrf_token(session)
    finally:
        first.close()
        second.close()


def test_a_requests_own_check_serves_one_access_and_a_logout_elsewhere_ends_the_next(
    shared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A request's session is checked as it arrives, its account read in the same query;
    # that check serves the one access the request then makes. Any other access with the
    # same session reads both again, so a logout in another process holds at once.
    first, second = _open(shared), _open(shared)
    reads: list[str] = []
    storage = first._storage

    def counted(name: str) -> Callable[..., object]:
        read = getattr(storage, name)

        def call(*args: object) -> object:
            reads.append(name)
            return read(*args)

        return call

    for name in ("get_session", "get_session_account", "get_account"):
        monkeypatch.setattr(storage, name, counted(name))
    try:
        session = login(first, Role.INVESTIGATOR, "t.once")
        purpose = AccessPurpose("test of a request's own session check", "T-5")
        nid = _national_ids(shared)[0]
        reads.clear()  # logging in reads the account

        def search(who: Session) -> None:
            found = first.search(
                who,
                purpose,
                record_type="person",
                index="national_id",
                values={"national_id": nid},
            )
            assert len(found) == 1

        checked = first.session_for(session.token)
        assert reads == ["get_session_account"]
        search(checked)
        assert reads == ["get_session_account"]  # the request's check, taken
        search(checked)
        assert reads == ["get_session_account"] * 2  # read again for a second access
        second.logout(second.session_for(session.token))
        with pytest.raises(AuthenticationFailed):
            search(checked)
    finally:
        first.close()
        second.close()


def test_disabling_an_account_in_one_process_ends_its_sessions_in_every_other(
    shared: Path,
) -> None:
    first, second = _open(shared), _open(shared)
    try:
        session = login(first, Role.OFFICER, "t.disabled")
        second.admin.disable_account(second.operator, "t.disabled")
        with pytest.raises(AuthenticationFailed):
            first.session_for(session.token)
    finally:
        first.close()
        second.close()


def test_a_password_guesser_cannot_spread_attempts_over_processes(shared: Path) -> None:
    first, second = _open(shared), _open(shared)
    try:
        first.admin.add_account(
            first.operator, "t.target", PASSWORD, Role.OFFICER, {"district": "*"}
        )
        enrol(first, "t.target")
        for vault in (first, second, first, second):
            with pytest.raises(AuthenticationFailed):
                vault.login("t.target", "a wrong guess at the password", totp="000000")
        # The fourth failure started the backoff, counted across both processes.
        with pytest.raises(LoginThrottled):
            second.login("t.target", PASSWORD, totp=totp_now(second, "x" * 32))
    finally:
        first.close()
        second.close()


class _CountedHasher:
    """The vault's password hasher, counting the checks that reach it."""

    def __init__(self, vault: Vault, counter: list[int], lock: threading.Lock) -> None:
        self._real = vault._accounts._hasher
        self._counter = counter
        self._lock = lock

    def verify(self, stored: str, password: str) -> bool:
        with self._lock:
            self._counter[0] += 1
        time.sleep(0.005)  # the hash takes time: the burst piles up behind it
        return bool(self._real.verify(stored, password))

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)


def test_a_burst_of_wrong_passwords_over_two_processes_reaches_the_hash_only_as_the_throttle_allows(
    shared: Path,
) -> None:
    # Three hundred guesses at one account at once, from as many addresses, spread over
    # two server processes: an attempt is counted as it is let in, in one step with the
    # decision, so only the free attempts reach the password hash; counted after the
    # check, the whole burst would find the count at zero and be let through.
    from custodes.sessions import FREE_FAILURES

    first, second = _open(shared), _open(shared)
    checks = [0]
    lock = threading.Lock()
    try:
        first.admin.add_account(
            first.operator, "t.target", PASSWORD, Role.OFFICER, {"district": "*"}
        )
        enrol(first, "t.target")
        for vault in (first, second):
            vault._accounts._hasher = _CountedHasher(vault, checks, lock)  # type: ignore[assignment]
        start = threading.Barrier(300)
        outcomes: list[str] = []

        def guess(n: int) -> None:
            vault = (first, second)[n % 2]
            start.wait()
            try:
                vault.login(
                    "t.target", f"wrong guess number {n}", totp="000000", client=f"10.1.{n}.7"
                )
            except LoginThrottled:
                outcomes.append("throttled")
            except AuthenticationFailed:
                outcomes.append("checked")

        threads = [threading.Thread(target=guess, args=(n,)) for n in range(300)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert checks[0] == FREE_FAILURES
        assert outcomes.count("checked") == FREE_FAILURES
        assert outcomes.count("throttled") == 300 - FREE_FAILURES
        # Each refused guess is on the one access log, with why it was refused.
        reasons = [
            entry.detail.get("reason")
            for _, entry in first._log.entries()
            if entry.action == Action.LOGIN and entry.actor == "t.target"
        ]
        assert reasons.count("throttled") == 300 - FREE_FAILURES
        assert reasons.count("credentials") == FREE_FAILURES
    finally:
        first.close()
        second.close()


def test_failed_logins_counted_at_once_in_two_processes_are_all_counted(shared: Path) -> None:
    # The lock after ten failures counts in the account's own (tagged) row. Two processes
    # counting at once must never both read the same count and write the same next one:
    # a guesser with two servers would get twice the guesses before the lock.
    first, second = _open(shared), _open(shared)
    try:
        first.admin.add_account(
            first.operator, "t.target", PASSWORD, Role.OFFICER, {"district": "*"}
        )
        start = threading.Barrier(8)

        def fail_many(vault: Vault) -> None:
            start.wait()
            for _ in range(25):
                vault._accounts.record_failure("t.target")

        threads = [
            threading.Thread(target=fail_many, args=((first, second)[n % 2],)) for n in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        row = second._storage.get_account("t.target")
        assert row is not None
        security = orjson.loads(row.attributes)["security"]
        assert security["failures"] == 200
        assert security["locked"] is True
        # Still an authentic row: every write was tagged over what it replaced.
        assert second._accounts.get("t.target") is not None
    finally:
        first.close()
        second.close()


def test_a_session_survives_a_restart_of_the_server_within_its_timeouts(shared: Path) -> None:
    vault = _open(shared)
    session = login(vault, Role.OFFICER, "t.restart")
    vault.close()
    reopened = _open(shared)
    try:
        assert reopened.session_for(session.token).username == "t.restart"
    finally:
        reopened.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_up(base: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError("the server exited before it answered")
        try:
            httpx.get(f"{base}/api/v1/me", timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError("the server did not answer in time")


def _serve_two_workers(
    shared: Path, output: int, *options: str
) -> tuple[subprocess.Popen[bytes], str]:
    """`custodes serve --workers 2` on a free loopback port, and its base URL."""
    port = _free_port()
    env = {**os.environ, "CUSTODES_KEYRING_PASSPHRASE": PASSPHRASE}
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "custodes", "serve"),
            *("--vault", str(_vault_dir(shared)), "--port", str(port), "--workers", "2"),
            *options,
        ],
        env=env,
        stdout=output,
        stderr=output,
    )
    return server, f"http://127.0.0.1:{port}"


def _web_investigator(shared: Path, budget: dict[str, int] | None = None) -> tuple[str, str]:
    """An investigator t.web for the shared vault: a one-time code, and a national ID to
    search for."""
    vault = _open(shared)
    try:
        attributes: dict[str, object] = {"district": "*"}
        if budget is not None:
            attributes["budget"] = budget
        vault.admin.add_account(vault.operator, "t.web", PASSWORD, Role.INVESTIGATOR, attributes)
        secret = enrol(vault, "t.web")
        return totp_now(vault, secret), _national_ids(shared)[0]
    finally:
        vault.close()


def _web_search(base: str, code: str, nid: str) -> tuple[dict[str, str], dict[str, object]]:
    """Log t.web in; the bearer header and the body of a search for `nid`."""
    opened = httpx.post(
        f"{base}/api/v1/session",
        json={"username": "t.web", "password": PASSWORD, "totp": code},
        timeout=30,
    )
    assert opened.status_code == 201, opened.text
    auth = {"Authorization": f"Bearer {opened.json()['token']}"}
    body: dict[str, object] = {
        "record_type": "person",
        "index": "national_id",
        "values": {"national_id": nid},
        "purpose": "test of a server with two workers",
        "case_ref": "T-3",
    }
    return auth, body


def _logged_searches(shared: Path) -> int:
    """The searches on the shared vault's access log, once the log is verified whole."""
    vault = _open(shared)
    try:
        verify_log(vault._storage, vault._log.verifier_key)
        return sum(1 for _, e in vault._log.entries() if e.action == Action.SEARCH.value)
    finally:
        vault.close()


def test_serve_with_two_workers_shares_sessions_and_one_access_log(shared: Path) -> None:
    code, nid = _web_investigator(shared)
    server, base = _serve_two_workers(shared, subprocess.PIPE)
    try:
        _wait_up(base, server)
        auth, body = _web_search(base, code, nid)
        # A new connection each time, so that both workers take some of them.
        for _ in range(40):
            answer = httpx.post(f"{base}/api/v1/search", json=body, headers=auth, timeout=30)
            assert answer.status_code == 200, answer.text
            assert len(answer.json()["results"]) == 1
        ended = httpx.delete(f"{base}/api/v1/session", headers=auth, timeout=30)
        assert ended.status_code in (200, 204), ended.text
        for _ in range(10):
            refused = httpx.post(f"{base}/api/v1/search", json=body, headers=auth, timeout=30)
            assert refused.status_code == 401
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=60)
        assert server.returncode == 0, err.decode()
        assert b"2 worker processes" in out
        pids = {
            line.split(b"[")[1].split(b"]")[0]
            for line in err.splitlines()
            if b"Started server process" in line
        }
        assert len(pids) == 2
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert _logged_searches(shared) == 40


def test_a_server_worker_sends_the_alert_of_a_crossed_budget_to_syslog(shared: Path) -> None:
    code, nid = _web_investigator(shared, budget={"misses_per_hour": 1})
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as syslog:
        syslog.bind(("127.0.0.1", 0))
        syslog.settimeout(30)
        address = f"udp://127.0.0.1:{syslog.getsockname()[1]}"
        server, base = _serve_two_workers(shared, subprocess.DEVNULL, "--alert-syslog", address)
        try:
            _wait_up(base, server)
            auth, body = _web_search(base, code, nid)
            absent = "11010519800101007"  # a valid number no one in the vault holds
            missing = {**body, "values": {"national_id": absent + check_char(absent)}}
            answers = [
                httpx.post(f"{base}/api/v1/search", json=missing, headers=auth, timeout=30)
                for _ in range(2)
            ]
            assert [a.status_code for a in answers] == [200, 403]
            assert answers[1].json()["error"]["code"] == "budget_exceeded"
            message = syslog.recv(65536).decode()
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    assert " custodes " in message and " guard:budget - " in message
    alert = orjson.loads(message.split(" - ", 1)[1])
    assert alert["account"] == "t.web" and alert["signals"] == ["misses_per_hour"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_a_killed_log_sequencer_is_replaced_and_no_answered_search_goes_unlogged(
    shared: Path,
) -> None:
    # The workers hand their entries to the log sequencer; while it is away they append
    # them themselves, so that its death refuses at most the searches it had in hand.
    code, nid = _web_investigator(shared)
    server, base = _serve_two_workers(shared, subprocess.DEVNULL)
    answered = 0
    try:
        _wait_up(base, server)
        auth, body = _web_search(base, code, nid)

        def search(times: int) -> None:
            nonlocal answered
            for _ in range(times):
                answer = httpx.post(f"{base}/api/v1/search", json=body, headers=auth, timeout=30)
                assert answer.status_code == 200, answer.text
                answered += 1

        search(10)
        sequencers = _children(server.pid) - _workers(server.pid)
        assert len(sequencers) == 1
        victim = sequencers.pop()
        os.kill(victim, signal.SIGKILL)
        search(20)  # at once: the sequencer is not back yet
        deadline = time.monotonic() + 30
        while not (_children(server.pid) - _workers(server.pid) - {victim}):
            assert time.monotonic() < deadline, "the log sequencer was not started again"
            time.sleep(0.05)
        search(10)
        assert server.poll() is None
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert answered == 40
    assert _logged_searches(shared) == answered


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The parent pid is the second field after the parenthesised command name.
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def _is_sequencer(pid: int) -> bool:
    """Whether `pid` is a server's log sequencer, by the name it gives itself."""
    try:
        name = Path(f"/proc/{pid}/comm").read_bytes().strip()
    except OSError:
        return False
    return name == serve.SEQUENCER_NAME


def _workers(pid: int) -> set[int]:
    """The server workers of the supervisor `pid`: its children but the log sequencer."""
    return {child for child in _children(pid) if not _is_sequencer(child)}


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_a_killed_worker_is_replaced_and_the_server_keeps_answering(shared: Path) -> None:
    server, base = _serve_two_workers(shared, subprocess.DEVNULL)
    try:
        _wait_up(base, server)
        workers = _workers(server.pid)
        assert len(workers) == 2
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = _workers(server.pid)
            if len(now) == 2 and victim not in now:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the killed worker was not replaced")
        for _ in range(20):  # new connections, spread over both workers
            assert httpx.get(f"{base}/api/v1/me", timeout=30).status_code == 401
        assert server.poll() is None
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert server.returncode == 0


def test_a_session_that_outlived_its_account_opens_nothing(shared: Path) -> None:
    from custodes.storage.base import SessionRow

    vault = _open(shared)
    try:
        session = login(vault, Role.INVESTIGATOR, "t.leaver")
        row = vault._storage.get_session(token_key(session.token))
        assert row is not None
        vault.admin.disable_account(vault.operator, "t.leaver")
        # A restored copy of the database, or a fault, brings the session row back.
        vault._storage.put_session(SessionRow(*row))
        purpose = AccessPurpose("test of a session outliving its account", "T-4")
        nid = _national_ids(shared)[0]
        with pytest.raises(AuthenticationFailed):
            vault.search(
                session,
                purpose,
                record_type="person",
                index="national_id",
                values={"national_id": nid},
            )
        assert vault._storage.get_session(row.key) is None  # ended on the spot
    finally:
        vault.close()
