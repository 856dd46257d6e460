"""The vault: the only door to personal records and to the access log.

`door.Vault` is the door; `reading` is how it reads stored records for one access,
`integrity` how it holds the search index against them, `views` what it hands out.
"""

from custodes.sessions import ABSOLUTE_TIMEOUT, IDLE_TIMEOUT, Operator, Session
from custodes.vault.door import Vault
from custodes.vault.integrity import IndexCheck
from custodes.vault.reading import MAX_RESULTS
from custodes.vault.views import LinkView, LogExtract, RecordView

__all__ = [
    "ABSOLUTE_TIMEOUT",
    "IDLE_TIMEOUT",
    "MAX_RESULTS",
    "IndexCheck",
    "LinkView",
    "LogExtract",
    "Operator",
    "RecordView",
    "Session",
    "Vault",
]
