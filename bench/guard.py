"""What the guard costs: audited lookups with budgets charged and canaries watched for,
against the same lookups through the same vault with the guard taken out, in one run.

For each --backend, builds a vault of synthetic people (on PostgreSQL in a schema of its
own, dropped after) with canary records planted among them, adds an investigator whose
budget has every limit set, and so high that the run never crosses one (each lookup is
charged to five counters, as any official's is), logs in, and drives Vault.search in
--threads threads of this process: no HTTP, so that the guard's share is not hidden
behind a server's. The baseline is the same vault and session with the access
function's budget step replaced by one that charges nothing and its canary list by one
that holds none: a construction of this bench only, not a setting of custodes. The two
alternate, --rounds times each, and the medians are compared:

    overhead = 1 - (lookups/s with the guard) / (lookups/s without it)

With --anomaly-every N (default 10; 0: off) the guarded side also runs the anomaly
guard's round (Vault.guard_round: read the log since the last round, score, act) every
N seconds in this process, as a single-worker server does, with its thresholds raised
out of reach so that it never stops the bench's own account (this bench's construction
only); the baseline runs neither.

Target: under 15%. Prints a table, a column per backend; asserts nothing. Everything it
writes stays in its temporary directory.

    python bench/guard.py [--people 100000] [--seconds 5] [--threads 8]
    python bench/guard.py --backend sqlite postgresql [--database URL]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from baseline import LOCAL_SERVER, drop_schema, fresh_schema
from serve import BACKENDS, PASSPHRASE, PASSWORD, PURPOSE, USER, sample_ids, synthesise

TARGET_OVERHEAD = 0.15
CANARIES = 20


@contextmanager
def database_for(backend: str, server: str) -> Iterator[str | None]:
    if backend != "postgresql":
        yield None
        return
    schema, database = fresh_schema(server)
    try:
        yield database
    finally:
        drop_schema(server, schema)


def open_guarded_vault(area: Path, source: Path, people: int, database: str | None) -> Any:
    """A filled vault, open, with the bench's investigator logged in: (vault, session)."""
    import pyotp

    from custodes.bootstrap import create_vault
    from custodes.policy import Role
    from custodes.policy.budgets import LIMIT_NAMES, MAX_LIMIT

    vault = create_vault(
        area / "vault",
        passphrase=PASSPHRASE,
        keyring_path=area / "keys" / "vault.keyring",
        log_key_path=area / "keys" / "log.key",
        expected_population=max(people, 1000),
        database=database,
    )
    try:
        vault.ingest(vault.operator, source, workers=1)
        vault.plant_canaries(vault.operator, CANARIES)
        # Every limit set, all beyond reach: each lookup charges every counter.
        budget = dict.fromkeys(LIMIT_NAMES, MAX_LIMIT)
        vault.admin.add_account(
            vault.operator, USER, PASSWORD, Role.INVESTIGATOR, {"district": "*", "budget": budget}
        )
        code = vault.admin.issue_enrolment(vault.operator, USER)
        secret = vault.enrolment(code).secret
        vault.complete_enrolment(code, pyotp.TOTP(secret).now())
        session = vault.login(USER, PASSWORD, totp=pyotp.TOTP(secret).at(time.time() + 30))
    except BaseException:
        vault.close()
        raise
    return vault, session


@contextmanager
def without_the_guard(vault: Any) -> Iterator[None]:
    """The access function with its budget step charging nothing and no canary to watch
    for: this bench's baseline."""
    gate = vault._gate
    gate._spend = lambda *_args: []
    canaries = gate._canaries
    canaries.among = lambda _ids: []
    try:
        yield
    finally:
        del gate._spend
        del canaries.among


def lookups_per_second(
    vault: Any, session: Any, ids: list[str], threads: int, seconds: float
) -> float:
    from custodes.policy import AccessPurpose

    purpose = AccessPurpose(PURPOSE["purpose"], PURPOSE["case_ref"])
    stop = threading.Event()
    counts = [0] * threads
    failures: list[BaseException] = []

    def run(lane: int) -> None:
        n = lane
        try:
            while not stop.is_set():
                nid = ids[n % len(ids)]
                vault.search(
                    session,
                    purpose,
                    record_type="person",
                    index="national_id",
                    values={"national_id": nid},
                )
                counts[lane] += 1
                n += threads
        except BaseException as exc:
            failures.append(exc)
            stop.set()

    workers = [threading.Thread(target=run, args=(lane,)) for lane in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    stop.wait(seconds)
    stop.set()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"a lookup failed: {type(failures[0]).__name__}") from failures[0]
    return sum(counts) / elapsed


@contextmanager
def scoring(vault: Any, every: float) -> Iterator[None]:
    """The anomaly guard's rounds beside the lookups, every `every` seconds (0: none)."""
    if every <= 0:
        yield
        return
    stop = threading.Event()

    def run() -> None:
        # A round at once, then on the timer: a measurement shorter than the interval
        # still pays for one, over every entry since the last (the baseline's too).
        while True:
            vault.guard_round()
            if stop.wait(every):
                return

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def rate(vault: Any, session: Any, ids: list[str], args: argparse.Namespace) -> float:
    return lookups_per_second(vault, session, ids, args.threads, args.seconds)


def measure_backend(
    backend: str, workdir: Path, source: Path, ids: list[str], args: argparse.Namespace
) -> tuple[float, float]:
    """Median lookups/s without the guard and with it."""
    area = workdir / backend
    area.mkdir()
    with database_for(backend, args.database) as database:
        vault, session = open_guarded_vault(area, source, args.people, database)
        from custodes.policy.anomaly import GuardSettings

        # Scored in full, acted on never: the bench's account reads far beyond any day's.
        vault._guard_settings = GuardSettings(alert_at=1e9, step_up_at=1e9, lock_at=1e9)
        try:
            plain: list[float] = []
            guarded: list[float] = []
            lookups_per_second(vault, session, ids, args.threads, args.warmup)
            # In turns, each first in every other round: the log grows as the run goes
            # on, and neither side may have the fresher vault.
            for round_ in range(args.rounds):
                for guard in (True, False) if round_ % 2 else (False, True):
                    if guard:
                        with scoring(vault, args.anomaly_every):
                            guarded.append(rate(vault, session, ids, args))
                        continue
                    with without_the_guard(vault):
                        plain.append(rate(vault, session, ids, args))
            print(
                f"{backend}: without the guard {', '.join(f'{r:,.0f}' for r in plain)}; "
                f"with it {', '.join(f'{r:,.0f}' for r in guarded)} lookups/s",
                flush=True,
            )
            return statistics.median(plain), statistics.median(guarded)
        finally:
            vault.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--people", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--backend", nargs="+", choices=BACKENDS, default=["sqlite"])
    parser.add_argument(
        "--anomaly-every",
        type=float,
        default=10.0,
        help="seconds between the anomaly guard's rounds on the guarded side (0: off)",
    )
    parser.add_argument(
        "--database", default=LOCAL_SERVER, help="the PostgreSQL server, for --backend postgresql"
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="custodes-bench-guard-"))
    try:
        source = synthesise(workdir, args.people, args.seed)
        ids = sample_ids(source, 2_000, args.seed)
        figures = {b: measure_backend(b, workdir, source, ids, args) for b in args.backend}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    width = 12
    lines = [
        f"people {args.people:,}  threads {args.threads}  {args.rounds} rounds of "
        f"{args.seconds:g} s, medians  anomaly rounds every {args.anomaly_every:g} s  "
        f"target: overhead < {TARGET_OVERHEAD:.0%}",
        " " * 34 + "".join(f"{b:>{width}}" for b in args.backend),
        f"{'lookups/s without the guard':34}"
        + "".join(f"{figures[b][0]:>{width},.0f}" for b in args.backend),
        f"{'lookups/s with budgets and scores':34}"
        + "".join(f"{figures[b][1]:>{width},.0f}" for b in args.backend),
        f"{'overhead of the guard':34}"
        + "".join(f"{1 - figures[b][1] / figures[b][0]:>{width}.1%}" for b in args.backend),
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
