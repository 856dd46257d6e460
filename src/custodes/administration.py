"""Account administration: add, list, enrol, set passwords, disable, enable, unlock,
assign cases, issue integration tokens.

Each verb is an action like any other: the vault's access function asks the policy
whether the principal (an administrator's session, or the host operator) may perform
it, and puts it on the access log, naming the account and never a secret.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from custodes.access import AccessGate, Done, Grant
from custodes.accounts import Account, AccountBook
from custodes.errors import RecordNotFound
from custodes.policy import Action, Role, check_account_change
from custodes.policy.budgets import checked_budget
from custodes.sessions import Clock, Gatekeeper, Principal

T = TypeVar("T")


class Administration:
    """The administrator's verbs, owned by the vault and reached as `vault.admin`."""

    def __init__(
        self,
        *,
        gate: AccessGate,
        accounts: AccountBook,
        keeper: Gatekeeper,
        clock: Clock,
        case_exists: Callable[[str], bool],
    ) -> None:
        self._gate = gate
        self._case_exists = case_exists
        self._accounts = accounts
        self._keeper = keeper
        self._clock = clock

    def __repr__(self) -> str:
        return "Administration()"

    def list_accounts(self, actor: Principal) -> list[Account]:
        """Every account: names, roles, districts, assigned cases, state; never hashes."""
        return self._gate.access(actor, Action.ACCOUNT_LIST, lambda _: Done(self._accounts.list()))

    def add_account(
        self,
        actor: Principal,
        username: str,
        password: str,
        role: Role,
        attributes: dict[str, Any] | None = None,
    ) -> Account:
        def run(_: Grant) -> Done[Account]:
            return Done(self._accounts.add(username, password, role, attributes))

        detail = {"account": username, "account_role": role.value}
        return self._gate.access(actor, Action.ACCOUNT_ADD, run, detail=detail)

    def issue_enrolment(self, actor: Principal, username: str) -> str:
        """A one-time code (24 h) with which the account's holder enrols a second factor."""
        return self._change(
            actor,
            Action.MFA_ENROL_ISSUE,
            username,
            lambda: self._accounts.issue_enrolment(username, now=self._clock()),
        )

    def change_password(self, actor: Principal, username: str, password: str) -> None:
        """Set a new password and end every session of the account."""

        def change() -> None:
            self._accounts.set_password(username, password)
            self._keeper.sessions.end_all(username)

        self._change(actor, Action.PASSWORD_CHANGE, username, change)

    def disable_account(self, actor: Principal, username: str) -> None:
        """Disable an account: every session and API token of it stops working at once."""

        def change() -> None:
            self._accounts.set_disabled(username, True)
            self._keeper.sessions.end_all(username)

        self._change(actor, Action.ACCOUNT_DISABLE, username, change)

    def enable_account(self, actor: Principal, username: str) -> None:
        self._change(
            actor,
            Action.ACCOUNT_ENABLE,
            username,
            lambda: self._accounts.set_disabled(username, False),
        )

    def unlock_account(self, actor: Principal, username: str) -> None:
        """Lift a lock left by repeated failed logins or by a budget the account crossed;
        its counters go on, so an account still over a limit is locked again at its next
        read."""

        def change() -> None:
            self._accounts.unlock(username)
            self._keeper.clear_failures(username)

        self._change(actor, Action.ACCOUNT_UNLOCK, username, change)

    def set_budget(
        self, actor: Principal, username: str, limits: Mapping[str, int | None] | None
    ) -> None:
        """Give an account budget limits of its own (None for a limit: none of that kind),
        or with `limits` None put it back on its role's budget; logged with the limits.
        Holds from the account's next read, in every session it has."""
        checked = None if limits is None else checked_budget(limits)

        def run(grant: Grant) -> Done[None]:
            check_account_change(grant.username, username, Action.ACCOUNT_BUDGET)
            if self._accounts.get(username) is None:
                raise RecordNotFound("no account with that name")
            self._accounts.set_budget(username, checked)
            return Done(None)

        detail = {"account": username, "limits": checked if checked is not None else "role"}
        self._gate.access(actor, Action.ACCOUNT_BUDGET, run, detail=detail)

    def set_role_budget(
        self, actor: Principal, role: Role, limits: Mapping[str, int | None] | None
    ) -> dict[str, int | None]:
        """Give every account of a role these budget limits in this vault, over the
        defaults (None for a limit: none of that kind; an account's own limits still
        win), or with `limits` None put the role back on the defaults. Logged with the
        limits; holds from the next read of every process within seconds. The role's
        own limits as now set."""
        checked = None if limits is None else checked_budget(limits)

        def run(_: Grant) -> Done[dict[str, int | None]]:
            return Done(self._keeper.role_budgets.set(role, checked))

        detail = {"role": role.value, "limits": checked if checked is not None else "defaults"}
        return self._gate.access(actor, Action.ROLE_BUDGET, run, detail=detail)

    def set_district(self, actor: Principal, username: str, district: str | None) -> None:
        """Move an account to another division (None: no district, so no records but its
        cases'). Holds from the account's next access, in every session it has; logged
        with the district set."""

        def run(grant: Grant) -> Done[None]:
            check_account_change(grant.username, username, Action.ACCOUNT_DISTRICT)
            if self._accounts.get(username) is None:
                raise RecordNotFound("no account with that name")
            self._accounts.set_district(username, district)
            return Done(None)

        detail = {"account": username, "district": district}
        self._gate.access(actor, Action.ACCOUNT_DISTRICT, run, detail=detail)

    def assign_case(self, actor: Principal, username: str, case_no: str) -> str:
        """Assign a case to an account: with the case as the stated purpose, its records
        open to the account wherever they live. Returns the canonical number. Holds from
        the account's next access, in every session it has."""
        return self._case_change(actor, Action.CASE_ASSIGN, username, case_no)

    def unassign_case(self, actor: Principal, username: str, case_no: str) -> str:
        """Take a case from an account; from its next access the case opens nothing."""
        return self._case_change(actor, Action.CASE_UNASSIGN, username, case_no)

    def issue_api_token(self, actor: Principal, username: str, scope: str, *, days: int) -> str:
        """A bearer token for an integration, shown once; only its SHA-256 is stored."""

        def run(_: Grant) -> Done[str]:
            if self._accounts.get(username) is None:
                raise RecordNotFound("no account with that name")
            token = self._keeper.tokens.issue(username, scope, days=days, now=self._clock())
            return Done(token, detail={"scope": scope, "days": days})

        return self._gate.access(actor, Action.API_TOKEN_ISSUE, run, detail={"account": username})

    def _case_change(self, actor: Principal, action: Action, username: str, case_no: str) -> str:
        def run(_: Grant) -> Done[str]:
            if action is Action.CASE_ASSIGN:
                # Only a stored case can be assigned: an assignment opens what the case
                # names, and a number with nothing behind it would open nothing anyway.
                case = self._accounts.assign_case(username, case_no, exists=self._case_exists)
            else:
                case = self._accounts.unassign_case(username, case_no)
            # The canonical number only: a refused one is never repeated, not even here.
            return Done(case, detail={"case": case})

        return self._gate.access(actor, action, run, detail={"account": username})

    def _change(
        self, actor: Principal, action: Action, username: str, change: Callable[[], T]
    ) -> T:
        def run(grant: Grant) -> Done[T]:
            check_account_change(grant.username, username, action)
            if self._accounts.get(username) is None:
                raise RecordNotFound("no account with that name")
            return Done(change())

        return self._gate.access(actor, action, run, detail={"account": username})
