"""Rotation under load (threat 19): a full data-key and index-key rotation of 100,000
records, run by `custodes keys rotate` beside a serving `custodes serve --workers 2`,
SIGKILLed in the middle and finished with --resume, while searches go on: not one search
fails or misses its person, and afterwards no record, token or key of the old versions
remains. CUSTODES_ROTATION_RECORDS sets the size (default 100,000)."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import orjson

from custodes.audit.verify import verify_log
from custodes.bootstrap import create_vault, open_vault
from custodes.crypto import Keyring
from custodes.policy import Action, Role
from custodes.settings import VaultLayout
from custodes.synth import write_jsonl
from tests.conftest import FAST_HASH, FAST_KDF, PASSPHRASE, PASSWORD, enrol, free_port, totp_now

RECORDS = int(os.environ.get("CUSTODES_ROTATION_RECORDS", "100000"))
# The synthetic population writes 1.7 records a person (cases and deliveries besides).
PEOPLE = max(100, round(RECORDS / 1.7))
UNLIMITED = {
    "views_per_minute": None,
    "views_per_hour": None,
    "views_per_day": None,
    "subjects_per_day": None,
    "misses_per_hour": None,
    "misses_per_day": None,
}


def _host(*args: str, directory: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CUSTODES_KEYRING_PASSPHRASE": PASSPHRASE}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "custodes", *args, "--vault", str(directory)],
            env=env,
            stdout=out,
            stderr=out,
        )


def _cursor(database: Path) -> int:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = 'rotation.cursor'").fetchone()
    return int(row[0]) if row else 0


def test_searches_never_fail_through_a_killed_and_resumed_full_rotation(tmp_path: Path) -> None:
    directory = tmp_path / "vault"
    source = tmp_path / "population.jsonl"
    with source.open("wb") as f:
        write_jsonl(f, PEOPLE, seed=23)
    people = [
        r["national_id"]
        for r in map(orjson.loads, source.read_bytes().splitlines())
        if r["type"] == "person"
    ]
    vault = create_vault(
        directory,
        passphrase=PASSPHRASE,
        keyring_path=tmp_path / "keys" / "load.keyring",
        kdf=FAST_KDF,
        hash_cost=FAST_HASH,
    )
    try:
        report = vault.ingest(vault.operator, source, workers=2)
        assert report.rejected == 0
        total = vault._storage.count_records()
        attributes = {"district": "*", "budget": UNLIMITED}
        vault.admin.add_account(vault.operator, "t.load", PASSWORD, Role.SUPERVISOR, attributes)
        code = totp_now(vault, enrol(vault, "t.load"))
    finally:
        vault.close()
    assert total >= RECORDS * 0.95

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server_log = tmp_path / "server.log"
    server = _host(
        "serve", "--port", str(port), "--workers", "2", directory=directory, log=server_log
    )
    outcomes: Counter[str] = Counter()
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, server_log.read_text()
            try:
                httpx.get(f"{base}/api/v1/me", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not answer"
                time.sleep(0.2)
        opened = httpx.post(
            f"{base}/api/v1/session",
            json={"username": "t.load", "password": PASSWORD, "totp": code},
            timeout=30,
        )
        assert opened.status_code == 201, opened.text
        auth = {"Authorization": f"Bearer {opened.json()['token']}"}
        sample = random.Random(5).sample(people, min(2000, len(people)))

        def search() -> None:
            with httpx.Client(base_url=base, headers=auth, timeout=60) as client:
                n = 0
                while not stop.is_set():
                    nid = sample[n % len(sample)]
                    n += 1
                    answer = client.post(
                        "/api/v1/search",
                        json={
                            "record_type": "person",
                            "index": "national_id",
                            "values": {"national_id": nid},
                            "purpose": "rotation under load",
                            "case_ref": "T-9",
                        },
                    )
                    if answer.status_code != 200:
                        outcomes[f"status {answer.status_code}"] += 1
                    elif len(answer.json()["results"]) != 1:
                        outcomes["missed"] += 1
                    else:
                        outcomes["found"] += 1

        searchers = [threading.Thread(target=search) for _ in range(2)]
        for searcher in searchers:
            searcher.start()

        rotate_log = tmp_path / "rotate.log"
        rotation = _host("keys", "rotate", "--data", "--index", directory=directory, log=rotate_log)
        database = VaultLayout(directory).database
        # Killed once a third of the records are done: mid-pass, a page half applied at most.
        deadline = time.monotonic() + 600
        while _cursor(database) < total // 3:
            assert rotation.poll() is None, rotate_log.read_text()
            assert time.monotonic() < deadline, "the rotation made no progress"
            time.sleep(0.05)
        rotation.send_signal(signal.SIGKILL)
        rotation.wait(timeout=30)
        killed_at = _cursor(database)
        found_before_resume = outcomes["found"]

        resumed = _host("keys", "rotate", "--resume", directory=directory, log=rotate_log)
        assert resumed.wait(timeout=600) == 0, rotate_log.read_text()
        # Searches went on through the whole rotation, before and after the kill.
        time.sleep(1)
        stop.set()
        for searcher in searchers:
            searcher.join(timeout=120)
    finally:
        stop.set()
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    assert 0 < killed_at < total
    assert outcomes["found"] > found_before_resume > 0
    assert set(outcomes) == {"found"}, dict(outcomes)

    keyring = Keyring.open(tmp_path / "keys" / "load.keyring", passphrase=PASSPHRASE)
    material = keyring.material
    # The old KEK and index key are gone from the keyring for good.
    assert set(material.keks) == {2} and set(material.index_roots()) == {2}
    assert material.data_generation == 2
    vault = open_vault(directory, passphrase=PASSPHRASE, hash_cost=FAST_HASH)
    try:
        census = vault._storage.key_census()
        # No data key under the old KEK, no payload of the old generation, no old token.
        assert census.kek_versions == {2: total}
        assert census.data_generations == {2: total}
        assert {index_id >> 32 for index_id in census.token_index_ids} == {1}
        state = vault.key_state(vault.operator)
        assert state.finished
        verify_log(vault._storage, vault._log.verifier_key)
        steps = [
            e.detail["step"]
            for _, e in vault._log.entries()
            if e.action == Action.KEYS_ROTATE.value
        ]
        assert steps[:2] == ["start", "pass"] and "resume" in steps and steps[-1] == "status"
        assert "retired" in steps
        searched = sum(1 for _, e in vault._log.entries() if e.action == Action.SEARCH.value)
        assert searched >= outcomes["found"]
        print(
            f"\n{total:,} records; {outcomes['found']:,} searches, none failed; killed at "
            f"record {killed_at:,}"
        )
    finally:
        vault.close()
