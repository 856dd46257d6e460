"""The crash drill: SIGKILL at random moments during `custodes ingest --workers 2` and
during audited serving by `custodes serve --workers 2`, on SQLite and on PostgreSQL.

What was promised before a kill must hold after it: every record the storage had
acknowledged to its readers is still stored, and was written by exactly one batch that the
access log announced; every read that came back 200 has its one entry on the log; the
vault opens; `audit verify` passes, against the log signer's own last checkpoint too, so
that no checkpoint signed before or after a kill forks from another; and no process of a
killed command is left running with the keys.

A kill is sent to the command's own process only, as an operator's `kill -9` would be:
its workers must end with it by themselves. CUSTODES_CRASH_KILLS sets the kills per
backend (half during ingest, half during serving; 30 by default: the module ran in about
two minutes for both backends on two cores shared with other work, three and a half on a
busy machine); every failure names the seed of its random moments, which
CUSTODES_CRASH_SEED draws again.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from click.testing import CliRunner

from custodes.audit import AccessEntry, Outcome
from custodes.audit.verify import verify_log
from custodes.bootstrap import create_vault, open_vault, unlock_vault
from custodes.cli import cli
from custodes.policy import Action, Role
from custodes.policy.budgets import NO_LIMITS
from custodes.synth import write_jsonl as synth_jsonl
from custodes.vault import Vault
from custodes.web import serve
from tests.conftest import FAST_HASH, FAST_KDF, PASSPHRASE, PURPOSE, login, make_vault, write_jsonl
from tests.postgres import (  # noqa: F401 - fixtures, asked for by name
    postgres_dsn_fixture,
    postgres_server_fixture,
)
from tests.test_ingest_bad_input import national_id, person
from tests.test_ingest_drills import batch_ids, stored_ids
from tests.test_shared_vault import _free_port, _wait_up

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/environ").exists(), reason="finds a command's processes in /proc"
)

KILLS = int(os.environ.get("CUSTODES_CRASH_KILLS") or 30)
INGEST_KILLS = KILLS // 2
SERVE_KILLS = KILLS - INGEST_KILLS

INGEST_PEOPLE = 2_000  # about 3,400 lines with their cases and deliveries
INGEST_BATCH = 25  # some 140 batches, a few of them stored between two kills
# Where a kill falls: after 0 to 4 more entries on the access log (each a batch
# announced, or the run's own entry at its end), then up to 40 ms more (a batch takes a
# few), so that kills land before, inside and after a batch's two commits. Drawn as 0
# entries, it falls anywhere in the first second and a half instead: in start-up, while
# the workers are spawned, or while the stored records are held against the input. A
# moment drawn from the start alone would, on a busy machine, land in start-up nearly
# always.
INGEST_ENTRIES = 4
INGEST_JITTER = 0.04
INGEST_START = 1.5

SERVE_PEOPLE = 150
READERS = 3  # client threads, each reading as one of the officials
SERVE_WINDOW = (0.2, 1.0)  # seconds served between a restart and the next kill
CASE = "DRILL-10"

# Set in the environment of every command the drill starts, and so inherited by each
# process it forks or spawns: how its processes are found after its own was killed.
MARK = "DRILL_RUN_MARK"


# -- the drill's random moments and what its failures say --------------------------------


class _Drill:
    """The random moments of one drill, from a seed that each of its failures names."""

    def __init__(self) -> None:
        given = os.environ.get("CUSTODES_CRASH_SEED")
        self.seed = int(given) if given else secrets.randbits(32)
        self.rng = random.Random(self.seed)
        self.at = "setting up"

    @contextlib.contextmanager
    def named(self) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            exc.add_note(
                f"[{self.at}; seed {self.seed}: CUSTODES_CRASH_SEED={self.seed} draws the same "
                "moments again]"
            )
            raise


# -- the vault, and the processes of the commands run on it -------------------------------


@dataclass(frozen=True)
class _DrillVault:
    directory: Path
    keyring: Path
    log_key: Path

    def open(self) -> Vault:
        """Open as the host does, holding the log to its signer's last checkpoint."""
        return open_vault(
            self.directory,
            passphrase=PASSPHRASE,
            keyring_path=self.keyring,
            log_key_path=self.log_key,
            hash_cost=FAST_HASH,
        )

    def environment(self, mark: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTODES_")}
        env |= {
            "CUSTODES_VAULT": str(self.directory),
            "CUSTODES_KEYRING_PASSPHRASE": PASSPHRASE,
            "COLUMNS": "200",  # the ingest summary on one line a row
            MARK: mark,
        }
        return env


@pytest.fixture(params=["sqlite", "postgresql"])
def drill_vault(request: pytest.FixtureRequest, tmp_path: Path) -> _DrillVault:
    """An empty vault, closed, on the backend of the parameter (PostgreSQL: a fresh
    schema on the shared server)."""
    database = None
    if request.param == "postgresql":
        fresh: Callable[[], str] = request.getfixturevalue("postgres_dsn")
        database = fresh()
    keys = tmp_path / "keys"
    made = _DrillVault(tmp_path / "vault", keys / "drill.keyring", keys / "drill.logkey")
    create_vault(
        made.directory,
        passphrase=PASSPHRASE,
        keyring_path=made.keyring,
        log_key_path=made.log_key,
        kdf=FAST_KDF,
        hash_cost=FAST_HASH,
        database=database,
    ).close()
    return made


def _marked(mark: str) -> set[int]:
    """The living processes started with `mark` in their environment (a zombie's is
    empty: it has ended)."""
    wanted = f"{MARK}={mark}".encode()
    return {pid for pid, environ in _proc_files("environ") if wanted in environ.split(b"\0")}


def _proc_files(name: str) -> Iterator[tuple[int, bytes]]:
    """(pid, /proc/PID/name) of every process whose file can be read now."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            yield int(entry.name), (entry / name).read_bytes()
        except OSError:
            continue


def _outliving(mark: str, within: float) -> set[int]:
    """The processes of `mark` still running after `within` seconds (none: at once)."""
    deadline = time.monotonic() + within
    while (alive := _marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def _end_marked(mark: str) -> None:
    """Kill whatever process of `mark` a failed drill left behind."""
    for pid in _marked(mark):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _children(pid: int) -> set[int]:
    """The living child processes of `pid`."""
    found = set()
    for child, stat in _proc_files("stat"):
        # After the parenthesised command name: state, then the parent's pid.
        state, parent = stat.rsplit(b")", 1)[1].split()[:2]
        if int(parent) == pid and state != b"Z":
            found.add(child)
    return found


def _audit_verify(vault: _DrillVault) -> dict[str, object]:
    """`custodes audit verify --json`, as the host runs it: every leaf and root
    recomputed, every stored checkpoint and the signer's own last one held against them."""
    result = CliRunner().invoke(
        cli,
        ["audit", "verify", "--vault", str(vault.directory), "--json"],
        env={"CUSTODES_DATABASE": None, "CUSTODES_VAULT": None},
    )
    assert result.exit_code == 0, f"audit verify failed: {result.exception!r}"
    verified: dict[str, object] = orjson.loads(result.stdout)
    assert verified["ok"] is True and verified["outside_checkpoints"] == 1, verified
    return verified


# -- ingest -------------------------------------------------------------------------------


@dataclass
class _BatchBook:
    """What the access log said of the batches of every run so far."""

    announced: Counter[str] = field(default_factory=Counter)  # granted entries naming each id
    unwritten: Counter[str] = field(default_factory=Counter)  # of those, never written


def _ingest_until_killed(
    command: list[str],
    env: dict[str, str],
    moment: tuple[int, float],
    observer: Vault,
    output: Path,
) -> tuple[bool, set[str]]:
    """Run the ingest until its moment, `moment` = (n, s): `s` seconds after its n-th
    entry on the access log (after its start if n is 0). There, note the records stored
    (what the storage has acknowledged to any reader), then SIGKILL the ingest's own
    process. Whether it was killed (else it ran to its end first), and the records noted."""
    entries, after = moment
    since = observer._storage.log_size()
    with output.open("ab") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while process.poll() is None and observer._storage.log_size() < since + entries:
            assert time.monotonic() < deadline, "the ingest logged nothing for two minutes"
            time.sleep(0.002)
        until = time.monotonic() + after
        while process.poll() is None and time.monotonic() < until:
            time.sleep(0.002)
        if process.poll() is None:
            acknowledged = stored_ids(observer)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
            return True, acknowledged
        tail = output.read_text(errors="replace")[-2000:]
        assert process.returncode == 0, f"the ingest failed ({process.returncode}): {tail}"
        return False, set()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _check_ingest(
    vault: Vault, book: _BatchBook, since: int, acknowledged: set[str], killed: bool
) -> set[str]:
    """Hold the vault after one run (killed or not) to what the run was told and what the
    log says of it; the ids stored."""
    stored = stored_ids(vault)
    assert vault.count() == len(stored), "a record id is stored more than once"
    lost = acknowledged - stored
    assert not lost, f"{len(lost)} records stored before the kill were gone after it"
    run = [
        (index, entry)
        for index, entry in vault._log.entries(since)
        if entry.action == Action.INGEST_BATCH.value
    ]
    outcomes = Counter(entry.outcome.value for _, entry in run)
    assert set(outcomes) <= {Outcome.GRANTED.value}, f"batch entries of the run: {outcomes}"
    unwritten = []
    for index, entry in run:
        ids = batch_ids(vault, index, entry)
        held = sum(record_id in stored for record_id in ids)
        assert held in (0, len(ids)), (
            f"batch entry {index} announced {len(ids)} records, of which {held} are stored: "
            "a batch stored in part"
        )
        book.announced.update(ids)
        if not held:
            unwritten.append(index)
            book.unwritten.update(ids)
    # The writer announces a batch, then writes it, one batch at a time: only a run
    # killed between the two leaves an announcement unwritten, and only its last.
    if unwritten:
        assert killed and unwritten == [run[-1][0]], (
            f"batch entries {unwritten} of {len(run)} in the run announced records it never "
            f"stored ({'killed' if killed else 'not killed'})"
        )
    written = Counter({r: n - book.unwritten[r] for r, n in book.announced.items()})
    not_once = [r for r in stored if written[r] != 1]
    assert not not_once, (
        f"{len(not_once)} stored records were not written by exactly one announced batch "
        f"(by {sorted(Counter(written[r] for r in not_once).items())} batches)"
    )
    phantom = [r for r, n in written.items() if n and r not in stored]
    assert not phantom, f"{len(phantom)} records announced as written are not stored"
    return stored


def _summary(stdout: str) -> dict[str, int]:
    """The counts of the ingest's summary table."""
    rows = re.findall(r"│\s*(stored|already present|refused)\s*│\s*([\d,]+)", stdout)
    return {name: int(count.replace(",", "")) for name, count in rows}


def test_an_ingest_killed_at_random_moments_keeps_every_acknowledged_batch_exactly_once(
    drill_vault: _DrillVault, tmp_path: Path
) -> None:
    drill = _Drill()
    source = tmp_path / "population.jsonl"
    with source.open("wb") as f:
        lines = synth_jsonl(f, INGEST_PEOPLE, seed=10)
    command = [
        *(sys.executable, "-m", "custodes", "ingest", str(source)),
        *("--workers", "2", "--batch-size", str(INGEST_BATCH)),
    ]
    output = tmp_path / "ingest.out"
    book = _BatchBook()
    kills = runs = 0
    marks: list[str] = []
    observer = drill_vault.open()
    try:
        with drill.named():
            while kills < INGEST_KILLS:
                runs += 1
                assert runs <= 3 * INGEST_KILLS + 3, f"{runs} runs ended before their kill"
                # No more entries than the run can still make: its batches left, and its
                # own entry at the end.
                left = -(-(lines - observer.count()) // INGEST_BATCH)
                entries = drill.rng.randint(0, min(INGEST_ENTRIES, left + 1))
                after = drill.rng.uniform(0.0, INGEST_JITTER if entries else INGEST_START)
                drill.at = (
                    f"ingest run {runs}, kill {kills + 1} of {INGEST_KILLS} {after:.3f} s "
                    f"after its {entries}th entry"
                )
                since = observer._storage.log_size()
                marks.append(f"ingest-{runs}-{secrets.token_hex(4)}")
                killed, acknowledged = _ingest_until_killed(
                    command,
                    drill_vault.environment(marks[-1]),
                    (entries, after),
                    observer,
                    output,
                )
                kills += killed
                outlived = _outliving(marks[-1], 10)
                assert not outlived, f"{len(outlived)} processes of the killed ingest outlived it"
                observer.close()
                observer = drill_vault.open()
                _check_ingest(observer, book, since, acknowledged, killed)
                _audit_verify(drill_vault)
                # Signed between runs, so that the next kill falls on a log its signer
                # has signed: the run after it must extend that checkpoint, never fork.
                observer.checkpoint(observer.operator)

            drill.at = f"the whole ingest after {kills} kills in {runs} runs"
            since = observer._storage.log_size()
            marks.append(f"ingest-final-{secrets.token_hex(4)}")
            done = subprocess.run(
                command,
                env=drill_vault.environment(marks[-1]),
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
            counts = _summary(done.stdout)
            assert counts["refused"] == 0 and counts["stored"] + counts["already present"] == lines
            assert not _outliving(marks[-1], 10)
            stored = _check_ingest(observer, book, since, set(), killed=False)
            assert len(stored) == lines, f"{len(stored)} of {lines} records stored"
            verified = subprocess.run(
                [sys.executable, "-m", "custodes", "audit", "verify", "--json"],
                env=drill_vault.environment(marks[-1]),
                capture_output=True,
                timeout=120,
                check=False,
            )
            assert verified.returncode == 0, verified.stderr.decode(errors="replace")
            assert orjson.loads(verified.stdout)["checkpoints"] >= runs
    finally:
        observer.close()
        for mark in marks:
            _end_marked(mark)


# -- serving ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Answer:
    """A read that came back 200, whole."""

    request: int  # the number its purpose carries: "crash drill <request>"
    official: str
    action: str
    records: tuple[str, ...]


class _Officials:
    """Officials reading over the API from threads of their own, a new connection each
    time (so that every worker takes some), each 200 noted once its body has come whole."""

    def __init__(
        self, base: str, sessions: list[tuple[str, str]], people: list[tuple[str, str]], seed: int
    ) -> None:
        self._base = base
        self._sessions = sessions
        self._people = people
        self._seed = seed
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self._answers: list[_Answer] = []
        self.unanswered: Counter[str] = Counter()  # what came back instead of a 200
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._read, args=(lane,), name=f"drill-reader-{lane}")
            for lane in range(READERS)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=30)

    def answered(self) -> list[_Answer]:
        with self._lock:
            return list(self._answers)

    def _read(self, lane: int) -> None:
        try:
            self._read_until_stopped(lane)
        except BaseException as exc:  # the test fails on it
            self.errors.append(exc)

    def _read_until_stopped(self, lane: int) -> None:
        rng = random.Random(self._seed * READERS + lane)
        official, token = self._sessions[lane % len(self._sessions)]
        auth = {"Authorization": f"Bearer {token}"}
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(base_url=self._base, headers=auth, timeout=10, limits=limits) as http:
            while not self._stop.is_set():
                with self._lock:
                    request = next(self._numbers)
                national_id, record_id = rng.choice(self._people)
                asked = {"purpose": f"crash drill {request}", "case_ref": CASE}
                try:
                    if request % 2:
                        action = Action.REVEAL.value
                        answer = http.post(
                            f"/api/v1/records/{record_id}/reveal", json={"field": "phone", **asked}
                        )
                    else:
                        action = Action.SEARCH.value
                        values = {"national_id": national_id}
                        answer = http.post(
                            "/api/v1/search",
                            json={
                                "record_type": "person",
                                "index": "national_id",
                                "values": values,
                                **asked,
                            },
                        )
                except httpx.TransportError:
                    # Refused while the server restarts, or cut by a killed worker.
                    self.unanswered["no answer"] += 1
                    self._stop.wait(0.02)
                    continue
                if answer.status_code != 200:
                    self.unanswered[str(answer.status_code)] += 1
                    self._stop.wait(0.02)
                    continue
                body = answer.json()
                if action == Action.SEARCH.value:
                    records = tuple(found["record_id"] for found in body["results"])
                else:
                    records = (body["record_id"],)
                with self._lock:
                    self._answers.append(_Answer(request, official, action, records))


class _Server:
    """One `custodes serve --workers 2` in the background, found again by its mark."""

    def __init__(self, vault: _DrillVault, port: int, output: Path) -> None:
        self.mark = f"serve-{secrets.token_hex(4)}"
        command = [
            *(sys.executable, "-m", "custodes", "serve", "--vault", str(vault.directory)),
            *("--port", str(port), "--workers", "2"),
        ]
        with output.open("ab") as out:
            self.process = subprocess.Popen(
                command, env=vault.environment(self.mark), stdout=out, stderr=subprocess.STDOUT
            )

    def processes(self) -> set[int]:
        """Its two workers and its log sequencer."""
        return _children(self.process.pid)

    def stop(self) -> None:
        """Stop it as its operator would, and see that it stopped cleanly."""
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=60) == 0, "the server did not stop cleanly"
        assert not _outliving(self.mark, 10), "workers outlived a server that stopped"

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        _end_marked(self.mark)


@dataclass
class _Ledger:
    """The drill's reads as the access log has them, by request number."""

    logged: dict[int, list[AccessEntry]] = field(default_factory=dict)
    read_to: int = 0

    def read(self, vault: Vault) -> None:
        for index, entry in vault._log.entries(self.read_to):
            found = re.fullmatch(r"crash drill (\d+)", entry.purpose or "")
            if found:
                self.logged.setdefault(int(found.group(1)), []).append(entry)
            self.read_to = index + 1


def _check_served(
    vault: Vault, drill_vault: _DrillVault, readers: _Officials, ledger: _Ledger
) -> int:
    """Every read answered 200 so far is on the access log, once, as it was answered;
    the log verifies. How many reads were answered."""
    assert not readers.errors, f"a reader failed: {readers.errors[0]!r}"
    answered = readers.answered()  # before the log is read: each entry was durable first
    ledger.read(vault)
    missing = [a.request for a in answered if a.request not in ledger.logged]
    assert not missing, (
        f"{len(missing)} of {len(answered)} reads answered 200 have no entry on the access "
        f"log (requests {missing[:10]})"
    )
    doubled = [n for n, entries in ledger.logged.items() if len(entries) > 1]
    assert not doubled, f"{len(doubled)} requests have several entries (requests {doubled[:10]})"
    for answer in answered:
        [entry] = ledger.logged[answer.request]
        assert (entry.actor, entry.action, entry.outcome, entry.case_ref) == (
            answer.official,
            answer.action,
            Outcome.GRANTED,
            CASE,
        ), f"request {answer.request} was answered as another entry says"
        assert set(entry.records) == set(answer.records), (
            f"request {answer.request} answered with other records than its entry names"
        )
    _audit_verify(drill_vault)
    # The operator signs beside the servers, as `custodes audit checkpoint` would: each
    # signer must extend the others' checkpoints, whoever was killed in between, and a
    # third appender beside two busy workers is never refused for a log that moves.
    vault.checkpoint(vault.operator)
    return len(answered)


def _kill_the_supervisor_and_restart(
    server: _Server, vault: _DrillVault, port: int, output: Path
) -> _Server:
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=10)
    left = _outliving(server.mark, 15)
    assert not left, f"{len(left)} workers went on serving without their killed supervisor"
    again = _Server(vault, port, output)
    _wait_up(f"http://127.0.0.1:{port}", again.process)
    return again


# What `serve --workers 2` runs beside its supervisor: two workers and the log sequencer.
SERVER_PROCESSES = 3


def _kill_a_server_process(server: _Server, rng: random.Random) -> int:
    """SIGKILL one of the server's workers or its log sequencer; its pid."""
    running = sorted(server.processes())
    assert len(running) == SERVER_PROCESSES, f"the server runs {len(running)} processes"
    victim = rng.choice(running)
    os.kill(victim, signal.SIGKILL)
    return victim


def _replaced(server: _Server, victim: int) -> None:
    """Wait until the supervisor has replaced a killed process."""
    deadline = time.monotonic() + 30
    while victim in (now := server.processes()) or len(now) != SERVER_PROCESSES:
        assert server.process.poll() is None, "the server exited after a worker was killed"
        assert time.monotonic() < deadline, "the killed process was not replaced"
        time.sleep(0.05)


def test_audited_serving_killed_at_random_moments_answers_no_read_it_did_not_log(
    drill_vault: _DrillVault, tmp_path: Path
) -> None:
    drill = _Drill()
    source = tmp_path / "people.jsonl"
    with source.open("wb") as f:
        synth_jsonl(f, SERVE_PEOPLE, seed=11)
    national_ids = [
        str(doc["national_id"])
        for doc in map(orjson.loads, source.read_bytes().splitlines())
        if doc.get("type") == "person"
    ]
    vault = drill_vault.open()
    try:
        vault.ingest(vault.operator, source, workers=1)
        people = [(nid, vault._codec.record_id("person", [nid])) for nid in national_ids[:30]]
        sessions = [
            # Reading without pause for minutes: no budget would let them.
            (name, login(vault, Role.INVESTIGATOR, name, budget=NO_LIMITS).token)
            for name in ("t.drill.north", "t.drill.south")
        ]
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        output = tmp_path / "serve.out"
        readers = _Officials(base, sessions, people, drill.seed)
        ledger = _Ledger()
        servers: list[_Server] = []
        with drill.named():
            try:
                servers.append(_Server(drill_vault, port, output))
                _wait_up(base, servers[-1].process)
                readers.start()
                victim = None  # a process killed, and perhaps not yet replaced
                for kill in range(SERVE_KILLS):
                    up = time.monotonic()
                    window = drill.rng.uniform(*SERVE_WINDOW)
                    # Alternately, so that each supervisor loses one worker at most and
                    # replaces it after its first, shortest delay.
                    supervisor = kill % 2 == 1
                    whom = "the supervisor" if supervisor else "a worker or the log sequencer"
                    drill.at = (
                        f"serving, kill {kill + 1} of {SERVE_KILLS} ({whom}) at {window:.3f} s"
                    )
                    if kill:  # the checks after the last kill and restart, while serving
                        _check_served(vault, drill_vault, readers, ledger)
                    while time.monotonic() < up + window:
                        assert servers[-1].process.poll() is None, "the server exited"
                        time.sleep(0.02)
                    if victim is not None:
                        # Replaced after a second, while the other worker served on.
                        _replaced(servers[-1], victim)
                        victim = None
                    if supervisor:
                        servers.append(
                            _kill_the_supervisor_and_restart(servers[-1], drill_vault, port, output)
                        )
                    else:
                        victim = _kill_a_server_process(servers[-1], drill.rng)
                drill.at = f"serving, stopped after {SERVE_KILLS} kills"
                time.sleep(drill.rng.uniform(*SERVE_WINDOW))
                if victim is not None:
                    _replaced(servers[-1], victim)
                readers.stop()
                servers[-1].stop()
                answered = _check_served(vault, drill_vault, readers, ledger)
                assert answered >= SERVE_KILLS, f"only {answered} reads were answered"
                # Connections refused while a server restarts, answers cut by a kill and
                # reads refused because the log could not take their entry (503, nothing
                # returned) are a drill's lot; any other answer is not.
                assert set(readers.unanswered) <= {"no answer", "503"}, readers.unanswered
                verified = subprocess.run(
                    [sys.executable, "-m", "custodes", "audit", "verify", "--json"],
                    env=drill_vault.environment(servers[-1].mark),
                    capture_output=True,
                    timeout=120,
                    check=False,
                )
                assert verified.returncode == 0, verified.stderr.decode(errors="replace")
            finally:
                readers.stop()
                for server in servers:
                    server.close()
    finally:
        vault.close()


# -- found by the drill: audit verify beside a server that appends -------------------------


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_audit_verify_while_another_process_appends_finds_no_tampering(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The drill's `audit verify` beside a busy server on PostgreSQL reported a healthy log
    # as tampered ("the subject index does not match entry N"): the verifier read the
    # subject index, then the log's size, and an entry appended in between (with its
    # subject rows) was read without them. Here the append falls exactly there.
    vault = make_vault(tmp_path, backend)
    try:
        vault.ingest(vault.operator, write_jsonl(tmp_path / "in.jsonl", [person(1)]))
        session = login(vault)

        def search() -> None:
            found = vault.search(
                session,
                PURPOSE,
                record_type="person",
                index="national_id",
                values={"national_id": national_id(1)},
            )
            assert len(found) == 1  # so that its entry names a subject

        search()
        storage = vault._storage
        real_entries = storage.log_entries
        appended: list[int] = []

        def entries_after_an_append(start: int = 0, end: int | None = None) -> Iterator[Any]:
            if not appended:
                search()  # another server's read, logged as the verifier starts reading
                appended.append(storage.log_size())
            return real_entries(start, end)

        monkeypatch.setattr(storage, "log_entries", entries_after_an_append)
        report = verify_log(storage, vault._log.verifier_key)
        assert appended and report.entries == appended[0]
    finally:
        vault.close()


def test_a_stop_whose_exception_a_finalizer_swallowed_still_keeps_a_worker_from_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The drill's serving on PostgreSQL left a worker serving on, its supervisor killed:
    # the SIGTERM of the supervisor's death reached the new worker while the collector
    # ran a connection pool's __del__, and the handler's SystemExit, raised in there, was
    # printed as ignored and dropped. Here the handler runs in a finalizer on purpose.
    monkeypatch.setattr(serve, "_stop", serve._WorkerStop())
    make_vault(tmp_path, "sqlite").close()
    unlocked = unlock_vault(tmp_path / "vault", passphrase=PASSPHRASE)
    dropped: list[type[BaseException]] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda lost: dropped.append(type(lost.exc_value)))

    class Collected:
        def __del__(self) -> None:
            serve._stop_worker(signal.SIGTERM, None)

    Collected()
    assert dropped == [SystemExit]
    listen = serve._Listen("127.0.0.1", _free_port(), None)
    returned = threading.Event()

    def work() -> None:
        serve._run_worker(unlocked, listen, own_socket=True)
        returned.set()

    # In a thread of its own: a worker that starts serving would not come back.
    threading.Thread(target=work, name="drill-worker", daemon=True).start()
    assert returned.wait(30), "the worker started serving after it was told to stop"
