"""Threats 10 and 16: free text that can lie.

A purpose or a case reference goes on the access log and is read back by auditors, so it
is normalised and refused at input if it holds a character that would not show as itself
(controls, zero-width and bidi formatting, separators, private-use, unassigned). And
whatever a stored entry holds (a log written before the check, or by a writer who went
around it) reaches the auditor's terminal spelt out, never as an instruction, and rich
markup in it is printed as typed.
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from custodes.audit import AccessEntry, Outcome
from custodes.cli.client import _log_line, _print_json
from custodes.cli.common import print_record
from custodes.errors import PurposeRequired
from custodes.freetext import escape_hidden
from custodes.policy import AccessPurpose, Role
from tests.conftest import login
from tests.test_cli_client import (  # noqa: F401 - served is a fixture, used by name
    Served,
    run,
    search_args,
    served,
)

HIDDEN = {
    "right-to-left override": "\u202e",
    "zero-width space": "\u200b",
    "zero-width joiner": "\u200d",
    "left-to-right isolate": "\u2066",
    "pop directional isolate": "\u2069",
    "byte order mark": "\ufeff",
    "escape sequence that erases the line": "\x1b[2K\x1b[1A",
    "C1 control sequence introducer": "\x9b2K",
    "carriage return": "\r",
    "backspace": "\x08",
    "delete": "\x7f",
    "line separator": "\u2028",
    "paragraph separator": "\u2029",
    "private use": "\ue000",
    "unassigned": "\u0378",
    "tag character": "\U000e0041",
}
# What an official hides behind a right-to-left override: the line reads innocently.
LYING_PURPOSE = "court order \u202e\u2066ex-partner's address\u2069"
ERASER = "curiosity\x1b[2K\r\x1b[1Aburglary follow-up"


@pytest.mark.parametrize("hidden", HIDDEN.values(), ids=HIDDEN.keys())
def test_a_purpose_with_a_right_to_left_override_is_refused(hidden: str) -> None:
    with pytest.raises(PurposeRequired) as refused:
        AccessPurpose(f"burglary {hidden}follow-up", "C-1")
    assert hidden not in str(refused.value) and "follow-up" not in str(refused.value)


@pytest.mark.parametrize("hidden", HIDDEN.values(), ids=HIDDEN.keys())
def test_a_case_reference_with_a_hidden_character_is_refused(hidden: str) -> None:
    with pytest.raises(PurposeRequired):
        AccessPurpose("burglary follow-up", f"C-1{hidden}")


def test_ordinary_chinese_and_latin_purposes_are_kept_normalised() -> None:
    stated = AccessPurpose("核查　入户盗窃案  ｆｏｌｌｏｗ-up 張三", "Ｃ-２０２６/１７")
    assert stated.reason == "核查 入户盗窃案 follow-up 張三"
    assert stated.case_ref == "C-2026/17"
    assert AccessPurpose("address check for a summons").reason == "address check for a summons"


def test_a_purpose_with_a_bidi_override_is_refused_by_the_api_and_never_logged(
    served: Served,  # noqa: F811
) -> None:
    session = login(served.vault, Role.INVESTIGATOR, "api.investigator")
    before = served.vault._log.size
    answer = httpx.post(
        f"{served.url}/api/v1/search",
        headers={"Authorization": f"Bearer {session.token}"},
        json={
            "record_type": "person",
            "index": "national_id",
            "values": {"national_id": str(served.people[0]["national_id"])},
            "purpose": LYING_PURPOSE,
            "case_ref": "C-1",
        },
    )
    assert answer.status_code == 422, answer.text
    assert "\u202e" not in answer.text and "ex-partner" not in answer.text
    assert served.vault._log.size == before
    # Nor from the command line.
    official = served.official("wang.fang")
    served.login(official)
    args = search_args(served.people[0])
    args[args.index("--purpose") + 1] = LYING_PURPOSE
    done = run(*args, env=official)
    assert done.returncode != 0 and "\u202e" not in done.stdout + done.stderr
    assert all("\u202e" not in (e.purpose or "") for _, e in served.vault._log.entries())


def test_a_logged_escape_sequence_cannot_erase_a_line_in_the_auditors_terminal(
    served: Served,  # noqa: F811
) -> None:
    officer = served.official("wang.fang")
    served.login(officer)
    done = run(*search_args(served.people[0], "--json"), env=officer)
    assert done.returncode == 0, done.stderr
    [found] = orjson.loads(done.stdout)
    # An entry as a log written before purposes were checked (or a tampering writer with
    # the log's own code) may hold: it names the person, so their report lists it too.
    log = served.vault._log
    log.append(
        AccessEntry(
            actor="wang.fang",
            role="investigator",
            action="record:masked:read",
            outcome=Outcome.GRANTED,
            time=served.vault._clock(),
            purpose=ERASER,
            case_ref="C-1\u202e",
            record_type="person",
            records=(found["record_id"],),
            result_count=1,
        )
    )
    auditor = served.official("zhao.audit", Role.AUDITOR)
    served.login(auditor)
    asked = ["--purpose", "quarterly review", "--case", "AUD-1"]
    for args in (
        ["audit", "log", *asked],
        ["audit", "log", *asked, "--json"],
        ["audit", "subject", found["record_id"], *asked],
        ["audit", "subject", found["record_id"], *asked, "--json"],
    ):
        done = run(*args, env={**auditor, "COLUMNS": "250"})
        assert done.returncode == 0, done.stderr
        for raw in ("\x1b", "\r", "\u202e"):
            assert raw not in done.stdout, args
        if "--json" in args:
            # The same JSON value for a program, inert text for a terminal.
            assert ERASER in _json_values(done.stdout)
        else:
            assert "curiosity\\u001b[2K\\u000d\\u001b[1Aburglary follow-up" in done.stdout
            assert "C-1\\u202e" in done.stdout


def _json_values(text: str) -> list[str]:
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for line in text.splitlines():
        walk(orjson.loads(line))
    return found


def test_an_audit_log_filter_with_a_hidden_character_is_refused(
    served: Served,  # noqa: F811
) -> None:
    session = login(served.vault, Role.AUDITOR, "api.audit")
    answer = httpx.get(
        f"{served.url}/api/v1/audit/log",
        headers={"Authorization": f"Bearer {session.token}"},
        params={"purpose": "quarterly review", "purpose_contains": "x\u202e"},
    )
    assert answer.status_code == 422, answer.text
    assert "\u202e" not in answer.text


def test_rich_markup_and_controls_in_a_record_are_printed_as_typed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    print_record(
        {
            "type": "person",
            "record_id": "[bold red]abc[/]",
            "fields": {"name": "张*\x1b]8;;https://example.invalid\x07x", "note": ":warning:"},
            "links": [{"role": "[blink]", "type": "case", "record_id": "r1", "label": "A\u202eB"}],
        }
    )
    printed = capsys.readouterr().out
    assert "[bold red]abc[/]" in printed and ":warning:" in printed and "[blink]" in printed
    assert "\x1b" not in printed and "\x07" not in printed and "\u202e" not in printed
    assert "\\u001b]8;;https://example.invalid\\u0007x" in printed and "A\\u202eB" in printed


def test_log_lines_and_json_output_spell_out_what_they_hold(
    capsys: pytest.CaptureFixture[str],
) -> None:
    entry = {
        "index": 7,
        "time": "2026-01-01T00:00:00+00:00",
        "actor": "a\u2066b",
        "role": "officer",
        "action": "record:masked:read",
        "outcome": "granted",
        "purpose": ERASER,
        "case_ref": "\u200bC-1",
        "records": ["r\u0085"],
    }
    line = _log_line(entry)
    assert line == escape_hidden(line) and line.isprintable()
    _print_json(entry)
    printed = capsys.readouterr().out
    assert printed.isascii() or all(ch.isprintable() for ch in printed.rstrip("\n"))
    assert orjson.loads(printed) == entry
    assert escape_hidden("\U000e0041") == "\\U000e0041"
