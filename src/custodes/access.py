"""The single access function: who asks, may they, do it, log it durably, then answer.

Every operation of the vault that reads personal data or the access log, or changes an
account or the log, passes `AccessGate.access`: it checks the principal afresh (a live
session of an enabled account, or the host operator the vault was opened with), asks
custodes.policy once, runs the operation in memory, appends the access-log entry
durably, and only then returns. If the entry cannot be written, nothing is returned.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from custodes.accounts import BUDGET, Account, AccountBook
from custodes.alert_book import AlertBook
from custodes.alerts import Alert
from custodes.audit import AccessEntry, AccessLog, Outcome
from custodes.canaries import CanaryList
from custodes.errors import (
    AccessDenied,
    AuthenticationFailed,
    BudgetExceeded,
    CustodesError,
    DatabaseRefused,
    RecordNotFound,
)
from custodes.metering import UsageMeter
from custodes.policy import (
    AccessPurpose,
    Action,
    RecordFacts,
    Role,
    assigned_cases,
    authorise,
    may_see,
    sees_reporters,
)
from custodes.policy.budgets import (
    Budget,
    budget_for,
    charge_for,
    crossed,
    paging_crossed,
)
from custodes.sessions import Clock, Gatekeeper, Operator, Principal, Session
from custodes.storage.base import UsageStore

T = TypeVar("T")

# The operational log (counts and outcomes), not the access log.
logger = logging.getLogger("custodes.access")

# The alert an entry carries (detail "alert") when the database refused the vault's own
# role during the access: a privilege it lacks or the log's append-only triggers. Either
# something asked for more than the server's role may do, or the grants changed under it.
DATABASE_REFUSED = "database:refused"

# Reads whose log entry counts the records withheld by the record-level rules.
_RECORD_READS = frozenset({Action.SEARCH, Action.READ})
# Reads that show records, charged to the reader's budgets (custodes.policy.budgets).
_BUDGETED = frozenset({Action.SEARCH, Action.READ, Action.REVEAL})
# The alert a refusal carries when the read would have crossed a budget.
BUDGET_ALERT = "guard:budget"
# The alert a read carries when it returned a canary record (custodes.canaries).
CANARY_ALERT = "guard:canary"
# The alert an entry carries when the anomaly guard acted on an account.
ANOMALY_ALERT = "guard:anomaly"
# The most records one entry names: a write of more is announced in several entries, so
# that no leaf of the log grows without bound (an ingest batch is 2,000 by default).
MAX_ENTRY_RECORDS = 5_000


def ids_digest(record_ids: Sequence[str]) -> str:
    """SHA-256 over record ids in the order given, one per line: what a batch's entry
    commits to of the ids sealed beside it."""
    return hashlib.sha256("".join(f"{rid}\n" for rid in record_ids).encode()).hexdigest()


def _alert(exc: BaseException) -> dict[str, str]:
    """The alert a failed access's entry carries, if its failure calls for one."""
    return {"alert": DATABASE_REFUSED} if isinstance(exc, DatabaseRefused) else {}


def _report_alert(exc: BaseException, action: Action, index: int) -> None:
    """Log the alert an entry carries: the action and where the entry is, no value."""
    if isinstance(exc, DatabaseRefused):
        logger.error(
            "alert %s: the database refused the vault's role during %s; on the access log "
            "at entry %d",
            DATABASE_REFUSED,
            action.value,
            index,
        )


def _report_budget(who: Session, action: Action, limits: list[str], index: int) -> None:
    """Log the alert of a read refused at a budget: the account, the limits crossed and
    where the refusal is on the access log, never a value."""
    logger.error(
        "alert %s: account %s crossed %s during %s and was locked; on the access log at entry %d",
        BUDGET_ALERT,
        who.username,
        ", ".join(limits),
        action.value,
        index,
    )


def _paging(budget: Budget | None) -> str:
    """An account's paging limits, as a refusal says them."""
    said = []
    if budget is not None and budget.page_size is not None:
        said.append(f"{budget.page_size} records a page")
    if budget is not None and budget.search_depth is not None:
        said.append(f"{budget.search_depth} in all")
    return " and ".join(said)


def _nothing() -> None:
    """No keyring to follow (a vault on keys handed in whole, as tests build)."""


def _nowhere(_alert: Alert) -> None:
    """Where alerts go when no destination is configured: the access log, the vault's
    alert book and the operational log hold them already."""


class OutOfReach(RecordNotFound):
    """A record that exists but lies outside the official's reach. Logged as a refusal,
    then raised to the caller as a plain RecordNotFound: the two must look alike."""

    def __init__(self, record_type: str | None = None) -> None:
        super().__init__("no such record")
        self.record_type = record_type


@dataclass(slots=True)
class Reach:
    """One access's view of the record-level rules: who asks, for what, and what has
    been withheld from them so far (a count for the log, never shown)."""

    role: Role
    district: object
    cases: frozenset[str]
    purpose: AccessPurpose | None
    today: dt.date
    case_scope: Callable[[str], frozenset[str]]  # the record ids a stored case names
    withheld: int = 0
    districts: dict[str, str | None] = field(default_factory=dict)  # person id -> district
    scopes: dict[str, frozenset[str]] = field(default_factory=dict)  # case -> its records

    def allows(self, facts: RecordFacts, record_id: str) -> bool:
        if self.purpose is None:
            return False

        def names_record(case: str) -> bool:
            if case not in self.scopes:
                self.scopes[case] = self.case_scope(case)
            return record_id in self.scopes[case]

        return may_see(
            self.role, self.district, self.cases, self.purpose, facts, names_record=names_record
        )

    @property
    def sees_reporters(self) -> bool:
        return sees_reporters(self.role)


@dataclass(frozen=True, slots=True)
class Grant:
    """What an authorised operation is told about its caller."""

    principal: Session | Operator
    reach: Reach

    @property
    def username(self) -> str:
        return self.principal.username

    @property
    def role(self) -> Role:
        return self.principal.role


@dataclass(slots=True)
class Done(Generic[T]):
    """An operation's result, the records it touched and what its log entry adds."""

    result: T
    records: Sequence[str] = ()
    detail: Mapping[str, Any] = field(default_factory=dict)
    record_type: str | None = None  # known only once the record is read
    # Sealed beside the granted entry with the access's own `private`: what only the
    # operation knows once it has run (the records a bulk export holds, its canaries).
    private: Mapping[str, Any] = field(default_factory=dict)


class AccessGate:
    """The one door: every decision by custodes.policy, every outcome on the access log."""

    def __init__(
        self,
        *,
        keeper: Gatekeeper,
        accounts: AccountBook,
        log: AccessLog,
        clock: Clock,
        operator: Operator | None,
        case_scope: Callable[[str], frozenset[str]],
        usage: UsageStore,
        alert_book: AlertBook,
        canaries: CanaryList,
        keys: Callable[[], None] | None = None,
        housekeeper: Operator | None = None,
    ) -> None:
        self._keeper = keeper
        # Before every access: the record keys in step with the keyring, which a
        # rotation on the host changes under a running server (custodes.key_watch).
        self._keys = keys or _nothing
        # The vault's own hand (custodes.vault.erasure): erases what its ledger or a
        # retention rule already decided, also in a server, which has no operator.
        self._housekeeper = housekeeper
        self._meter = UsageMeter(usage)
        self._alert_book = alert_book
        self._canaries = canaries
        self._send: Callable[[Alert], None] = _nowhere
        self._case_scope = case_scope
        self._accounts = accounts
        self._log = log
        self._clock = clock
        self._operator = operator

    def __repr__(self) -> str:
        return "AccessGate()"

    def access(
        self,
        principal: Principal,
        action: Action,
        run: Callable[[Grant], Done[T]],
        *,
        purpose: AccessPurpose | None = None,
        record_type: str | None = None,
        detail: Mapping[str, Any] | None = None,
        private: dict[str, Any] | None = None,
        target: str | None = None,
        page: tuple[int, int] | None = None,
    ) -> T:
        """Decide, run, log durably, then return. Nothing leaves before the entry exists.

        `private` (such as the values searched for) is sealed beside the entry, so that
        a subject's report can show it while the log itself names no one. `target` is the
        record an operation on one record names, so that a refused or failed attempt
        reaches that person's subject report. `page` is a search's (offset, size), held
        against the account's paging limits (policy.budgets) before anything is read.
        """
        result, _ = self._access(
            principal, action, run, purpose, record_type, detail, private, target, page
        )
        return result

    def access_then(
        self,
        principal: Principal,
        action: Action,
        run: Callable[[Grant], Done[T]],
        *,
        purpose: AccessPurpose | None = None,
        target: str | None = None,
        record_type: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> tuple[T, int]:
        """Like access, and also the index of the entry that records it, for an operation
        whose answer is read from the log after its own entry (a subject report), or that
        raises an alert pointing at it (an export naming canaries)."""
        return self._access(
            principal, action, run, purpose, record_type, detail, None, target, None
        )

    def canaries_among(self, record_ids: Sequence[str]) -> frozenset[str]:
        """The canary records among these ids (custodes.canaries)."""
        return frozenset(self._canaries.among(record_ids))

    def canaries_exported(
        self, username: str, action: Action, index: int, records: Sequence[str]
    ) -> None:
        """An export that named canary records among the ids it asked for, now on the log
        at `index`: the same alarm as a read that returned one. The account is locked and
        a critical alert raised; the export was answered as any other, so that whoever
        holds the account learns nothing from it."""
        self._keeper.lock_out(username, {"alert": CANARY_ALERT})
        logger.critical(
            "alert %s: account %s named canary records in %s and was locked; on the access "
            "log at entry %d",
            CANARY_ALERT,
            username,
            action.value,
            index,
        )
        self.raise_alert(
            Alert(CANARY_ALERT, "critical", username, action.value, ["canary"], index, records)
        )

    def access_write(
        self,
        principal: Principal,
        action: Action,
        records: Sequence[str],
        write: Callable[[Grant], Done[T]],
        *,
        detail: Mapping[str, Any] | None = None,
    ) -> T:
        """Decide, log durably, then write: for an operation that stores records, the
        entry comes first, so that no record is stored without one.

        The entry counts the records and carries a digest of their ids (ids_digest); the
        ids themselves are sealed beside it, in its private details. Named as subjects,
        every record of a batch would put the batch's thousands of commitments into each
        of its people's subject reports, and their index rows cost ingest a sixth. A
        write that raises is logged again as an error for the same records, and one that
        stores fewer than it announced (its Done.records are those it stored) is logged
        as an error for the rest.
        """
        who, account = self._check(principal)
        announced = tuple(dict.fromkeys(records))

        def log(outcome: Outcome, named: Sequence[str], extra: Mapping[str, Any]) -> int:
            index = -1
            for start in range(0, max(len(named), 1), MAX_ENTRY_RECORDS):
                part = tuple(named[start : start + MAX_ENTRY_RECORDS])
                index = self._log.append(
                    AccessEntry(
                        actor=who.username,
                        role=who.role.value,
                        action=action.value,
                        outcome=outcome,
                        time=self._clock(),
                        result_count=len(part),
                        client=who.client,
                        detail={**(detail or {}), **extra, "ids_digest": ids_digest(part)},
                    ),
                    private={"records": list(part)},
                )
            return index

        try:
            authorise(who.role, action, scope=who.scope)
        except AccessDenied:
            log(Outcome.DENIED, announced, {})
            raise
        log(Outcome.GRANTED, announced, {})
        try:
            done = write(Grant(who, self._reach(who, None, account)))
        except Exception as exc:
            # Whatever the fault: the granted entry is on the log already, and must not be
            # left to say the records were stored.
            index = log(Outcome.ERROR, announced, {"error": type(exc).__name__, **_alert(exc)})
            _report_alert(exc, action, index)
            raise
        stored = set(done.records)
        unwritten = [r for r in announced if r not in stored]
        if unwritten:
            log(Outcome.ERROR, unwritten, {**done.detail, "error": "not_written"})
        return done.result

    def _access(
        self,
        principal: Principal,
        action: Action,
        run: Callable[[Grant], Done[T]],
        purpose: AccessPurpose | None,
        record_type: str | None,
        detail: Mapping[str, Any] | None,
        private: dict[str, Any] | None,
        target: str | None,
        page: tuple[int, int] | None,
    ) -> tuple[T, int]:
        who, account = self._check(principal)
        attempted = (target,) if target else ()

        def entry(
            outcome: Outcome,
            done: Done[Any] | None = None,
            kind: str | None = record_type,
            extra: Mapping[str, Any] | None = None,
        ) -> AccessEntry:
            records = tuple(done.records) if done is not None else attempted
            return AccessEntry(
                actor=who.username,
                role=who.role.value,
                action=action.value,
                outcome=outcome,
                time=self._clock(),
                purpose=purpose.reason if isinstance(purpose, AccessPurpose) else None,
                case_ref=purpose.case_ref if isinstance(purpose, AccessPurpose) else None,
                record_type=done.record_type or kind if done is not None else kind,
                records=records,
                result_count=len(done.records) if done is not None else 0,
                client=who.client,
                detail={**(detail or {}), **(done.detail if done else {}), **(extra or {})},
            )

        append = self._log.append
        try:
            authorise(who.role, action, scope=who.scope, purpose=purpose)
        except AccessDenied:
            append(entry(Outcome.DENIED), private=private)
            raise
        if page is not None and account is not None:
            budget = self._budget(who, account)
            deep = paging_crossed(budget, *page)
            if deep:
                refused = {"reason": "paging", "limits": deep}
                append(entry(Outcome.DENIED, extra=refused), private=private)
                raise AccessDenied(
                    f"this account's searches show at most {_paging(budget)}: ask for "
                    "fewer, or narrow the search"
                )
        reach = self._reach(who, purpose, account)
        try:
            done = run(Grant(who, reach))
        except OutOfReach as refused:
            kind = refused.record_type or record_type
            append(
                entry(Outcome.DENIED, kind=kind, extra={"reason": "out_of_reach"}), private=private
            )
            raise RecordNotFound("no such record") from None
        except AccessDenied:
            append(entry(Outcome.DENIED), private=private)
            raise
        except CustodesError as exc:
            failed = {"error": type(exc).__name__, **_alert(exc)}
            index = append(entry(Outcome.ERROR, extra=failed), private=private)
            _report_alert(exc, action, index)
            if "alert" in failed:
                self.raise_alert(
                    Alert(
                        str(failed["alert"]),
                        "critical",
                        who.username,
                        action.value,
                        [type(exc).__name__],
                        index,
                    )
                )
            raise
        if action in _BUDGETED and isinstance(who, Session) and account is not None:
            tripped = self._canaries.among(done.records)
            if tripped:
                return self._tripped(who, action, done, tripped, entry, private)
            crossed_limits = self._spend(who, account, action, done)
            if crossed_limits:
                # Locked first: should the entry fail to be written, the account stays
                # locked all the same (and the read is refused either way).
                self._keeper.lock_out(who.username, {"limits": crossed_limits})
                spent = {
                    "reason": "budget",
                    "alert": BUDGET_ALERT,
                    "limits": crossed_limits,
                    "locked": True,
                }
                index = append(entry(Outcome.DENIED, extra=spent), private=private)
                _report_budget(who, action, crossed_limits, index)
                self.raise_alert(
                    Alert(BUDGET_ALERT, "high", who.username, action.value, crossed_limits, index)
                )
                raise BudgetExceeded(
                    "this account has been shown as many records as its budget allows; it "
                    "is locked until an administrator unlocks it"
                )
        withheld = {"filtered": reach.withheld} if action in _RECORD_READS else {}
        sealed = {**(private or {}), **done.private} if done.private else private
        index = append(entry(Outcome.GRANTED, done, extra=withheld), private=sealed)
        return done.result, index

    def _tripped(
        self,
        who: Session,
        action: Action,
        done: Done[T],
        tripped: list[str],
        entry: Callable[..., AccessEntry],
        private: dict[str, Any] | None,
    ) -> tuple[T, int]:
        """A read that returned a canary: the account is locked first (its sessions and
        tokens end), then the read is logged with the alert and answered as any other,
        so that whoever holds the account learns nothing from this answer; the next
        request finds the account locked. The alert is critical: no legitimate search
        returns a canary (custodes.canaries)."""
        self._keeper.lock_out(who.username, {"alert": CANARY_ALERT})
        extra = {"alert": CANARY_ALERT, "locked": True}
        index = self._log.append(entry(Outcome.GRANTED, done, extra=extra), private=private)
        logger.critical(
            "alert %s: account %s was shown a canary record during %s and was locked; on "
            "the access log at entry %d",
            CANARY_ALERT,
            who.username,
            action.value,
            index,
        )
        self.raise_alert(
            Alert(
                CANARY_ALERT,
                "critical",
                who.username,
                action.value,
                ["canary"],
                index,
                tuple(done.records),
            )
        )
        return done.result, index

    def _spend(self, who: Session, account: Account, action: Action, done: Done[Any]) -> list[str]:
        """Charge what a read showed (its records, or a miss: a search that found nothing)
        to the account's counters, shared by every server process; the budget limits the
        totals now cross, by name (none: the read may be answered)."""
        budget = self._budget(who, account)
        if budget is None:
            return []
        views = len(done.records)
        charge = charge_for(
            budget,
            self._clock(),
            views=views,
            missed=action is Action.SEARCH and not views,
            subjects=done.records,
        )
        if not charge.items:
            return []
        limits = {(counter, window): limit for _, counter, window, limit in budget.limits()}
        caps = [limits[(counter, window)] for counter, window, _, _ in charge.items]
        totals = self._meter.charge(
            who.username, charge.rows, caps, distinct=charge.distinct, subjects=charge.subjects
        )
        return crossed(budget, charge, totals)

    def _budget(self, who: Session | Operator, account: Account) -> Budget | None:
        """The account's budget: its role's in this vault, with its own limits put in."""
        return budget_for(
            who.role, account.attributes.get(BUDGET), self._keeper.role_budgets.current()
        )

    def act_on_anomaly(
        self,
        account: str,
        role: str,
        *,
        verdict: str,
        called_for: str,
        severity: str,
        score: float,
        signals: Sequence[str],
        explained: Sequence[str],
        records: Sequence[str] = (),
        end_sessions: bool = False,
        lock: bool = False,
    ) -> int:
        """What the anomaly guard does about an account, done and logged here like a read
        refused at its budget: locked (sessions and tokens ended) or its sessions ended
        (it logs in again, with its second factor), then the entry, with the score and its
        explanation (counts, never a value), then the alert. The entry's position."""
        # Acted on first: should the entry fail to be written, the account stays locked.
        if lock:
            why = {"alert": ANOMALY_ALERT, "signals": list(signals), "score": score}
            self._keeper.lock_out(account, why)
        elif end_sessions:
            self._keeper.sessions.end_all(account)
        index = self._log.append(
            AccessEntry(
                actor=account,
                role=role,
                action=Action.GUARD_ACT.value,
                outcome=Outcome.GRANTED,
                time=self._clock(),
                records=tuple(records),
                detail={
                    "alert": ANOMALY_ALERT,
                    "guard": verdict,
                    "called_for": called_for,
                    "score": score,
                    "signals": list(signals),
                    "explained": list(explained),
                    "locked": lock,
                    "sessions_ended": lock or end_sessions,
                },
            )
        )
        logger.error(
            "alert %s: account %s scored %.1f (%s), guard %s; on the access log at entry %d",
            ANOMALY_ALERT,
            account,
            score,
            ", ".join(signals),
            verdict,
            index,
        )
        self.raise_alert(
            Alert(
                ANOMALY_ALERT,
                severity,
                account,
                Action.GUARD_ACT.value,
                list(signals),
                index,
                tuple(records),
            )
        )
        return index

    def close(self) -> None:
        """Charge what the meter holds, before storage closes."""
        self._meter.close()

    def send_alerts_to(self, send: Callable[[Alert], None]) -> None:
        """Hand every alert this door raises (after its entry is on the log, and once it
        is in the alert book) to `send`, which must not wait (custodes.alerts.Dispatcher)."""
        self._send = send

    def raise_alert(self, alert: Alert) -> None:
        """The one way an alert is raised, once its entry is on the access log: kept in
        the vault's alert book for the watchers, then sent out. An alert the book cannot
        take is still sent (and stays on the access log)."""
        try:
            self._alert_book.record(alert)
        except CustodesError as exc:
            logger.error(
                "alert %s (entry %d) was not stored in the alert book (%s); it is on the "
                "access log",
                alert.kind,
                alert.entry,
                type(exc).__name__,
            )
        self._send(alert)

    def check(self, principal: Principal) -> Session | Operator:
        """The principal, checked afresh, for operations that log nothing themselves."""
        return self._check(principal)[0]

    def _check(self, principal: object) -> tuple[Session | Operator, Account | None]:
        self._keys()
        if isinstance(principal, Operator):
            # Only the operator this vault was opened with on the host; a server's vault
            # has none, so no request can act as one.
            held = (self._operator, self._housekeeper)
            if not any(principal is mine for mine in held if mine is not None):
                raise AuthenticationFailed("the host operator acts only on the host")
            return principal, None
        live, account = self._keeper.live_with_account(principal)
        return live, self._holder(live, account)

    def _holder(self, live: Session, account: Account | None) -> Account:
        """The session's account, read with the session at every request (at its arrival,
        or here): a changed district or case assignment holds at once, and a session that
        outlived its account (a restored database, a fault) opens nothing."""
        if account is None or account.disabled:
            if live.scope is None:
                self._keeper.sessions.end(live.token)
            raise AuthenticationFailed("the session has ended: log in again")
        return account

    def _reach(
        self, who: Session | Operator, purpose: AccessPurpose | None, account: Account | None
    ) -> Reach:
        attributes = account.attributes if account is not None else {}
        today = dt.datetime.fromtimestamp(self._clock(), dt.UTC).date()
        return Reach(
            who.role,
            attributes.get("district"),
            assigned_cases(attributes.get("cases")),
            purpose,
            today,
            self._case_scope,
        )
