"""Threats 1, 2 and 3 at deployment: `custodes doctor` names each exposure, with its fix,
and exits non-zero on any high one. Each test builds a deliberately bad deployment.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from custodes.bootstrap import create_vault
from custodes.cli.doctor import doctor
from custodes.doctor import (
    Deployment,
    Finding,
    Listener,
    Severity,
    examine,
    listening_sockets,
)
from custodes.policy import Role
from custodes.settings import VaultLayout
from tests.conftest import FAST_HASH, FAST_KDF, PASSPHRASE, PASSWORD, enrol, login


@pytest.fixture
def deployment(tmp_path: Path) -> Path:
    """A sound deployment: keys apart and owner-only, one enrolled official."""
    vault = create_vault(
        tmp_path / "vault",
        passphrase=PASSPHRASE,
        keyring_path=tmp_path / "keys" / "vault.keyring",
        log_key_path=tmp_path / "keys" / "log.key",
        kdf=FAST_KDF,
        hash_cost=FAST_HASH,
    )
    try:
        vault.admin.add_account(
            vault.operator, "d.officer", PASSWORD, Role.OFFICER, {"district": "3101"}
        )
        enrol(vault, "d.officer")
    finally:
        vault.close()
    return tmp_path / "vault"


def check(vault_dir: Path, **options: object) -> list[Finding]:
    options.setdefault("listeners", list)  # no listeners unless a test brings its own
    return examine(Deployment(vault_dir=vault_dir, **options))  # type: ignore[arg-type]


def tags(findings: list[Finding]) -> dict[str, Severity]:
    return {f.check: f.severity for f in findings}


def run_cli(vault_dir: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(doctor, ["--vault", str(vault_dir), *args])
    return result.exit_code, result.output


def test_a_sound_deployment_has_no_serious_finding(deployment: Path) -> None:
    found = check(deployment)
    assert not [f for f in found if f.severity is not Severity.LOW], found
    code, output = run_cli(deployment, "--port", "1")
    assert code == 0, output


def test_a_world_readable_database_is_high(deployment: Path) -> None:
    database = VaultLayout(deployment).database
    os.chmod(database, 0o644)
    found = [f for f in check(deployment) if f.check == "files:database:mode"]
    assert found and found[0].severity is Severity.HIGH
    assert found[0].fix == f"chmod 600 {database}"
    code, output = run_cli(deployment, "--port", "1")
    assert code == 1
    assert "HIGH" in output and "chmod 600" in output


def test_an_open_vault_directory_is_high(deployment: Path) -> None:
    os.chmod(deployment, 0o755)
    assert tags(check(deployment))["files:vault:mode"] is Severity.HIGH


def test_a_keyring_inside_the_vault_directory_is_high(deployment: Path) -> None:
    layout = VaultLayout(deployment)
    recorded = layout.read()
    moved = deployment / "vault.keyring"
    moved.write_bytes(recorded.keyring.read_bytes())
    os.chmod(moved, 0o600)
    text = layout.vault_file.read_text("utf-8")
    layout.vault_file.write_text(
        text.replace(
            orjson.dumps(str(recorded.keyring)).decode(), orjson.dumps(str(moved)).decode()
        )
    )
    assert layout.read().keyring == moved
    found = tags(check(deployment))
    assert found["keys:keyring:beside-data"] is Severity.HIGH
    assert run_cli(deployment, "--port", "1")[0] == 1


def test_a_keyring_readable_by_others_is_high(deployment: Path) -> None:
    keyring = VaultLayout(deployment).read().keyring
    os.chmod(keyring, 0o644)
    found = [f for f in check(deployment) if f.check == "keys:keyring:readable"]
    assert found and found[0].severity is Severity.HIGH and "chmod 600" in found[0].fix


def test_a_missing_log_key_is_reported(deployment: Path) -> None:
    VaultLayout(deployment).read().log_key.unlink()
    assert tags(check(deployment))["keys:log-signing-key:missing"] is Severity.MEDIUM


def test_an_official_without_a_second_factor_is_high(deployment: Path, tmp_path: Path) -> None:
    from custodes.bootstrap import open_vault

    vault = open_vault(deployment, passphrase=PASSPHRASE, hash_cost=FAST_HASH)
    try:
        vault.admin.add_account(vault.operator, "d.investigator", PASSWORD, Role.INVESTIGATOR)
        vault.admin.add_account(vault.operator, "d.auditor", PASSWORD, Role.AUDITOR)
    finally:
        vault.close()
    no_mfa = {
        f.message.split("'")[1]: f.severity
        for f in check(deployment)
        if f.check == "accounts:no-mfa"
    }
    assert no_mfa == {"d.investigator": Severity.HIGH, "d.auditor": Severity.MEDIUM}
    code, output = run_cli(deployment, "--port", "1")
    assert code == 1 and "d.investigator" in output and "custodes account enrol" in output


def test_an_official_added_without_a_district_who_can_read_nothing_is_told_how_to_fix_it(
    deployment: Path,
) -> None:
    from custodes.bootstrap import open_vault

    vault = open_vault(deployment, passphrase=PASSPHRASE, hash_cost=FAST_HASH)
    try:
        vault.admin.add_account(vault.operator, "d.nowhere", PASSWORD, Role.INVESTIGATOR)
        vault.admin.add_account(vault.operator, "d.cased", PASSWORD, Role.OFFICER)
        vault._accounts.assign_case("d.cased", "A2023-17")  # no case stored here to check
        vault.admin.add_account(vault.operator, "d.auditor", PASSWORD, Role.AUDITOR)
    finally:
        vault.close()
    found = {
        f.message.split("'")[1]: f for f in check(deployment) if f.check == "accounts:no-district"
    }
    assert set(found) == {"d.nowhere", "d.cased"}  # not the auditor, not d.officer (3101)
    assert found["d.nowhere"].severity is Severity.MEDIUM
    assert "can read no records" in found["d.nowhere"].message
    assert found["d.nowhere"].fix.startswith("'custodes account district d.nowhere CODE'")
    assert found["d.cased"].severity is Severity.LOW
    assert "1 assigned case" in found["d.cased"].message
    _, output = run_cli(deployment, "--port", "1")
    assert "custodes account district d.nowhere CODE" in output


def test_locked_and_disabled_accounts_are_reported(deployment: Path) -> None:
    from custodes.bootstrap import open_vault

    vault = open_vault(deployment, passphrase=PASSPHRASE, hash_cost=FAST_HASH)
    try:
        vault.admin.add_account(vault.operator, "d.gone", PASSWORD, Role.OFFICER)
        vault.admin.disable_account(vault.operator, "d.gone")
        while not vault._accounts.record_failure("d.officer"):
            pass
    finally:
        vault.close()
    found = tags(check(deployment))
    assert found["accounts:disabled"] is Severity.LOW
    assert found["accounts:locked"] is Severity.MEDIUM
    assert "accounts:budget-locked" not in found


def test_an_account_locked_at_its_budget_is_reported_as_a_possible_scraper(
    deployment: Path,
) -> None:
    from custodes.bootstrap import open_vault
    from custodes.errors import BudgetExceeded
    from custodes.policy import AccessPurpose
    from custodes.records.idnumber import check_char

    vault = open_vault(deployment, passphrase=PASSPHRASE, hash_cost=FAST_HASH)
    try:
        session = login(vault, Role.INVESTIGATOR, "d.walker", budget={"misses_per_hour": 0})
        absent = "11010519800101007"
        with pytest.raises(BudgetExceeded):
            vault.search(
                session,
                AccessPurpose("checking a reported burglary", "C-2026-17"),
                record_type="person",
                index="national_id",
                values={"national_id": absent + check_char(absent)},
            )
    finally:
        vault.close()
    [finding] = [f for f in check(deployment) if f.check == "accounts:budget-locked"]
    assert finding.severity is Severity.HIGH
    assert "'d.walker'" in finding.message and "misses_per_hour" in finding.message
    assert "custodes account unlock d.walker" in finding.fix


def test_an_account_that_read_a_canary_is_reported_as_stolen_or_misused(
    deployment: Path,
) -> None:
    from custodes.bootstrap import open_vault
    from custodes.policy import AccessPurpose

    vault = open_vault(deployment, passphrase=PASSPHRASE, hash_cost=FAST_HASH)
    try:
        vault.plant_canaries(vault.operator, 2)
        session = login(vault, Role.SUPERVISOR, "d.dumper")
        canary = sorted(vault._canaries.ids())[0]
        vault.record(session, AccessPurpose("looking around", "C-2026-17"), canary)
    finally:
        vault.close()
    [finding] = [f for f in check(deployment) if f.check == "accounts:canary-read"]
    assert finding.severity is Severity.HIGH
    assert "'d.dumper'" in finding.message and "canary" in finding.message
    assert "custodes audit log --actor d.dumper" in finding.fix
    assert "accounts:budget-locked" not in tags(check(deployment))


def test_an_account_locked_by_the_anomaly_guard_is_reported_with_its_signals(
    deployment: Path,
) -> None:
    from custodes.bootstrap import open_vault
    from custodes.policy import AccessPurpose
    from custodes.records.idnumber import check_char

    vault = open_vault(deployment, passphrase=PASSPHRASE, hash_cost=FAST_HASH)
    try:
        session = login(vault, Role.OFFICER, "d.prober")
        for serial in range(100, 120):
            body = f"31010419800101{serial:03d}"
            vault.search(
                session,
                AccessPurpose("checking a reported burglary", "C-2026-17"),
                record_type="person",
                index="national_id",
                values={"national_id": body + check_char(body)},
            )
        assert [s.account for s in vault.guard_round()] == ["d.prober"]
    finally:
        vault.close()
    [finding] = [f for f in check(deployment) if f.check == "accounts:anomaly-locked"]
    assert finding.severity is Severity.HIGH
    assert "'d.prober'" in finding.message and "id_probes" in finding.message
    assert "19800101" not in finding.message + finding.fix
    assert "custodes account unlock d.prober" in finding.fix


# -- listeners and TLS -------------------------------------------------------------------


@pytest.fixture
def plaintext_listener() -> Iterator[int]:
    """A plain-HTTP server on every address, as a misconfigured dashboard would be."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("0.0.0.0", 0))
    server.listen()
    stop = threading.Event()

    def answer() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


def test_a_plaintext_listener_beyond_loopback_is_high(
    deployment: Path, plaintext_listener: int
) -> None:
    port = plaintext_listener
    assert Listener("0.0.0.0", port) in listening_sockets()
    found = examine(Deployment(vault_dir=deployment, port=port))
    plain = [f for f in found if f.check == "network:listener:plaintext"]
    assert plain and plain[0].severity is Severity.HIGH and "0.0.0.0" in plain[0].message
    code, output = run_cli(deployment, "--port", str(port))
    assert code == 1 and "without TLS" in output


def test_loopback_listeners_and_tls_listeners_are_fine(deployment: Path) -> None:
    listeners = [Listener("127.0.0.1", 8443), Listener("::1", 8443), Listener("10.1.2.3", 8443)]
    probed: list[tuple[str, int]] = []

    def probe(host: str, port: int) -> bool:
        probed.append((host, port))
        return True

    found = check(deployment, port=8443, listeners=lambda: listeners, probe=probe)
    assert not [f for f in found if f.check.startswith("network:")]
    assert probed == [("10.1.2.3", 8443)]


def test_kernel_tables_are_read_for_ipv4_and_ipv6(tmp_path: Path) -> None:
    head = "  sl  local_address rem_address   st\n"
    (tmp_path / "tcp").write_text(
        head
        + "   0: 0100007F:20FB 00000000:0000 0A 0\n"  # 127.0.0.1:8443 listening
        + "   1: 00000000:20FB 00000000:0000 0A 0\n"  # 0.0.0.0:8443 listening
        + "   2: 0100007F:20FB 0100007F:D431 01 0\n"  # an established connection
    )
    (tmp_path / "tcp6").write_text(
        head + "   0: 00000000000000000000000000000000:20FB 0000:0000 0A 0\n"
    )
    found = listening_sockets([tmp_path / "tcp", tmp_path / "tcp6", tmp_path / "absent"])
    assert found == [
        Listener("127.0.0.1", 8443),
        Listener("0.0.0.0", 8443),
        Listener("::", 8443),
    ]


def test_a_plain_http_url_beyond_loopback_is_high(deployment: Path) -> None:
    found = tags(check(deployment, url="http://203.0.113.7:8443/"))
    assert found["network:url:plaintext"] is Severity.HIGH
    assert "network:url:plaintext" not in tags(check(deployment, url="http://127.0.0.1:8443/"))


def certificate(path: Path, days_left: float) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "custodes.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=400))
        .not_valid_after(now + dt.timedelta(days=days_left))
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.mark.parametrize(
    ("days_left", "expected"),
    [(-3, Severity.HIGH), (10, Severity.MEDIUM), (200, None)],
)
def test_certificate_expiry(
    deployment: Path, tmp_path: Path, days_left: float, expected: Severity | None
) -> None:
    cert = certificate(tmp_path / "server.pem", days_left)
    found = [f for f in check(deployment, tls_cert=cert) if f.check.startswith("tls:")]
    assert [f.severity for f in found] == ([expected] if expected else [])
    code, _ = run_cli(deployment, "--port", "1", "--tls-cert", str(cert))
    assert code == (1 if expected is Severity.HIGH else 0)


def test_a_readable_tls_key_is_high(deployment: Path, tmp_path: Path) -> None:
    key = tmp_path / "server.key"
    key.write_text("not a real key\n")
    os.chmod(key, 0o644)
    assert tags(check(deployment, tls_key=key))["tls:key:mode"] is Severity.HIGH


def test_a_schema_other_than_the_vaults_is_reported(deployment: Path, tmp_path: Path) -> None:
    from importlib import resources

    text = resources.files("custodes").joinpath("schemas/population.toml").read_text("utf-8")
    same = tmp_path / "same.toml"
    same.write_text(text, "utf-8")
    assert "schema:digest-mismatch" not in tags(check(deployment, schema_path=same))
    other = tmp_path / "other.toml"
    other.write_text(text + "\n# edited\n", "utf-8")
    assert tags(check(deployment, schema_path=other))["schema:digest-mismatch"] is Severity.MEDIUM


def test_findings_come_as_json_lines_most_severe_first(deployment: Path) -> None:
    os.chmod(VaultLayout(deployment).database, 0o644)
    os.chmod(VaultLayout(deployment).vault_file, 0o644)
    code, output = run_cli(deployment, "--port", "1", "--json")
    assert code == 1
    docs = [orjson.loads(line) for line in output.splitlines()]
    assert {"check", "severity", "message", "fix"} == set(docs[0])
    assert [d["severity"] for d in docs] == sorted(
        (d["severity"] for d in docs), key=["high", "medium", "low"].index
    )


def test_no_vault_here_is_high(tmp_path: Path) -> None:
    assert tags(check(tmp_path / "nowhere"))["files:vault:missing"] is Severity.HIGH


def test_a_session_that_outlived_its_account_is_high(deployment: Path) -> None:
    from custodes.bootstrap import open_vault
    from custodes.storage.base import SessionRow

    vault = open_vault(deployment, passphrase=PASSPHRASE, hash_cost=FAST_HASH)
    try:
        vault.admin.add_account(vault.operator, "d.leaver", PASSWORD, Role.OFFICER)
        vault.admin.disable_account(vault.operator, "d.leaver")
        now = vault._clock()
        # What a restored copy of the database, or a bug, could leave behind.
        vault._storage.put_session(
            SessionRow(b"k" * 32, "d.leaver", "officer", now, now + 3600, now, None)
        )
        vault._storage.put_session(
            SessionRow(b"e" * 32, "d.leaver", "officer", now - 9e4, now - 5e4, now - 9e4, None)
        )
    finally:
        vault.close()
    found = {f.check: f for f in check(deployment)}
    assert found["sessions:inactive-account"].severity is Severity.HIGH
    assert "d.leaver" in found["sessions:inactive-account"].message
    assert "1 live session" in found["sessions:inactive-account"].message
    assert found["sessions:ended"].severity is Severity.LOW


# -- the access log against its signer ----------------------------------------------------


def _grow_log(deployment: Path, entries: int, *, sign: bool) -> None:
    """Append account events to the deployment's log, then sign a checkpoint if asked."""
    from custodes.bootstrap import open_vault

    vault = open_vault(deployment, passphrase=PASSPHRASE, hash_cost=FAST_HASH)
    try:
        for _ in range(entries):
            vault.admin.issue_enrolment(vault.operator, "d.officer")
        if sign:
            vault.checkpoint(vault.operator)
    finally:
        vault.close()


def test_a_log_rolled_back_behind_its_signers_last_checkpoint_is_high(
    deployment: Path, tmp_path: Path
) -> None:
    # A restored older copy, or a fresh log file swapped in: the signer's own state says
    # it already signed more than the log now holds.
    log_file = Path(f"{VaultLayout(deployment).database}-log")
    _grow_log(deployment, 2, sign=True)
    older = tmp_path / "older-log"
    older.write_bytes(log_file.read_bytes())
    _grow_log(deployment, 5, sign=True)
    log_file.write_bytes(older.read_bytes())
    for leftover in (Path(f"{log_file}-wal"), Path(f"{log_file}-shm")):
        leftover.unlink(missing_ok=True)
    assert tags(check(deployment))["log:rolled-back"] is Severity.HIGH
    code, output = run_cli(deployment, "--port", "1")
    assert code == 1 and "rolled back" in output


def test_a_replaced_stored_verifier_key_is_high(deployment: Path) -> None:
    import sqlite3

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from custodes.audit.checkpoint import NoteSigner

    impostor = NoteSigner("custodes.vault/impostor", Ed25519PrivateKey.generate())
    with sqlite3.connect(VaultLayout(deployment).database) as db:
        db.execute(
            "UPDATE meta SET value = ? WHERE key = 'log_verifier_key'",
            (impostor.verifier_key.encode(),),
        )
    assert tags(check(deployment))["log:verifier-key-replaced"] is Severity.HIGH


def test_entries_not_yet_covered_by_a_signed_checkpoint_are_reported(deployment: Path) -> None:
    _grow_log(deployment, 3, sign=False)
    found = {f.check: f for f in check(deployment)}
    assert found["log:unsigned-tail"].severity is Severity.LOW
    assert "yet covered by a signed checkpoint" in found["log:unsigned-tail"].message
    _grow_log(deployment, 0, sign=True)
    # What remains is the entry that records the signing itself, which no checkpoint
    # can cover until the next one.
    after = {f.check: f for f in check(deployment)}["log:unsigned-tail"]
    assert after.message.startswith("1 access-log entry is not")


def test_a_key_file_copied_into_the_vault_directory_is_high(
    deployment: Path, tmp_path: Path
) -> None:
    for key in ("vault.keyring", "log.key"):
        copy = deployment / "rejects" / f"backup-of-{key}"
        copy.parent.mkdir(exist_ok=True)
        copy.write_bytes((tmp_path / "keys" / key).read_bytes())
        found = [f for f in check(deployment) if f.check == "keys:copy-beside-data"]
        assert [f.severity for f in found] == [Severity.HIGH] and str(copy) in found[0].message
        copy.unlink()


def test_a_world_readable_access_log_file_is_high(deployment: Path) -> None:
    log_file = Path(f"{VaultLayout(deployment).database}-log")
    log_file.chmod(0o644)
    found = [f for f in check(deployment) if f.check == "files:database:mode"]
    assert found and all(f.severity is Severity.HIGH for f in found)
    assert any(log_file.name in f.message for f in found)


def test_a_server_behind_its_tls_proxy_on_loopback_is_not_reported_as_without_tls(
    deployment: Path,
) -> None:
    # custodes on 127.0.0.1 in plain HTTP, nginx terminating TLS on this host.
    found = check(
        deployment,
        port=8000,
        listeners=lambda: [Listener("127.0.0.1", 8000)],
        url="http://127.0.0.1:8000/",
        trusted_proxies=("127.0.0.1",),
        behind_tls_proxy=True,
    )
    assert not [f for f in found if f.check.startswith("network:")]


@pytest.mark.parametrize("proxy", ["1.2.3.4", "0.0.0.0/0", "2a00:1450::/32"])
def test_a_trusted_proxy_on_the_internet_is_high(deployment: Path, proxy: str) -> None:
    # Whoever holds a trusted address names the client and claims https.
    found = check(deployment, trusted_proxies=(proxy,), behind_tls_proxy=True)
    public = [f for f in found if f.check == "network:proxy:public"]
    assert public and public[0].severity is Severity.HIGH


@pytest.mark.parametrize("proxy", ["127.0.0.1", "10.0.0.5", "192.168.0.0/24", "::1"])
def test_a_trusted_proxy_on_this_host_or_the_private_network_is_fine(
    deployment: Path, proxy: str
) -> None:
    found = check(deployment, trusted_proxies=(proxy,), behind_tls_proxy=True)
    assert not [f for f in found if f.check.startswith("network:")]


def test_a_proxy_that_may_relay_plain_http_is_reported(deployment: Path) -> None:
    assert tags(check(deployment, trusted_proxies=("127.0.0.1",)))["network:proxy:plain"] is (
        Severity.LOW
    )
    found = tags(check(deployment, behind_tls_proxy=True))
    assert found["network:proxy:unnamed"] is Severity.HIGH


def test_doctor_takes_the_servers_proxy_settings(deployment: Path) -> None:
    code, output = run_cli(deployment, "--trusted-proxy", "1.2.3.4", "--behind-tls-proxy")
    assert code == 1 and "1.2.3.4" in output
