"""M-of-N unseal (threat 19): the keyring opens with any M of N officers' shares, and the
keyring file with fewer shares, a repeated share or a wrong one opens nothing."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from custodes.bootstrap import create_shared_vault, unlock_vault
from custodes.crypto import Keyring
from custodes.crypto.key_shares import (
    KeyShare,
    key_passphrase,
    read_share_file,
    write_share_file,
)
from custodes.crypto.keyring import ShareMode, read_share_mode
from custodes.crypto.shamir import combine
from custodes.errors import KeyringError
from custodes.settings import VaultLayout
from tests.conftest import FAST_HASH, FAST_KDF

OFFICERS = ["ada", "bo", "cy", "di", "ed"]
SHARE_PASSPHRASE = "quartz mango velvet harbour 1987"


@pytest.fixture
def shared(tmp_path: Path) -> tuple[Path, list[Path]]:
    vault, paths = create_shared_vault(
        tmp_path / "vault",
        mode=ShareMode(5, 3),
        officers=OFFICERS,
        share_paths=[tmp_path / "shares" / f"{o}.share" for o in OFFICERS],
        keyring_path=tmp_path / "keys" / "test.keyring",
        log_key_path=tmp_path / "keys" / "test.logkey",
        kdf=FAST_KDF,
        hash_cost=FAST_HASH,
    )
    vault.close()
    return tmp_path / "vault", paths


def _shares(paths: list[Path]) -> list[KeyShare]:
    return [read_share_file(path) for path in paths]


def test_any_three_of_five_shares_open_the_keyring(shared: tuple[Path, list[Path]]) -> None:
    directory, paths = shared
    keyring = VaultLayout(directory).read().keyring
    assert read_share_mode(keyring) == ShareMode(5, 3)
    seen = set()
    for chosen in itertools.combinations(paths, 3):
        unlocked = unlock_vault(directory, shares=_shares(list(chosen)))
        seen.add(unlocked.material.index_root)
    assert len(seen) == 1


def test_the_keyring_file_with_any_two_shares_opens_nothing(
    shared: tuple[Path, list[Path]],
) -> None:
    directory, paths = shared
    keyring = VaultLayout(directory).read().keyring
    for pair in itertools.combinations(paths, 2):
        shares = _shares(list(pair))
        with pytest.raises(KeyringError, match="3 shares are needed"):
            unlock_vault(directory, shares=shares)
        # Combining two anyway gives a key that does not open the seal.
        guess = key_passphrase(combine([s.share for s in shares]))
        with pytest.raises(KeyringError):
            Keyring.open(keyring, passphrase=guess)
    with pytest.raises(KeyringError, match="not a passphrase"):
        unlock_vault(directory, passphrase="correct horse battery staple")


def test_a_repeated_share_is_refused(shared: tuple[Path, list[Path]]) -> None:
    directory, paths = shared
    with pytest.raises(KeyringError, match="twice"):
        unlock_vault(directory, shares=_shares([paths[0], paths[1], paths[1]]))


def test_a_wrong_share_fails_the_seal_and_says_so(shared: tuple[Path, list[Path]]) -> None:
    directory, paths = shared
    good = _shares(paths[:2])
    third = read_share_file(paths[2])
    forged = third._replace(share=os.urandom(32) + bytes([third.number]))
    with pytest.raises(KeyringError, match="do not open this keyring"):
        unlock_vault(directory, shares=[*good, forged])


def test_a_share_of_another_vault_is_refused(
    shared: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    directory, paths = shared
    _, others = create_shared_vault(
        tmp_path / "other",
        mode=ShareMode(5, 3),
        officers=OFFICERS,
        share_paths=[tmp_path / "other-shares" / f"{o}.share" for o in OFFICERS],
        keyring_path=tmp_path / "keys" / "other.keyring",
        log_key_path=tmp_path / "keys" / "other.logkey",
        kdf=FAST_KDF,
        hash_cost=FAST_HASH,
    )
    with pytest.raises(KeyringError, match="another vault"):
        unlock_vault(directory, shares=_shares([paths[0], paths[1], others[2]]))


def test_an_edited_threshold_in_the_keyring_header_opens_nothing(
    shared: tuple[Path, list[Path]],
) -> None:
    directory, paths = shared
    keyring = VaultLayout(directory).read().keyring
    doc = json.loads(keyring.read_bytes())
    doc["shares"]["threshold"] = 2
    keyring.write_text(json.dumps(doc))
    with pytest.raises(KeyringError):
        unlock_vault(directory, shares=_shares(paths[:3]))


def test_a_sealed_share_opens_only_with_its_officers_passphrase(
    shared: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    _, paths = shared
    share = read_share_file(paths[0])
    sealed = tmp_path / "sealed" / "ada.share"
    write_share_file(sealed, share, passphrase=SHARE_PASSPHRASE, kdf=FAST_KDF)
    assert share.share.hex() not in sealed.read_text()
    assert sealed.stat().st_mode & 0o077 == 0
    with pytest.raises(KeyringError, match="passphrase is needed"):
        read_share_file(sealed)
    with pytest.raises(KeyringError, match="wrong passphrase"):
        read_share_file(sealed, passphrase="not the officer's passphrase")
    assert read_share_file(sealed, passphrase=SHARE_PASSPHRASE) == share
    assert "share=<hidden>" in repr(share)


def test_share_files_must_live_outside_the_vault(tmp_path: Path) -> None:
    from custodes.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="outside the vault directory"):
        create_shared_vault(
            tmp_path / "vault",
            mode=ShareMode(3, 2),
            officers=["a", "b", "c"],
            share_paths=[tmp_path / "vault" / f"{o}.share" for o in "abc"],
            keyring_path=tmp_path / "keys" / "test.keyring",
            kdf=FAST_KDF,
            hash_cost=FAST_HASH,
        )


def _custodes(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTODES_")}
    return subprocess.run(
        [sys.executable, "-m", "custodes", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
        check=False,
    )


def test_init_with_five_shares_then_host_commands_need_three(
    private_home: Path, tmp_path: Path
) -> None:
    made = _custodes("init", "v", "--shares", "5", "--threshold", "3", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    layout = VaultLayout(tmp_path / "v").read()
    held = layout.keyring.parent / f"{layout.vault_id.hex()}.shares"
    files = sorted(held.glob("*.share"))
    assert [f.name for f in files] == [f"officer-{n}.share" for n in range(1, 6)]
    assert all(f.stat().st_mode & 0o077 == 0 for f in files)
    doctor = _custodes("doctor", "--vault", "v", cwd=tmp_path)
    assert "3 of 5 officers' key shares" in doctor.stdout
    assert "keys:shares" in _custodes("doctor", "--vault", "v", "--json", cwd=tmp_path).stdout

    three = [a for f in files[1:4] for a in ("--share", str(f))]
    listed = _custodes("account", "list", "--vault", "v", *three, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    two = [a for f in files[:2] for a in ("--share", str(f))]
    refused = _custodes("account", "list", "--vault", "v", *two, cwd=tmp_path)
    assert refused.returncode != 0 and "3 shares are needed" in refused.stderr
    none = _custodes("account", "list", "--vault", "v", cwd=tmp_path)
    assert none.returncode != 0 and "--share" in none.stderr
