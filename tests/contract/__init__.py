"""Contract suites that every implementation of a Protocol must pass: one per storage
concern (records, accounts, log, meta), and StorageContract, all of them at once.
"""


def close_backend(backend: object) -> None:
    """Close a backend a test has finished with. Only Storage promises close(): a backend
    of one concern may hold nothing to close."""
    close = getattr(backend, "close", None)
    if callable(close):
        close()
