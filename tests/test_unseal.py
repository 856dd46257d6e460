"""M-of-N unseal (threat 19): the keyring opens with any M of N officers' shares, and the
keyring file with fewer shares, a repeated share or a wrong one opens nothing."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from custodes.bootstrap import assemble_vault, create_shared_vault, unlock_vault
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
from custodes.policy import Role
from custodes.settings import VaultLayout
from tests.conftest import FAST_HASH, FAST_KDF, PASSWORD, enrol, free_port, totp_code

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
    with pytest.raises(KeyringError, match="do not open this keyring"):
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
    backed = _custodes("backup", "create", "--vault", "v", "--to", "bk", *three, cwd=tmp_path)
    assert backed.returncode == 0, backed.stderr


# -- a server that starts sealed -------------------------------------------------------------


@contextlib.contextmanager
def _sealed_server(directory: Path, log: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`custodes serve` on a free loopback port, no share given: it starts sealed."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTODES_")}
    with log.open("ab") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "custodes",
                "serve",
                "--vault",
                str(directory),
                "--port",
                str(port),
            ],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text()
            try:
                httpx.get(f"{base}/api/v1/sys/seal-status", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not answer"
                time.sleep(0.2)
        yield base, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _give(base: str, path: Path) -> httpx.Response:
    return httpx.post(f"{base}/api/v1/sys/unseal", json={"share": path.read_text()}, timeout=60)


def _reads_refused(base: str) -> None:
    for method, path in (
        ("GET", "/api/v1/me"),
        ("POST", "/api/v1/session"),
        ("GET", "/api/v1/records/x"),
        ("GET", "/"),
    ):
        answer = httpx.request(method, f"{base}{path}", timeout=10)
        assert answer.status_code == 503 and answer.json()["error"] == "sealed", path


def test_a_sealed_server_refuses_reads_until_three_officers_unseal_it(
    private_home: Path,
    shared: tuple[Path, list[Path]],
    population_file: Path,
    people: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    directory, paths = shared
    host = assemble_vault(unlock_vault(directory, shares=_shares(paths[:3])), host=True)
    try:
        assert host.ingest(host.operator, population_file).rejected == 0
        host.admin.add_account(
            host.operator, "li.na", PASSWORD, Role.INVESTIGATOR, {"district": "*"}
        )
        totp = enrol(host, "li.na")
    finally:
        host.close()
    log = tmp_path / "serve.out"
    with contextlib.ExitStack() as stack, _sealed_server(directory, log) as (base, process):
        status = httpx.get(f"{base}/api/v1/sys/seal-status", timeout=10).json()
        assert status == {"sealed": True, "threshold": 3, "parts": 5, "progress": 0}
        _reads_refused(base)

        assert _give(base, paths[0]).json()["progress"] == 1
        repeated = _give(base, paths[0])
        assert repeated.status_code == 409 and repeated.json()["progress"] == 1
        assert _give(base, paths[4]).json()["progress"] == 2
        _reads_refused(base)  # two shares leave it sealed

        # A wrong third share: the keyring's seal refuses the key, and progress starts over.
        forged = json.loads(paths[2].read_text())
        forged["share"] = base64.b64encode(os.urandom(32) + bytes([forged["index"]])).decode()
        wrong = httpx.post(
            f"{base}/api/v1/sys/unseal", json={"share": json.dumps(forged)}, timeout=60
        )
        assert wrong.status_code == 400 and wrong.json()["progress"] == 0
        _reads_refused(base)

        # Three officers, the third with the command, from a share sealed under their
        # own passphrase (opened on the officer's side, never sent sealed or whole).
        _give(base, paths[1])
        _give(base, paths[3])
        sealed = tmp_path / "officer" / "cy.share"
        write_share_file(
            sealed, read_share_file(paths[2]), passphrase=SHARE_PASSPHRASE, kdf=FAST_KDF
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTODES_")}
        env["CUSTODES_SHARE_PASSPHRASE"] = SHARE_PASSPHRASE
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "custodes",
                "unseal",
                "--server",
                base,
                "--share",
                str(sealed),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0 and "unsealed" in done.stdout, done.stderr
        assert httpx.get(f"{base}/api/v1/sys/seal-status", timeout=10).json()["sealed"] is False

        # Now a login and a search work.
        client = httpx.Client(base_url=base, timeout=30)
        stack.callback(client.close)
        login = client.post(
            "/api/v1/session",
            json={"username": "li.na", "password": PASSWORD, "totp": totp_code(totp)},
        )
        assert login.status_code == 201, login.text
        token = login.json()["token"]
        found = client.post(
            "/api/v1/search",
            json={
                "record_type": "person",
                "index": "national_id",
                "values": {"national_id": str(people[0]["national_id"])},
                "purpose": "burglary follow-up",
                "case_ref": "T-1",
            },
            headers={"Authorization": f"Bearer {token}"},
        )
        assert found.status_code == 200, found.text
        assert found.json()["results"], found.text

        # Sealed again, by the host: every read is refused once more, the session's too.
        port = base.rsplit(":", 1)[1]
        sealing = subprocess.run(
            [sys.executable, "-m", "custodes", "seal", "--vault", str(directory), "--port", port],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert sealing.returncode == 0 and str(process.pid) in sealing.stdout, sealing.stderr
        deadline = time.monotonic() + 10
        while httpx.get(f"{base}/api/v1/sys/seal-status", timeout=10).json()["sealed"] is False:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        _reads_refused(base)
        again = client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
        assert again.status_code == 503

    operational = (VaultLayout(directory).logs / "custodes.log").read_text()
    assert "share 1 of officer ada taken" in operational
    assert "refused share 1 (ada) given again" in operational
    assert "do not open the keyring" in operational
    assert "unsealed by" in operational and "sealed: the keys are dropped" in operational
    for path in paths:  # no share's bytes reach the log
        assert json.loads(path.read_text())["share"] not in operational

    # The unseal is on the access log, naming officers and share numbers only.
    auditor = assemble_vault(unlock_vault(directory, shares=_shares(paths[:3])), host=True)
    try:
        entries = [e for _, e in auditor._log.entries() if e.action == "vault:keys:unseal"]
    finally:
        auditor.close()
    assert len(entries) == 1


def test_wrong_shares_are_limited_to_a_few_a_minute(shared: tuple[Path, list[Path]]) -> None:
    from custodes.web.unseal import WRONG_SHARES_PER_MINUTE, SealedServer

    directory, paths = shared
    now = [1000.0]
    gate = SealedServer(
        directory,
        vault_id=VaultLayout(directory).read().vault_id,
        mode=ShareMode(5, 3),
        open_app=lambda unlocked, officers: pytest.fail("no share here opens anything"),
        clock=lambda: now[0],
    )
    for _ in range(WRONG_SHARES_PER_MINUTE):
        assert gate.unseal(b'{"share": "not a share"}')[0] == 400
    good = json.dumps({"share": paths[0].read_text()}).encode()
    status, doc = gate.unseal(good)
    assert status == 429 and doc["progress"] == 0  # refused unread, even a good share
    now[0] += 61
    assert gate.unseal(good) == (200, {"sealed": True, "threshold": 3, "parts": 5, "progress": 1})


def test_a_shares_mode_vault_is_not_served_sealed_by_several_workers(
    private_home: Path, shared: tuple[Path, list[Path]]
) -> None:
    directory, _ = shared
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTODES_")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "custodes",
            "serve",
            "--vault",
            str(directory),
            "--workers",
            "2",
            "--port",
            str(free_port()),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0 and "one worker for now" in done.stderr


def test_rekeying_with_three_old_shares_leaves_the_old_shares_opening_nothing(
    shared: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    from custodes.bootstrap import reshare_vault

    directory, paths = shared
    before = unlock_vault(directory, shares=_shares(paths[:3])).material
    # Two old shares are not enough to rekey.
    with pytest.raises(KeyringError, match="3 shares are needed"):
        reshare_vault(
            directory,
            old_shares=_shares(paths[:2]),
            mode=ShareMode(4, 2),
            officers=["fa", "gu", "ha", "io"],
            share_paths=[tmp_path / "new" / f"{o}.share" for o in ("fa", "gu", "ha", "io")],
            kdf=FAST_KDF,
        )
    assert not (tmp_path / "new").exists()
    written = reshare_vault(
        directory,
        old_shares=_shares(paths[2:]),
        mode=ShareMode(4, 2),
        officers=["fa", "gu", "ha", "io"],
        share_paths=[tmp_path / "new" / f"{o}.share" for o in ("fa", "gu", "ha", "io")],
        kdf=FAST_KDF,
    )
    keyring = VaultLayout(directory).read().keyring
    assert read_share_mode(keyring) == ShareMode(4, 2)
    # Any two new shares open the same keys; no three old ones open anything now.
    for pair in itertools.combinations(written, 2):
        assert unlock_vault(directory, shares=_shares(list(pair))).material == before
    for trio in itertools.combinations(paths, 3):
        with pytest.raises(KeyringError):
            unlock_vault(directory, shares=_shares(list(trio)))
    vault = assemble_vault(unlock_vault(directory, shares=_shares(written[:2])), host=True)
    try:
        assert vault.verify_log(vault.operator).entries > 0
        steps = [e.detail for _, e in vault._log.entries() if e.action == "vault:keys:rotate"]
        assert {k: steps[-1][k] for k in ("step", "parts", "threshold", "given")} == {
            "step": "reshare",
            "parts": 4,
            "threshold": 2,
            "given": 3,
        }
    finally:
        vault.close()


def test_keys_reshare_on_the_command_line_takes_the_old_shares_and_writes_new_ones(
    shared: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from custodes.cli import cli

    directory, paths = shared
    runner = CliRunner()
    new_dir = tmp_path / "handover"
    args = ["keys", "reshare", "--vault", str(directory), "--shares", "3", "--threshold", "2"]
    args += ["--share-dir", str(new_dir)]
    refused = runner.invoke(cli, args)
    assert refused.exit_code != 0 and "--share" in str(refused.exception)
    done = runner.invoke(cli, [*args, *(x for p in paths[:3] for x in ("--share", str(p)))])
    assert done.exit_code == 0, done.output
    assert "the old shares open nothing now" in done.output
    written = sorted(new_dir.glob("*.share"))
    assert [p.name for p in written] == [f"officer-{n}.share" for n in (1, 2, 3)]
    assert unlock_vault(directory, shares=_shares(written[1:])).material is not None


def test_behind_a_tls_proxy_a_sealed_server_takes_shares_only_through_the_proxy(
    shared: tuple[Path, list[Path]],
) -> None:
    import warnings

    from custodes.web import serve
    from custodes.web.unseal import SealedServer

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*httpx2")
        from fastapi.testclient import TestClient

    directory, paths = shared
    gate = SealedServer(
        directory,
        vault_id=VaultLayout(directory).read().vault_id,
        mode=ShareMode(5, 3),
        open_app=lambda unlocked, officers: pytest.fail("one share opens nothing"),
    )
    listen = serve._Listen("127.0.0.1", free_port(), None, ("127.0.0.1",), behind_tls_proxy=True)
    app = serve.guarded(gate, listen)
    share = {"share": paths[0].read_text()}
    # No lifespan (outside a context manager): it would take SIGUSR1, from a thread.
    # Around the proxy, even claiming https: refused, and the share never read.
    around = TestClient(app, client=("198.51.100.4", 41000)).post(
        "/api/v1/sys/unseal", json=share, headers={"X-Forwarded-Proto": "https"}
    )
    assert around.status_code == 421 and around.json()["error"]["code"] == "not_through_proxy"
    assert gate.status()["progress"] == 0
    # Through the proxy over https: taken, with the security headers.
    through = TestClient(app, client=("127.0.0.1", 41000)).post(
        "/api/v1/sys/unseal", json=share, headers={"X-Forwarded-Proto": "https"}
    )
    assert through.status_code == 200 and through.json()["progress"] == 1
    assert "max-age" in through.headers["strict-transport-security"]
