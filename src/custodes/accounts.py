"""Officials' accounts: argon2id password hashes, a refusal of weak passwords, login.

A password is never stored or logged; an unknown account, a wrong password and a
disabled account fail the same way and take about the same time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import orjson
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from zxcvbn import zxcvbn

from custodes.errors import AuthenticationFailed, ConfigurationError, WeakPassword
from custodes.policy import Role
from custodes.storage.base import AccountRow, Storage

MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 1024
# zxcvbn's estimate is costly on very long inputs; its verdict is settled well before this.
_ZXCVBN_PREFIX = 100


@dataclass(frozen=True, slots=True)
class HashCost:
    """argon2id cost. The floor is OWASP's minimum; the default is above it."""

    time_cost: int = 3
    memory_kib: int = 65_536
    parallelism: int = 1

    def __post_init__(self) -> None:
        if self.time_cost < 2 or self.memory_kib < 19_456:
            raise ConfigurationError("argon2id cost below the floor (t>=2, m>=19 MiB)")


@cache
def _common_passwords() -> frozenset[str]:
    text = resources.files("custodes").joinpath("data/common_passwords_zh.txt").read_text("utf-8")
    return frozenset(
        line.strip().casefold() for line in text.splitlines() if line and not line.startswith("#")
    )


def check_password_strength(password: str, *, username: str = "") -> None:
    """Raise WeakPassword, with a reason that never repeats the password, unless strong."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise WeakPassword(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise WeakPassword(f"a password may have at most {MAX_PASSWORD_LENGTH} characters")
    folded = password.casefold()
    if folded in _common_passwords():
        raise WeakPassword("that password is on the list of commonly used passwords")
    if username and username.casefold() in folded:
        raise WeakPassword("a password must not contain the account name")
    verdict = zxcvbn(password[:_ZXCVBN_PREFIX], user_inputs=[username] if username else [])
    if verdict["score"] < 3:
        raise WeakPassword("that password is too easy to guess; use a longer passphrase")


@dataclass(frozen=True, slots=True)
class Account:
    """An account as the rest of the system sees it: no hash."""

    username: str
    role: Role
    attributes: dict[str, Any]
    disabled: bool


class AccountBook:
    """Accounts over a storage backend."""

    def __init__(self, storage: Storage, cost: HashCost = HashCost()) -> None:
        self._storage = storage
        self._hasher = PasswordHasher(
            time_cost=cost.time_cost, memory_cost=cost.memory_kib, parallelism=cost.parallelism
        )
        # Verified against when the account is unknown, so that unknown and known
        # usernames cost the same.
        self._decoy_hash = self._hasher.hash("decoy password that matches nothing")

    def add(
        self,
        username: str,
        password: str,
        role: Role,
        attributes: dict[str, Any] | None = None,
    ) -> Account:
        _check_username(username)
        check_password_strength(password, username=username)
        row = AccountRow(
            username=username,
            role=role.value,
            password_hash=self._hasher.hash(password),
            attributes=orjson.dumps(attributes or {}),
            created_at=time.time(),
            disabled=False,
        )
        self._storage.add_account(row)
        return _account(row)

    def authenticate(self, username: str, password: str) -> Account:
        row = self._storage.get_account(username)
        candidate = row.password_hash if row is not None else self._decoy_hash
        try:
            self._hasher.verify(candidate, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            raise AuthenticationFailed() from None
        if row is None or row.disabled:
            raise AuthenticationFailed()
        if self._hasher.check_needs_rehash(row.password_hash):
            self._storage.update_account(row._replace(password_hash=self._hasher.hash(password)))
        return _account(row)

    def list(self) -> list[Account]:
        return [_account(row) for row in self._storage.list_accounts()]


def _account(row: AccountRow) -> Account:
    return Account(
        username=row.username,
        role=Role(row.role),
        attributes=orjson.loads(row.attributes) if row.attributes else {},
        disabled=row.disabled,
    )


def _check_username(username: str) -> None:
    if not (3 <= len(username) <= 64) or not all(
        ch.isascii() and (ch.isalnum() or ch in "._-") for ch in username
    ):
        raise ConfigurationError("an account name is 3-64 ASCII letters, digits, '.', '_' or '-'")
