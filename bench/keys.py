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
   in the same process for as long as it runs: their rate against the baseline's is the
   ratio printed.

The rotation's waits for other processes to read the keyring (custodes.key_watch) are
taken out here, as there are none, and the rates are of the pass over the records alone:
the keyring's own cost (an Argon2id derivation each time the file is opened or
rewritten, a few seconds a rotation whatever its size at the default cost; the vault
here is made with the cheapest the library accepts) is printed apart. Prints a table, a column
per backend; asserts nothing. Everything it writes stays in its temporary directory.

    python bench/keys.py [--people 60000] [--seconds 5] [--threads 4]
    python bench/keys.py --backend sqlite postgresql [--database URL]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from baseline import LOCAL_SERVER
from guard import database_for, lookups_per_second
from serve import BACKENDS, PASSPHRASE, PASSWORD, USER, sample_ids, synthesise


def open_vault_from_files(area: Path, source: Path, people: int, database: str | None) -> Any:
    """A filled vault, reopened from its files, with the bench's investigator logged in:
    (vault, session)."""
    import pyotp

    from custodes.bootstrap import assemble_vault, create_vault, unlock_vault
    from custodes.policy import Role
    from custodes.policy.budgets import LIMIT_NAMES, MAX_LIMIT

    from custodes.crypto import KdfParams

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


def timed_rotation(vault: Any, **options: bool) -> tuple[float, float, int]:
    """Seconds a rotation took in all, seconds its pass over the records took (from its
    first page done to its last, scaled to every record), and how many records it walked.
    The rest is the keyring's: each rewrite of the file is an Argon2id derivation."""
    records = vault._storage.count_records()
    marks: list[tuple[float, int]] = []
    started = time.perf_counter()
    state = vault.rotate_keys(
        vault.operator,
        sleep=lambda _s: None,
        progress=lambda done, _total: marks.append((time.perf_counter(), done)),
        **options,
    )
    elapsed = time.perf_counter() - started
    if not state.finished:
        raise RuntimeError("the rotation did not finish")
    (first_at, first_done), (last_at, last_done) = marks[0], marks[-1]
    if last_done <= first_done:
        raise RuntimeError("too few records to time a pass: give more --people")
    per_record = (last_at - first_at) / (last_done - first_done)
    return elapsed, per_record * records, records


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
            rewrap_all, rewrap_s, records = timed_rotation(vault)
            # The full rotation with lookups beside it, for as long as it runs.
            result: dict[str, Any] = {}

            def rotate() -> None:
                try:
                    result["figures"] = timed_rotation(vault, data=True, index=True)
                except BaseException as exc:
                    result["error"] = exc

            rotation = threading.Thread(target=rotate)
            started = time.perf_counter()
            rotation.start()
            during: list[float] = []
            while rotation.is_alive():
                during.append(lookups_per_second(vault, session, ids, args.threads, 1.0))
            rotation.join()
            if "error" in result:
                raise RuntimeError("the rotation failed") from result["error"]
            reseal_all, reseal_s, _ = result["figures"]
            print(
                f"{backend}: {records:,} records; keys rotate {rewrap_all:.1f} s (pass "
                f"{rewrap_s:.1f} s); --data --index {reseal_all:.1f} s (pass {reseal_s:.1f} "
                f"s) with lookups beside it for {time.perf_counter() - started:.1f} s",
                flush=True,
            )
            rate_during = sum(during) / len(during) if during else 0.0
            return {
                "records": records,
                "rewrap": records / rewrap_s,
                "reseal": records / reseal_s,
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
        "alone and for the whole rotation beside it",
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
