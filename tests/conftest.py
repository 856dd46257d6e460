"""Shared fixtures: vaults on every backend, with the cheapest key-derivation costs allowed.

The costs are the floors the library accepts, not a switch that turns protection off.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pyotp
import pytest
from hypothesis import settings

from custodes.accounts import HashCost
from custodes.audit.checkpoint import LogSigner, create_log_key
from custodes.bootstrap import create_vault, log_origin, memory_vault
from custodes.crypto import KdfParams, KeyMaterial, Keyring
from custodes.policy import AccessPurpose, Role
from custodes.vault import Session, Vault
from custodes.web.serve import TlsFiles

# Tests never assert on time: a Hypothesis deadline would measure the machine (two cores
# shared by the suite's workers and the servers they start), not the code.
settings.register_profile("custodes", deadline=None)
settings.load_profile("custodes")

FAST_KDF = KdfParams(time_cost=2, memory_kib=19_456, parallelism=1)
FAST_HASH = HashCost(time_cost=2, memory_kib=19_456, parallelism=1)
PASSPHRASE = "a keyring passphrase used only by tests"
PASSWORD = "tests-only: violet harbour quietly 7"
PURPOSE = AccessPurpose("test of the search path", "T-1")


@pytest.fixture(scope="session", autouse=True)
def private_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A home directory of the run's own: what a test leaves in a user's configuration
    (keyrings, log keys, TLS files) lands there, never in the real one. Subprocesses
    inherit it through the environment."""
    home = tmp_path_factory.mktemp("home")
    directories = {
        "XDG_CONFIG_HOME": ".config",
        "XDG_DATA_HOME": ".local/share",
        "XDG_CACHE_HOME": ".cache",
        "XDG_STATE_HOME": ".local/state",
    }
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv("HOME", str(home))
        for variable, directory in directories.items():
            (home / directory).mkdir(parents=True)
            environment.setenv(variable, str(home / directory))
        yield home


class MovableClock:
    """A vault's one clock in tests: the real time, unless a test moves it (`moved`)."""

    def __init__(self) -> None:
        self.moved: Callable[[], float] | None = None

    def __call__(self) -> float:
        return time.time() if self.moved is None else self.moved()


def make_vault(tmp: Path, backend: str) -> Vault:
    if backend == "sqlite":
        return create_vault(
            tmp / "vault",
            passphrase=PASSPHRASE,
            keyring_path=tmp / "keys" / "test.keyring",
            kdf=FAST_KDF,
            hash_cost=FAST_HASH,
            clock=MovableClock(),
        )
    return memory_vault(*memory_keys(tmp), hash_cost=FAST_HASH, clock=MovableClock())


def memory_keys(tmp: Path) -> tuple[KeyMaterial, LogSigner]:
    """A keyring and a log signing key in files of their own, for a vault held in memory."""
    vault_id = os.urandom(16)
    keyring = Keyring.create(
        tmp / "keys" / "mem.keyring", vault_id=vault_id, passphrase=PASSPHRASE, kdf=FAST_KDF
    )
    signer = create_log_key(
        tmp / "keys" / "mem.logkey",
        origin=log_origin(vault_id),
        passphrase=PASSPHRASE,
        kdf=FAST_KDF,
    )
    return keyring.material, signer


@pytest.fixture(params=["memory", "sqlite"])
def vault(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Vault]:
    v = make_vault(tmp_path, request.param)
    yield v
    v.close()


@pytest.fixture
def sqlite_vault(tmp_path: Path) -> Iterator[Vault]:
    v = make_vault(tmp_path, "sqlite")
    yield v
    v.close()


def login(
    vault: Vault,
    role: Role = Role.INVESTIGATOR,
    username: str | None = None,
    *,
    district: str = "*",
    cases: list[str] | None = None,
    budget: Mapping[str, int | None] | None = None,
) -> Session:
    """Add an account, enrol its second factor and log in with password and code.

    The account serves the whole country ("*") unless a test names its district.
    """
    name = username or f"t.{role.value}"
    attributes: dict[str, object] = {"district": district}
    if cases is not None:
        attributes["cases"] = cases
    if budget is not None:
        attributes["budget"] = dict(budget)
    vault.admin.add_account(vault.operator, name, PASSWORD, role, attributes)
    secret = enrol(vault, name)
    return vault.login(name, PASSWORD, totp=totp_now(vault, secret))


# The last time step used per TOTP secret: the vault refuses a code whose step is not
# later than the last one it accepted, so tests hand out steps in increasing order.
_USED_STEPS: dict[str, int] = {}
TOTP_SECRETS: dict[str, str] = {}  # username -> secret of its latest enrolment in a test


def totp_code(secret: str, now: float | None = None) -> str:
    """The next code the vault will accept for this secret (steps now-1, now, now+1)."""
    real = now is None
    at = time.time() if now is None else now
    current = int(at // 30)
    # Close to a step boundary the previous step's code could age out before it is checked.
    lowest = current - 1 if not real or 30 - at % 30 > 2 else current
    step = max(lowest, _USED_STEPS.get(secret, lowest - 1) + 1)
    if real and step > current + 1:  # this window's codes are used up: wait for the next
        time.sleep((step - 1) * 30 - at + 0.05)
    _USED_STEPS[secret] = step
    return pyotp.TOTP(secret).at(step * 30)


def totp_now(vault: Vault, secret: str) -> str:
    """The next accepted code by the vault's clock (which a test may have moved)."""
    moved = getattr(vault._clock, "moved", None)
    return totp_code(secret, None if moved is None else moved())


def enrol(vault: Vault, username: str) -> str:
    """Enrol the account's second factor as its holder would; returns the TOTP secret."""
    code = vault.admin.issue_enrolment(vault.operator, username)
    secret = vault.enrolment(code).secret
    vault.complete_enrolment(code, totp_now(vault, secret))
    TOTP_SECRETS[username] = secret
    return secret


def write_jsonl(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


@pytest.fixture(scope="session")
def population_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic population (people, cases, deliveries) as JSON Lines."""
    from custodes.synth import write_jsonl as synth_jsonl

    path = tmp_path_factory.mktemp("population") / "population.jsonl"
    with path.open("wb") as f:
        synth_jsonl(f, 300, seed=7)
    return path


def read_records(path: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def people(population_file: Path) -> list[dict[str, Any]]:
    """The people of population_file, as records."""
    return [r for r in read_records(population_file) if r["type"] == "person"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def serving(vault: Vault, tls: TlsFiles | None = None) -> Iterator[str]:
    """The real app around `vault` on a free loopback port, in a thread; its base URL."""
    import uvicorn

    from custodes.web.app import create_app

    port = free_port()
    config = uvicorn.Config(
        create_app(vault, tls=tls is not None),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="off",
        ssl_certfile=str(tls.cert) if tls else None,
        ssl_keyfile=str(tls.key) if tls else None,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
