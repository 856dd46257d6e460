"""Client commands: an official's login, logout, search, show and reveal, and an auditor's
audit log and audit subject, asked of a running server over its JSON API (/api/v1).

`custodes login` opens a session once with password and one-time code; the others reuse it
until it ends. They read no keyring and no vault directory and load no key code: the
server holds the keys, decides, and logs every access before it answers.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import click
import httpx
import orjson
from rich.text import Text

from custodes import __version__, settings
from custodes.cli import session_file
from custodes.cli.common import out, print_record, secret, shown
from custodes.cli.session_file import LOGIN_HINT, NotLoggedIn, StoredSession
from custodes.errors import (
    AccessDenied,
    AuditUnavailable,
    AuthenticationFailed,
    ConfigurationError,
    CustodesError,
    InvalidQuery,
    PurposeRequired,
    RecordNotFound,
)
from custodes.freetext import escape_hidden, is_hidden

F = TypeVar("F", bound=Callable[..., Any])

API = "/api/v1"
LOG_PAGE = 200  # the API's largest page of access-log entries
SESSION_ENDED = f"not logged in or the session has ended: {LOGIN_HINT}"

# The library's error each of the API's codes stands for, then each status for a code this
# client does not know: a refusal exits as it did when the CLI asked the vault itself.
_BY_CODE: dict[str, type[CustodesError]] = {
    "authentication_failed": AuthenticationFailed,
    "login_throttled": AuthenticationFailed,
    "purpose_required": PurposeRequired,
    "invalid_query": InvalidQuery,
    "invalid_request": InvalidQuery,
    "access_denied": AccessDenied,
    "record_not_found": RecordNotFound,
    "audit_unavailable": AuditUnavailable,
}
_BY_STATUS: dict[int, type[CustodesError]] = {
    400: InvalidQuery,
    401: AuthenticationFailed,
    403: AccessDenied,
    404: RecordNotFound,
    422: InvalidQuery,
    429: AuthenticationFailed,
    503: AuditUnavailable,
}


class ServerUnreachable(CustodesError):
    """No answer from a custodes server: connection refused, unknown host, timeout, an
    untrusted certificate, or an answer that is not the API's."""

    exit_code = 11


class _Api:
    """One conversation with a custodes server, in its JSON API's terms.

    A refusal becomes the library's error for it, carrying the server's message (which
    names fields and limits, never a value); a 401 on a stored session forgets the session.
    """

    def __init__(self, server: str, ca_cert: str | None, token: str | None = None) -> None:
        self.server = server
        self._token = token
        headers = {"User-Agent": f"custodes/{__version__}", "Accept": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            base_url=server + API,
            headers=headers,
            verify=_trust(ca_cert),
            timeout=httpx.Timeout(60.0, connect=10.0),
            # Proxies and CA bundles named by the environment would decide who sees the
            # password and the token; the official named the server, and its certificate.
            trust_env=False,
            follow_redirects=False,
        )

    def __enter__(self) -> _Api:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._http.close()

    def call(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str | int] | None = None,
    ) -> Any:
        """The answer's JSON (None for an empty answer), or the error the server meant."""
        response = self._request(method, path, body=body, params=params)
        if not response.content:
            return None
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise ServerUnreachable(
                f"{self.server} answered something other than JSON: is it a custodes server?"
            ) from None

    def call_bytes(self, method: str, path: str) -> bytes:
        """The answer's bytes as sent (a sealed export), or the error the server meant."""
        return self._request(method, path).content

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str | int] | None = None,
    ) -> httpx.Response:
        try:
            response = self._http.request(
                method,
                path,
                content=None if body is None else orjson.dumps(body),
                headers={"Content-Type": "application/json"} if body is not None else None,
                params=params,
            )
        except httpx.ConnectError as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise ServerUnreachable(
                    f"the certificate of {self.server} is not trusted: log in with "
                    "--ca-cert FILE (the certificate the server's operator gives you)"
                ) from None
            raise ServerUnreachable(
                f"cannot reach the server at {self.server}: is 'custodes serve' running there?"
            ) from None
        except httpx.TimeoutException:
            raise ServerUnreachable(f"the server at {self.server} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise ServerUnreachable(
                f"cannot talk to the server at {self.server} ({type(exc).__name__})"
            ) from None
        if response.status_code >= 400:
            raise self._refusal(response)
        return response

    def _refusal(self, response: httpx.Response) -> CustodesError:
        status = response.status_code
        if status == 401 and self._token is not None:
            session_file.forget(self._token)
            return NotLoggedIn(SESSION_ENDED)
        refusal = _server_refusal(response)
        if refusal is None:
            return ServerUnreachable(
                f"the server at {self.server} answered HTTP {status}: is it a custodes server?"
            )
        code, message = refusal
        error = _BY_CODE.get(code) or _BY_STATUS.get(status, CustodesError)
        return error(message)


def _server_refusal(response: httpx.Response) -> tuple[str, str] | None:
    """The code and message of the API's one error shape, the message on one line; None if
    the answer is not in that shape."""
    try:
        detail = orjson.loads(response.content)["error"]
        code, message = detail["code"], detail["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    if not isinstance(code, str) or not isinstance(message, str) or not message:
        return None
    # One line on the terminal, whatever the server sent.
    printable = "".join(c if c.isprintable() else " " for c in message)
    return code, " ".join(printable.split())[:500]


def _trust(ca_cert: str | None) -> ssl.SSLContext | bool:
    if ca_cert is None:
        return True
    try:
        return ssl.create_default_context(cafile=ca_cert)
    except (OSError, ssl.SSLError):
        raise ConfigurationError(
            f"cannot read the certificate {ca_cert}: log in again with --ca-cert FILE"
        ) from None


def _server_url(value: str) -> str:
    """The server's base address, refused before anything is sent if it would carry the
    password in the clear beyond this host."""
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise click.BadParameter("give the server's address, e.g. https://vault.example:8443")
    if url.userinfo or url.query or url.fragment:
        raise click.BadParameter("give only scheme, host, port and path; no name or query")
    if url.scheme == "http" and not _is_loopback(url.host):
        raise click.BadParameter(
            "plain http only to this host (127.0.0.1, localhost): elsewhere the password "
            "and the session would cross the network in the clear; use https"
        )
    return str(url).rstrip("/")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name may resolve anywhere


@contextmanager
def _logged_in() -> Iterator[_Api]:
    stored = session_file.load()  # NotLoggedIn before anything is contacted
    with _Api(stored.server, stored.ca_cert, stored.token) as api:
        yield api


def _asked(purpose: str, case_ref: str | None) -> dict[str, str]:
    # The case goes only when given: whether one is needed is the server's decision.
    return {"purpose": purpose, **({"case_ref": case_ref} if case_ref else {})}


def _record_path(record_id: str) -> str:
    return f"/records/{quote(record_id, safe='')}"


def _print_json(doc: Any) -> None:
    sys.stdout.write(_json_escaped(orjson.dumps(doc).decode()) + "\n")


def _json_escaped(text: str) -> str:
    """JSON text with every hidden character (controls, bidi, zero-width, unassigned) as a
    \\u escape: the same JSON value for a program, inert text for a terminal. They can
    only stand inside strings, where an escape means the same character."""
    if text.isprintable():
        return text
    return "".join(_json_escape(ch) if is_hidden(ch) else ch for ch in text)


def _json_escape(ch: str) -> str:
    code = ord(ch)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def reader_options(fn: F) -> F:
    fn = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(fn)
    fn = click.option("--case", "case_ref", help="The case this access serves.")(fn)
    fn = click.option(
        "--purpose", required=True, help="Why you are looking; recorded on the access log."
    )(fn)
    return fn


# -- the session -------------------------------------------------------------------------


@click.command()
@click.option(
    "--server",
    required=True,
    help="The server's address, e.g. https://vault.example:8443 (http only on this host).",
)
@click.option(
    "--ca-cert",
    type=click.Path(exists=True, dir_okay=False),
    help="The certificate to trust for a server with a self-signed one; remembered.",
)
@click.option("--user", help=f"Account name (default: ${settings.ENV_USER}, or a prompt).")
def login(server: str, ca_cert: str | None, user: str | None) -> None:
    """Open a session with your password and one-time code; the commands after it use the
    session until 'custodes logout' or until the server ends it."""
    url = _server_url(server)
    trusted = str(Path(ca_cert).resolve()) if ca_cert else None
    username = user or settings.env(settings.ENV_USER)
    if username is None:
        if not sys.stdin.isatty():
            raise ConfigurationError(f"pass --user or set {settings.ENV_USER}")
        username = str(click.prompt("Account"))
    password = secret(settings.ENV_PASSWORD, "Password")
    totp = secret(settings.ENV_TOTP, "One-time code from your authenticator")
    with _Api(url, trusted) as api:
        created = api.call(
            "POST",
            "/session",
            body={"username": username, "password": password, "totp": totp.replace(" ", "")},
        )
    if not isinstance(created, dict) or not all(
        isinstance(created.get(k), str) for k in ("token", "username", "role")
    ):
        raise ServerUnreachable(f"{url} opened no session: is it a custodes server?")
    try:
        previous: StoredSession | None = session_file.load()
    except NotLoggedIn:
        previous = None
    stored = StoredSession(url, created["token"], created["username"], created["role"], trusted)
    where = session_file.save(stored)
    if previous is not None:
        _end_quietly(previous)
    out.print(shown(f"logged in to {url} as {stored.username} ({stored.role})"))
    out.print(shown(f"  session kept in {where} until 'custodes logout' or the server ends it"))


def _end_quietly(stored: StoredSession) -> None:
    """End a session this login replaces; if its server is gone, it ends by itself."""
    try:
        with _Api(stored.server, stored.ca_cert, stored.token) as api:
            api.call("DELETE", "/session")
    except CustodesError:
        pass


@click.command()
def logout() -> None:
    """End the session on the server and forget it here."""
    stored = session_file.load()
    try:
        with _Api(stored.server, stored.ca_cert, stored.token) as api:
            api.call("DELETE", "/session")
    except NotLoggedIn:
        pass  # the server had already ended it; the file is gone with it
    except ServerUnreachable as exc:
        session_file.forget(stored.token)
        raise ServerUnreachable(
            f"{exc}; the session is forgotten here, but stays open on the server until it times out"
        ) from None
    session_file.forget(stored.token)
    out.print(shown(f"logged out of {stored.server}"))


# -- records ----------------------------------------------------------------------------


@click.command()
@reader_options
@click.option(
    "--type",
    "record_type",
    default=None,
    help="Record type (default: person, or case for --case-no).",
)
@click.option("--national-id", help="Find by resident ID number.")
@click.option("--phone", help="Find by mobile number.")
@click.option("--name", help="Find by name (Han characters or pinyin); needs --birth-date.")
@click.option("--birth-date", help="Birth date YYYY-MM-DD, with --name.")
@click.option("--case-no", help="Find a case by its number.")
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True)
def search(
    purpose: str,
    case_ref: str | None,
    as_json: bool,
    record_type: str | None,
    national_id: str | None,
    phone: str | None,
    name: str | None,
    birth_date: str | None,
    case_no: str | None,
    limit: int,
) -> None:
    """Find records by an indexed value. Results are masked; use 'reveal' for a field."""
    index, values, default_type = _choose_index(national_id, phone, name, birth_date, case_no)
    body = {
        "record_type": record_type or default_type,
        "index": index,
        "values": values,
        **_asked(purpose, case_ref),
        "limit": limit,
    }
    with _logged_in() as api:
        found = api.call("POST", "/search", body=body)
    results = found["results"]
    if as_json:
        _print_json(results)
        return
    if not results:
        out.print("no match")
        if name:
            out.print(NAME_HINT)
        return
    for record in results:
        print_record(record)


# What a clerk can do about a name that finds nobody (see README, "Names").
NAME_HINT = (
    "  a name matches as registered, with its birth date: in Han characters, type a rare "
    "character as itself (𠮷, not 吉: paste it if your input method lacks it); in pinyin, "
    "either order works, but a name holding a character with no known reading is found "
    "only by its characters"
)


def _choose_index(
    national_id: str | None,
    phone: str | None,
    name: str | None,
    birth_date: str | None,
    case_no: str | None,
) -> tuple[str, dict[str, str], str]:
    given = [x for x in (national_id, phone, name or birth_date, case_no) if x]
    if len(given) != 1:
        raise click.UsageError(
            "give exactly one of --national-id, --phone, --name with --birth-date, --case-no"
        )
    if national_id:
        return "national_id", {"national_id": national_id}, "person"
    if phone:
        return "phone", {"phone": phone}, "person"
    if case_no:
        return "case_no", {"case_no": case_no}, "case"
    if not (name and birth_date):
        raise click.UsageError("--name and --birth-date go together")
    return "name_birth", {"name": name, "birth_date": birth_date}, "person"


@click.command()
@click.argument("record_id")
@reader_options
def show(record_id: str, purpose: str, case_ref: str | None, as_json: bool) -> None:
    """Show one record, masked, with the records linked to it."""
    with _logged_in() as api:
        record = api.call("GET", _record_path(record_id), params=_asked(purpose, case_ref))
    if as_json:
        _print_json(record)
    else:
        print_record(record)


@click.command()
@click.argument("record_id")
@click.argument("field")
@reader_options
def reveal(record_id: str, field: str, purpose: str, case_ref: str | None, as_json: bool) -> None:
    """Show one FIELD of one record in the clear. Logged with its purpose."""
    body = {"field": field, **_asked(purpose, case_ref)}
    with _logged_in() as api:
        revealed = api.call("POST", _record_path(record_id) + "/reveal", body=body)
    value = revealed["value"]
    if as_json:
        _print_json(
            {"record_id": revealed["record_id"], "field": revealed["field"], "value": value}
        )
    else:
        out.print(shown("(empty)" if value is None else value))


# -- the access log, for auditors -------------------------------------------------------


@click.command("log")
@click.option("--purpose", required=True, help="Why you are reading the log; it is logged too.")
@click.option("--case", "case_ref", help="The case or inquiry this reading serves.")
@click.option("--actor", help="Only entries by this account.")
@click.option("--action", help="Only actions starting with this tag, e.g. record:field.")
@click.option("--since", help="From this time (ISO 8601, UTC if no zone).")
@click.option("--until", help="Before this time (ISO 8601).")
@click.option("--purpose-contains", help="Only entries whose stated purpose contains this text.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def audit_log(
    purpose: str,
    case_ref: str | None,
    actor: str | None,
    action: str | None,
    since: str | None,
    until: str | None,
    purpose_contains: str | None,
    as_json: bool,
) -> None:
    """Stream access-log entries, filtered. For auditors."""
    wanted = {
        "actor": actor,
        "action": action,
        "since": _time(since),
        "until": _time(until),
        "purpose_contains": purpose_contains,
    }
    params: dict[str, str | int] = {
        **_asked(purpose, case_ref),
        **{k: v for k, v in wanted.items() if v is not None},
        "limit": LOG_PAGE,
    }
    count = 0
    with _logged_in() as api:
        cursor = None
        while True:
            page = api.call("GET", "/audit/log", params={**params, **_cursor(cursor)})
            for entry in page["entries"]:
                count += 1
                if as_json:
                    _print_json(entry)
                else:
                    out.print(shown(_log_line(entry)))
            cursor = page["next_cursor"]
            if not cursor:
                break
    if not as_json:
        out.print(f"{count:,} entries")


# -- alerts, for supervisors and auditors ------------------------------------------------


@click.command("list")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def alerts_list(limit: int, as_json: bool) -> None:
    """The latest alerts, newest first, with how far each has been dealt with."""
    with _logged_in() as api:
        found = api.call("GET", "/alerts", params={"limit": limit})["alerts"]
    for alert in found:
        if as_json:
            _print_json(alert)
        else:
            out.print(shown(_alert_line(alert)))
    if not as_json:
        out.print(f"{len(found):,} alerts")


def _alert_line(alert: Mapping[str, Any]) -> str:
    when = datetime.fromisoformat(alert["time"]).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    state = "TAMPERED" if alert["tampered"] else alert["state"]
    signals = ",".join(escape_hidden(str(s)) for s in alert["signals"])
    return (
        f"{escape_hidden(str(alert['id']))} {when} {escape_hidden(str(alert['severity'])):<8} "
        f"{escape_hidden(str(alert['kind'])):<14} {escape_hidden(str(alert['account'])):<18} "
        f"{state:<12} entry {alert['entry']} {signals}"
    )


def _step_alert(alert_id: str, step: str) -> None:
    with _logged_in() as api:
        alert = api.call("POST", f"/alerts/{quote(alert_id, safe='')}/{step}")
    out.print(shown(_alert_line(alert)))


@click.command("acknowledge")
@click.argument("alert_id")
def alerts_acknowledge(alert_id: str) -> None:
    """Say that you are looking into an alert; logged."""
    _step_alert(alert_id, "acknowledge")


@click.command("resolve")
@click.argument("alert_id")
def alerts_resolve(alert_id: str) -> None:
    """Close an alert as dealt with; logged."""
    _step_alert(alert_id, "resolve")


def _cursor(cursor: str | None) -> dict[str, str]:
    return {"cursor": cursor} if cursor else {}


def _log_line(entry: Mapping[str, Any]) -> str:
    """One entry on one line. Every text is escaped before it is padded: an entry may hold
    what no input check lets in today (written earlier, or around the check), and must
    reach the auditor as visible text that cannot move the cursor or reorder the line."""
    when = datetime.fromisoformat(entry["time"]).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")

    def text(key: str) -> str:
        value = entry[key]
        return "" if value is None else escape_hidden(str(value))

    records = [escape_hidden(str(r)) for r in entry["records"]]
    listed = ",".join(records[:3]) + ("…" if len(records) > 3 else "")
    return (
        f"{entry['index']:>8} {when} {text('actor'):<18} {text('role'):<12} "
        f"{text('action'):<22} {text('outcome'):<7} {text('purpose'):<30} "
        f"{text('case_ref'):<10} {listed}"
    )


def _time(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter("use ISO 8601, e.g. 2026-11-28T09:00") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC).isoformat().replace("+00:00", "Z")


@click.command("subject")
@click.argument("record_id", required=False)
@click.option(
    "--national-id",
    help="Find the person by the resident ID number they bring, instead of RECORD_ID "
    "(the lookup is logged too, and returns nothing but the record id).",
)
@click.option(
    "--purpose",
    required=True,
    help="Why you are reading this person's accesses (e.g. 'their request of 3 March'); "
    "recorded on the access log. Nothing is assumed: state it.",
)
@click.option("--case", "case_ref", help="The request or inquiry this report answers.")
@click.option(
    "--bundle",
    "bundle_path",
    type=click.Path(dir_okay=False),
    help="Also write a bundle that verifies offline with only the log's public key.",
)
@click.option("--json", "as_json", is_flag=True)
def audit_subject(
    record_id: str | None,
    national_id: str | None,
    purpose: str,
    case_ref: str | None,
    bundle_path: str | None,
    as_json: bool,
) -> None:
    """Every access to one person's records (RECORD_ID is the person's, or find it with
    --national-id), with proofs."""
    if (record_id is None) == (national_id is None):
        raise click.UsageError("give the person's RECORD_ID or --national-id, one of them")
    with _logged_in() as api:
        if national_id is not None:
            body = {"national_id": national_id, **_asked(purpose, case_ref)}
            record_id = str(api.call("POST", "/audit/subject/lookup", body=body)["record_id"])
        assert record_id is not None
        doc = api.call(
            "GET", f"/audit/subject/{quote(record_id, safe='')}", params=_asked(purpose, case_ref)
        )
    # Imported here, not above: the audit package's log half loads storage and key code,
    # which the other client commands never need. This command opens no key with it.
    from custodes.audit.report import as_json as report_json
    from custodes.audit.report import render_text, report_from_json

    # One report, fetched once (one log entry); the bundle is rebuilt from it here.
    report = report_from_json(doc)
    if bundle_path:
        Path(bundle_path).write_bytes(report.bundle())
    if as_json:
        _print_json(report_json(report))
        return
    out.print(Text(render_text(report)))
    if bundle_path:
        out.print(
            shown(f"bundle written to {bundle_path}; check it with 'custodes audit verify-bundle'")
        )


# -- bulk exports ------------------------------------------------------------------------


def _export_path(export_id: str) -> str:
    return f"/exports/{quote(export_id, safe='')}"


def _print_export(status: Mapping[str, Any]) -> None:
    out.print(shown(f"export {status['export_id']}: {status['state']}"))
    out.print(shown(f"  asked by {status['requester']}; approved by {status['approver'] or '-'}"))
    scope = (
        f"in district {status['district']}" if status.get("district") else "all the asker may see"
    )
    if status.get("named_records") is not None:
        scope = f"{status['named_records']} named"
    out.print(
        shown(
            f"  {status['record_type']} records, {scope}, class {status['purpose_class']}, "
            f"for recipient key {status['recipient']}"
        )
    )
    case = f" (case {status['case_ref']})" if status.get("case_ref") else ""
    out.print(shown(f"  purpose: {status.get('purpose', '')}{case}"))


@click.command("request")
@click.option("--type", "record_type", default="person", show_default=True)
@click.option(
    "--class", "purpose_class", required=True, help="The schema's export class, e.g. statistics."
)
@click.option(
    "--recipient",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="The recipient's public key file (from 'custodes export keygen').",
)
@click.option("--district", help="Only records of this 2, 4 or 6-digit division code.")
@click.option(
    "--ids",
    "ids_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Only these records: a file of record ids, one a line.",
)
@reader_options
def export_request(
    record_type: str,
    purpose_class: str,
    recipient: str,
    district: str | None,
    ids_file: str | None,
    purpose: str,
    case_ref: str | None,
    as_json: bool,
) -> None:
    """Ask for a bulk export; a supervisor other than you must approve it before you fetch
    it. Prints the export's id."""
    body: dict[str, Any] = {
        "record_type": record_type,
        "purpose_class": purpose_class,
        "recipient": Path(recipient).read_text("utf-8", errors="replace"),
        **_asked(purpose, case_ref),
    }
    if district:
        body["district"] = district
    if ids_file:
        lines = Path(ids_file).read_text("utf-8", errors="replace").splitlines()
        body["record_ids"] = [line.strip() for line in lines if line.strip()]
    with _logged_in() as api:
        status = api.call("POST", "/exports", body=body)
    if as_json:
        _print_json(status)
    else:
        _print_export(status)


@click.command("approve")
@click.argument("export_id")
@click.option("--json", "as_json", is_flag=True)
def export_approve(export_id: str, as_json: bool) -> None:
    """Approve another official's export request (supervisors)."""
    with _logged_in() as api:
        status = api.call("POST", _export_path(export_id) + "/approve")
    if as_json:
        _print_json(status)
    else:
        _print_export(status)


@click.command("status")
@click.argument("export_id")
@click.option("--json", "as_json", is_flag=True)
def export_status(export_id: str, as_json: bool) -> None:
    """Where an export request stands."""
    with _logged_in() as api:
        status = api.call("GET", _export_path(export_id))
    if as_json:
        _print_json(status)
    else:
        _print_export(status)


@click.command("fetch")
@click.argument("export_id")
@click.option(
    "--out",
    "out_file",
    required=True,
    type=click.Path(dir_okay=False),
    help="Where to write the sealed export (only its recipient's key opens it).",
)
def export_fetch(export_id: str, out_file: str) -> None:
    """Produce your approved export, once, sealed to its recipient, and write it."""
    target = Path(out_file)
    if target.exists():
        raise ConfigurationError(f"{target} exists already; choose another name")
    with _logged_in() as api:
        sealed = api.call_bytes("POST", _export_path(export_id) + "/produce")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(sealed)
    out.print(shown(f"export {export_id} written to {target}, sealed to its recipient"))


# -- erasure -----------------------------------------------------------------------------


def _erasure_path(request_id: str) -> str:
    return f"/erasures/{quote(request_id, safe='')}"


def _print_erasure(status: Mapping[str, Any]) -> None:
    out.print(shown(f"erasure {status['request_id']}: {status['state']}"))
    out.print(shown(f"  record {status['record_id']}"))
    out.print(shown(f"  asked by {status['requester']}; approved by {status['approver'] or '-'}"))
    case = f" (case {status['case_ref']})" if status.get("case_ref") else ""
    out.print(shown(f"  purpose: {status.get('purpose', '')}{case}"))
    if status.get("erased_at"):
        out.print(shown(f"  erased at {status['erased_at']}"))


@click.command("request")
@click.argument("record_id")
@reader_options
def erase_request(record_id: str, purpose: str, case_ref: str | None, as_json: bool) -> None:
    """Ask for a record's erasure (supervisors and auditors); a supervisor or an
    administrator other than you must approve it. Prints the request's id."""
    with _logged_in() as api:
        status = api.call(
            "POST", "/erasures", body={"record_id": record_id, **_asked(purpose, case_ref)}
        )
    if as_json:
        _print_json(status)
    else:
        _print_erasure(status)


@click.command("approve")
@click.argument("request_id")
@click.option("--json", "as_json", is_flag=True)
def erase_approve(request_id: str, as_json: bool) -> None:
    """Approve another official's erasure request, which erases the record at once: its
    data key, sealed fields and search tokens are destroyed (supervisors, administrators)."""
    with _logged_in() as api:
        status = api.call("POST", _erasure_path(request_id) + "/approve")
    if as_json:
        _print_json(status)
    else:
        _print_erasure(status)


@click.command("status")
@click.argument("request_id")
@click.option("--json", "as_json", is_flag=True)
def erase_status(request_id: str, as_json: bool) -> None:
    """Where an erasure request stands."""
    with _logged_in() as api:
        status = api.call("GET", _erasure_path(request_id))
    if as_json:
        _print_json(status)
    else:
        _print_erasure(status)
