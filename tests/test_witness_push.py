"""Threat 16 after hours: an entry nobody checkpoints by hand still reaches a witness.

A server signs the access log on a timer and sends each signed checkpoint to its witnesses
(`custodes serve --witness URL`), so an insider holding the log key cannot rewrite an
entry made at night before anyone outside has seen it. The push is no official's access:
it puts nothing on the log. A witness that was down is caught up; one left behind is
reported by `custodes doctor`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from custodes.audit.checkpoint import Checkpoint, parse_note, verify_cosignature
from custodes.audit.verify import OutsideCheckpoint
from custodes.audit.witness import Witness
from custodes.audit.witness_server import make_server
from custodes.bootstrap import (
    DeploymentFacts,
    assemble_vault,
    deployment_facts,
    unlock_vault,
    verify_log_files,
)
from custodes.crypto import KdfParams
from custodes.doctor import WITNESS_GRACE, Deployment, Finding, examine
from custodes.policy import AccessPurpose, Role
from custodes.vault import Vault
from tests.conftest import PASSPHRASE, free_port, login, make_vault
from tests.test_cli import run, vault_env  # noqa: F401 - a fixture, used by name

ROUND = 0.1  # seconds between signing rounds here; a server's default is a minute
WAIT = 60.0  # the most any test waits for the push before it fails
WITNESS_PASSPHRASE = "a witness passphrase used only by tests"
WITNESS_NAME = "dpa.test/witness"
NIGHT = AccessPurpose("a lookup nobody else is awake to see", "T-16")
NATIONAL_ID = "11010519491231002X"


def _vault_dir(tmp_path: Path) -> Path:
    return tmp_path / "vault"


@pytest.fixture
def vault(tmp_path: Path) -> Iterator[Vault]:
    v = make_vault(tmp_path, "sqlite")
    yield v
    v.close()


@pytest.fixture
def witness(tmp_path: Path, vault: Vault) -> Witness:
    """An outside body's witness, told this vault's log key (it holds nothing yet)."""
    w = Witness.init(
        tmp_path / "witness",
        name=WITNESS_NAME,
        passphrase=WITNESS_PASSPHRASE,
        kdf=KdfParams(time_cost=2, memory_kib=19_456, parallelism=1),
    )
    w.add_log(vault.log_origin, vault.log_verifier_key)
    return w


@contextmanager
def witness_serving(witness: Witness, port: int) -> Iterator[list[str]]:
    """The witness's real HTTP server on a loopback port, in a thread; yields the paths
    of the requests it answers, as they come."""
    server = make_server(witness, "127.0.0.1", port)
    answered: list[str] = []
    handler = server.RequestHandlerClass

    class Counted(handler):  # type: ignore[valid-type, misc]
        def do_POST(self) -> None:
            answered.append(self.path)
            super().do_POST()

        def log_message(self, format: str, *args: object) -> None:
            pass  # the test's output is not the place for the witness's request log

    server.RequestHandlerClass = Counted
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield answered
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def facts(tmp_path: Path) -> DeploymentFacts:
    found = deployment_facts(_vault_dir(tmp_path))
    assert found is not None
    return found


def held(witness: Witness, vault: Vault) -> int:
    """The size of the latest checkpoint the witness cosigned for the vault's log."""
    note = witness.latest(vault.log_origin)
    return 0 if note is None else Checkpoint.parse_body(parse_note(note)[0]).size


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"still waiting, after {WAIT:.0f}s, for {what}"
        time.sleep(0.05)


def look_up_at_night(vault: Vault, tmp_path: Path, official: str = "night.shift") -> int:
    """An official's search, the last access of the day; the log's size after it."""
    session = login(vault, Role.INVESTIGATOR, official)
    vault.search(
        session,
        NIGHT,
        record_type="person",
        index="national_id",
        values={"national_id": NATIONAL_ID},
    )
    return facts(tmp_path).log_size


def witness_lines(note: bytes) -> list[str]:
    return [
        line + "\n"
        for line in note.decode("utf-8").splitlines()
        if line.startswith(f"\N{EM DASH} {WITNESS_NAME} ")
    ]


def test_an_entry_made_at_night_reaches_the_witness_without_an_operator(
    tmp_path: Path, vault: Vault, witness: Witness
) -> None:
    port = free_port()
    with witness_serving(witness, port):
        vault.keep_signing(every=ROUND, witnesses=[f"http://127.0.0.1:{port}/"])
        size = look_up_at_night(vault, tmp_path)
        wait_for(lambda: held(witness, vault) >= size, "the witness to cosign the lookup")

    # What the witness holds covers the lookup and matches the log: an insider who now
    # rewrote the entry, even re-signing every checkpoint, would be caught against it.
    outside = OutsideCheckpoint("the witness", witness.latest(vault.log_origin) or b"")
    report = verify_log_files(
        _vault_dir(tmp_path), log_key=vault.log_verifier_key, outside=[outside]
    )
    assert report.outside == 1 and report.latest_signed >= size
    # And the vault keeps the cosignature beside its own checkpoint, as `audit witness` does.
    witnessed = held(witness, vault)
    stored = dict(facts(tmp_path).checkpoints)[witnessed]
    [line] = witness_lines(stored)
    assert verify_cosignature(witness.verifier_key, parse_note(stored)[0], line) > 0


def test_the_first_lookup_after_a_quiet_spell_reaches_the_witness(
    tmp_path: Path, vault: Vault, witness: Witness
) -> None:
    # After an idle spell the access itself is due a checkpoint and signs it as it is
    # appended: the timer then finds nothing left to sign, and must still hand it on.
    port = free_port()
    with witness_serving(witness, port):
        vault.keep_signing(every=ROUND, witnesses=[f"http://127.0.0.1:{port}/"])
        session = login(vault, Role.INVESTIGATOR, "night.shift")
        size = facts(tmp_path).log_size
        wait_for(lambda: held(witness, vault) >= size, "the witness to cosign the login")
        later = time.time() + 120  # past the log's minute between checkpoints
        vault._clock.moved = lambda: later  # type: ignore[attr-defined]
        vault.search(
            session,
            NIGHT,
            record_type="person",
            index="national_id",
            values={"national_id": NATIONAL_ID},
        )
        assert facts(tmp_path).signed_size == size + 1  # signed by its own append
        wait_for(lambda: held(witness, vault) > size, "the witness to cosign the lookup")


def test_a_witness_that_was_down_is_caught_up_when_it_returns(
    tmp_path: Path, vault: Vault, witness: Witness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="custodes.witness")
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    vault.keep_signing(every=ROUND, witnesses=[url])
    size = look_up_at_night(vault, tmp_path)

    def failures() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.levelno >= logging.ERROR]

    # The lookup is signed while the witness is away, and every failed push is loud.
    wait_for(lambda: facts(tmp_path).signed_size >= size, "the lookup to be signed")
    wait_for(lambda: len(failures()) >= 2, "the failed pushes to be logged, twice")
    assert witness.latest(vault.log_origin) is None
    for record in failures():
        message = record.getMessage()
        assert url in message and "StorageError" in message
        assert NATIONAL_ID not in message and NIGHT.reason not in message

    with witness_serving(witness, port):
        wait_for(lambda: held(witness, vault) >= size, "the returning witness to catch up")
    assert any("caught up" in r.getMessage() for r in caplog.records)


def test_the_push_puts_nothing_on_the_log_and_stops_once_the_witness_holds_it(
    tmp_path: Path, vault: Vault, witness: Witness
) -> None:
    port = free_port()
    with witness_serving(witness, port) as answered:
        vault.keep_signing(every=ROUND, witnesses=[f"http://127.0.0.1:{port}/"])
        size = look_up_at_night(vault, tmp_path)
        wait_for(lambda: held(witness, vault) >= size, "the witness to cosign the lookup")
        asked = len(answered)
        # Idle: many rounds pass, and nothing is appended, signed or sent. An entry per
        # push would make a new checkpoint due, and the log would grow forever.
        time.sleep(20 * ROUND)
        assert facts(tmp_path).log_size == size
        assert held(witness, vault) == size
        assert len(answered) == asked
    assert facts(tmp_path).signed_size == size


def test_server_processes_sharing_a_log_push_the_same_checkpoint_harmlessly(
    tmp_path: Path, vault: Vault, witness: Witness, caplog: pytest.LogCaptureFixture
) -> None:
    # `custodes serve --workers 2`: two vaults on one directory, each signing and pushing.
    caplog.set_level(logging.WARNING, logger="custodes.witness")
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    other = assemble_vault(unlock_vault(_vault_dir(tmp_path), passphrase=PASSPHRASE))
    try:
        with witness_serving(witness, port):
            vault.keep_signing(every=ROUND, witnesses=[url])
            other.keep_signing(every=ROUND, witnesses=[url])
            look_up_at_night(vault, tmp_path)
            wait_for(
                lambda: held(witness, vault) >= facts(tmp_path).log_size > 0,
                "the witness to cosign everything both processes logged",
            )
            time.sleep(10 * ROUND)  # rounds in which both have seen the same checkpoint
    finally:
        other.close()
    assert witness.evidence() == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    # Asked twice, the witness cosigned twice; the note stored keeps one line of it.
    size = held(witness, vault)
    assert len(witness_lines(dict(facts(tmp_path).checkpoints)[size])) == 1


def _witness_findings(tmp_path: Path, *, now: float) -> dict[str, Finding]:
    found = examine(Deployment(vault_dir=_vault_dir(tmp_path), listeners=list, now=now))
    return {f.check: f for f in found if f.check in ("log:unwitnessed", "log:witness-behind")}


def test_a_witness_left_behind_is_reported_by_doctor(
    tmp_path: Path, vault: Vault, witness: Witness
) -> None:
    look_up_at_night(vault, tmp_path)
    vault.checkpoint(vault.operator)
    assert "log:unwitnessed" in _witness_findings(tmp_path, now=time.time())

    port = free_port()
    with witness_serving(witness, port):
        cosigned = vault.publish_checkpoint(vault.operator, f"http://127.0.0.1:{port}/")
    # The witness goes away; the log is signed on without it.
    look_up_at_night(vault, tmp_path, "next.night")
    vault.checkpoint(vault.operator)
    signed = facts(tmp_path).signed_size
    assert signed > cosigned

    # Within the grace a push may still be on its way; after it, the lag is a finding.
    assert _witness_findings(tmp_path, now=time.time()) == {}
    later = _witness_findings(tmp_path, now=time.time() + 2 * WITNESS_GRACE)
    [finding] = later.values()
    assert finding.check == "log:witness-behind"
    assert WITNESS_NAME in finding.message and f"size {cosigned:,}" in finding.message
    assert f"{signed - cosigned:,} entries" in finding.message


def test_serve_refuses_a_witness_beyond_loopback_before_asking_anything(
    vault_env: dict[str, str],  # noqa: F811 - the fixture
) -> None:
    done = run("serve", "--witness", "http://192.0.2.7:7380/", env=vault_env)
    assert done.returncode == 2 and "--witness" in done.stderr and "loopback" in done.stderr
    assert done.stdout == ""


def test_signing_again_at_the_same_size_keeps_the_witnesses_cosignatures(
    vault: Vault, witness: Witness, tmp_path: Path
) -> None:
    # A server's pusher cosigned the latest checkpoint (and put nothing on the log); an
    # operator's `audit checkpoint` then has nothing new to sign. It must hand back the
    # cosigned note, not store the bare one over it: a witness's word would be lost.
    look_up_at_night(vault, tmp_path)
    note = vault._log.checkpoint()
    size = vault._log.size
    port = free_port()
    with witness_serving(witness, port):
        vault._witness(f"http://127.0.0.1:{port}/", note)
    cosigned = dict(vault._storage.checkpoints())[size]
    assert witness_lines(cosigned)
    assert vault._log.checkpoint() == cosigned
    assert dict(vault._storage.checkpoints())[size] == cosigned
