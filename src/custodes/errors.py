"""Typed errors for everything custodes refuses to do.

Every message names what went wrong and, for input, the line and field; none ever
carries a personal value. The CLI turns each into one line and an exit code.
"""

from __future__ import annotations


class CustodesError(Exception):
    """Base of every error the library raises on purpose."""

    exit_code = 1


class ConfigurationError(CustodesError):
    """The vault, keyring or schema is missing, malformed or inconsistent."""

    exit_code = 2


class SchemaError(ConfigurationError):
    """A schema file does not describe a usable set of record types."""


class KeyringError(CustodesError):
    """The keyring cannot be opened: wrong passphrase, wrong vault, or damaged file."""

    exit_code = 3


class TamperDetected(CustodesError):
    """Stored data failed its integrity check.

    One opaque error for every kind of failure (bad tag, wrong record, wrong field,
    truncated frame) so that nothing can be learned by probing which check failed.
    """

    exit_code = 4

    def __init__(self, message: str = "stored data failed its integrity check") -> None:
        super().__init__(message)


class ErasureLedgerBroken(TamperDetected):
    """The erasure ledger failed its chain or a signature: the vault does not serve until
    it is put back (custodes.audit.erasures)."""


class InvalidRecord(CustodesError):
    """One input record was refused. Carries line, field and reason; never the value."""

    exit_code = 5

    def __init__(self, reason: str, *, field: str | None = None, line: int | None = None) -> None:
        self.reason = reason
        self.field = field
        self.line = line
        super().__init__(self._describe())

    def _describe(self) -> str:
        where = []
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.field is not None:
            where.append(f"field {self.field!r}")
        prefix = ", ".join(where)
        return f"{prefix}: {self.reason}" if prefix else self.reason

    def at_line(self, line: int) -> InvalidRecord:
        """The same refusal, placed at an input line."""
        return InvalidRecord(self.reason, field=self.field, line=line)


class InvalidInput(CustodesError):
    """A whole input cannot be read (missing CSV column, broken JSON array, unknown format)."""

    exit_code = 5

    def __init__(self, reason: str, *, line: int | None = None) -> None:
        self.reason = reason
        self.line = line
        super().__init__(f"line {line}: {reason}" if line is not None else reason)


class InvalidQuery(CustodesError):
    """A search or reveal request is malformed (unknown index, unknown field, bad value)."""

    exit_code = 5


class InvalidAssignment(InvalidQuery):
    """A case cannot be assigned to an account, or taken from it: a malformed case number,
    a case already (or not) assigned, an account that reads no records. The message says
    which, and never repeats the case number."""


class AuthenticationFailed(CustodesError):
    """Unknown account, wrong password, or disabled account: deliberately indistinguishable."""

    exit_code = 6

    def __init__(self, message: str = "authentication failed") -> None:
        super().__init__(message)


class CodeUsed(AuthenticationFailed):
    """The right password, and a one-time code right for these moments but used already:
    said to its holder so that they wait for the next code. Counted and throttled like
    any failed login."""

    def __init__(self) -> None:
        super().__init__(
            "that one-time code was used already: wait for the next code in your app, then "
            "log in with it"
        )


class LoginThrottled(AuthenticationFailed):
    """Too many failed logins from this account name or address: wait before trying again.

    Raised alike for known and unknown account names, and before any password is checked.
    """

    def __init__(self, retry_after: float) -> None:
        self.retry_after = max(1, int(retry_after + 0.999))
        super().__init__(f"too many failed attempts: try again in {self.retry_after} seconds")


class WeakPassword(CustodesError):
    """A new password is too short, too common or too easy to guess."""

    exit_code = 6


class AccessDenied(CustodesError):
    """The account may not do this, or not for this purpose."""

    exit_code = 7


class SelfApproval(AccessDenied):
    """A two-person step approved by the official who asked for it."""


class PurposeRequired(AccessDenied):
    """A read of personal data was attempted without a stated purpose."""


class BudgetExceeded(AccessDenied):
    """The read would take the account past a budget of record views or misses
    (custodes.policy.budgets): nothing of it is returned, and the account is locked."""


class SessionLimit(AccessDenied):
    """The account has as many sessions open as it may: one must end before another
    starts."""


class RecordNotFound(CustodesError):
    """No record with that id (or not one this account may know exists)."""

    exit_code = 8


class AuditUnavailable(CustodesError):
    """The access log could not durably record an access, so the access was refused."""

    exit_code = 9


class LogMoved(AuditUnavailable):
    """Another writer appended to the access log first; the batch must be rebuilt on the
    tree as it now stands."""


class StorageError(CustodesError):
    """The storage backend failed; the batch in flight did not land."""

    exit_code = 10


class DatabaseRefused(StorageError):
    """The database refused the vault's own role an operation: a privilege it was never
    granted (or was revoked), or the access log's append-only triggers. Something asked
    for more than the role may do, or the grants changed under it; the operation failed
    closed. The message names the operation and the vault's table, never a value."""

    # Not the request's fault: the server's role is refused, as for a missing log.
    http_status = 503


class AuditRefused(AuditUnavailable, DatabaseRefused):
    """The database refused the vault's role an append to the access log: the access is
    refused (AuditUnavailable), and the refusal is reported as any other DatabaseRefused."""
