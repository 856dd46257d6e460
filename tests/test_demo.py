"""`custodes demo` as a newcomer meets it: run twice in one folder, it asks before it
replaces anything (refuses without --force when no one is at a terminal); all it makes
stays in its folder, keys included; Ctrl-C on its server is an ordinary end.

Each run is a process of its own with a fresh home, as a person runs it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

SRC = Path(__file__).resolve().parents[1] / "src"


def fresh_env(tmp_path: Path) -> dict[str, str]:
    """A home and XDG directories of their own, inside tmp_path, and no CUSTODES_ variable."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CUSTODES_", "XDG_")) and k != "HOME"
    }
    # This checkout's code, wherever the command runs from.
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [env.get("PYTHONPATH")])])
    home = tmp_path / "home"
    home.mkdir()
    env["HOME"] = str(home)
    for name, sub in (
        ("XDG_CONFIG_HOME", ".config"),
        ("XDG_DATA_HOME", ".local/share"),
        ("XDG_CACHE_HOME", ".cache"),
        ("XDG_STATE_HOME", ".local/state"),
    ):
        env[name] = str(home / sub)
    return env


def demo(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "custodes", "demo", "--count", "10", "--no-serve", *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def listing(root: Path, *, leaving_out: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.is_relative_to(leaving_out)}


def password_of(output: str, user: str) -> str:
    found = re.search(rf"CUSTODES_USER={re.escape(user)}\s+export CUSTODES_PASSWORD=(\S+)", output)
    assert found is not None, output
    return found[1]


def test_a_second_demo_in_the_same_folder_is_refused_without_force_and_replaced_with_it(
    tmp_path: Path,
) -> None:
    env = fresh_env(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    folder = work / "custodes-demo"
    before = listing(tmp_path, leaving_out=folder)

    first = demo(work, env)
    assert first.returncode == 0, first.stderr
    investigator = password_of(first.stdout, "demo.investigator")
    auditor = password_of(first.stdout, "demo.auditor")
    assert investigator != auditor
    keyring = (folder / "keys" / "demo.keyring").read_bytes()

    again = demo(work, env)
    assert again.returncode != 0
    assert "already holds a demo" in again.stderr and "--force" in again.stderr, again.stderr
    assert (folder / "keys" / "demo.keyring").read_bytes() == keyring  # left as it was

    forced = demo(work, env, "--force")
    assert forced.returncode == 0, forced.stderr
    assert password_of(forced.stdout, "demo.investigator") != investigator

    # Every file the demo made, the keys and the log's signing key included, is in its folder.
    assert listing(tmp_path, leaving_out=folder) == before
    assert {"demo.keyring", "demo-log.key"} <= {p.name for p in (folder / "keys").iterdir()}


def test_a_demo_never_replaces_a_folder_it_did_not_make(tmp_path: Path) -> None:
    env = fresh_env(tmp_path)
    (tmp_path / "custodes-demo").mkdir()
    (tmp_path / "custodes-demo" / "notes.txt").write_text("mine")
    done = demo(tmp_path, env, "--force")
    assert done.returncode != 0 and "not a custodes demo" in done.stderr
    assert (tmp_path / "custodes-demo" / "notes.txt").read_text() == "mine"


def _wait_for_port(port: int, process: subprocess.Popen[str], seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the demo ended before serving: {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.2)
    pytest.fail("the demo's server did not start")


def test_ctrl_c_on_the_demos_server_stops_it_with_exit_0_not_an_abort(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "custodes", "demo", "--count", "10", "--port", str(port)],
        cwd=tmp_path,
        env=fresh_env(tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_port(port, process)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr
    assert "the demo's server stopped" in stdout
    assert "aborted" not in stderr + stdout and "interrupted" not in stderr + stdout


def _demo_at_a_terminal(cwd: Path, env: dict[str, str], answer: str) -> tuple[int, str]:
    """The demo run in a terminal (a pseudo-terminal), answering its question."""
    import pty
    import select

    main, side = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "custodes", "demo", "--count", "10", "--no-serve"],
        cwd=cwd,
        env=env,
        stdin=side,
        stdout=side,
        stderr=side,
    )
    os.close(side)
    shown = b""
    answered = False
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(main, 65536)
                except OSError:  # the terminal closed: the demo has ended
                    break
                if not chunk:
                    break
                shown += chunk
            if not answered and b"Replace it?" in shown:
                os.write(main, answer.encode() + b"\n")
                answered = True
            if process.poll() is not None and not ready:
                break
        code = process.wait(timeout=30)
    finally:
        os.close(main)
        if process.poll() is None:
            process.kill()
            process.wait()
    assert answered, shown.decode(errors="replace")
    return code, shown.decode(errors="replace")


def test_a_second_demo_at_a_terminal_asks_before_replacing_the_first(tmp_path: Path) -> None:
    env = fresh_env(tmp_path)
    first = demo(tmp_path, env)
    assert first.returncode == 0, first.stderr
    keyring = tmp_path / "custodes-demo" / "keys" / "demo.keyring"
    kept = keyring.read_bytes()

    code, shown = _demo_at_a_terminal(tmp_path, env, "n")
    assert code == 0 and "already holds a demo" in shown and "kept as it was" in shown
    assert keyring.read_bytes() == kept

    code, shown = _demo_at_a_terminal(tmp_path, env, "y")
    assert code == 0, shown
    assert keyring.read_bytes() != kept
