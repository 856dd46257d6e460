"""Where things live and which environment variables custodes reads: the one place that does.

The vault directory holds data only; the keyring defaults to the user's configuration
directory, so that a copy of the vault directory carries no key.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from custodes.errors import ConfigurationError

ENV_KEYRING_PASSPHRASE = "CUSTODES_KEYRING_PASSPHRASE"  # noqa: S105 - a variable name
ENV_KEYRING = "CUSTODES_KEYRING"
ENV_VAULT = "CUSTODES_VAULT"
ENV_USER = "CUSTODES_USER"
ENV_PASSWORD = "CUSTODES_PASSWORD"  # noqa: S105 - a variable name
ENV_NEW_PASSWORD = "CUSTODES_NEW_PASSWORD"  # noqa: S105 - a variable name

VAULT_FILE = "vault.toml"
DATABASE_FILE = "vault.db"
REJECTS_DIR = "rejects"
LOGS_DIR = "logs"
VAULT_FORMAT = "custodes-vault"


def env(name: str) -> str | None:
    """An environment variable, or None when unset or empty."""
    value = os.environ.get(name)
    return value if value else None


def default_keyring_path(vault_id: bytes) -> Path:
    base = env(ENV_KEYRING)
    if base is not None:
        return Path(base)
    return platformdirs.user_config_path("custodes") / "keyrings" / f"{vault_id.hex()}.keyring"


@dataclass(frozen=True, slots=True)
class VaultLayout:
    """The files of one vault directory."""

    directory: Path

    @property
    def vault_file(self) -> Path:
        return self.directory / VAULT_FILE

    @property
    def database(self) -> Path:
        return self.directory / DATABASE_FILE

    @property
    def rejects(self) -> Path:
        return self.directory / REJECTS_DIR

    @property
    def logs(self) -> Path:
        return self.directory / LOGS_DIR

    def read(self) -> tuple[bytes, Path]:
        """The vault id and the keyring path recorded when the vault was created."""
        try:
            doc = tomllib.loads(self.vault_file.read_text("utf-8"))
        except FileNotFoundError:
            raise ConfigurationError(
                "no vault here: run 'custodes init DIR' first, or pass --vault"
            ) from None
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
            raise ConfigurationError(f"{VAULT_FILE} is damaged") from None
        if doc.get("format") != VAULT_FORMAT:
            raise ConfigurationError(f"{VAULT_FILE} does not describe a custodes vault")
        try:
            return bytes.fromhex(doc["vault_id"]), Path(doc["keyring"])
        except (KeyError, ValueError, TypeError):
            raise ConfigurationError(f"{VAULT_FILE} is damaged") from None

    def write(self, vault_id: bytes, keyring: Path) -> None:
        # json.dumps yields a valid TOML basic string for any path.
        import json

        text = (
            "# A custodes vault. The keyring is kept apart from this directory on purpose.\n"
            f'format = "{VAULT_FORMAT}"\n'
            f'vault_id = "{vault_id.hex()}"\n'
            f"keyring = {json.dumps(str(keyring))}\n"
        )
        fd = os.open(self.vault_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)


def is_within(path: Path, directory: Path) -> bool:
    """Whether path lies inside directory, after resolving links."""
    try:
        path.resolve().relative_to(directory.resolve())
    except ValueError:
        return False
    return True
