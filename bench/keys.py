"""What rotating the keys costs: records rewrapped and re-encrypted per second, and
audited lookups per second while a rotation runs, against the same lookups on the same
vault with no rotation, in one run.

For each --backend, builds a vault of synthetic people (on PostgreSQL in a schema of its
own, dropped after), opened from its files as a server opens it (so that it follows its
keyring), adds an investigator with budgets beyond reach, logs in, and then:

1. lookups alone: Vault.search in --threads threads for --seconds (the baseline);
2. `keys rotate` (a new KEK: every data key rewrapped, no record re-encrypted), timed;
3. `keys rotate --data --index` (every record re-encrypted under a new data key and its
   tokens rebuilt under a new index key), timed, with the same lookups running beside it
   in this process, as a server's run beside the host's `keys rotate`: their rate during
   the pass against the baseline's is the ratio printed.

Each rotation runs in a process of its own, as `custodes keys rotate` does on the host,
and this process follows it through its keyring as a server does. The rates are of the
pass over the records alone, not of its waits for the serving processes to read the
keyring (custodes.key_watch: a few seconds a rotation, whatever its size) nor of the
keyring's own rewrites (an Argon2id derivation each; the vault here is made with the
cheapest the library accepts); the whole is printed apart. Prints a table, a column per
backend; asserts nothing. Everything it writes stays in its temporary directory.

    python bench/keys.py [--people 60000] [--seconds 5] [--threads 4]
    python bench/keys.py --backend sqlite postgresql [--database URL]
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from baseline import LOCAL_SERVER
from custodes.key_watch import GRACE_SECONDS
from guard import database_for, lookups_per_second
from serve import BACKENDS, PASSPHRASE, PASSWORD, USER, sample_ids, synthesise


def open_vault_from_files(area: Path, source: Path, people: int, database: str | None) -> Any:
    """A filled vault, reopened from its files, with the bench's investigator logged in:
    (vault, session)."""
    import pyotp

    from custodes.bootstrap import assemble_vault, create_vault, unlock_vault
    from custodes.crypto import KdfParams
    from custodes.policy import Role
    from custodes.policy.budgets import LIMIT_NAMES, MAX_LIMIT

    created = create_vault(
        area / "vault",
        passphrase=PASSPHRASE,
        keyring_path=area / "keys" / "vault.keyring",
        log_key_path=area / "keys" / "log.key",
        expected_population=max(people, 1000),
        database=database,
        # The cheapest key derivation the library accepts: each rotation opens and
        # rewrites the keyring several times, and this bench times the records' work.
        kdf=KdfParams(time_cost=2, memory_kib=19_456, parallelism=1),
    )
    try:
        created.ingest(created.operator, source, workers=1)
        budget = dict.fromkeys(LIMIT_NAMES, MAX_LIMIT)
        created.admin.add_account(
            created.operator, USER, PASSWORD, Role.INVESTIGATOR, {"district": "*", "budget": budget}
        )
        code = created.admin.issue_enrolment(created.operator, USER)
        secret = created.enrolment(code).secret
        created.complete_enrolment(code, pyotp.TOTP(secret).now())
    finally:
        created.close()
    vault = assemble_vault(
        unlock_vault(area / "vault", passphrase=PASSPHRASE, database=database), host=True
    )
    try:
        session = vault.login(USER, PASSWORD, totp=pyotp.TOTP(secret).at(time.time() + 30))
    except BaseException:
        vault.close()
        raise
    return vault, session


def timed_rotation(
    vault: Any, page: int, grace: float, **options: bool
) -> tuple[float, float, float, int]:
    """Seconds a rotation took in all, and the wall-clock start and end of its pass over
    the records (from its first page done to its last, scaled to every record), and how
    many records it walked. The rest is waiting for other processes to read the keyring
    (custodes.key_watch) and the keyring's own rewrites."""
    records = vault._storage.count_records()
    marks: list[tuple[float, int]] = []
    started = time.perf_counter()
    state = vault.rotate_keys(
        vault.operator,
        progress=lambda done, _total: marks.append((time.time(), done)),
        page=page,
        sleep=lambda seconds: time.sleep(min(seconds, grace)),
        **options,
    )
    elapsed = time.perf_counter() - started
    if not state.finished:
        raise RuntimeError("the rotation did not finish")
    (first_at, first_done), (last_at, last_done) = marks[0], marks[-1]
    if last_done <= first_done:
        raise RuntimeError("too few records to time a pass: give more --people")
    per_record = (last_at - first_at) / (last_done - first_done)
    return elapsed, first_at - per_record * first_done, first_at + per_record * records, records


def rotate_elsewhere(
    directory: str, database: str | None, page: int, grace: float, full: bool, out: Any
) -> None:
    """A rotation as the host runs it: in a process of its own, on the vault's files
    (the lookups' process follows it through its KeyWatch, as a server does)."""
    from custodes.bootstrap import assemble_vault, unlock_vault

    vault = assemble_vault(
        unlock_vault(Path(directory), passphrase=PASSPHRASE, database=database), host=True
    )
    try:
        out.send(timed_rotation(vault, page, grace, data=full, index=full))
    except BaseException as exc:
        out.send(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        vault.close()


def measure_backend(
    backend: str, workdir: Path, source: Path, ids: list[str], args: argparse.Namespace
) -> dict[str, float]:
    area = workdir / backend
    area.mkdir()
    with database_for(backend, args.database) as database:
        vault, session = open_vault_from_files(area, source, args.people, database)
        try:
            lookups_per_second(vault, session, ids, args.threads, args.warmup)
            alone = lookups_per_second(vault, session, ids, args.threads, args.seconds)
            figures: dict[str, tuple[float, float, float, int]] = {}
            during: list[float] = []
            for name, full in (("rewrap", False), ("reseal", True)):
                receive, send = multiprocessing.get_context("spawn").Pipe(duplex=False)
                child = multiprocessing.get_context("spawn").Process(
                    target=rotate_elsewhere,
                    args=(str(area / "vault"), database, args.page, args.grace, full, send),
                )
                child.start()
                windows: list[tuple[float, float, float]] = []
                while child.is_alive() and not receive.poll():
                    began = time.time()
                    rate = lookups_per_second(vault, session, ids, args.threads, args.window)
                    windows.append((began, time.time(), rate))
                answer = receive.recv()
                child.join()
                if not isinstance(answer, tuple):
                    raise RuntimeError(f"the rotation failed: {answer}")
                figures[name] = answer
                if full:
                    _, first, last, _ = answer
                    # The windows within the pass: not the waits for the keyring around it.
                    during = [r for a, b, r in windows if a >= first and b <= last]
            rewrap_all, rewrap_first, rewrap_last, records = figures["rewrap"]
            reseal_all, reseal_first, reseal_last, _ = figures["reseal"]
            print(
                f"{backend}: {records:,} records; keys rotate {rewrap_all:.1f} s (pass "
                f"{rewrap_last - rewrap_first:.1f} s); --data --index {reseal_all:.1f} s "
                f"(pass {reseal_last - reseal_first:.1f} s, {len(during)} windows of lookups "
                "within it)",
                flush=True,
            )
            rate_during = sum(during) / len(during) if during else 0.0
            return {
                "records": records,
                "rewrap": records / (rewrap_last - rewrap_first),
                "reseal": records / (reseal_last - reseal_first),
                "alone": alone,
                "during": rate_during,
            }
        finally:
            vault.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--people", type=int, default=60_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--page", type=int, default=1000, help="records a rotation step")
    parser.add_argument(
        "--window", type=float, default=1.0, help="seconds of each lookup measure in a pass"
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=GRACE_SECONDS,
        help="at most this long a wait for the lookups' process to read the keyring: it "
        "checks every second, and the bench's keyring opens in milliseconds",
    )
    parser.add_argument("--backend", nargs="+", choices=BACKENDS, default=["sqlite"])
    parser.add_argument(
        "--database", default=LOCAL_SERVER, help="the PostgreSQL server, for --backend postgresql"
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="custodes-bench-keys-"))
    try:
        source = synthesise(workdir, args.people, args.seed)
        ids = sample_ids(source, 2_000, args.seed)
        figures = {b: measure_backend(b, workdir, source, ids, args) for b in args.backend}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    width = 12
    rows = [
        ("records", "records", ",.0f"),
        ("rewrapped/s (keys rotate)", "rewrap", ",.0f"),
        ("re-encrypted and re-indexed/s", "reseal", ",.0f"),
        ("lookups/s, no rotation", "alone", ",.0f"),
        ("lookups/s during --data --index", "during", ",.0f"),
    ]
    lines = [
        f"people {args.people:,}  threads {args.threads}  lookups measured {args.seconds:g} s "
        f"alone and in windows of {args.window:g} s within the rotation's pass",
        " " * 34 + "".join(f"{b:>{width}}" for b in args.backend),
    ]
    for label, key, spec in rows:
        lines.append(
            f"{label:34}" + "".join(f"{figures[b][key]:>{width}{spec}}" for b in args.backend)
        )
    lines.append(
        f"{'lookups during / alone':34}"
        + "".join(f"{figures[b]['during'] / figures[b]['alone']:>{width}.2f}" for b in args.backend)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
