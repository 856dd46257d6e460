"""Matching a leaked sample to where it left the vault: an export, by its canaries and
its watermark, or else the accounts whose reads best explain it.

Pure: the vault hands over each export as rebuilt from the log's sealed details (its
rows, recomputed with the export's keys, and its canaries), the record ids the sample's
rows match through the blind indexes, and each account's reads. The report names
exports by id, records by id and accounts by name; never a value.

Evidence for an export, over the columns the sample and the export share:
- canaries: rows equal to one of the export's synthetic rows, which no other export and
  no record of the vault holds (k of n);
- watermark: rows that match one of the export's records on every shared column but the
  watermark's carriers, and whose carrier takes the export's keyed form rather than the
  other one. An unrelated export agrees on about half of them;
- coverage: the sample's rows that match the export's rows (carriers aside).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from custodes.errors import InvalidInput

# Each canary found: the chance that an unrelated sample holds a synthetic row of this
# export's own on every shared column, taken as at most one in 2^32.
_CANARY_CHANCE = 2.0**-32
# What it takes to name an export: a confidence of this much (an unrelated export reaches
# it by chance once in a million; with many exports compared, once in a million each),
# and this share of the sample explained by it.
NAMED_CONFIDENCE = 1 - 1e-6
NAMED_COVERAGE = 0.5
# Columns shared with an export below which it is not compared at all.
MIN_SHARED_COLUMNS = 2
MAX_LEAK_ROWS = 1_000_000


@dataclass(frozen=True, slots=True)
class RebuiltRow:
    record_id: str
    values: Mapping[str, str]
    # The form each watermark carrier would have had under the other choice.
    other: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RebuiltExport:
    """An export as the log's sealed details let the vault rebuild it."""

    export_id: str
    requester: str
    record_type: str
    purpose_class: str
    rows: Sequence[RebuiltRow]
    canaries: Sequence[Mapping[str, str]]
    carriers: tuple[str, ...]
    pseudonyms: tuple[str, ...] = ()  # the fields that hold the export's pseudonym


@dataclass(frozen=True, slots=True)
class ExportFinding:
    export_id: str
    requester: str
    purpose_class: str
    canaries_found: int
    canaries: int
    watermark_agree: int
    watermark_rows: int
    matched_rows: int
    coverage: float
    confidence: float
    # The export's records the sample's rows were matched to (one record each), by id.
    records: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {
            "export": self.export_id,
            "requester": self.requester,
            "purpose_class": self.purpose_class,
            "canaries_found": self.canaries_found,
            "canaries": self.canaries,
            "watermark_agree": self.watermark_agree,
            "watermark_rows": self.watermark_rows,
            "matched_rows": self.matched_rows,
            "coverage": round(self.coverage, 4),
            "confidence": self.confidence,
        }


@dataclass(frozen=True, slots=True)
class AccountFinding:
    account: str
    covered: int
    seen: int
    coverage: float  # of the sample's records matched in the vault, how many it was shown
    precision: float  # of the records it was shown, how many are in the sample

    def as_json(self) -> dict[str, Any]:
        return {
            "account": self.account,
            "covered": self.covered,
            "seen": self.seen,
            "coverage": round(self.coverage, 4),
            "precision": round(self.precision, 4),
        }


@dataclass(frozen=True, slots=True)
class TraceReport:
    rows: int
    columns: tuple[str, ...]
    records_matched: int  # distinct records of the vault the sample's rows were matched to
    export: ExportFinding | None  # the export named, if the evidence suffices
    exports: tuple[ExportFinding, ...]  # every export compared, best first
    accounts: tuple[AccountFinding, ...]  # best first
    # The records the sample names, by id: those matched through the blind indexes, and
    # the named export's records its rows were matched to. Whose data left.
    records: tuple[str, ...] = ()

    @property
    def verdict(self) -> str:
        if self.export is not None:
            return "export"
        return "accounts" if self.accounts else "unknown"

    def as_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "rows": self.rows,
            "columns": list(self.columns),
            "records_matched": self.records_matched,
            "export": None if self.export is None else self.export.as_json(),
            "exports": [e.as_json() for e in self.exports],
            "accounts": [a.as_json() for a in self.accounts],
            "records": list(self.records),
        }


def read_leak(data: bytes) -> list[dict[str, str]]:
    """A leaked sample's rows, as text: JSON Lines, a JSON array or CSV with a header.
    InvalidInput names the line, never a value."""
    text = data.decode("utf-8-sig", errors="strict") if data else ""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = orjson.loads(text)
        except orjson.JSONDecodeError:
            raise InvalidInput("the sample is not a readable JSON array") from None
        return [_row(item, n) for n, item in enumerate(items, 1)]
    if stripped.startswith("{"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = orjson.loads(line)
            except orjson.JSONDecodeError:
                raise InvalidInput("not a JSON object", line=n) from None
            rows.append(_row(item, n))
        return _capped(rows)
    reader = csv.DictReader(io.StringIO(text))
    rows = []
    for n, item in enumerate(reader, 2):
        if None in item:
            raise InvalidInput("a row has more cells than the header", line=n)
        rows.append(_row(item, n))
    return _capped(rows)


def _capped(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    if len(rows) > MAX_LEAK_ROWS:
        raise InvalidInput(f"a sample of more than {MAX_LEAK_ROWS:,} rows is not traced")
    return rows


def _row(item: object, line: int) -> dict[str, str]:
    if not isinstance(item, dict):
        raise InvalidInput("not a JSON object", line=line)
    row: dict[str, str] = {}
    for key, value in item.items():
        if value is None or isinstance(value, dict | list):
            continue
        text = str(value).strip()
        if text:
            row[str(key).strip()] = text
    return row


def _tail(agree: int, rows: int) -> float:
    """P(X >= agree) for X ~ Binomial(rows, 1/2): the chance an unrelated export agrees
    this often with the watermark."""
    if rows == 0 or agree <= rows / 2:
        return 1.0
    log_half = rows * math.log(0.5)
    terms = [
        math.lgamma(rows + 1) - math.lgamma(k + 1) - math.lgamma(rows - k + 1) + log_half
        for k in range(agree, rows + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def compare_export(
    leak: Sequence[Mapping[str, str]], export: RebuiltExport
) -> ExportFinding | None:
    """The evidence that `leak` came from `export`; None if they share too few columns."""
    present = {name for row in leak for name in row}
    fields = {name for row in export.rows for name in row.values}
    fields.update(name for row in export.canaries for name in row)
    shared = tuple(sorted(present & fields))
    plain = tuple(c for c in shared if c not in export.carriers)
    carriers = tuple(c for c in shared if c in export.carriers)
    if len(shared) < MIN_SHARED_COLUMNS or not plain:
        return None

    def key(row: Mapping[str, str], columns: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(row.get(c, "") for c in columns)

    # A pseudonym is the export's own and names one record (or canary) outright, whatever
    # else in the row was edited; without one, a row is matched on every shared column.
    named = tuple(c for c in export.pseudonyms if c in present)
    canaries = {key(c, shared): n for n, c in enumerate(export.canaries)}
    canary_names = {c[f]: n for n, c in enumerate(export.canaries) for f in named if f in c}
    by_plain: dict[tuple[str, ...], list[RebuiltRow]] = {}
    by_name: dict[str, RebuiltRow] = {}
    for rebuilt in export.rows:
        by_plain.setdefault(key(rebuilt.values, plain), []).append(rebuilt)
        by_name.update((rebuilt.values[f], rebuilt) for f in named if f in rebuilt.values)
    found: set[int] = set()
    records: set[str] = set()
    matched = agree = compared = 0
    for row in leak:
        canary = canaries.get(key(row, shared))
        if canary is None:
            canary = next(
                (canary_names[v] for f in named if (v := row.get(f)) in canary_names), None
            )
        if canary is not None:
            found.add(canary)
            matched += 1
            continue
        by_pseudonym = [by_name[v] for f in named if (v := row.get(f)) in by_name][:1]
        candidates = by_pseudonym or by_plain.get(key(row, plain))
        if not candidates:
            continue
        matched += 1
        if len(candidates) != 1:
            continue  # neither a record nor a watermark bit where several are alike
        (rebuilt,) = candidates
        records.add(rebuilt.record_id)
        for carrier in carriers:
            ours, other = rebuilt.values.get(carrier), rebuilt.other.get(carrier)
            if ours is None or other is None or ours == other:
                continue  # both forms alike: this row carries no bit
            leaked = row.get(carrier)
            if leaked == ours:
                agree += 1
                compared += 1
            elif leaked == other:
                compared += 1
    chance = _tail(agree, compared) * _CANARY_CHANCE ** len(found)
    return ExportFinding(
        export_id=export.export_id,
        requester=export.requester,
        purpose_class=export.purpose_class,
        canaries_found=len(found),
        canaries=len(export.canaries),
        watermark_agree=agree,
        watermark_rows=compared,
        matched_rows=matched,
        coverage=matched / len(leak) if leak else 0.0,
        confidence=max(0.0, 1.0 - chance),
        records=tuple(sorted(records)),
    )


def rank_accounts(
    leaked_records: Iterable[str], histories: Mapping[str, set[str]]
) -> tuple[AccountFinding, ...]:
    """Accounts by how much of the sample's records they were shown (coverage), then by
    how little else (precision); accounts shown none of them are left out."""
    wanted = set(leaked_records)
    found = []
    for account, seen in histories.items():
        covered = len(wanted & seen)
        if covered == 0:
            continue
        found.append(
            AccountFinding(
                account=account,
                covered=covered,
                seen=len(seen),
                coverage=covered / len(wanted),
                precision=covered / len(seen),
            )
        )
    found.sort(key=lambda a: (-a.coverage, -a.precision, a.account))
    return tuple(found)


def trace_leak(
    leak: Sequence[Mapping[str, str]],
    exports: Sequence[RebuiltExport],
    matched_records: Sequence[set[str]],
    histories: Mapping[str, set[str]],
    *,
    known_fields: frozenset[str],
    top: int = 10,
) -> TraceReport:
    """The report: every export compared (best first), the one named if its evidence
    suffices, and the accounts whose reads explain the records matched."""
    findings = [f for e in exports if (f := compare_export(leak, e)) is not None]
    findings.sort(key=lambda f: (-f.confidence, -f.canaries_found, -f.coverage, -f.watermark_agree))
    best = findings[0] if findings else None
    named = (
        best
        if best is not None
        and best.confidence >= NAMED_CONFIDENCE
        and best.coverage >= NAMED_COVERAGE
        else None
    )
    records = {rid for found in matched_records for rid in found}
    named_records = set(named.records) if named is not None else set()
    # A column the schema does not name is input like a value (a person's name makes a
    # fine CSV header): counted, never shown.
    columns = tuple(sorted({name for row in leak for name in row} & known_fields))
    return TraceReport(
        rows=len(leak),
        columns=columns,
        records_matched=len(records),
        export=named,
        exports=tuple(findings[:top]),
        accounts=rank_accounts(records, histories)[:top],
        records=tuple(sorted(records | named_records)),
    )
