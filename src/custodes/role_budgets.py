"""A vault's own budgets per role: its administrators' settings over the defaults.

custodes.policy.budgets holds what each role may see by default; a vault can set its
own for a role (`custodes account role-budget`), which hold for every account of the
role that has no limit of its own for the same thing. They decide access, so they are
stored tagged under a key of the vault's (custodes.crypto.row_mac): a database writer
who lifts a role's budget stops every read instead, with TamperDetected, until the
setting is made again by an administrator.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

import orjson

from custodes.crypto.row_mac import RowKind, RowMacs
from custodes.errors import ConfigurationError, TamperDetected
from custodes.policy import Role
from custodes.policy.budgets import DEFAULT_SESSIONS, checked_budget
from custodes.storage.base import MetaStore

ROLE_BUDGETS = "role_budgets"
# A process reads the setting again after this many seconds: a change made by another
# process (the host's CLI, another server worker) holds within that time.
REFRESH = 2.0

RoleSettings = Mapping[str, Mapping[str, int | None]]  # role -> its limits


class RoleBudgets:
    """The vault's role budgets, read from their tagged setting and cached briefly."""

    def __init__(
        self,
        meta: MetaStore,
        macs: RowMacs,
        *,
        clock: Callable[[], float] = time.monotonic,
        refresh: float = REFRESH,
    ) -> None:
        self._meta = meta
        self._macs = macs
        self._clock = clock
        self._refresh = refresh
        self._lock = threading.Lock()
        self._settings: RoleSettings = {}
        self._read_at: float | None = None

    def __repr__(self) -> str:
        return "RoleBudgets()"

    def current(self) -> RoleSettings:
        """Every role's own limits, as set for this vault (none: the defaults hold)."""
        now = self._clock()
        with self._lock:
            if self._read_at is None or now - self._read_at >= self._refresh:
                self._settings = self._load()
                self._read_at = now
            return self._settings

    def set(self, role: Role, limits: Mapping[str, int | None] | None) -> dict[str, int | None]:
        """Give a role limits of its own (None for a limit: none of that kind), or with
        `limits` None put it back on the defaults; the role's limits as now stored."""
        if role not in DEFAULT_SESSIONS:
            raise ConfigurationError(f"the {role.value} role is no account's")
        checked = {} if limits is None else checked_budget(limits)
        with self._lock:
            try:
                held = self._load()
            except TamperDetected:
                # Set again by an administrator: the forged value is replaced whole.
                held = {}
            settings = {name: dict(own) for name, own in held.items()}
            if limits is None:
                settings.pop(role.value, None)
            else:
                settings[role.value] = {**settings.get(role.value, {}), **checked}
            body = orjson.dumps(settings, option=orjson.OPT_SORT_KEYS)
            tag = self._macs.tag_hex(RowKind.SETTINGS, [ROLE_BUDGETS, body.hex()])
            self._meta.set_meta(ROLE_BUDGETS, orjson.dumps({"roles": settings, "tag": tag}))
            self._settings = settings
            self._read_at = self._clock()
            return dict(settings.get(role.value, {}))

    def _load(self) -> RoleSettings:
        stored = self._meta.get_meta(ROLE_BUDGETS)
        if stored is None:
            return {}
        try:
            doc = orjson.loads(stored)
            settings = doc["roles"]
            body = orjson.dumps(settings, option=orjson.OPT_SORT_KEYS)
            sound = self._macs.check_hex(
                RowKind.SETTINGS, [ROLE_BUDGETS, body.hex()], doc.get("tag")
            )
            if sound:
                return {
                    str(Role(name).value): checked_budget(own) for name, own in settings.items()
                }
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, ConfigurationError):
            pass
        raise TamperDetected(
            "the vault's role budgets fail their seal: they were changed outside custodes; "
            "an administrator sets them again with 'custodes account role-budget'"
        )
