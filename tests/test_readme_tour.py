"""The first hour: every shell block of README.md runs as written, in order, in an empty
folder with a home of its own, and every command exits 0.

The test reads the README; the tour is never copied here. What it changes, all listed
below and nothing else: the set-up line (this checkout's installed environment stands in
for a new `.venv`), the test suite's line (collected, not run: it holds this test), the
placeholders in angle brackets (filled in from what earlier commands printed, as a reader
would), and the one prompt a reader answers (the app's first code, in `account mfa`).
Servers the README starts are run in the background, stopped as a person stops them
(Ctrl-C, by pid) when another takes their port or at the end, and must then exit 0.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pyotp
import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FENCE = re.compile(r"^```(?:sh|bash|console|shell)\n(.*?)^```", re.M | re.S)

# The one set-up line, and what stands in for it: a `.venv` whose python and custodes are
# this test's interpreter running this checkout, and whose activate puts them on PATH.
SET_UP = "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]'"
# The suite's line is collected (every test found, the configuration read), not run.
SUITE = "python -m pytest -q"
# What each placeholder becomes (see Tour.fill).
PLACEHOLDERS = (
    "<enrolment code>",
    "<code from the app>",
    "<record id>",
    "<export id>",
    "<erasure id>",
)
# The prompt a reader answers at the terminal, answered with the app's code for the key the
# same command printed.
APP_CODE_PROMPT = "Code the app shows now"
# Commands that serve until Ctrl-C, on --port or 8000.
SERVERS = ("custodes serve", "custodes demo")
DEFAULT_PORT = 8000
COMMAND_TIMEOUT = 180.0


@dataclass(frozen=True)
class Command:
    block: int  # 1-based, counting the README's shell blocks
    line: int  # the README line where the command starts
    text: str

    def __str__(self) -> str:
        return f"README.md block {self.block}, line {self.line}: {self.text}"


def commands(readme: str) -> list[Command]:
    """Every command of every shell block, continuation lines joined, comments left in."""
    found = []
    for number, block in enumerate(FENCE.finditer(readme), start=1):
        first_line = readme.count("\n", 0, block.start(1)) + 1
        pending: list[str] = []
        start = 0
        for offset, line in enumerate(block[1].splitlines()):
            if not pending:
                start = first_line + offset
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
            if line.endswith("\\"):
                pending.append(line[:-1])
                continue
            found.append(Command(number, start, " ".join([*pending, line]).strip()))
            pending = []
    return found


def _words(text: str) -> list[str]:
    """The command's words, without its leading VAR=value assignments and its comment."""
    words = shlex.split(text, comments=True)
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
        words.pop(0)
    return words


def serves_on(text: str) -> int | None:
    """The port a command serves on until Ctrl-C, or None if it does not serve."""
    words = _words(text)
    if not any(" ".join(words).startswith(s) for s in SERVERS) or "--no-serve" in words:
        return None
    return int(words[words.index("--port") + 1]) if "--port" in words else DEFAULT_PORT


@dataclass
class Server:
    command: Command
    port: int
    process: subprocess.Popen[bytes]
    log: Path


@dataclass
class Tour:
    """One reader's terminal: the folder, the environment `export` changes, what was
    printed so far, and the servers left running."""

    folder: Path
    env: dict[str, str]
    printed: list[tuple[Command, str]] = field(default_factory=list)
    servers: list[Server] = field(default_factory=list)
    app_keys: dict[str, str] = field(default_factory=dict)  # account -> TOTP key
    last_step: dict[str, int] = field(default_factory=dict)  # account -> code step used

    # -- placeholders, each from what an earlier command printed ---------------------

    def _last(self, pattern: str, of: Callable[[Command], bool]) -> str:
        """What the most recent command of a kind printed, as a reader copies it: from
        that command only, never an older one."""
        for command, output in reversed(self.printed):
            if of(command):
                found = re.findall(pattern, output)
                assert found, f"{command}\nprinted nothing matching {pattern!r}:\n{output}"
                return str(found[0])
        raise AssertionError(f"no command so far prints what {pattern!r} matches")

    def app_code(self, account: str) -> str:
        """The code the account's app shows now: a code is taken once, so if this time
        step's was used, the next step's (the server takes one step either side), or else
        wait for a step that has not been."""
        totp = pyotp.TOTP(self.app_keys[account])
        used = self.last_step.get(account, -1)
        while True:
            now = int(time.time() // 30)
            step = next((s for s in (now, now + 1) if s > used), None)
            if step is not None:
                self.last_step[account] = step
                return totp.at(step * 30)
            time.sleep(1)

    def fill(self, command: Command) -> str:
        text = command.text
        if "<enrolment code>" in text:
            code = self._last(
                r"enrolment code \(one use, valid 24 h\): (\S+)", lambda c: "account add" in c.text
            )
            text = text.replace("<enrolment code>", code)
        if "<code from the app>" in text:
            text = text.replace("<code from the app>", self.app_code(self.env["CUSTODES_USER"]))
        if "<record id>" in text:
            record = self._last(r"\b[a-z2-7]{24}\b", lambda c: " search " in f" {c.text} ")
            text = text.replace("<record id>", record)
        if "<export id>" in text:
            export = self._last(r"\b[0-9a-f]{32}\b", lambda c: "export request" in c.text)
            text = text.replace("<export id>", export)
        if "<erasure id>" in text:
            erasure = self._last(r"erasure ([0-9a-f]{32}):", lambda c: "erase request" in c.text)
            text = text.replace("<erasure id>", erasure)
        leftover = re.findall(r"<[a-z][a-z ]+>", text)
        assert not leftover, f"{command}: no rule fills {leftover}"
        return text

    # -- running ---------------------------------------------------------------------

    def run(self, command: Command) -> None:
        if command.text == SET_UP:
            self._stand_in_environment()
            return
        if command.text == SUITE:
            self._collect_suite(command)
            return
        text = self.fill(command)
        port = serves_on(text)
        if port is not None:
            self._serve(command, text, port)
            return
        env_file = self.folder.parent / "env.after"
        script = f'{text}\n__rc=$?\nenv -0 > "{env_file}"\nexit $__rc\n'
        output, code = self._talk(command, ["bash", "-c", script])
        self.printed.append((command, output))
        if code != 0:
            pytest.fail(f"{command}\nexited {code}:\n{output[-3000:]}")
        pairs = env_file.read_bytes().split(b"\0")
        self.env = dict(p.decode().split("=", 1) for p in pairs if b"=" in p)

    def _talk(self, command: Command, argv: list[str]) -> tuple[str, int]:
        """Run one command, answering the app-code prompt the way a reader would."""
        process = subprocess.Popen(
            argv,
            cwd=self.folder,
            env={**self.env, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert process.stdin is not None and process.stdout is not None
        chunks: list[bytes] = []
        reader = threading.Thread(target=_drain, args=(process.stdout, chunks), daemon=True)
        reader.start()
        deadline = time.monotonic() + COMMAND_TIMEOUT
        answered = False
        while process.poll() is None:
            if time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"{command}\ndid not finish:\n{b''.join(chunks).decode()[-3000:]}")
            shown = b"".join(chunks).decode(errors="replace")
            if not answered and APP_CODE_PROMPT in shown:
                key = re.search(
                    r"account: (\S+)\s+key \(to type instead of scanning\): (\w+)", shown
                )
                assert key is not None, f"{command}: the prompt came without a key"
                self.app_keys[key[1]] = key[2]
                process.stdin.write(f"{self.app_code(key[1])}\n".encode())
                process.stdin.close()
                answered = True
            time.sleep(0.05)
        reader.join(timeout=10)
        process.stdout.close()
        if not answered:
            process.stdin.close()
        return b"".join(chunks).decode(errors="replace"), process.returncode

    def _serve(self, command: Command, text: str, port: int) -> None:
        for running in [s for s in self.servers if s.port == port]:
            self.stop(running)  # the reader presses Ctrl-C before serving on its port
        if _port_taken(port):
            pytest.fail(f"{command}\nport {port} is taken by something outside this test")
        log = self.folder.parent / f"server-{command.line}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                ["bash", "-c", f"exec {text}"],
                cwd=self.folder,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = Server(command, port, process, log)
        self.servers.append(server)
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while not _port_taken(port):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{command}\ndid not serve:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        self.printed.append((command, log.read_text()))

    def stop(self, server: Server) -> None:
        """Ctrl-C, as the reader ends it: SIGINT to the server's process group."""
        self.servers.remove(server)
        if server.process.poll() is None:
            os.killpg(server.process.pid, signal.SIGINT)
        try:
            code = server.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()
            pytest.fail(f"{server.command}\ndid not stop on Ctrl-C")
        if code != 0:
            pytest.fail(
                f"{server.command}\nexited {code} on Ctrl-C:\n{server.log.read_text()[-3000:]}"
            )

    def stop_all(self) -> None:
        while self.servers:
            self.stop(self.servers[-1])

    def kill_all(self) -> None:
        for server in self.servers:
            if server.process.poll() is None:
                os.killpg(server.process.pid, signal.SIGKILL)
                server.process.wait()

    # -- the two stand-ins -----------------------------------------------------------

    def _stand_in_environment(self) -> None:
        """What the set-up line would make, from this test's interpreter and checkout."""
        bin_dir = self.folder / ".venv" / "bin"
        bin_dir.mkdir(parents=True)
        src = REPO / "src"
        for name, run in (("python", ""), ("custodes", " -m custodes")):
            path = bin_dir / name
            path.write_text(
                "#!/bin/sh\n"
                f"PYTHONPATH={shlex.quote(str(src))}${{PYTHONPATH:+:$PYTHONPATH}} exec "
                f'{shlex.quote(sys.executable)}{run} "$@"\n'
            )
            path.chmod(0o755)
        (bin_dir / "activate").write_text(
            f"VIRTUAL_ENV={shlex.quote(str(bin_dir.parent))}\nexport VIRTUAL_ENV\n"
            f'PATH="$VIRTUAL_ENV/bin:$PATH"\nexport PATH\n'
        )

    def _collect_suite(self, command: Command) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider"],
            cwd=REPO,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            pytest.fail(f"{command}\ncollecting the suite failed:\n{done.stdout[-3000:]}")


def _drain(stream: IO[bytes], chunks: list[bytes]) -> None:
    fd = stream.fileno()
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)


def _port_taken(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def fresh_environment(home: Path) -> dict[str, str]:
    """The reader's environment: a home of its own, and nothing of custodes's or of a
    virtual environment from outside."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CUSTODES_", "XDG_", "PYTEST_"))
        and k not in {"HOME", "VIRTUAL_ENV", "PYTHONPATH", "COLUMNS"}
    }
    env["HOME"] = str(home)
    for name, sub in (
        ("XDG_CONFIG_HOME", ".config"),
        ("XDG_DATA_HOME", ".local/share"),
        ("XDG_CACHE_HOME", ".cache"),
        ("XDG_STATE_HOME", ".local/state"),
        ("XDG_RUNTIME_DIR", "run"),
    ):
        env[name] = str(home / sub)
    (home / "run").mkdir(parents=True, mode=0o700)
    return env


@pytest.fixture
def tour(tmp_path: Path) -> Iterator[Tour]:
    folder = tmp_path / "folder"
    folder.mkdir()
    reader = Tour(folder, fresh_environment(tmp_path / "home"))
    try:
        yield reader
    finally:
        reader.kill_all()


@pytest.mark.slow  # about a minute and a half: the demo's 100,000 people, each keyring unlock
def test_every_command_of_the_readme_runs_as_written_in_an_empty_folder(tour: Tour) -> None:
    tour_commands = commands(README.read_text("utf-8"))
    texts = [c.text for c in tour_commands]
    # The exceptions above are the README's own lines, each once.
    assert texts.count(SET_UP) == 1 and texts.count(SUITE) == 1
    # Set up puts custodes in .venv only: no command may use it before activating.
    activated = texts.index(". .venv/bin/activate")
    assert not [t for t in texts[:activated] if _words(t)[:1] == ["custodes"]]
    for command in tour_commands:
        tour.run(command)
    tour.stop_all()


def test_the_readme_runner_names_the_block_and_line_of_a_failing_command(tmp_path: Path) -> None:
    text = (
        "Intro.\n\n```sh\ntrue\n```\n\nMore.\n\n```bash\necho one \\\n  two\nfalse   # fails\n```\n"
    )
    found = commands(text)
    assert [(c.block, c.line, c.text) for c in found] == [
        (1, 4, "true"),
        (2, 10, "echo one    two"),
        (2, 12, "false   # fails"),
    ]
    (tmp_path / "folder").mkdir()
    reader = Tour(tmp_path / "folder", fresh_environment(tmp_path / "home"))
    reader.run(found[0])
    with pytest.raises(pytest.fail.Exception, match=re.escape("README.md block 2, line 12: false")):
        reader.run(found[2])


def test_placeholders_are_filled_only_by_the_listed_rules(tmp_path: Path) -> None:
    reader = Tour(tmp_path, {})
    unknown = Command(1, 1, "custodes show '<some id>'")
    with pytest.raises(AssertionError, match="no rule fills"):
        reader.fill(unknown)
    assert all(p in README.read_text("utf-8") for p in PLACEHOLDERS)
