"""The access log: every read, reveal, login and administrative act, written before data leaves.

The journal here records each entry durably in the vault's storage and fails closed;
the tamper-evident Merkle log and signed checkpoints build on the same entries.
"""

from custodes.audit.journal import AccessEntry, AccessJournal, Outcome

__all__ = ["AccessEntry", "AccessJournal", "Outcome"]
