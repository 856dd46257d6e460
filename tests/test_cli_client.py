"""An official's command line as a client of the running server: one login with password
and one-time code, then searches and reveals with no keyring and no vault on the
official's side; and every way a missing, ended or unreachable session is refused.

Each command runs as a user runs it: a separate process, secrets in the environment.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from custodes.policy import Role
from custodes.sessions import IDLE_TIMEOUT
from custodes.vault import Vault
from custodes.web.serve import self_signed
from tests.conftest import PASSWORD, enrol, free_port, make_vault, serving, totp_code

# Not an environment variable custodes reads: run() turns it into a fresh CUSTODES_TOTP,
# as an official would type the current code from an authenticator app.
TOTP_SECRET = "test:totp-secret"
NOT_LOGGED_IN = "custodes: error: not logged in: run 'custodes login --server URL'\n"
SESSION_ENDED = (
    "custodes: error: not logged in or the session has ended: run 'custodes login --server URL'\n"
)
# Modules that hold or open keys and vaults: a client command loads none of them.
KEY_CODE = ("custodes.bootstrap", "custodes.crypto", "custodes.storage", "custodes.vault")


def run(
    *args: str, env: dict[str, str] | None = None, input: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    """`custodes ARGS` in a process of its own, with only the CUSTODES_ variables given."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTODES_")}
    full_env.update(env or {})
    secret = full_env.pop(TOTP_SECRET, None)
    # Only a login reads a code; handing out one per command would use up the window's.
    if secret is not None and args[:1] == ("login",):
        full_env["CUSTODES_TOTP"] = totp_code(secret)
    return subprocess.run(
        [sys.executable, "-m", "custodes", *args],
        capture_output=True,
        text=True,
        env=full_env,
        input=None if input is None else input.decode(),
        timeout=120,
        check=False,
    )


@dataclass
class Served:
    """A running server, its vault, and a home directory per official."""

    url: str
    vault: Vault
    root: Path
    people: list[dict[str, Any]] = field(default_factory=list)

    def official(
        self, name: str, role: Role = Role.INVESTIGATOR, district: str = "*"
    ) -> dict[str, str]:
        """An account with its second factor enrolled, and the environment its holder
        runs the client in: a home of its own, no keyring passphrase, no vault."""
        self.vault.admin.add_account(
            self.vault.operator, name, PASSWORD, role, {"district": district}
        )
        secret = enrol(self.vault, name)
        return {
            **client_env(self.root / f"home-{name}"),
            "CUSTODES_USER": name,
            "CUSTODES_PASSWORD": PASSWORD,
            TOTP_SECRET: secret,
        }

    def login(self, env: dict[str, str], *extra: str) -> None:
        done = run("login", "--server", self.url, *extra, env=env)
        assert done.returncode == 0, done.stderr


def client_env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    return {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        # Somewhere no vault is: a client command that looked for one would fail.
        "CUSTODES_VAULT": str(home / "no-vault-here"),
    }


def session_path(env: dict[str, str]) -> Path:
    return Path(env["XDG_CONFIG_HOME"]) / "custodes" / "session.json"


@pytest.fixture
def served(tmp_path: Path, people: list[dict[str, Any]], population_file: Path) -> Iterator[Served]:
    vault = make_vault(tmp_path, "sqlite")
    assert vault.ingest(vault.operator, population_file).rejected == 0
    try:
        with serving(vault) as url:
            yield Served(url, vault, tmp_path, people)
    finally:
        vault.close()


def search_args(person: dict[str, Any], *extra: str) -> list[str]:
    return [
        "search",
        "--national-id",
        str(person["national_id"]),
        "--purpose",
        "burglary follow-up",
        "--case",
        "T-1",
        *extra,
    ]


def test_one_login_then_ten_searches_and_a_reveal_in_half_a_minute_without_the_keyring(
    served: Served,
) -> None:
    official = served.official("li.na")
    assert "CUSTODES_KEYRING_PASSPHRASE" not in official
    # Another program made the configuration directory first, open to all.
    config = Path(official["XDG_CONFIG_HOME"]) / "custodes"
    config.mkdir(parents=True)
    config.chmod(0o755)
    done = run("login", "--server", served.url, env=official)
    assert done.returncode == 0, done.stderr
    assert "logged in" in done.stdout and "li.na (investigator)" in done.stdout

    stored = session_path(official)
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert stat.S_IMODE(stored.parent.stat().st_mode) == 0o700
    doc = orjson.loads(stored.read_bytes())
    assert set(doc) == {"server", "token", "username", "role"}
    assert doc["server"] == served.url and doc["username"] == "li.na"
    assert PASSWORD not in stored.read_text()

    # No CUSTODES_PASSWORD or code from here on: the session is all the client holds.
    reader = {k: v for k, v in official.items() if k in ("HOME", "XDG_CONFIG_HOME")}
    started = time.monotonic()
    found = []
    for person in served.people[:10]:
        done = run(*search_args(person, "--json"), env=reader)
        assert done.returncode == 0, done.stderr
        [record] = orjson.loads(done.stdout)
        assert set(record) == {"record_id", "type", "fields", "links"}
        assert record["type"] == "person" and "*" in record["fields"]["national_id"]
        assert str(person["national_id"]) not in done.stdout
        found.append(record["record_id"])
    done = run(
        "reveal",
        found[0],
        "phone",
        "--purpose",
        "call the witness",
        "--case",
        "T-1",
        "--json",
        env=reader,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout) == {
        "record_id": found[0],
        "field": "phone",
        "value": served.people[0]["phone"],
    }
    assert elapsed < 30, f"ten searches and a reveal took {elapsed:.1f} s"


def test_client_commands_refuse_at_once_without_a_login(tmp_path: Path) -> None:
    env = client_env(tmp_path / "home")
    for args in (
        ["search", "--phone", "13800000000", "--purpose", "a look", "--case", "T-1"],
        ["show", "some-record", "--purpose", "a look"],
        ["reveal", "some-record", "phone", "--purpose", "a look"],
        ["audit", "log", "--purpose", "a review"],
        ["audit", "subject", "some-record", "--purpose", "their request"],
        ["logout"],
    ):
        done = run(*args, env=env)
        assert (done.returncode, done.stderr, done.stdout) == (6, NOT_LOGGED_IN, ""), args


def test_logout_ends_the_session_on_the_server_and_forgets_it_here(served: Served) -> None:
    official = served.official("li.na")
    served.login(official)
    token = orjson.loads(session_path(official).read_bytes())["token"]
    person = served.people[0]
    assert run(*search_args(person), env=official).returncode == 0

    done = run("logout", env=official)
    assert done.returncode == 0, done.stderr
    assert not session_path(official).exists()
    # The token is dead on the server too, not only forgotten here.
    answer = httpx.get(
        f"{served.url}/api/v1/me", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    assert answer.status_code == 401
    done = run(*search_args(person), env=official)
    assert (done.returncode, done.stderr) == (6, NOT_LOGGED_IN)


@pytest.mark.parametrize("ending", ["idle timeout", "logged out everywhere"])
def test_a_session_the_server_ended_is_refused_and_forgotten(served: Served, ending: str) -> None:
    official = served.official("li.na")
    served.login(official)
    person = served.people[0]
    assert run(*search_args(person), env=official).returncode == 0
    if ending == "idle timeout":
        later = time.time() + IDLE_TIMEOUT + 60
        served.vault._clock.moved = lambda: later  # type: ignore[attr-defined]
    else:
        served.vault._keeper.sessions.end_all("li.na")

    done = run(*search_args(person), env=official)
    assert (done.returncode, done.stderr, done.stdout) == (6, SESSION_ENDED, "")
    assert not session_path(official).exists()
    done = run("reveal", "any-record", "phone", "--purpose", "a look", env=official)
    assert (done.returncode, done.stderr) == (6, NOT_LOGGED_IN)


def test_the_servers_refusal_is_one_line_with_the_librarys_exit_code(served: Served) -> None:
    official = served.official("li.na")
    served.login(official)
    done = run("show", "no-such-record", "--purpose", "a look", "--case", "T-1", env=official)
    assert done.returncode == 8
    assert done.stderr.startswith("custodes: error: ") and done.stderr.count("\n") == 1
    # A refusal is not an ended session: the official stays logged in.
    assert session_path(official).exists()


def test_client_commands_load_no_key_code_and_read_no_keyring(served: Served) -> None:
    official = served.official("li.na")
    # Every client command under a probe that lists, at exit, the key code it loaded.
    probe = (
        "import atexit, sys\n"
        f"KEY_CODE = {KEY_CODE!r}\n"
        "atexit.register(lambda: sys.stderr.write('loaded: ' + ','.join(sorted(\n"
        "    m for m in sys.modules if m.startswith(KEY_CODE))) + '\\n'))\n"
        "from custodes.cli import main\n"
        "sys.argv[0] = 'custodes'\n"
        "main()\n"
    )
    person = served.people[0]

    def client(*args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTODES_")}
        env.update({k: v for k, v in official.items() if k != TOTP_SECRET})
        if args[0] == "login":
            env["CUSTODES_TOTP"] = totp_code(official[TOTP_SECRET])
        assert "CUSTODES_KEYRING_PASSPHRASE" not in env
        return subprocess.run(
            [sys.executable, "-c", probe, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )

    for args, code in (
        (["login", "--server", served.url], 0),
        (search_args(person, "--json"), 0),
        (["show", "no-such-record", "--purpose", "a look", "--case", "T-1"], 8),
        (["reveal", "no-such-record", "phone", "--purpose", "a look", "--case", "T-1"], 8),
        (["audit", "log", "--purpose", "curious"], 7),
        (["logout"], 0),
    ):
        done = client(*args)
        assert done.returncode == code, (args, done.stderr)
        assert done.stderr.endswith("loaded: \n"), (args, done.stderr)


def test_an_unreachable_server_is_one_line_naming_it(served: Served, tmp_path: Path) -> None:
    official = served.official("li.na")
    nobody = f"http://127.0.0.1:{free_port()}"
    done = run("login", "--server", nobody, env=official)
    assert done.returncode == 11 and done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"custodes: error: cannot reach the server at {nobody}")
    assert not session_path(official).exists()

    served.login(official)
    stored = orjson.loads(session_path(official).read_bytes())
    session_path(official).write_bytes(orjson.dumps({**stored, "server": nobody}))
    done = run(*search_args(served.people[0]), env=official)
    assert done.returncode == 11 and done.stderr.count("\n") == 1
    assert nobody in done.stderr
    assert session_path(official).exists()  # unreachable is not ended: retry later


def test_plain_http_beyond_this_host_is_refused_before_the_password_is_sent(
    tmp_path: Path,
) -> None:
    env = {
        **client_env(tmp_path / "home"),
        "CUSTODES_USER": "li.na",
        "CUSTODES_PASSWORD": PASSWORD,
        "CUSTODES_TOTP": "123456",
    }
    done = run("login", "--server", "http://vault.example:8000", env=env)
    assert done.returncode == 2 and "use https" in done.stderr
    assert PASSWORD not in done.stderr + done.stdout


def test_a_self_signed_server_is_trusted_only_through_ca_cert(
    tmp_path: Path, people: list[dict[str, Any]], population_file: Path
) -> None:
    vault = make_vault(tmp_path, "sqlite")
    assert vault.ingest(vault.operator, population_file).rejected == 0
    tls = self_signed("127.0.0.1", tmp_path / "tls", vault_dir=tmp_path / "vault")
    try:
        with serving(vault, tls) as url:
            served = Served(url, vault, tmp_path, people)
            official = served.official("li.na")
            done = run("login", "--server", url, env=official)
            assert done.returncode == 11 and "--ca-cert" in done.stderr
            assert not session_path(official).exists()

            served.login(official, "--ca-cert", str(tls.cert))
            stored = orjson.loads(session_path(official).read_bytes())
            assert stored["ca_cert"] == str(tls.cert.resolve())
            done = run(*search_args(people[0], "--json"), env=official)
            assert done.returncode == 0, done.stderr
            assert len(orjson.loads(done.stdout)) == 1
    finally:
        vault.close()
