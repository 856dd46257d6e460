"""KEKs inside a PKCS#11 token: AES-256 keys made in the token, never extractable.

Data keys are wrapped and unwrapped by the token (AES-GCM on the token's key), so the
holder of the keyring file and its passphrase holds no KEK: without the token, and its
PIN, no record opens (threat 19).
"""

from __future__ import annotations

import contextlib
import hmac
import os
import threading
import time
from typing import Any, NamedTuple

from custodes.errors import KeyringError, TamperDetected

__all__ = [
    "KeyStoreUnavailable",
    "Pkcs11Keks",
    "TokenKeks",
    "destroy_token_kek",
    "generate_token_kek",
]

KEK_BITS = 256


class TokenKeks(NamedTuple):
    """A vault's KEKs as objects in a PKCS#11 token: the module, the token's label, one
    key label per version, and the user PIN (given at unlock, never written down)."""

    module: str
    token_label: str
    key_labels: dict[int, str]
    pin: str = ""

    def __repr__(self) -> str:
        # The PIN must never reach a log line or a traceback through repr().
        return (
            f"TokenKeks(module={self.module!r}, token_label={self.token_label!r}, "
            f"versions={sorted(self.key_labels)}, pin=<hidden>)"
        )

    def describe(self) -> str:
        """Where the keys are, for messages: never the PIN."""
        return f"PKCS#11 token {self.token_label!r} (module {self.module})"


class KeyStoreUnavailable(KeyringError):
    """The token that holds the vault's KEKs cannot be reached or lacks a key."""


def _pkcs11() -> Any:
    try:
        import pkcs11
    except ImportError:
        raise KeyStoreUnavailable(
            "the vault's keys are in a PKCS#11 token, and python-pkcs11 is not installed: "
            "install custodes with its 'hsm' extra"
        ) from None
    return pkcs11


def _session(token: TokenKeks, *, rw: bool = False) -> Any:
    pkcs11 = _pkcs11()
    where = token.describe()
    try:
        lib = pkcs11.lib(token.module)
        # A forked child inherits the parent's initialised module, which PKCS#11 says it
        # must not use (a server forks its workers after unlocking): start it afresh here.
        if _initialised_in.setdefault(token.module, os.getpid()) != os.getpid():
            lib.reinitialize()
            _initialised_in[token.module] = os.getpid()
            _logins.clear()
    except (RuntimeError, OSError) as exc:
        raise KeyStoreUnavailable(f"cannot load the PKCS#11 module of {where}: {exc}") from None
    found = _token(pkcs11, lib, token)
    try:
        session = found.open(user_pin=token.pin, rw=rw)
    except pkcs11.exceptions.UserAlreadyLoggedIn:
        # A login belongs to the process, not the session: another session of this
        # process logged in, and this one shares it, but only for the PIN it logged in with.
        if not hmac.compare_digest(_logins.get(_slot(token), ""), token.pin):
            raise KeyStoreUnavailable(f"the PIN for {where} is wrong") from None
        return found.open(rw=rw)
    except pkcs11.exceptions.PinIncorrect:
        raise KeyStoreUnavailable(f"the PIN for {where} is wrong") from None
    except pkcs11.exceptions.PKCS11Error as exc:
        raise KeyStoreUnavailable(
            f"cannot open a session on {where}: {type(exc).__name__}"
        ) from None
    _logins[_slot(token)] = token.pin
    return session


def _token(pkcs11: Any, lib: Any, token: TokenKeks) -> Any:
    # SoftHSM2's file store can fail a read with CKR_GENERAL_ERROR while another process
    # reads the same token (softhsm/SoftHSMv2#757): try again a few times before giving up.
    for attempt in range(_ATTEMPTS):
        try:
            return lib.get_token(token_label=token.token_label)
        except pkcs11.exceptions.NoSuchToken:
            raise KeyStoreUnavailable(
                f"the {token.describe()} that holds this vault's key-encryption keys is not "
                "present: no record opens without it"
            ) from None
        except pkcs11.exceptions.GeneralError:
            if attempt == _ATTEMPTS - 1:
                raise KeyStoreUnavailable(
                    f"the {token.describe()} fails to answer (CKR_GENERAL_ERROR)"
                ) from None
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


_ATTEMPTS = 5

# The process that initialised each module (see _session).
_initialised_in: dict[str, int] = {}
# The PIN each token was logged in with by this process (see _session).
_logins: dict[tuple[str, str], str] = {}


def _slot(token: TokenKeks) -> tuple[str, str]:
    return (token.module, token.token_label)


def generate_token_kek(token: TokenKeks, label: str) -> None:
    """Make a new AES-256 KEK inside the token under `label`: sensitive, never extractable,
    usable only to encrypt and decrypt. Refuses a label the token already holds."""
    pkcs11 = _pkcs11()
    attr = pkcs11.Attribute
    with _session(token, rw=True) as session:
        existing = list(
            session.get_objects({attr.LABEL: label, attr.CLASS: pkcs11.ObjectClass.SECRET_KEY})
        )
        if existing:
            raise KeyringError(f"{token.describe()} already holds a key labelled {label!r}")
        session.generate_key(
            pkcs11.KeyType.AES,
            KEK_BITS,
            label=label,
            store=True,
            template={
                attr.TOKEN: True,
                attr.PRIVATE: True,
                attr.SENSITIVE: True,
                attr.EXTRACTABLE: False,
                attr.ENCRYPT: True,
                attr.DECRYPT: True,
                attr.WRAP: False,
                attr.UNWRAP: False,
            },
        )


def destroy_token_kek(token: TokenKeks, label: str) -> int:
    """Destroy the token's key objects labelled `label` (a retired KEK version); returns
    how many went. The token's own deletion: no copy of the key ever left it."""
    pkcs11 = _pkcs11()
    attr = pkcs11.Attribute
    with _session(token, rw=True) as session:
        found = list(
            session.get_objects({attr.LABEL: label, attr.CLASS: pkcs11.ObjectClass.SECRET_KEY})
        )
        for key in found:
            key.destroy()
        return len(found)


def _lost(pkcs11: Any) -> tuple[type[Exception], ...]:
    """Errors after which a new session on the same token may well succeed."""
    errors = pkcs11.exceptions
    return (
        errors.ObjectHandleInvalid,
        errors.KeyHandleInvalid,
        errors.SessionClosed,
        errors.SessionHandleInvalid,
        errors.UserNotLoggedIn,
    )


def _gone(pkcs11: Any) -> tuple[type[Exception], ...]:
    errors = pkcs11.exceptions
    return (
        errors.DeviceRemoved,
        errors.TokenNotPresent,
        errors.DeviceError,
        errors.SessionClosed,
        errors.SessionHandleInvalid,
        errors.UserNotLoggedIn,
    )


class Pkcs11Keks:
    """A `KekProvider` whose KEKs are in a token; one session per instance (and process)."""

    __slots__ = ("_closed", "_keys", "_lock", "_mechanism", "_params", "_session", "_token")

    def __init__(self, token: TokenKeks) -> None:
        pkcs11 = _pkcs11()
        self._token = token
        self._closed = False
        self._session, self._keys = self._open()
        self._mechanism = pkcs11.Mechanism.AES_GCM
        self._params = pkcs11.mechanisms.GCMParams
        # A PKCS#11 session runs one operation at a time.
        self._lock = threading.Lock()

    def _open(self) -> tuple[Any, dict[int, Any]]:
        """A session on the token and a handle on each of the KEKs."""
        pkcs11 = _pkcs11()
        token = self._token
        session = _session(token)
        keys: dict[int, Any] = {}
        try:
            for version, label in token.key_labels.items():
                try:
                    keys[version] = session.get_key(
                        object_class=pkcs11.ObjectClass.SECRET_KEY,
                        key_type=pkcs11.KeyType.AES,
                        label=label,
                    )
                except (pkcs11.exceptions.NoSuchKey, pkcs11.exceptions.MultipleObjectsReturned):
                    raise KeyStoreUnavailable(
                        f"{token.describe()} does not hold exactly one key-encryption key "
                        f"labelled {label!r} (version {version}): no record under it opens"
                    ) from None
        except BaseException:
            session.close()
            raise
        return session, keys

    def _again(self) -> None:
        """Open the session again after the token let go of it (held by the lock). A
        login belongs to the process, and some tokens (SoftHSM2) log the process out
        when the session that logged in closes, as a rotation closes the old keys'
        session: the handles then fail, and a new session logs in again."""
        # A session already gone is what is being mended.
        with contextlib.suppress(Exception):
            self._session.close()
        _logins.pop(_slot(self._token), None)
        self._session, self._keys = self._open()

    def __repr__(self) -> str:
        return f"Pkcs11Keks({self._token!r})"

    def versions(self) -> frozenset[int]:
        return frozenset(self._keys)

    def wrap(self, version: int, nonce: bytes, data_key: bytes, aad: bytes) -> bytes:
        pkcs11 = _pkcs11()
        try:
            with self._lock:
                for attempt in (0, 1):
                    try:
                        result: bytes = self._keys[version].encrypt(
                            data_key,
                            mechanism=self._mechanism,
                            mechanism_param=self._params(nonce, aad, 128),
                        )
                        break
                    except _lost(pkcs11):
                        if attempt or self._closed:
                            raise
                        self._again()
        except pkcs11.exceptions.PKCS11Error as exc:
            raise KeyStoreUnavailable(
                f"the {self._token.describe()} refused to wrap a data key: {type(exc).__name__}"
            ) from None
        return result

    def unwrap(self, version: int, nonce: bytes, wrapped: bytes, aad: bytes) -> bytes:
        key = self._keys.get(version)
        if key is None:
            raise TamperDetected()
        pkcs11 = _pkcs11()
        try:
            with self._lock:
                for attempt in (0, 1):
                    try:
                        result: bytes = self._keys[version].decrypt(
                            wrapped,
                            mechanism=self._mechanism,
                            mechanism_param=self._params(nonce, aad, 128),
                        )
                        break
                    except _lost(pkcs11):
                        if attempt or self._closed:
                            raise
                        self._again()
        except _gone(pkcs11) as exc:
            # The token went away: that is no tampering, and no record opens until it is back.
            raise KeyStoreUnavailable(
                f"the {self._token.describe()} is gone: {type(exc).__name__}"
            ) from None
        except pkcs11.exceptions.PKCS11Error:
            # A failed tag and a damaged blob look the same from here (SoftHSM2 answers a
            # bad tag with CKR_GENERAL_ERROR, others with ENCRYPTED_DATA_INVALID): opaque.
            raise TamperDetected() from None
        return result

    def close(self) -> None:
        self._closed = True
        self._session.close()
