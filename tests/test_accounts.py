"""Threats 2 and 6 at the vault: no default account, common passwords refused, a second
factor for everyone, codes that work once, throttling and lockout of guessers."""

from __future__ import annotations

import contextlib
from importlib import resources
from pathlib import Path

import pyotp
import pytest

from custodes.accounts import LOCK_AFTER_FAILURES, check_password_strength
from custodes.audit import Outcome
from custodes.errors import (
    AuthenticationFailed,
    LoginThrottled,
    WeakPassword,
)
from custodes.policy import ACCOUNT_ROLES, Action, Role
from custodes.vault import Vault
from tests.conftest import PASSWORD, enrol, make_vault, totp_code


class Clock:
    """A clock the test moves, so that backoff and code windows need no sleeping."""

    def __init__(self, now: float = 1_900_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clocked(vault: Vault) -> tuple[Vault, Clock]:
    clock = Clock()
    vault._clock.moved = clock  # type: ignore[attr-defined]
    return vault, clock


def shipped_list() -> list[str]:
    text = resources.files("custodes").joinpath("data/common_passwords.txt").read_text("utf-8")
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_shipped_list_holds_ten_thousand_common_passwords_and_chinese_ones() -> None:
    words = shipped_list()
    assert len(words) >= 10_000
    assert {"123456", "password", "woaini1314520", "5201314woaini"} <= set(words)


@pytest.mark.parametrize("pick", range(5))
def test_password_sprayer_favourites_are_refused_whatever_the_case(pick: int) -> None:
    long_ones = [w for w in shipped_list() if len(w) >= 12]
    word = long_ones[pick * 7]
    for candidate in (word, word.upper()):
        with pytest.raises(WeakPassword) as refused:
            check_password_strength(candidate)
        assert candidate not in str(refused.value)


def test_fresh_vault_has_no_account_and_no_default_login(tmp_path: Path) -> None:
    vault = make_vault(tmp_path, "sqlite")
    try:
        assert vault._accounts.list() == []
        for name, password in (("admin", "admin"), ("root", ""), ("custodes", "custodes")):
            with pytest.raises(AuthenticationFailed):
                vault.login(name, password, totp="000000")
    finally:
        vault.close()


@pytest.mark.parametrize("role", ACCOUNT_ROLES)
def test_stolen_password_alone_opens_no_session_for_any_role(vault: Vault, role: Role) -> None:
    vault.admin.add_account(vault.operator, "t.victim", PASSWORD, role)
    with pytest.raises(AuthenticationFailed) as before:
        vault.login("t.victim", PASSWORD)
    assert type(before.value) is AuthenticationFailed
    enrol(vault, "t.victim")
    with pytest.raises(AuthenticationFailed) as without:
        vault.login("t.victim", PASSWORD)
    with pytest.raises(AuthenticationFailed) as wrong:
        vault.login("t.victim", PASSWORD, totp="123456")
    with pytest.raises(AuthenticationFailed) as unknown:
        vault.login("t.nobody", PASSWORD, totp="123456")
    # Nothing tells the guesser that the password was right.
    assert str(without.value) == str(wrong.value) == str(unknown.value)


def test_replayed_one_time_code_is_refused(clocked: tuple[Vault, Clock]) -> None:
    vault, clock = clocked
    vault.admin.add_account(vault.operator, "t.officer", PASSWORD, Role.OFFICER)
    secret = enrol(vault, "t.officer")
    clock.now += 60
    code = pyotp.TOTP(secret).at(clock.now)
    vault.login("t.officer", PASSWORD, totp=code)
    with pytest.raises(AuthenticationFailed):
        vault.login("t.officer", PASSWORD, totp=code)
    # An older code, still inside the clock-skew window, is no better.
    with pytest.raises(AuthenticationFailed):
        vault.login("t.officer", PASSWORD, totp=pyotp.TOTP(secret).at(clock.now - 30))
    clock.now += 30
    vault.login("t.officer", PASSWORD, totp=pyotp.TOTP(secret).at(clock.now))


def test_totp_secret_is_sealed_in_the_database(tmp_path: Path) -> None:
    vault = make_vault(tmp_path, "sqlite")
    try:
        vault.admin.add_account(vault.operator, "t.officer", PASSWORD, Role.OFFICER)
        secret = enrol(vault, "t.officer")
        code = vault.admin.issue_enrolment(vault.operator, "t.officer")
    finally:
        vault.close()
    raw = b"".join(p.read_bytes() for p in (tmp_path / "vault").glob("vault.db*"))
    assert secret.encode() not in raw
    assert code.encode() not in raw  # only its hash is kept


def test_enrolment_code_works_once_and_expires(clocked: tuple[Vault, Clock]) -> None:
    vault, clock = clocked
    vault.admin.add_account(vault.operator, "t.officer", PASSWORD, Role.OFFICER)
    code = vault.admin.issue_enrolment(vault.operator, "t.officer")
    secret = vault.enrolment(code).secret
    assert vault.enrolment(code).secret == secret  # a reload shows the same secret
    vault.complete_enrolment(code, pyotp.TOTP(secret).at(clock.now))
    with pytest.raises(AuthenticationFailed):
        vault.enrolment(code)
    late = vault.admin.issue_enrolment(vault.operator, "t.officer")
    clock.now += 24 * 3600 + 1
    with pytest.raises(AuthenticationFailed):
        vault.enrolment(late)


def test_credential_stuffer_is_slowed_then_locked_out(clocked: tuple[Vault, Clock]) -> None:
    vault, clock = clocked
    vault.admin.add_account(vault.operator, "t.officer", PASSWORD, Role.OFFICER)
    secret = enrol(vault, "t.officer")
    for attempt in range(LOCK_AFTER_FAILURES):
        with pytest.raises(AuthenticationFailed):
            vault.login("t.officer", f"guess number {attempt}", client="203.0.113.9")
        if attempt >= 3:
            # Backoff: an immediate retry is refused before any password is checked.
            with pytest.raises(LoginThrottled):
                vault.login("t.officer", PASSWORD, totp="000000", client="203.0.113.9")
        clock.now += 901
    # Locked: even the right password and a fresh code fail, and alike.
    clock.now += 60
    with pytest.raises(AuthenticationFailed) as locked:
        vault.login("t.officer", PASSWORD, totp=totp_code(secret, clock.now))
    assert not isinstance(locked.value, LoginThrottled)
    assert vault._accounts.get("t.officer").locked  # type: ignore[union-attr]
    entries = [e for _, e in vault._log.entries() if e.action == Action.LOGIN]
    assert any(e.detail.get("account_locked") for e in entries)
    assert all(e.outcome is Outcome.DENIED for e in entries[-LOCK_AFTER_FAILURES:])
    assert not any("guess number" in str(e.encode()) for e in entries)

    vault.admin.unlock_account(vault.operator, "t.officer")
    clock.now += 60
    vault.login("t.officer", PASSWORD, totp=totp_code(secret, clock.now))


def test_password_sprayer_is_throttled_per_address_and_names_alike(
    clocked: tuple[Vault, Clock],
) -> None:
    vault, _clock = clocked
    vault.admin.add_account(vault.operator, "t.known", PASSWORD, Role.OFFICER)
    for n in range(4):
        with pytest.raises(AuthenticationFailed):
            vault.login(f"t.sprayed{n}", "Summer2026!!", client="198.51.100.7")
    # The address is throttled whichever name it tries next, known or not.
    for name in ("t.known", "t.unknown"):
        with pytest.raises(LoginThrottled) as throttled:
            vault.login(name, PASSWORD, client="198.51.100.7")
        assert throttled.value.retry_after >= 1
    # Another address is not: the password is checked (and, with no second factor
    # enrolled yet, answered like a wrong one).
    with pytest.raises(AuthenticationFailed) as answered:
        vault.login("t.known", PASSWORD, client="192.0.2.1")
    assert not isinstance(answered.value, LoginThrottled)


def test_one_code_opens_one_session_even_when_two_server_processes_race(
    tmp_path: Path,
) -> None:
    # Two server processes each keep the account's last accepted step in a read-modify-
    # write of their own: racing, both could accept one code. The code is also spent in
    # storage, once, whichever process spends it.
    from custodes.bootstrap import open_vault
    from tests.conftest import FAST_HASH, PASSPHRASE, TOTP_SECRETS

    first = make_vault(tmp_path, "sqlite")
    second = open_vault(tmp_path / "vault", passphrase=PASSPHRASE, hash_cost=FAST_HASH)
    try:
        first.admin.add_account(first.operator, "t.racer", PASSWORD, Role.OFFICER)
        enrol(first, "t.racer")
        code = totp_code(TOTP_SECRETS["t.racer"])
        # The second process read the account before the first wrote its step back.
        second._accounts.verify_totp = lambda *_a, **_k: True  # type: ignore[method-assign]
        first.login("t.racer", PASSWORD, totp=code)
        with pytest.raises(AuthenticationFailed):
            second.login("t.racer", PASSWORD, totp=code)
    finally:
        second.close()
        first.close()


def test_a_burst_of_logins_checks_only_a_few_passwords_at_once(vault: Vault) -> None:
    # Each check holds the hash's memory: a burst from many addresses must queue, not
    # multiply the server's memory.
    import threading
    import time

    from custodes.accounts import HASHES_AT_ONCE

    real = vault._accounts._hasher
    running = 0
    most = 0
    lock = threading.Lock()

    def counted(stored: str, password: str) -> bool:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            time.sleep(0.02)
            return bool(real.verify(stored, password))
        finally:
            with lock:
                running -= 1

    class CountingHasher:
        verify = staticmethod(counted)

        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

    vault._accounts._hasher = CountingHasher()  # type: ignore[assignment]

    def guess(n: int) -> None:
        with contextlib.suppress(AuthenticationFailed):
            vault.login(
                f"t.nobody{n}", "wrong password, guess", totp="000000", client=f"198.51.100.{n}"
            )

    threads = [threading.Thread(target=guess, args=(n,)) for n in range(4 * HASHES_AT_ONCE)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 1 <= most <= HASHES_AT_ONCE
