"""Audited lookups over HTTP: exact national-ID searches against the running server.

Builds a vault of synthetic people (or uses --vault), serves it on 127.0.0.1 from
--server-workers processes (as `custodes serve --workers`), logs in with password and
one-time code, then drives POST /api/v1/search from keep-alive connections for --seconds
and prints lookups/s and p50/p99 latency beside the target. Every lookup is authenticated
and on the access log. Asserts nothing; stops the server and removes what it built when done.

    python bench/serve.py [--people 1000000] [--seconds 20] [--concurrency 16,32]
    python bench/serve.py --vault DIR --source people.jsonl   (passphrase, user, password
                                                               and TOTP secret from env)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson

PASSPHRASE_ENV = "CUSTODES_KEYRING_PASSPHRASE"
USER = "bench.investigator"
PASSWORD = "bench only: cobalt meadow lantern 58"
TARGET_RATE = 1000.0
TARGET_P99_MS = 50.0
PURPOSE = {"purpose": "benchmark of audited lookups", "case_ref": "BENCH-1"}
SAMPLE = 20_000


def build(workdir: Path, people: int, seed: int, workers: int) -> tuple[Path, Path, str]:
    """A vault of `people` synthetic people; its source file; the investigator's TOTP secret."""
    import pyotp

    from custodes.bootstrap import create_vault
    from custodes.policy import Role
    from custodes.synth import write_jsonl

    source = workdir / "people.jsonl"
    started = time.perf_counter()
    with source.open("wb") as f:
        lines = write_jsonl(f, people, seed=seed)
    print(f"synthesised {lines:,} records in {time.perf_counter() - started:.1f} s", flush=True)
    vault = create_vault(
        workdir / "vault",
        passphrase=os.environ[PASSPHRASE_ENV],
        keyring_path=workdir / "keys" / "vault.keyring",
        log_key_path=workdir / "keys" / "log.key",
        expected_population=max(people, 1000),
    )
    try:
        started = time.perf_counter()
        report = vault.ingest(vault.operator, source, workers=workers)
        print(
            f"ingested {report.accepted:,} records with {workers} workers in "
            f"{time.perf_counter() - started:.1f} s",
            flush=True,
        )
        vault.admin.add_account(
            vault.operator, USER, PASSWORD, Role.INVESTIGATOR, {"district": "*"}
        )
        code = vault.admin.issue_enrolment(vault.operator, USER)
        secret = vault.enrolment(code).secret
        vault.complete_enrolment(code, pyotp.TOTP(secret).now())
    finally:
        vault.close()
    return workdir / "vault", source, secret


def sample_ids(source: Path, count: int, seed: int) -> list[str]:
    """National IDs drawn evenly from the whole file (reservoir sampling)."""
    rng = random.Random(seed)
    chosen: list[str] = []
    seen = 0
    with source.open("rb") as f:
        for line in f:
            if b'"type":"person"' not in line:
                continue
            seen += 1
            nid = str(orjson.loads(line)["national_id"])
            if len(chosen) < count:
                chosen.append(nid)
            elif (j := rng.randrange(seen)) < count:
                chosen[j] = nid
    return chosen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(vault_dir: str, port: int, workers: int) -> None:
    """The server: `workers` processes sharing the port, as `custodes serve --workers`."""
    from custodes.bootstrap import unlock_vault
    from custodes.web.serve import serve as serve_vault

    unlocked = unlock_vault(Path(vault_dir), passphrase=os.environ[PASSPHRASE_ENV])
    serve_vault(unlocked, host="127.0.0.1", port=port, workers=workers)


def wait_until_up(base: str, server: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit("the server exited before it answered")
        try:
            httpx.get(f"{base}/api/v1/me", timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit("the server did not answer in time")


def login(base: str, username: str, password: str, secret: str) -> str:
    import pyotp

    totp = pyotp.TOTP(secret)
    # The code that confirmed enrolment is spent; the next step's is accepted too.
    for code in (totp.at(time.time() + 30), totp.now()):
        response = httpx.post(
            f"{base}/api/v1/session",
            json={"username": username, "password": password, "totp": code},
            timeout=30,
        )
        if response.status_code == 201:
            return str(response.json()["token"])
    raise SystemExit(f"login failed: {response.status_code} {response.text}")


class Connection:
    """One keep-alive HTTP/1.1 connection, just enough for this benchmark's POSTs.

    httpx spends about 2 ms of CPU per request here, more than the server does, and on
    two cores that would time the client; this one costs a few tens of microseconds.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def post(self, path: str, token: str, body: bytes) -> tuple[int, bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "transfer-encoding":
                raise SystemExit("chunked responses are not expected from this endpoint")
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def drive(
    port: int, token: str, ids: list[str], concurrency: int, seconds: float, warmup: float
) -> tuple[list[float], int, float]:
    """Latencies (s) of successful lookups after the warm-up, errors, measured seconds."""
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + seconds

    async def worker(n: int) -> None:
        nonlocal errors
        rng = random.Random(n)
        connection = await Connection.open(port)
        try:
            while (now := time.perf_counter()) < stop_at:
                body = {
                    "record_type": "person",
                    "index": "national_id",
                    "values": {"national_id": rng.choice(ids)},
                    "limit": 1,
                    **PURPOSE,
                }
                status, answer = await connection.post("/api/v1/search", token, orjson.dumps(body))
                done = time.perf_counter()
                ok = status == 200 and len(orjson.loads(answer)["results"]) == 1
                if now >= measure_from:
                    if ok:
                        latencies.append(done - now)
                    else:
                        errors += 1
        finally:
            connection.close()

    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return latencies, errors, time.perf_counter() - measure_from


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--people", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2, help="ingest worker processes")
    parser.add_argument("--vault", help="an existing vault (skips building one)")
    parser.add_argument("--source", help="with --vault: the JSON Lines it was built from")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument(
        "--warmup",
        type=float,
        default=20.0,
        help="seconds of load before the first measurement (the servers' page caches fill)",
    )
    parser.add_argument(
        "--settle", type=float, default=3.0, help="seconds at each level before measuring"
    )
    parser.add_argument(
        "--concurrency",
        default="16,32",
        help="connections in flight; a comma list runs each in turn on the same server",
    )
    parser.add_argument(
        "--server-workers", type=int, default=2, help="server processes (one per core)"
    )
    parser.add_argument("--serve", nargs=3, metavar=("VAULT", "PORT", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), int(args.serve[2]))
        return
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        parser.error("--concurrency is a number or a comma list of numbers")
    if not all(1 <= c <= 1024 for c in levels) or not 0 < args.seconds <= 3600:
        parser.error("--concurrency is 1..1024 and --seconds 0..3600")

    workdir = Path(tempfile.mkdtemp(prefix="custodes-bench-serve-"))
    env = dict(os.environ)
    server: subprocess.Popen[bytes] | None = None
    try:
        if args.vault:
            if not args.source:
                parser.error("--vault needs --source, the file it was built from")
            vault_dir, source = Path(args.vault), Path(args.source)
            username = os.environ["CUSTODES_USER"]
            password = os.environ["CUSTODES_PASSWORD"]
            secret = os.environ["CUSTODES_TOTP_SECRET"]
        else:
            env.setdefault(PASSPHRASE_ENV, "bench passphrase for a throwaway vault")
            os.environ[PASSPHRASE_ENV] = env[PASSPHRASE_ENV]
            vault_dir, source, secret = build(workdir, args.people, args.seed, args.workers)
            username, password = USER, PASSWORD
        ids = sample_ids(source, SAMPLE, args.seed)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--serve",
                str(vault_dir),
                str(port),
                str(args.server_workers),
            ],
            env=env,
        )
        wait_until_up(base, server)
        token = login(base, username, password, secret)
        # A server that has just started reads every page from the OS at first; what is
        # measured is the server as it runs, after that.
        asyncio.run(drive(port, token, ids, max(levels), 0.001, args.warmup))
        for level in levels:
            latencies, errors, measured = asyncio.run(
                drive(port, token, ids, level, args.seconds, args.settle)
            )
            report(args, level, latencies, errors, measured)
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def report(
    args: argparse.Namespace, level: int, latencies: list[float], errors: int, measured: float
) -> None:
    rate = len(latencies) / measured
    p50, p99 = percentile(latencies, 0.50) * 1000, percentile(latencies, 0.99) * 1000
    print(
        f"people {args.people:,}  server workers {args.server_workers}  "
        f"concurrency {level}  measured {measured:.1f} s  "
        f"lookups {len(latencies):,}  errors {errors}"
    )
    print(f"audited lookups/s  {rate:,.0f}   (target >= {TARGET_RATE:,.0f})")
    print(f"latency p50        {p50:.1f} ms")
    print(f"latency p99        {p99:.1f} ms  (target < {TARGET_P99_MS:.0f} ms)", flush=True)


if __name__ == "__main__":
    main()
