"""Crash drills on `custodes serve --workers N`: a supervisor killed outright, workers
killed again and again, a second server started on a port already served, and faults
that no restart can mend.

A flaw here leaves workers answering with no one watching them, a server that exits for
good after a bad minute, or two servers sharing one port's connections unknowingly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from custodes.bootstrap import create_vault
from custodes.settings import VaultLayout
from custodes.web import serve
from tests.conftest import FAST_HASH, FAST_KDF, PASSPHRASE
from tests.test_shared_vault import _children, _free_port, _is_sequencer, _wait_up

linux_only = pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="needs Linux /proc and PR_SET_PDEATHSIG"
)


def _new_vault(directory: Path, keys: Path) -> Path:
    create_vault(
        directory,
        passphrase=PASSPHRASE,
        keyring_path=keys / "drill.keyring",
        log_key_path=keys / "drill.logkey",
        kdf=FAST_KDF,
        hash_cost=FAST_HASH,
    ).close()
    return directory


@pytest.fixture
def vault(tmp_path: Path) -> Path:
    """An empty vault on disk, closed: the servers of each drill open it for themselves."""
    return _new_vault(tmp_path / "vault", tmp_path / "keys")


def _command(vault: Path, port: int, workers: int, *extra: str) -> list[str]:
    return [
        *(sys.executable, "-m", "custodes", "serve", "--vault", str(vault)),
        *("--port", str(port), "--workers", str(workers), *extra),
    ]


def _environment() -> dict[str, str]:
    return {**os.environ, "CUSTODES_KEYRING_PASSPHRASE": PASSPHRASE}


class _Running:
    """A `custodes serve` in the background, and every worker it was seen with."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self.pid = process.pid
        self.seen: set[int] = set()

    def processes(self) -> set[int]:
        """Every child of the supervisor: its workers and its log sequencer."""
        now = _children(self.pid)
        self.seen |= now
        return now

    def workers(self) -> set[int]:
        return {pid for pid in self.processes() if not _is_sequencer(pid)}

    def sequencer(self) -> int | None:
        return next((pid for pid in self.processes() if _is_sequencer(pid)), None)

    def poll(self) -> int | None:
        return self.process.poll()


@contextlib.contextmanager
def _server(vault: Path, port: int, log: Path, workers: int = 2) -> Iterator[_Running]:
    """`custodes serve` running in the background, its output in `log`; stopped at the end,
    and any worker seen in it killed should the drill have left one behind."""
    command = _command(vault, port, workers)
    with log.open("ab") as output:
        process = subprocess.Popen(
            command, env=_environment(), stdout=output, stderr=subprocess.STDOUT
        )
    running = _Running(process)
    try:
        yield running
    finally:
        if process.poll() is None:
            running.workers()
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        argv = b"".join(os.fsencode(part) + b"\0" for part in command)
        for pid in _living(running.seen):
            # A worker is a fork of the server, with its command line; another is not ours.
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/cmdline").read_bytes() == argv:
                    os.kill(pid, signal.SIGKILL)


def _living(pids: set[int]) -> set[int]:
    """The processes among `pids` that still run (a zombie has ended)."""
    living = set()
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z":
            living.add(pid)
    return living


def _port_is_free(port: int) -> bool:
    """Whether a server could listen on the port now: nothing else listens there."""
    probe = socket.socket()
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
        probe.listen(1)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _answers(base: str, times: int = 20) -> bool:
    """Whether every one of `times` new connections is answered (401: no session)."""
    return all(httpx.get(f"{base}/api/v1/me", timeout=30).status_code == 401 for _ in range(times))


def _one_line(text: bytes) -> str:
    return " ".join(text.decode().split())  # the console wraps long lines


@linux_only
def test_a_killed_supervisor_takes_its_workers_with_it_and_frees_the_port_for_a_restart(
    vault: Path, tmp_path: Path
) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with _server(vault, port, tmp_path / "first.log") as server:
        _wait_up(base, server.process)
        children = server.processes()
        assert len(server.workers()) == 2 and server.sequencer() in children
        os.kill(server.pid, signal.SIGKILL)  # no handler, no cleanup
        server.process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _living(children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _living(children) == set(), "workers went on serving without their supervisor"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/api/v1/me", timeout=5)
        assert _port_is_free(port)
    # The killed supervisor's lock does not outlive it: the server starts again at once.
    with _server(vault, port, tmp_path / "again.log") as again:
        _wait_up(base, again.process)
        assert _answers(base)


@linux_only
@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_server_on_a_port_already_served_is_refused_and_the_first_keeps_answering(
    vault: Path, tmp_path: Path, workers: int
) -> None:
    # Workers listen under SO_REUSEPORT, which would let a second server of the same user
    # join the port and take a share of the first one's connections.
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with _server(vault, port, tmp_path / "first.log") as first:
        _wait_up(base, first.process)
        serving = first.workers()
        second = subprocess.run(
            _command(vault, port, workers),
            env=_environment(),
            capture_output=True,
            timeout=60,
        )
        assert second.returncode == 2
        refusal = _one_line(second.stderr)
        assert f"port {port} on 127.0.0.1 is held by another custodes server" in refusal
        assert f"(process {first.pid})" in refusal
        assert b"serving on" not in second.stdout
        assert b"Started server process" not in second.stderr
        assert _answers(base)
        assert first.poll() is None
        assert first.workers() == serving


@linux_only
def test_a_server_of_another_vault_on_a_port_already_served_is_refused(
    vault: Path, tmp_path: Path
) -> None:
    # Another vault has a lock file of its own; the port itself is found busy.
    other = _new_vault(tmp_path / "other-vault", tmp_path / "other-keys")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with _server(vault, port, tmp_path / "first.log") as first:
        _wait_up(base, first.process)
        second = subprocess.run(
            _command(other, port, 2), env=_environment(), capture_output=True, timeout=60
        )
        assert second.returncode == 2
        refusal = _one_line(second.stderr)
        assert f"port {port} on 127.0.0.1 is in use: another custodes server" in refusal
        assert b"serving on" not in second.stdout
        assert _answers(base)
        assert first.poll() is None


def _replacements(server: _Running, killed: set[int], within: float) -> dict[int, float]:
    """The workers started in place of `killed`, each with when it was first seen."""
    seen: dict[int, float] = {}
    deadline = time.monotonic() + within
    while len(seen) < len(killed) and time.monotonic() < deadline:
        assert server.poll() is None, "the server gave up and exited"
        now = time.monotonic()
        for pid in server.workers() - killed:
            seen.setdefault(pid, now)
        time.sleep(0.05)
    assert len(seen) == len(killed), "killed workers were not replaced"
    return seen


@linux_only
def test_workers_killed_again_and_again_come_back_ever_slower_and_the_server_never_gives_up(
    vault: Path, tmp_path: Path
) -> None:
    # Eight deaths within half a minute: a server that counted them and gave up after
    # five would have exited, serving no one until someone noticed.
    rounds = 4
    assert serve.RESTART_DELAY * 2 ** (rounds - 1) < serve.RESTART_DELAY_MAX
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    with _server(vault, port, log) as server:
        _wait_up(base, server.process)
        workers = server.workers()
        assert len(workers) == 2
        for n in range(rounds):
            delay = serve.RESTART_DELAY * 2**n
            killed_at = time.monotonic()
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            started = _replacements(server, workers, within=delay + 15)
            # Each replacement waited out the delay, doubled from the round before.
            assert all(at - killed_at >= delay for at in started.values()), (delay, started)
            workers = set(started)
        _wait_up(base, server.process)
        assert _answers(base)
        assert server.poll() is None
    said = _one_line(log.read_bytes())
    for n in range(rounds):
        restart = (
            f"exited (killed by SIGKILL); starting another in {serve.RESTART_DELAY * 2**n:g} s"
        )
        assert said.count(restart) == 2, restart


def test_a_certificate_that_cannot_load_stops_the_server_at_once_not_in_endless_restarts(
    vault: Path, tmp_path: Path
) -> None:
    # Restarts never give up, so what no restart can mend must stop the server before
    # its first worker: here a key that is not a key.
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    key.write_text("not a key\n")
    done = subprocess.run(
        _command(vault, _free_port(), 2, "--tls-cert", str(cert), "--tls-key", str(key)),
        env=_environment(),
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "cannot use the TLS certificate and key" in _one_line(done.stderr)
    assert b"serving on" not in done.stdout
    assert b"Started server process" not in done.stderr


def test_a_vault_that_cannot_open_stops_the_server_at_once_not_in_endless_restarts(
    vault: Path,
) -> None:
    # A setting edited behind the vault's back: every worker would stop at its start.
    with sqlite3.connect(VaultLayout(vault).database, isolation_level=None) as edit:
        edit.execute("UPDATE meta SET value = ? WHERE key = 'expected_population'", (b"1000",))
    edit.close()
    done = subprocess.run(
        _command(vault, _free_port(), 2), env=_environment(), capture_output=True, timeout=60
    )
    assert done.returncode == 4  # TamperDetected
    assert "expected_population" in _one_line(done.stderr)
    assert b"serving on" not in done.stdout
    assert b"Started server process" not in done.stderr
