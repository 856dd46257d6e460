"""The access log: every read, reveal, login and administrative act, written before data leaves.

Entries are leaves of an RFC 6962 Merkle tree (`merkle`), appended durably with group
commit (`log`), sealed by signed checkpoints (`checkpoint`) that outside witnesses
cosign (`witness`), and checked offline by the verifier (`verify`).
"""

from custodes.audit.entry import AccessEntry, Outcome
from custodes.audit.log import AccessLog, AuditKeys

__all__ = ["AccessEntry", "AccessLog", "AuditKeys", "Outcome"]
