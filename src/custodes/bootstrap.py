"""The composition root: builds a Vault from a directory, a keyring and a passphrase.

Nothing else constructs a storage backend or wires storage, keys, schema, access log,
accounts, the clock and the source of randomness together, so every entry point (CLI,
server, tests) gets the same, complete vault. A vault opened here with the passphrase,
on the host, comes with its host operator; a server process's vault has none.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson

from custodes.accounts import Account, AccountBook, HashCost, SecretBox, check_password_strength
from custodes.audit import AccessLog, AuditKeys
from custodes.audit.checkpoint import (
    Checkpoint,
    LogLoss,
    LogSigner,
    create_log_key,
    open_log_key,
    reseal_signing_key,
)
from custodes.audit.erasures import ErasureLedger
from custodes.audit.log import stored_root
from custodes.audit.verify import OutsideCheckpoint, VerifyReport, verify_log
from custodes.codec import RecordCodec
from custodes.crypto import KdfParams, KeyMaterial, Keyring, plan_token_bits
from custodes.crypto.kek import kek_provider
from custodes.crypto.key_shares import (
    KeyShare,
    new_shares,
    passphrase_from_shares,
    write_share_file,
)
from custodes.crypto.keyring import ShareMode, read_share_mode
from custodes.crypto.pkcs11 import TokenKeks
from custodes.crypto.row_mac import RowKind, RowMacs
from custodes.errors import (
    ConfigurationError,
    ErasureLedgerBroken,
    KeyringError,
    StorageError,
    TamperDetected,
)
from custodes.key_watch import KeyWatch
from custodes.schema import Schema, load_schema, parse_schema
from custodes.sessions import Operator
from custodes.settings import (
    DEFAULT_REPLICA_MAX_LAG,
    ENV_DATABASE,
    ENV_PKCS11_PIN,
    VaultFile,
    VaultLayout,
    check_database_url,
    check_replica_max_lag,
    check_replicas,
    check_role_name,
    database_topology,
    database_url_as,
    default_keyring_path,
    default_log_key_path,
    env,
    is_within,
)
from custodes.storage import MemoryStorage, SQLiteStorage, Storage
from custodes.storage.base import SessionRow
from custodes.storage.log_apart import LOG_APART_KEY, LOG_OF_KEY
from custodes.vault import Vault
from custodes.vault.rotation import STARTED_KEY as ROTATION_STARTED

if TYPE_CHECKING:
    from custodes.storage.pg_replicas import ReplicaStanding
    from custodes.storage.postgres import RoleStanding

Clock = Callable[[], float]
Random = Callable[[int], bytes]
# The one clock and the one source of randomness every part of a vault is given (session
# and API tokens, enrolment codes, passkey challenges, vault ids). Keys and nonces are
# drawn by custodes.crypto straight from the operating system, by design.
SYSTEM_CLOCK: Clock = time.time
SYSTEM_RANDOM: Random = os.urandom

DEFAULT_POPULATION = 10**9
STORE_FORMAT = b"1"
# The stored settings that decide masks, sensitivity, clearance and indexes, each sealed
# with a tag under a vault key (in SETTINGS_MAC): a database writer cannot change one.
SEALED_SETTINGS = (
    "format",
    "vault_id",
    "schema",
    "token_bits",
    "expected_population",
    "created_at",
)
SETTINGS_MAC = "settings_mac"


def create_vault(
    directory: Path,
    *,
    passphrase: str,
    key_shares: ShareMode | None = None,
    vault_id: bytes | None = None,
    keyring_path: Path | None = None,
    log_key_path: Path | None = None,
    schema_path: Path | None = None,
    expected_population: int = DEFAULT_POPULATION,
    kdf: KdfParams | None = None,
    hash_cost: HashCost | None = None,
    checkpoint_every: int = 1000,
    clock: Clock = SYSTEM_CLOCK,
    random: Random = SYSTEM_RANDOM,
    database: str | None = None,
    app_role: str | None = None,
    replicas: Sequence[str] = (),
    log_database: str | None = None,
    replica_max_lag: float = DEFAULT_REPLICA_MAX_LAG,
    pkcs11_module: str | None = None,
    pkcs11_token: str | None = None,
    partitions: int | None = None,
) -> Vault:
    """Create a new vault in an empty or new directory, and its keys elsewhere. The vault
    comes with its host operator: whoever creates it holds the passphrase. With
    `database` (a PostgreSQL URL), the records and the log live there, in the schema the
    URL's search_path names, which must hold no vault yet; the directory keeps the
    vault's settings file, rejects and operational logs. With `key_shares` the passphrase
    is a key split among officers (create_shared_vault) and the keyring says so.

    With `app_role` too, `database` is the schema owner's URL: the vault is made as the
    owner, app_role is granted what a server needs and no more (grant_app_role), and the
    settings record the same URL with app_role as its user, never the owner's: no later
    command finds the owner's credentials in the vault's configuration.

    With `pkcs11_module` and `pkcs11_token` (a token's label), the key-encryption key is
    made inside that PKCS#11 token, non-extractable, and the keyring file holds only the
    blind-index root and where the KEK is; the token's user PIN comes from
    CUSTODES_PKCS11_PIN, never an argument.

    `replicas` (streaming replicas of `database`) may serve reads of records and tokens
    while within `replica_max_lag` seconds of it; with `app_role` they are recorded with
    that role as their user too. `log_database` names the access log's database."""
    directory = Path(directory)
    token = _token_settings(pkcs11_module, pkcs11_token)
    recorded_database = database
    recorded_log_database: str | None = None
    recorded_replicas = check_replicas(list(replicas))
    replica_max_lag = check_replica_max_lag(replica_max_lag)
    if database is not None:
        database = check_database_url(database)
        if log_database is not None:
            log_database = check_database_url(log_database)
            if log_database == database:
                log_database = None  # the log in the records' database, as without it
        recorded_log_database = log_database
        if app_role is not None:
            recorded_database = database_url_as(database, app_role)
            recorded_replicas = tuple(database_url_as(r, app_role) for r in recorded_replicas)
            if log_database is not None:
                recorded_log_database = database_url_as(log_database, app_role)
    elif app_role is not None:
        raise ConfigurationError("an application role needs a PostgreSQL database")
    elif replicas or log_database is not None:
        raise ConfigurationError("replicas and a log database need a PostgreSQL database")
    if directory.exists() and any(directory.iterdir()):
        raise ConfigurationError("the vault directory exists and is not empty")
    # Whoever holds this passphrase and the files reads everything: no weaker than a
    # password, which only opens one account.
    check_password_strength(passphrase, what="keyring passphrase")
    vault_id = vault_id if vault_id is not None else random(16)
    keyring_path = Path(keyring_path) if keyring_path else default_keyring_path(vault_id)
    log_key_path = Path(log_key_path) if log_key_path else default_log_key_path(vault_id)
    for key_path in (keyring_path, log_key_path):
        if is_within(key_path, directory):
            raise ConfigurationError(
                "keys must live outside the vault directory: keys are never kept "
                "beside the data they protect"
            )
    if log_key_path.resolve() == keyring_path.resolve():
        raise ConfigurationError("the log signing key needs a file of its own")
    if expected_population < 1:
        raise ConfigurationError("the expected population must be positive")
    schema_text = _schema_text(schema_path)
    schema = parse_schema(schema_text)
    if database is not None and app_role is not None:
        # Before any key or file is made: a role that cannot be granted leaves nothing.
        from custodes.storage.postgres import check_app_role

        check_app_role(database, app_role)
        if log_database is not None:
            check_app_role(log_database, app_role)
    if token is not None:
        from custodes.crypto.pkcs11 import generate_token_kek

        if keyring_path.exists():
            raise ConfigurationError(
                f"keyring file already exists, refusing to overwrite: {keyring_path}"
            )
        token = token._replace(key_labels={1: f"custodes-kek-{vault_id.hex()}-v1"})
        generate_token_kek(token, token.key_labels[1])
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    keyring = Keyring.create(
        keyring_path,
        vault_id=vault_id,
        passphrase=passphrase,
        kdf=kdf or KdfParams(),
        shares=key_shares,
        token=token,
    )
    signer = create_log_key(
        log_key_path, origin=log_origin(vault_id), passphrase=passphrase, kdf=kdf or KdfParams()
    )
    layout = VaultLayout(directory)
    storage = _storage_at(directory, database, log_database=log_database, partitions=partitions)
    try:
        if storage.get_meta("vault_id") is not None:
            raise ConfigurationError("that database already holds a custodes vault")
        bits = {ix.index_id: plan_token_bits(expected_population) for ix in schema.all_indexes()}
        _write_meta(storage, keyring.material, schema_text, bits, expected_population)
        storage.set_meta("log_verifier_key", signer.verifier_key.encode())
        # The settings first, then the grant: should the grant fail now, the vault is whole
        # and 'custodes database grant' finishes it.
        layout.write(
            vault_id,
            keyring_path,
            log_key_path,
            recorded_database,
            app_role,
            replicas=recorded_replicas,
            log_database=recorded_log_database,
            replica_max_lag=replica_max_lag,
        )
        if database is not None and app_role is not None:
            _grant(database, app_role, finish=f"--vault {directory}")
            if log_database is not None:
                _grant(log_database, app_role, finish=f"--vault {directory}")
    except BaseException:
        storage.close()
        raise
    return _assemble(
        storage,
        schema,
        schema_text,
        keyring.material,
        signer,
        bits,
        hash_cost,
        directory,
        checkpoint_every,
        clock=clock,
        random=random,
        operator=Operator(),
        key_watch=KeyWatch(
            keyring_path, passphrase, keyring.material, token_pin=env(ENV_PKCS11_PIN)
        ),
    )


def default_share_path(vault_id: bytes, officer: str) -> Path:
    """Where an officer's share file goes unless told: beside the keyring's default place."""
    return default_keyring_path(vault_id).parent / f"{vault_id.hex()}.shares" / f"{officer}.share"


def create_shared_vault(
    directory: Path,
    *,
    mode: ShareMode,
    officers: Sequence[str],
    share_paths: Sequence[Path] | None = None,
    share_passphrases: Sequence[str | None] | None = None,
    random: Random = SYSTEM_RANDOM,
    **options: Any,
) -> tuple[Vault, list[Path]]:
    """Create a vault whose keyring (and log key) are sealed under a random key split
    M-of-N among `officers`: one share file each, outside the vault directory, sealed
    under that officer's passphrase if given. The whole key is never written anywhere.
    Returns the vault and the share files, in the officers' order."""
    directory = Path(directory)
    vault_id = random(16)
    passphrase, shares = new_shares(vault_id, mode, officers)
    paths = [Path(p) for p in share_paths] if share_paths else []
    if not paths:
        paths = [default_share_path(vault_id, officer) for officer in officers]
    secrets_for = list(share_passphrases) if share_passphrases else [None] * len(officers)
    if len(paths) != len(shares) or len(secrets_for) != len(shares):
        raise ConfigurationError("one share file and one passphrase (or none) per officer")
    for path in paths:
        if is_within(path, directory):
            raise ConfigurationError(
                "share files must live outside the vault directory: keys are never kept "
                "beside the data they protect"
            )
        if path.exists():
            raise ConfigurationError(f"a share file already exists there: {path}")
    for officer_secret in secrets_for:
        if officer_secret is not None:
            check_password_strength(officer_secret, what="share passphrase")
    vault = create_vault(
        directory,
        passphrase=passphrase,
        key_shares=mode,
        vault_id=vault_id,
        random=random,
        **options,
    )
    try:
        kdf = options.get("kdf") or KdfParams()
        for path, share, officer_secret in zip(paths, shares, secrets_for, strict=True):
            write_share_file(path, share, passphrase=officer_secret, kdf=kdf)
    except BaseException:
        vault.close()
        raise
    return vault, paths


def reshare_vault(
    directory: Path,
    *,
    old_shares: Sequence[KeyShare],
    mode: ShareMode,
    officers: Sequence[str],
    share_paths: Sequence[Path],
    share_passphrases: Sequence[str | None] | None = None,
    kdf: KdfParams | None = None,
) -> list[Path]:
    """Rekey a shares-mode vault: the same keyring and log key sealed under a new random
    key split M-of-N among `officers`, opened first with `old_shares` (its threshold of the
    current ones). The data and its keys do not change; every old share opens nothing
    after. Logged before anything changes. Returns the new share files."""
    directory = Path(directory)
    layout = VaultLayout(directory)
    recorded = layout.read()
    if read_share_mode(recorded.keyring) is None:
        raise ConfigurationError("this vault's keyring is sealed under a passphrase, not shares")
    old_passphrase = passphrase_from_shares(old_shares, vault_id=recorded.vault_id)
    unlocked = unlock_vault(directory, passphrase=old_passphrase)
    new_passphrase, shares = new_shares(recorded.vault_id, mode, officers)
    paths = [Path(p) for p in share_paths]
    secrets_for = list(share_passphrases) if share_passphrases else [None] * len(shares)
    if len(paths) != len(shares) or len(secrets_for) != len(shares):
        raise ConfigurationError("one share file and one passphrase (or none) per officer")
    for path in paths:
        if is_within(path, directory):
            raise ConfigurationError(
                "share files must live outside the vault directory: keys are never kept "
                "beside the data they protect"
            )
        if path.exists():
            raise ConfigurationError(f"a share file already exists there: {path}")
    for officer_secret in secrets_for:
        if officer_secret is not None:
            check_password_strength(officer_secret, what="share passphrase")
    vault = assemble_vault(unlocked, host=True)
    try:
        vault.note_key_step(
            vault.operator,
            "reshare",
            parts=mode.parts,
            threshold=mode.threshold,
            given=len(old_shares),
        )
    finally:
        vault.close()
    kdf = kdf or KdfParams()
    # The new shares first: until the files below are resealed they open nothing, and
    # the old ones still open everything.
    for path, share, officer_secret in zip(paths, shares, secrets_for, strict=True):
        write_share_file(path, share, passphrase=officer_secret, kdf=kdf)
    keyring = Keyring.open(
        recorded.keyring,
        passphrase=old_passphrase,
        vault_id=recorded.vault_id,
        token_pin=env(ENV_PKCS11_PIN),
    )
    keyring.reseal(old_passphrase, new_passphrase, mode)
    reseal_signing_key(
        recorded.log_key,
        purpose="log",
        passphrase=old_passphrase,
        new_passphrase=new_passphrase,
        kdf=kdf,
    )
    return paths


def keyring_passphrase_from_shares(directory: Path, shares: Sequence[KeyShare]) -> str:
    """The text a shares-mode keyring (and its log key) is sealed under, rebuilt from
    `shares`; held in memory by the command that needs it, never written."""
    return passphrase_from_shares(shares, vault_id=VaultLayout(Path(directory)).read().vault_id)


def keyring_share_mode(directory: Path, keyring_path: Path | None = None) -> ShareMode | None:
    """How the vault's keyring is unsealed: None for a passphrase, else its M-of-N shares."""
    recorded = VaultLayout(Path(directory)).read()
    return read_share_mode(Path(keyring_path) if keyring_path else recorded.keyring)


@dataclass(frozen=True, slots=True)
class UnlockedVault:
    """A vault's keys, unsealed, and where the vault lives: what a server process needs to
    open the vault itself. Held in memory and handed to forked workers, never written."""

    directory: Path
    material: KeyMaterial
    signer: LogSigner
    database: str | None = None  # a PostgreSQL URL; None: the directory's SQLite file
    app_role: str | None = None  # the least-privileged role the vault recorded, if any
    # Open the database with the application role's rights only, whichever role the URL
    # names (see _storage_at): for the URL the vault recorded with its app_role, and for a
    # server (for_server).
    least_privilege: bool = False
    # The keyring file and what opens it, so that each process follows a rotation done on
    # the host while it runs (custodes.key_watch); None for keys handed in whole.
    keyring_file: Path | None = None
    keyring_secret: str | None = None
    # Where reads may go besides `database`, and the access log's database (see
    # settings.database_topology): recorded, or named for this run.
    replicas: tuple[str, ...] = ()
    log_database: str | None = None
    replica_max_lag: float = DEFAULT_REPLICA_MAX_LAG

    def __repr__(self) -> str:
        return f"UnlockedVault(origin={self.signer.origin!r})"

    def key_watch(self) -> KeyWatch | None:
        """A watch on this vault's keyring for one process (each builds its own)."""
        if self.keyring_file is None or self.keyring_secret is None:
            return None
        return KeyWatch(
            self.keyring_file, self.keyring_secret, self.material, token_pin=env(ENV_PKCS11_PIN)
        )


def unlock_vault(
    directory: Path,
    *,
    passphrase: str | None = None,
    shares: Sequence[KeyShare] = (),
    keyring_path: Path | None = None,
    log_key_path: Path | None = None,
    database: str | None = None,
) -> UnlockedVault:
    """Unseal an existing vault's keyring and log signing key (the slow part of opening),
    with the keyring passphrase or, for a shares-mode keyring, its threshold of shares.
    `database` overrides the PostgreSQL URL the vault recorded (see _database_choice)."""
    layout = VaultLayout(Path(directory))
    recorded = layout.read()
    vault_id = recorded.vault_id
    database, least_privilege = _database_choice(recorded, database)
    if database is None and not layout.database.exists():
        raise ConfigurationError("the vault database is missing")
    topology = database_topology(recorded, database)
    keyring_file = Path(keyring_path) if keyring_path else recorded.keyring
    mode = read_share_mode(keyring_file)
    if mode is not None:
        # A passphrase here can only be the text of the key the shares rebuild
        # (keyring_passphrase_from_shares), for commands that need it again later.
        if passphrase is None:
            passphrase = passphrase_from_shares(shares, vault_id=vault_id)
    elif passphrase is None:
        raise KeyringError("this keyring is sealed under a passphrase, not shares")
    try:
        keyring = Keyring.open(
            keyring_file,
            passphrase=passphrase,
            vault_id=vault_id,
            token_pin=env(ENV_PKCS11_PIN),
        )
    except KeyringError:
        if mode is None:
            raise
        raise KeyringError(
            "the shares do not open this keyring (a wrong or damaged share)"
        ) from None
    if mode is not None and keyring.shares != mode:
        raise KeyringError("the keyring's share settings do not match its seal")
    if keyring.material.token is not None:
        # Reach the token now, so that a missing token or key stops the unlock with its
        # name rather than every record failing later.
        kek_provider(keyring.material).close()
    signer = open_log_key(
        Path(log_key_path) if log_key_path else recorded.log_key, passphrase=passphrase
    )
    if signer.origin != log_origin(vault_id):
        raise ConfigurationError("the log signing key belongs to another vault")
    return UnlockedVault(
        layout.directory,
        keyring.material,
        signer,
        database,
        app_role=recorded.app_role,
        least_privilege=least_privilege,
        keyring_file=keyring_file,
        keyring_secret=passphrase,
        replicas=() if topology is None else topology.replicas,
        log_database=None if topology is None else topology.log_database,
        replica_max_lag=DEFAULT_REPLICA_MAX_LAG if topology is None else topology.replica_max_lag,
    )


def for_server(unlocked: UnlockedVault) -> UnlockedVault:
    """The vault as a server opens it: with only the application role's rights whenever
    the vault recorded one, whatever URL this run names, so that a server never holds the
    owner's powers over a vault set up for least privilege (a settings file edited to name
    the owner stops the server at its start, and doctor names it)."""
    if unlocked.database is None or unlocked.app_role is None:
        return unlocked
    return replace(unlocked, least_privilege=True)


def runs_as_schema_owner(unlocked: UnlockedVault) -> bool:
    """Whether this vault's database connection holds the owner's powers over its schema
    (the owner, a superuser, or a role that could make itself either): asked of the
    server, for the warning a server logs at its start."""
    if unlocked.database is None or unlocked.least_privilege:
        return False
    from custodes.storage.postgres import role_standing

    return role_standing(unlocked.database).holds_owner_powers


def assemble_vault(
    unlocked: UnlockedVault,
    *,
    hash_cost: HashCost | None = None,
    checkpoint_every: int = 1000,
    host: bool = False,
    clock: Clock = SYSTEM_CLOCK,
    random: Random = SYSTEM_RANDOM,
) -> Vault:
    """Open an unlocked vault's database and build the Vault on it. Each process serving
    the vault calls this for itself: storage connections are never shared across a fork.
    `host` gives the vault its host operator, for commands run on the host; a server's
    vault has none, so no request can act as the operator."""
    layout = VaultLayout(unlocked.directory)
    storage = _unlocked_storage(unlocked)
    # Whatever stops the assembly (a bad setting, or an interrupt while a server starts)
    # closes the storage it opened: a PostgreSQL pool left open keeps its connections.
    try:
        schema_text, bits = _read_meta(storage, unlocked.material)
        return _assemble(
            storage,
            parse_schema(schema_text),
            schema_text,
            unlocked.material,
            unlocked.signer,
            bits,
            hash_cost,
            layout.directory,
            checkpoint_every,
            clock=clock,
            random=random,
            operator=Operator() if host else None,
            key_watch=unlocked.key_watch(),
        )
    except BaseException:
        storage.close()
        raise


def open_vault(
    directory: Path,
    *,
    passphrase: str,
    keyring_path: Path | None = None,
    log_key_path: Path | None = None,
    hash_cost: HashCost | None = None,
    checkpoint_every: int = 1000,
    clock: Clock = SYSTEM_CLOCK,
    random: Random = SYSTEM_RANDOM,
) -> Vault:
    """Open an existing vault on the host with its keyring and its log signing key; it
    comes with its host operator."""
    unlocked = unlock_vault(
        directory, passphrase=passphrase, keyring_path=keyring_path, log_key_path=log_key_path
    )
    return assemble_vault(
        unlocked,
        hash_cost=hash_cost,
        checkpoint_every=checkpoint_every,
        host=True,
        clock=clock,
        random=random,
    )


def memory_vault(
    material: KeyMaterial,
    signer: LogSigner,
    *,
    schema_path: Path | None = None,
    expected_population: int = DEFAULT_POPULATION,
    hash_cost: HashCost | None = None,
    storage: Storage | None = None,
    clock: Clock = SYSTEM_CLOCK,
    random: Random = SYSTEM_RANDOM,
) -> Vault:
    """A vault on in-memory storage (or a given backend), with its host operator: for
    tests and experiments."""
    schema_text = _schema_text(schema_path)
    schema = parse_schema(schema_text)
    storage = storage if storage is not None else MemoryStorage()
    bits = {ix.index_id: plan_token_bits(expected_population) for ix in schema.all_indexes()}
    _write_meta(storage, material, schema_text, bits, expected_population)
    storage.set_meta("log_verifier_key", signer.verifier_key.encode())
    return _assemble(
        storage,
        schema,
        schema_text,
        material,
        signer,
        bits,
        hash_cost,
        None,
        1000,
        clock=clock,
        random=random,
        operator=Operator(),
    )


def _assemble(
    storage: Storage,
    schema: Schema,
    schema_text: str,
    material: KeyMaterial,
    signer: LogSigner,
    bits: dict[int, int],
    hash_cost: HashCost | None,
    directory: Path | None,
    checkpoint_every: int,
    *,
    clock: Clock,
    random: Random,
    operator: Operator | None,
    key_watch: KeyWatch | None = None,
) -> Vault:
    access_log = AccessLog(
        storage,
        AuditKeys(material),
        signer,
        origin=signer.origin,
        checkpoint_every=checkpoint_every,
        clock=clock,
    )
    accounts = AccountBook(storage, hash_cost or HashCost(), random=random, clock=clock)
    accounts.bind_secrets(SecretBox(material), RowMacs(material))
    vault = Vault(
        schema=schema,
        schema_text=schema_text,
        storage=storage,
        codec=RecordCodec(schema, material, bits),
        material=material,
        token_bits=bits,
        access_log=access_log,
        accounts=accounts,
        clock=clock,
        random=random,
        operator=operator,
        directory=directory,
        key_watch=key_watch,
        erasure_ledger=ErasureLedger(signer),
    )
    # No path serves an erased person: a database put back from a copy older than an
    # erasure has it erased again before anything is served; a ledger that fails its
    # chain or a signature stops the opening (ErasureLedgerBroken).
    try:
        vault.erasures.reapply()
    except BaseException:
        vault.close()
        raise
    return vault


def _storage_at(
    directory: Path,
    database: str | None,
    *,
    least_privilege: bool = False,
    app_role: str | None = None,
    migrate: bool = True,
    replicas: tuple[str, ...] = (),
    replica_max_lag: float = DEFAULT_REPLICA_MAX_LAG,
    log_database: str | None = None,
    partitions: int | None = None,
) -> Storage:
    """The vault's storage: its PostgreSQL database when it has one, else the SQLite file
    in its directory. The one place a backend is chosen; each process opens its own.

    PostgreSQL opens with the application's privileges when least_privilege says so, and
    otherwise as the server answers for the URL's role: as the owner (migrating) if it owns
    the schema or is a superuser, as the application if not. The server is asked rather
    than the settings trusted: the settings file is what an intruder would edit, and it
    goes stale when a DBA changes a role, while the catalog is the truth a migration needs.
    Only least_privilege, which no answer can widen, comes from the settings. A role that
    is neither owner nor least-privileged is refused by the application's open. An owner's
    open that migrates a vault with a recorded app_role grants that role again in the same
    step, so that a new table is never left out of the server's grants; with migrate
    False (key-less checks) a schema behind this software is refused, never migrated.
    Replicas, when given, serve reads of records and tokens within replica_max_lag.
    `partitions` is how many partitions a new schema's big tables get (PostgreSQL's
    default when None); a schema made already keeps its own. A `log_database` other than
    `database` holds the access log (storage.log_apart), opened by the same rules, and
    the two must be bound to each other; a vault whose log is apart never opens on its
    records' database alone."""
    if database is None:
        if partitions is not None:
            raise ConfigurationError("partitions are PostgreSQL's: give --database as well")
        return SQLiteStorage(VaultLayout(directory).database)
    from custodes.storage.log_apart import check_log_in_place, open_log_apart
    from custodes.storage.postgres import (
        DEFAULT_PARTITIONS,
        SCHEMA_VERSION,
        PostgresStorage,
        role_standing,
    )

    def opened(url: str, *, log_only: bool = False) -> PostgresStorage:
        def as_(privileges: Literal["owner", "app"]) -> PostgresStorage:
            return PostgresStorage(
                url,
                privileges=privileges,
                # The log is read from and written to its own primary only.
                replicas=() if log_only else replicas,
                replica_max_lag=replica_max_lag,
                # A schema made already keeps its own count; this one is for a new
                # schema (the log side's record tables stay empty: one partition each).
                partitions=1 if log_only else partitions or DEFAULT_PARTITIONS,
            )

        if least_privilege:
            return as_("app")
        standing = role_standing(url)
        if not standing.migrates:
            return as_("app")
        if standing.version is not None and standing.version < SCHEMA_VERSION:
            if not migrate and standing.version == 0:
                raise ConfigurationError("the vault's database schema holds no vault")
            if not migrate:
                raise ConfigurationError(
                    f"the database schema is version {standing.version}, this software needs "
                    f"{SCHEMA_VERSION}: run 'custodes database grant' as the schema's owner"
                )
            if app_role is not None and standing.version > 0:
                _grant(url, app_role)
        return as_("owner")

    records = opened(database)
    if log_database is None or log_database == database:
        try:
            check_log_in_place(records)
        except BaseException:
            records.close()
            raise
        return records
    try:
        log = opened(log_database, log_only=True)
    except BaseException:
        records.close()
        raise
    return open_log_apart(records, log)


def _unlocked_storage(unlocked: UnlockedVault) -> Storage:
    return _storage_at(
        unlocked.directory,
        unlocked.database,
        least_privilege=unlocked.least_privilege,
        app_role=unlocked.app_role,
        replicas=unlocked.replicas,
        replica_max_lag=unlocked.replica_max_lag,
        log_database=unlocked.log_database,
    )


def _grant(owner_database: str, app_role: str, *, finish: str = "") -> None:
    """Migrate as the owner, then grant app_role exactly what a server needs."""
    from custodes.storage.postgres import grant_app_role

    try:
        grant_app_role(owner_database, app_role)
    except (ConfigurationError, StorageError) as exc:
        raise type(exc)(
            f"{exc}; the vault's database role was not granted: run 'custodes database grant "
            f"--owner-database URL --app-role {app_role}{' ' + finish if finish else ''}' "
            "as the schema's owner"
        ) from None


def _database_choice(recorded: VaultFile, override: str | None = None) -> tuple[str | None, bool]:
    """The database a command uses, and whether it opens with the application's rights
    only: one named for this run (the option or CUSTODES_DATABASE, e.g. the owner's for a
    migration) as its role stands; else the one the vault recorded, least-privileged if
    the vault recorded its app_role."""
    chosen = override or env(ENV_DATABASE)
    if chosen:
        return check_database_url(chosen), False
    return recorded.database, recorded.app_role is not None and recorded.database is not None


def _recorded_storage(directory: Path) -> Storage | None:
    """The storage of a vault directory as recorded, for key-less checks; None if the
    vault has no database yet. Never migrates."""
    layout = VaultLayout(Path(directory))
    recorded = layout.read()
    database, least_privilege = _database_choice(recorded)
    if database is None and not layout.database.exists():
        return None
    topology = database_topology(recorded, database)
    return _storage_at(
        layout.directory,
        database,
        least_privilege=least_privilege,
        app_role=recorded.app_role,
        migrate=False,
        log_database=None if topology is None else topology.log_database,
    )


def _token_settings(module: str | None, label: str | None) -> TokenKeks | None:
    if module is None and label is None:
        return None
    if not module or not label:
        raise ConfigurationError("a PKCS#11 key store needs both its module and its token label")
    pin = env(ENV_PKCS11_PIN)
    if pin is None:
        raise ConfigurationError(f"set {ENV_PKCS11_PIN} to the token's user PIN")
    return TokenKeks(module, label, {}, pin)


def log_origin(vault_id: bytes) -> str:
    """The access log's name in its checkpoints: unique per vault, schema-less (C2SP)."""
    return f"custodes.vault/{vault_id.hex()}"


def _schema_text(schema_path: Path | None) -> str:
    if schema_path is None:
        from importlib import resources

        return resources.files("custodes").joinpath("schemas/population.toml").read_text("utf-8")
    load_schema(schema_path)  # raises SchemaError with a clear message
    return Path(schema_path).read_text("utf-8")


def _write_meta(
    storage: Storage,
    material: KeyMaterial,
    schema_text: str,
    bits: dict[int, int],
    population: int,
) -> None:
    storage.set_meta("format", STORE_FORMAT)
    storage.set_meta("vault_id", material.vault_id)
    storage.set_meta("schema", schema_text.encode("utf-8"))
    storage.set_meta("token_bits", orjson.dumps({str(k): v for k, v in bits.items()}))
    storage.set_meta("expected_population", str(population).encode())
    storage.set_meta("created_at", str(time.time()).encode())
    _seal_settings(storage, material)


def _setting_tag(macs: RowMacs, key: str, value: bytes) -> str:
    return macs.tag_hex(RowKind.SETTINGS, [key, value.hex()])


def _seal_settings(storage: Storage, material: KeyMaterial) -> None:
    macs = RowMacs(material)
    tags = {}
    for key in SEALED_SETTINGS:
        value = storage.get_meta(key)
        if value is None:
            raise ConfigurationError(f"the vault database is missing its setting {key!r}")
        tags[key] = _setting_tag(macs, key, value)
    storage.set_meta(SETTINGS_MAC, orjson.dumps(tags))


def _check_settings(storage: Storage, material: KeyMaterial) -> None:
    """Every sealed setting as stored is the one written with this vault's keys; else
    TamperDetected naming the setting, never its value. Fails closed: no process, server
    or host command, runs on settings a database writer changed."""
    stored = storage.get_meta(SETTINGS_MAC)
    try:
        tags = orjson.loads(stored) if stored else None
    except orjson.JSONDecodeError:
        tags = None
    if not isinstance(tags, dict):
        raise TamperDetected(
            f"the vault's stored settings carry no valid seal ({SETTINGS_MAC!r}): the vault "
            "was made before settings were sealed, or the seal was removed or damaged. "
            "Nothing opens it until the host operator seals them once against the vault's "
            "own schema file: 'custodes upgrade' on the host"
        )
    macs = RowMacs(material)
    for key in SEALED_SETTINGS:
        value = storage.get_meta(key)
        if value is None or not macs.check_hex(RowKind.SETTINGS, [key, value.hex()], tags.get(key)):
            raise TamperDetected(
                f"the vault's stored setting {key!r} fails its seal: it was changed outside "
                "custodes, so the vault does not open. Restore the database from a backup "
                "(see docs/security.md, threat 18)"
            )


def _read_meta(storage: Storage, material: KeyMaterial) -> tuple[str, dict[int, int]]:
    if storage.get_meta("format") != STORE_FORMAT:
        raise ConfigurationError("the vault database has an unknown format")
    if storage.get_meta("vault_id") != material.vault_id:
        raise ConfigurationError("the vault database belongs to another vault")
    _check_settings(storage, material)
    schema = storage.get_meta("schema")
    bits = storage.get_meta("token_bits")
    if schema is None or bits is None:
        raise ConfigurationError("the vault database is missing its schema")
    return schema.decode("utf-8"), {int(k): int(v) for k, v in orjson.loads(bits).items()}


def seal_settings(
    unlocked: UnlockedVault, *, schema_path: Path | None, expected_population: int
) -> list[str]:
    """The one-time upgrade of a vault made before its settings and account rows were
    sealed, run by the host operator with the keyring: seal the stored settings, and the
    accounts that carry no tag, and return the names of those accounts (to check with
    `custodes account list`). Refused unless the stored schema is exactly the text of the
    vault's own schema file and the token sizes are the ones planned for the expected
    population, so that a schema a database writer edited is never blessed. A server
    never calls this: it only checks. API tokens and sessions from before are not
    blessed: they open nothing, and are issued again."""
    storage = _unlocked_storage(unlocked)
    try:
        material = unlocked.material
        if storage.get_meta("vault_id") != material.vault_id:
            raise ConfigurationError("the vault database belongs to another vault")
        if storage.get_meta(SETTINGS_MAC) is not None:
            raise ConfigurationError("the vault's settings are sealed already")
        schema_text = _schema_text(schema_path)
        if storage.get_meta("schema") != schema_text.encode("utf-8"):
            raise TamperDetected(
                "the stored schema is not the text of that schema file: nothing was sealed"
            )
        bits = {
            ix.index_id: plan_token_bits(expected_population)
            for ix in parse_schema(schema_text).all_indexes()
        }
        stored_bits = storage.get_meta("token_bits")
        if (
            stored_bits is None
            or {int(k): int(v) for k, v in orjson.loads(stored_bits).items()} != bits
            or storage.get_meta("expected_population") != str(expected_population).encode()
        ):
            raise TamperDetected(
                "the stored token sizes are not those planned for that population: "
                "nothing was sealed"
            )
        accounts = AccountBook(storage, HashCost(2, 19_456, 1))
        accounts.bind_secrets(SecretBox(material), RowMacs(material))
        sealed = accounts.seal_unsealed()
        _seal_settings(storage, material)
        return sealed
    finally:
        storage.close()


# -- what a host command reads without the keys ------------------------------------------


def verify_log_files(
    directory: Path, *, log_key: str, outside: Sequence[OutsideCheckpoint] = ()
) -> VerifyReport:
    """Verify a vault directory's access log (or a copy of it) with only the log's public
    key: what an outside auditor runs, on the host or on a copy, with no keyring.

    The log holds no personal value (subjects are keyed commitments, searched values are
    sealed beside it), so reading it whole needs no keys; LogTampered names the first bad
    position."""
    storage = _recorded_storage(Path(directory))
    if storage is None:
        raise ConfigurationError("the vault database is missing")
    try:
        return verify_log(storage, log_key, origin=log_key.split("+", 1)[0], outside=outside)
    finally:
        storage.close()


def acknowledge_log_loss(
    unlocked: UnlockedVault, *, reason: str, clock: Clock = SYSTEM_CLOCK
) -> LogLoss:
    """The host operator accepts that the vault's access log lost entries its signer had
    signed (rolled back to an older copy, cut, or replaced), when it cannot be put back
    from a copy: until then nothing is served from the vault.

    The signer records the loss, signed, beside its state and signs on from the log as it
    stands; the vault then opens and the acknowledgement is the log's next entry. Nothing
    is hidden by it: checkpoints of the lost entries held by witnesses and auditors still
    fail against the log, and `doctor` and `audit verify` report every acknowledged loss.
    """
    signer = unlocked.signer
    signed_size, _ = signer.current()
    storage = _unlocked_storage(unlocked)
    try:
        size = storage.log_size()
        now = Checkpoint(signer.origin, size, stored_root(storage, size))
        at_signed = stored_root(storage, signed_size) if signed_size <= size else None
    finally:
        storage.close()
    loss = signer.acknowledge_loss(now, root_at_signed=at_signed, reason=reason, at=clock())
    vault = assemble_vault(unlocked, host=True, clock=clock)
    try:
        vault.record_log_loss(vault.operator, loss)
    finally:
        vault.close()
    return loss


def stored_verifier_key(directory: Path) -> str | None:
    """The log's public key as the vault directory stores it (to find its witnesses)."""
    storage = _recorded_storage(Path(directory))
    if storage is None:
        return None
    try:
        stored = storage.get_meta("log_verifier_key")
    finally:
        storage.close()
    return stored.decode() if stored else None


@dataclass(frozen=True, slots=True)
class DeploymentFacts:
    """What `custodes doctor` reads of a vault database without its keys: the accounts
    (names, roles, state; never hashes or secrets), the stored sessions (hashes only) and
    the stored schema's text."""

    accounts: list[Account]
    sessions: list[SessionRow]
    schema: bytes | None
    log_size: int = 0  # entries in the access log
    signed_size: int = 0  # the largest size a stored checkpoint covers
    verifier_key: str | None = None  # the log's public key as the vault stores it
    checkpoints: tuple[tuple[int, bytes], ...] = ()  # stored (size, note), with cosignatures
    rotation_unfinished: bool = False  # a key rotation began and has not destroyed its old keys
    # Records the erasure ledger names that storage still holds (a role that may not
    # delete them); None when the ledger does not verify.
    erased_still_stored: int | None = 0


def deployment_facts(directory: Path) -> DeploymentFacts | None:
    """The facts of a vault directory's database, or None if it has none."""
    if not VaultLayout(Path(directory)).vault_file.exists():
        return None
    storage = _recorded_storage(Path(directory))
    if storage is None:
        return None
    try:
        # Only listing: the hashing cost is the floor, since nothing is hashed here.
        accounts = AccountBook(storage, HashCost(2, 19_456, 1)).list()
        checkpoints = storage.checkpoints()
        stored_key = storage.get_meta("log_verifier_key")
        return DeploymentFacts(
            accounts,
            storage.list_sessions(),
            storage.get_meta("schema"),
            log_size=storage.log_size(),
            signed_size=checkpoints[-1][0] if checkpoints else 0,
            verifier_key=stored_key.decode() if stored_key else None,
            checkpoints=tuple(checkpoints),
            rotation_unfinished=bool(storage.get_meta(ROTATION_STARTED)),
            erased_still_stored=_erased_still_stored(Path(directory), storage, stored_key),
        )
    finally:
        storage.close()


def _erased_still_stored(directory: Path, storage: Storage, verifier: bytes | None) -> int | None:
    """How many records the erasure ledger names are still in storage (None: the ledger
    does not verify against the log's key as the vault stores it)."""
    from custodes.audit.erasures import erasures_path, read_erasures

    if verifier is None:
        return 0
    path = erasures_path(VaultLayout(directory).read().log_key)
    try:
        ids = sorted({rid for e in read_erasures(path, verifier.decode()) for rid in e.records})
    except ErasureLedgerBroken:
        return None
    return sum(len(storage.get_records(ids[i : i + 500])) for i in range(0, len(ids), 500))


# -- the database's roles ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RoleGrant:
    """What `custodes database grant` did to a vault on PostgreSQL."""

    app_role: str  # granted what a server needs, and no more
    database: str  # the URL the vault records for its server, after the grant
    rerecorded: bool  # the recorded URL was the owner's and now names app_role
    other_role: str | None = None  # the recorded URL names this other plain role: left as is
    log: bool = False  # the schema granted holds the vault's access log (storage.log_apart)


def grant_database_role(directory: Path, *, owner_database: str, app_role: str) -> RoleGrant:
    """As the schema's owner, with no key of the vault's: migrate an existing vault's
    schema to this software's version and grant app_role exactly what a server needs
    (grant_app_role), after checking that the owner's schema holds this very vault. If the
    vault's recorded URL connects as the owner (or a role as strong), it is recorded again
    with app_role as its user; the owner's URL itself is never recorded."""
    layout = VaultLayout(Path(directory))
    recorded = layout.read()
    if recorded.database is None:
        raise ConfigurationError(
            "this vault keeps its records in its directory's SQLite file: there is no "
            "database role to grant"
        )
    owner_database = check_database_url(owner_database)
    app_role = check_role_name(app_role)
    from custodes.storage.postgres import PostgresStorage, check_app_role, role_standing

    owner = role_standing(owner_database)
    if not owner.migrates:
        raise ConfigurationError(
            f"--owner-database connects as {owner.role!r}, which does not own the vault's "
            "schema: it can neither migrate it nor grant on it"
        )
    if owner.version == 0:
        raise ConfigurationError(
            "the schema --owner-database names holds no vault: check its search_path"
        )
    check_app_role(owner_database, app_role)
    # The schema must hold this directory's vault, or its access log, before anyone is
    # granted anything in it.
    storage = PostgresStorage(owner_database, max_size=1)
    try:
        held = storage.get_meta("vault_id")
        log_of = storage.get_meta(LOG_OF_KEY)
    finally:
        storage.close()
    if held is None and log_of is not None and _is_log_of(recorded, log_of):
        _grant(owner_database, app_role)
        return RoleGrant(app_role, recorded.log_database or "", rerecorded=False, log=True)
    if held != recorded.vault_id:
        raise ConfigurationError("the schema --owner-database names holds another vault")
    _grant(owner_database, app_role)
    server = role_standing(recorded.database)
    if server.holds_owner_powers:
        database = database_url_as(recorded.database, app_role)
        layout.record_database(database, app_role)
        return RoleGrant(app_role, database, rerecorded=True)
    if server.role != app_role:
        return RoleGrant(app_role, recorded.database, rerecorded=False, other_role=server.role)
    if recorded.app_role != app_role:
        layout.record_database(recorded.database, app_role)
    return RoleGrant(app_role, recorded.database, rerecorded=False)


def _is_log_of(recorded: VaultFile, log_of: bytes) -> bool:
    """Whether a schema bound as a log database (`log_of`) is this vault's own: the
    binding its records' database holds, read with the URL the vault recorded."""
    if recorded.database is None or recorded.log_database is None:
        return False
    from custodes.storage.postgres import connect_pinned

    conn, _ = connect_pinned(recorded.database)
    with conn:
        row = conn.execute("SELECT value FROM meta WHERE key = %s", (LOG_APART_KEY,)).fetchone()
    return row is not None and secrets.compare_digest(bytes(row[0]), log_of)


def replica_standings(directory: Path) -> list[ReplicaStanding]:
    """What each replica a vault would read from is (reachable, a standby, of the
    primary's cluster), in the order configured (for doctor; no key, nothing changed)."""
    layout = VaultLayout(Path(directory))
    recorded = layout.read()
    database, _ = _database_choice(recorded)
    topology = database_topology(recorded, database)
    if topology is None:
        return []
    from custodes.storage.pg_replicas import replica_standing

    return [replica_standing(topology.primary, replica) for replica in topology.replicas]


def database_standing(directory: Path, *, log: bool = False) -> RoleStanding | None:
    """What the role of the URL a vault recorded for its server may do to the vault's
    schema, as the server answers (for doctor; no key, nothing changed); with `log`, to
    the schema of its access log's own database. None for a vault in SQLite, or (`log`)
    one whose log shares the records' database. StorageError if the database cannot be
    reached."""
    recorded = VaultLayout(Path(directory)).read()
    url = recorded.log_database if log else recorded.database
    if url is None:
        return None
    from custodes.storage.postgres import role_standing

    return role_standing(url)
