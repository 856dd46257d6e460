"""KeyWatch: keeps a process's record keys in step with its keyring file.

A key rotation (custodes.vault.rotation) runs on the host while servers keep serving:
it writes a new KEK, data key generation or index key into the keyring file, waits, then
rewrites records under it; at the end it removes the old versions from the file. Every
process serving the vault must have read the new versions before a record needs them,
and must let go of the old ones once they are destroyed. So the access function asks
this watch, before each access, whether the file changed: a stat at most once a
`every` seconds, and a reopen (with the secret the process was unlocked with, held in
memory as its keys are) only when it did. The rotation waits GRACE_SECONDS after each
change to the file, longer than any process takes to notice it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from custodes.crypto.keyring import KeyMaterial, Keyring
from custodes.errors import KeyringError

__all__ = ["CHECK_EVERY", "GRACE_SECONDS", "KeyWatch"]

log = logging.getLogger("custodes")

CHECK_EVERY = 1.0
# How long a rotation waits after changing the keyring before it relies on every process
# having read it: the check interval, a reopen (one Argon2id derivation) and margin.
GRACE_SECONDS = 4.0


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class KeyWatch:
    """Reopens the keyring when its file changes and hands the new material on."""

    __slots__ = (
        "_adopt",
        "_every",
        "_identity",
        "_last",
        "_lock",
        "_material",
        "_monotonic",
        "_path",
        "_pin",
        "_secret",
    )

    def __init__(
        self,
        path: Path,
        secret: str,
        material: KeyMaterial,
        *,
        token_pin: str | None = None,
        every: float = CHECK_EVERY,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = Path(path)
        self._secret = secret
        self._pin = token_pin
        self._material = material
        self._every = every
        self._monotonic = monotonic
        self._identity = _identity(self._path)
        self._last = monotonic()
        self._lock = threading.Lock()
        self._adopt: list[Callable[[KeyMaterial], None]] = []

    def __repr__(self) -> str:
        return "KeyWatch()"

    @property
    def material(self) -> KeyMaterial:
        return self._material

    def on_change(self, adopt: Callable[[KeyMaterial], None]) -> None:
        """Call `adopt` with the new material whenever the keyring changes."""
        self._adopt.append(adopt)

    def check(self) -> None:
        """Cheap unless the interval passed and the file changed; then reopen it."""
        now = self._monotonic()
        if now - self._last < self._every:
            return
        with self._lock:
            if now - self._last < self._every:
                return
            self._last = now
            seen = _identity(self._path)
            if seen is None or seen == self._identity:
                return
            self._reload(seen)

    def refresh(self) -> None:
        """Reopen the keyring now, changed or not."""
        with self._lock:
            self._last = self._monotonic()
            self._reload(_identity(self._path))

    def _reload(self, seen: tuple[int, int, int, int] | None) -> None:
        try:
            keyring = self.keyring()
        except KeyringError as exc:
            # A half-written file cannot be seen (it is renamed into place whole), so
            # this is a keyring resealed under another secret: keep serving with the
            # keys in hand, and say so; a rotation's grace covers no such process.
            log.error("the keyring file changed and does not open: %s", exc)
            self._identity = seen
            return
        material = keyring.material
        self._identity = seen
        if material == self._material:
            return
        self._material = material
        for adopt in self._adopt:
            adopt(material)
        log.info(
            "keys reloaded: KEK %d, data generation %d, index key %d",
            material.kek_version,
            material.data_generation,
            material.token_version,
        )

    def keyring(self) -> Keyring:
        """The keyring file opened afresh, for a rotation to rewrite (host only)."""
        return Keyring.open(
            self._path,
            passphrase=self._secret,
            vault_id=self._material.vault_id,
            token_pin=self._pin,
        )

    @property
    def secret(self) -> str:
        """What seals the keyring file: a rotation reseals it with the same."""
        return self._secret
