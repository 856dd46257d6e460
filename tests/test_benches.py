"""The benchmarks, run end to end at their smallest on every backend. They print figures
and assert nothing themselves: here a bench that no longer runs, measures nothing, or
leaves files, keys or database schemas behind is caught."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.postgres import (  # noqa: F401 - a fixture, asked for by name
    BINARIES,
    postgres_server_fixture,
    unavailable,
)

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[1] / "bench"
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(name="bench_server")
def bench_server_fixture(request: pytest.FixtureRequest, backend: str) -> Iterator[list[str]]:
    """The bench's options for `backend`; for PostgreSQL, a database of the test's own on
    the server, so that any schema a bench leaves there is the bench's, not another run's."""
    if backend == "sqlite":
        yield ["--backend", "sqlite"]
        return
    server: str = request.getfixturevalue("postgres_server")
    name = f"custodes_t_{secrets.token_hex(6)}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    database = psycopg.conninfo.make_conninfo(server, dbname=name)
    try:
        yield ["--backend", "postgresql", "--database", database]
        with psycopg.connect(database) as db:
            left = db.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%'"
                " AND nspname NOT IN ('public', 'information_schema')"
            ).fetchall()
        assert left == [], "the bench left schemas behind"
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def files_under(directory: Path) -> set[Path]:
    return {path for path in directory.rglob("*")}


def run_bench(
    script: str, tmp_path: Path, home: Path, *options: str, scratch: Path | None = None
) -> str:
    """The bench's output; it must exit cleanly, remove what it made in its temporary
    directory (`scratch`, empty, if given) and write nothing to the user's HOME."""
    if scratch is None:
        scratch = tmp_path / "tmp"
        scratch.mkdir()
    before = files_under(home)
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *options],
        env={**os.environ, "TMPDIR": str(scratch)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert list(scratch.iterdir()) == [], "the bench left files in its temporary directory"
    assert files_under(home) == before, "the bench wrote to the user's HOME"
    return done.stdout


def row(output: str, name: str) -> list[str]:
    """The cells of the table's row named `name`."""
    for line in output.splitlines():
        if name in line:
            return line.split(name, 1)[1].split()
    raise AssertionError(f"no row {name!r} in:\n{output}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_serving_bench_measures_custodes_beside_its_baseline_and_leaves_nothing(
    backend: str, bench_server: list[str], tmp_path: Path, private_home: Path
) -> None:
    output = run_bench(
        "serve.py",
        tmp_path,
        private_home,
        *bench_server,
        *("--people", "300", "--workers", "1", "--server-workers", "1"),
        *("--concurrency", "2", "--seconds", "0.5", "--warmup", "0.3", "--settle", "0.1"),
    )
    assert any(line.strip() == backend for line in output.splitlines()), output
    for name in ("audited lookups/s", "baseline lookups/s"):
        (rate,) = row(output, name)
        assert float(rate.replace(",", "")) > 0, f"{name}: nothing was answered"
    (ratio,) = row(output, "ratio custodes/baseline")
    assert float(ratio) > 0
    assert row(output, "errors custodes/baseline") == ["0/0"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_ingest_bench_measures_custodes_beside_its_baseline_and_leaves_nothing(
    backend: str, bench_server: list[str], tmp_path: Path, private_home: Path
) -> None:
    output = run_bench(
        "ingest.py", tmp_path, private_home, *bench_server, "--records", "300", "--workers", "1"
    )
    assert re.search(rf"{backend} plaintext baseline : +[\d,]+ records/s", output), output
    assert re.search(rf"{backend} custodes, 1 worker\(s\): +[\d,]+ records/s", output), output
    stages = r"per record: parse [\d.]+ \+ validate [\d.]+ \+ seal [\d.]+ = [\d.]+ µs CPU"
    assert re.search(stages + r".*; write [\d.]+ µs wall", output), output


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_guard_bench_measures_budgets_against_lookups_without_them_and_leaves_nothing(
    backend: str, bench_server: list[str], tmp_path: Path, private_home: Path
) -> None:
    output = run_bench(
        "guard.py",
        tmp_path,
        private_home,
        *bench_server,
        *("--people", "300", "--seconds", "0.3", "--warmup", "0.1", "--rounds", "2"),
        *("--threads", "2"),
    )
    for name in ("lookups/s without the guard", "lookups/s with budgets and scores"):
        (rate,) = row(output, name)
        assert float(rate.replace(",", "")) > 0, f"{name}: nothing was answered"
    (overhead,) = row(output, "overhead of the guard")
    assert overhead.endswith("%")


@contextlib.contextmanager
def cluster_scratch(backend: str) -> Iterator[Path | None]:
    """For PostgreSQL, the backup bench's temporary directory: one its cluster's OS user
    can pass through (pytest's own directories are private to the user running the
    tests), removed after; for SQLite, None (run_bench's own)."""
    if backend != "postgresql":
        yield None
        return
    if not (BINARIES / "initdb").exists() or shutil.which("pgbackrest") is None:
        unavailable("the backup bench needs PostgreSQL 15's initdb and pgBackRest")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            unavailable("run as root, the backup bench runs its cluster as the postgres user")
    scratch = Path(tempfile.mkdtemp(prefix="custodes-bench-test-"))
    os.chmod(scratch, 0o711)
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def processes_naming(path: Path) -> list[int]:
    """The processes whose command line names `path` (a cluster's data directory)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if str(path).encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return found


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_backup_bench_measures_custodes_beside_its_baseline_and_leaves_nothing(
    backend: str, tmp_path: Path, private_home: Path
) -> None:
    with cluster_scratch(backend) as scratch:
        output = run_bench(
            "backup.py",
            tmp_path,
            private_home,
            *("--backend", backend, "--records", "40", "--workers", "1"),
            scratch=scratch,
        )
        if scratch is not None:
            assert processes_naming(scratch) == [], "the bench left a cluster running"
    assert any(line.strip() == backend for line in output.splitlines()), output
    for operation in ("backup", "verify", "restore"):
        for name in ("custodes s", "baseline s", "ratio custodes/baseline"):
            (cell,) = row(output, f"{operation} {name}")
            assert float(cell.replace(",", "")) > 0, f"{operation} {name}: nothing was timed"
        (estimate,) = row(output, f"{operation} custodes s at 1,000,000, estimated")
        assert float(estimate.replace(",", "")) > 0
        (verdict,) = row(output, f"{operation} target")[-1:]
        assert verdict in ("met", "missed")
    for name in ("backup custodes MiB", "backup baseline MiB"):
        (size,) = row(output, name)
        assert float(size.replace(",", "")) > 0, f"{name}: the backup holds nothing"


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_keys_bench_measures_rotation_and_lookups_beside_it_and_leaves_nothing(
    backend: str, bench_server: list[str], tmp_path: Path, private_home: Path
) -> None:
    output = run_bench(
        "keys.py",
        tmp_path,
        private_home,
        *bench_server,
        *("--people", "3000", "--threads", "2", "--seconds", "0.5", "--warmup", "0.2"),
        *("--window", "0.1", "--grace", "1.5"),
    )
    assert any(line.split() == [backend] for line in output.splitlines()), output
    for name in (
        "rewrapped/s (keys rotate)",
        "re-encrypted and re-indexed/s",
        "lookups/s, no rotation",
        "lookups/s during --data --index",
    ):
        (rate,) = row(output, name)
        assert float(rate.replace(",", "")) > 0, f"{name}: nothing was measured"
    (ratio,) = row(output, "lookups during / alone")
    assert float(ratio) > 0


@pytest.mark.parametrize("backend", [pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_the_scale_bench_measures_each_size_beside_its_baseline_and_leaves_nothing(
    backend: str, bench_server: list[str], tmp_path: Path, private_home: Path
) -> None:
    database = bench_server[bench_server.index("--database") + 1]
    output = run_bench(
        "scale.py",
        tmp_path,
        private_home,
        *("--database", database, "--people", "300", "--workers", "1"),
        *("--server-workers", "1", "--concurrency", "2", "--seconds", "0.5"),
        *("--warmup", "0.3", "--settle", "0.1", "--stats-wait", "0"),
    )
    last = output[output.rindex("PostgreSQL; ingest workers") :]
    assert row(last, "people") == ["300"]
    for name in ("bytes per person on disk", "2 conn: lookups/s", "baseline lookups/s"):
        (cell,) = row(last, name)
        assert float(cell.replace(",", "")) > 0, last
    assert row(last, "errors") == ["0/0"]
    assert "bytes per person by table at 300: " in last
    # What a lookup cost, as the server counted it, custodes/baseline. Read at once here
    # (--stats-wait 0), before every backend has reported: shown, not yet complete.
    for name in ("pages touched a lookup", "disk reads a lookup", "rows seq-scanned a lookup"):
        (cell,) = row(last, name)
        assert all(float(part) >= 0 for part in cell.split("/")), last
    assert len(row(last, "vacuum (analyze) s, custodes/baseline")) == 1
