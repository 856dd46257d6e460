"""Backups of a vault, and restores from them.

`manifest` (pure: the manifest, its seal, its signed statement, the content digest),
`files` (the backup directory and the key files every backend's backup carries) and one
adapter per storage backend: `sqlite` (backup, verify, restore). Nothing is imported
here, so that the vault's door can name the manifest's types without loading an adapter.
"""
