"""Where things live and which environment variables custodes reads: the one place that does.

The vault directory holds data only; the keyring defaults to the user's configuration
directory, so that a copy of the vault directory carries no key.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

import platformdirs

from custodes.errors import ConfigurationError

ENV_KEYRING_PASSPHRASE = "CUSTODES_KEYRING_PASSPHRASE"  # noqa: S105 - a variable name
ENV_KEYRING = "CUSTODES_KEYRING"
ENV_LOG_KEY = "CUSTODES_LOG_KEY"
ENV_VAULT = "CUSTODES_VAULT"
# A PostgreSQL URL that overrides the one a vault recorded (another role, another host).
ENV_DATABASE = "CUSTODES_DATABASE"
# Read-only replicas of that database (streaming standbys), separated by semicolons; they
# override the ones a vault recorded. "none" names no replica at all.
ENV_REPLICAS = "CUSTODES_REPLICAS"
# The database of the access log, when it is not the records' own.
ENV_LOG_DATABASE = "CUSTODES_LOG_DATABASE"
# How far behind the primary a replica may be, in seconds, and still serve reads.
ENV_REPLICA_MAX_LAG = "CUSTODES_REPLICA_MAX_LAG"
ENV_USER = "CUSTODES_USER"
ENV_PASSWORD = "CUSTODES_PASSWORD"  # noqa: S105 - a variable name
ENV_NEW_PASSWORD = "CUSTODES_NEW_PASSWORD"  # noqa: S105 - a variable name
ENV_TOTP = "CUSTODES_TOTP"  # the current one-time code from the official's authenticator
ENV_ENROLMENT_CODE = "CUSTODES_ENROLMENT_CODE"  # for 'account mfa' without a prompt
ENV_ALERT_SECRET = "CUSTODES_ALERT_WEBHOOK_SECRET"  # noqa: S105 - a variable name
ENV_SESSION_FILE = "CUSTODES_SESSION_FILE"  # where 'custodes login' keeps its session
# An officer's passphrase for their key share file (M-of-N unseal); else a prompt per share.
ENV_SHARE_PASSPHRASE = "CUSTODES_SHARE_PASSPHRASE"  # noqa: S105 - a variable name
ENV_PKCS11_PIN = "CUSTODES_PKCS11_PIN"  # the user PIN of the token holding the KEKs

VAULT_FILE = "vault.toml"
DATABASE_FILE = "vault.db"
REJECTS_DIR = "rejects"
LOGS_DIR = "logs"
VAULT_FORMAT = "custodes-vault"
DEFAULT_REPLICA_MAX_LAG = 1.0


def env(name: str) -> str | None:
    """An environment variable, or None when unset or empty."""
    value = os.environ.get(name)
    return value if value else None


def default_keyring_path(vault_id: bytes) -> Path:
    base = env(ENV_KEYRING)
    if base is not None:
        return Path(base)
    return platformdirs.user_config_path("custodes") / "keyrings" / f"{vault_id.hex()}.keyring"


def default_log_key_path(vault_id: bytes) -> Path:
    """The access log's signing key: a file of its own, apart from the data keys."""
    base = env(ENV_LOG_KEY)
    if base is not None:
        return Path(base)
    return platformdirs.user_config_path("custodes") / "log-keys" / f"{vault_id.hex()}.key"


def session_file_path() -> Path:
    """Where an official's client keeps the session 'custodes login' opened: the user's
    configuration directory, never a vault directory."""
    override = env(ENV_SESSION_FILE)
    if override is not None:
        return Path(override)
    return platformdirs.user_config_path("custodes") / "session.json"


@dataclass(frozen=True, slots=True)
class VaultFile:
    """What vault.toml records: the vault's id and where its keys were put."""

    vault_id: bytes
    keyring: Path
    log_key: Path
    # Where the records live when not in this directory's SQLite file: a PostgreSQL URL
    # naming no password (libpq reads that from PGPASSFILE or ~/.pgpass).
    database: str | None = None
    # The least-privileged role the database was granted to for this vault's server
    # ('custodes init --app-role', 'custodes database grant'): while it is recorded, the
    # server opens the database only with that role's rights. None: the URL's role is
    # whatever the operator made it, and the server may run as the schema's owner.
    app_role: str | None = None
    # Streaming replicas of `database` that may serve reads of records and tokens while
    # they are no further behind than replica_max_lag seconds; never written to.
    replicas: tuple[str, ...] = ()
    # The access log's database, when not `database` itself.
    log_database: str | None = None
    replica_max_lag: float = DEFAULT_REPLICA_MAX_LAG


@dataclass(frozen=True, slots=True)
class DatabaseTopology:
    """Where a vault on PostgreSQL reads and writes: the primary (a libpq multi-host
    string with target_session_attrs=read-write follows a failover to whichever node is
    primary), the replicas reads may go to, the access log's database, and the lag bound."""

    primary: str
    replicas: tuple[str, ...] = ()
    log_database: str | None = None
    replica_max_lag: float = DEFAULT_REPLICA_MAX_LAG


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

    def read(self) -> VaultFile:
        """The vault id and the key paths recorded when the vault was created."""
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
        database = doc.get("database")
        app_role = doc.get("app_role")
        replicas = doc.get("replicas", [])
        log_database = doc.get("log_database")
        max_lag = doc.get("replica_max_lag", DEFAULT_REPLICA_MAX_LAG)
        try:
            if database is not None:
                if not isinstance(database, str):
                    raise TypeError
                database = check_database_url(database)
            if app_role is not None:
                if not isinstance(app_role, str) or database is None:
                    raise TypeError
                app_role = check_role_name(app_role)
            if not isinstance(replicas, list) or (replicas and database is None):
                raise TypeError
            if log_database is not None and (not isinstance(log_database, str) or not database):
                raise TypeError
            if isinstance(max_lag, bool) or not isinstance(max_lag, int | float):
                raise TypeError
            return VaultFile(
                bytes.fromhex(doc["vault_id"]),
                Path(doc["keyring"]),
                Path(doc["log_key"]),
                database,
                app_role,
                check_replicas(replicas),
                None if log_database is None else check_database_url(log_database),
                check_replica_max_lag(float(max_lag)),
            )
        except (KeyError, ValueError, TypeError):
            raise ConfigurationError(f"{VAULT_FILE} is damaged") from None

    def write(
        self,
        vault_id: bytes,
        keyring: Path,
        log_key: Path,
        database: str | None = None,
        app_role: str | None = None,
        *,
        replicas: tuple[str, ...] = (),
        log_database: str | None = None,
        replica_max_lag: float = DEFAULT_REPLICA_MAX_LAG,
    ) -> None:
        text = _vault_text(
            VaultFile(
                vault_id,
                keyring,
                log_key,
                database,
                app_role,
                replicas,
                log_database,
                replica_max_lag,
            )
        )
        fd = os.open(self.vault_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)

    def record_database(self, database: str, app_role: str | None) -> VaultFile:
        """Record another database URL (and the server's role) for an existing vault: the
        file is written beside the old one and renamed over it, so a reader finds the old
        settings or the new, never half of them."""
        recorded = self.read()
        replicas = recorded.replicas
        log_database = recorded.log_database
        if app_role is not None:
            replicas = tuple(database_url_as(r, app_role) for r in replicas)
            if log_database is not None:
                log_database = database_url_as(log_database, app_role)
        updated = replace(
            recorded,
            database=database,
            app_role=app_role,
            replicas=replicas,
            log_database=log_database,
        )
        text = _vault_text(updated)
        staged = self.vault_file.with_name(f".{VAULT_FILE}.new")
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(staged, self.vault_file)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        return updated


def _vault_text(vault: VaultFile) -> str:
    # json.dumps yields a valid TOML basic string for any path.
    import json

    text = (
        "# A custodes vault. Its keys are kept apart from this directory on purpose.\n"
        f'format = "{VAULT_FORMAT}"\n'
        f'vault_id = "{vault.vault_id.hex()}"\n'
        f"keyring = {json.dumps(str(vault.keyring))}\n"
        f"log_key = {json.dumps(str(vault.log_key))}\n"
    )
    if vault.database is not None:
        text += f"database = {json.dumps(check_database_url(vault.database))}\n"
        if vault.app_role is not None:
            text += f"app_role = {json.dumps(check_role_name(vault.app_role))}\n"
        if vault.replicas:
            listed = ", ".join(json.dumps(r) for r in check_replicas(vault.replicas))
            text += f"replicas = [{listed}]\n"
        if vault.log_database is not None:
            text += f"log_database = {json.dumps(check_database_url(vault.log_database))}\n"
        if vault.replica_max_lag != DEFAULT_REPLICA_MAX_LAG:
            text += f"replica_max_lag = {check_replica_max_lag(vault.replica_max_lag)!r}\n"
    return text


def check_replicas(replicas: object) -> tuple[str, ...]:
    """Replica connection strings a vault may record: each as check_database_url has it,
    none twice. The message names a replica by its place in the list, never its text."""
    if not isinstance(replicas, list | tuple):
        raise ConfigurationError("the replicas must be a list of PostgreSQL URLs")
    checked: list[str] = []
    for number, replica in enumerate(replicas, 1):
        if not isinstance(replica, str):
            raise ConfigurationError(f"replica {number} is not a PostgreSQL URL")
        try:
            checked.append(check_database_url(replica))
        except ConfigurationError as exc:
            raise ConfigurationError(f"replica {number}: {exc}") from None
    if len(set(checked)) != len(checked):
        raise ConfigurationError("a replica is named twice")
    return tuple(checked)


def check_replica_max_lag(seconds: float) -> float:
    """The lag bound: a replica further behind than this serves no read. Between 10 ms and
    an hour; a bound beyond that would let a replica serve a day-old index."""
    if not 0.01 <= seconds <= 3600.0:
        raise ConfigurationError("the replica lag bound is between 0.01 and 3600 seconds")
    return seconds


def database_topology(recorded: VaultFile, database: str | None) -> DatabaseTopology | None:
    """Where a vault's PostgreSQL reads and writes go for this run: the primary chosen
    (the recorded one or an override), the replicas and log database recorded unless
    CUSTODES_REPLICAS / CUSTODES_LOG_DATABASE name others, the lag bound unless
    CUSTODES_REPLICA_MAX_LAG names another. None for a vault in SQLite."""
    if database is None:
        return None
    replicas = recorded.replicas
    named = env(ENV_REPLICAS)
    if named is not None:
        parts = [] if named.strip() == "none" else [p.strip() for p in named.split(";")]
        replicas = check_replicas([p for p in parts if p])
    log_database = recorded.log_database
    named_log = env(ENV_LOG_DATABASE)
    if named_log is not None:
        log_database = check_database_url(named_log)
    max_lag = recorded.replica_max_lag
    named_lag = env(ENV_REPLICA_MAX_LAG)
    if named_lag is not None:
        try:
            max_lag = float(named_lag)
        except ValueError:
            raise ConfigurationError(f"{ENV_REPLICA_MAX_LAG} must be a number of seconds") from None
        max_lag = check_replica_max_lag(max_lag)
    return DatabaseTopology(database, replicas, log_database, max_lag)


def check_database_url(url: str) -> str:
    """A PostgreSQL connection string a vault may record: a URL
    (postgresql://USER@HOST:PORT/DATABASE?options=...) or libpq's key=value form, naming
    no password (a credential is never kept in the vault's settings: libpq reads it from
    PGPASSFILE or ~/.pgpass). ConfigurationError otherwise; the message never repeats
    the string, which may hold a secret."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    is_url = url.startswith(("postgresql://", "postgres://"))
    if not is_url and "=" not in url:
        raise ConfigurationError(
            "the database must be a PostgreSQL URL: postgresql://USER@HOST:PORT/DATABASE"
        )
    try:
        params = conninfo_to_dict(url)
    except ProgrammingError:
        raise ConfigurationError("the database connection string is malformed") from None
    if "password" in params or "passfile" in params:
        raise ConfigurationError(
            "the database connection string must not name a password: put it in "
            "PGPASSFILE or ~/.pgpass"
        )
    return url


def check_role_name(name: str) -> str:
    """A PostgreSQL role name a vault may record: 1 to 63 bytes (longer names are cut by
    the server), no control character. It is always sent quoted, never as SQL text."""
    if not name or len(name.encode("utf-8")) > 63 or not name.isprintable():
        raise ConfigurationError("a database role name is 1 to 63 bytes of printable characters")
    return name


def database_url_as(url: str, role: str) -> str:
    """The connection string `url` with its user replaced by `role`: the same server,
    database and options (the schema's search_path), in libpq's key=value form, naming no
    password, as the owner's URL named none."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(check_database_url(url))
    params["user"] = check_role_name(role)
    return check_database_url(make_conninfo("", **params))


def database_user(url: str) -> str | None:
    """The role a connection string names, or None where it names none (libpq then takes
    the operating system's user name)."""
    from psycopg.conninfo import conninfo_to_dict

    user = conninfo_to_dict(check_database_url(url)).get("user")
    return str(user) if user else None


def is_within(path: Path, directory: Path) -> bool:
    """Whether path lies inside directory, after resolving links."""
    try:
        path.resolve().relative_to(directory.resolve())
    except ValueError:
        return False
    return True
