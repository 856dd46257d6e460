"""An official's own account: the passkeys that may replace the one-time code at login.

Registering one needs a live session and the session's CSRF token; the challenge is bound
to the session and spent at the first answer, in whichever server process gets it.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, Response

from custodes.accounts import Passkey
from custodes.passkeys import MAX_CREDENTIAL_JSON, MAX_LABEL, PasskeyRefused
from custodes.vault import Session
from custodes.web import deps
from custodes.web.templating import render

router = APIRouter(include_in_schema=False)

Csrf = Depends(deps.verify_csrf)
Me = Annotated[Session, Depends(deps.require_session)]


def _when(at: float | None) -> str:
    if at is None:
        return "never"
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _rows(found: tuple[Passkey, ...]) -> list[dict[str, Any]]:
    return [
        {"label": p.label, "ref": p.ref, "created": _when(p.created), "used": _when(p.last_used)}
        for p in found
    ]


def _page(request: Request, me: Session, status: int = 200, **context: Any) -> Response:
    found = deps.vault_of(request).list_passkeys(me)
    return render(
        request,
        "passkeys.html",
        status_code=status,
        passkeys=_rows(found),
        max_label=MAX_LABEL,
        **context,
    )


@router.get("/account/passkeys", response_class=HTMLResponse)
def passkeys_page(request: Request, me: Me) -> Response:
    return _page(request, me)


@router.post("/account/passkeys/options", dependencies=[Csrf])
def registration_options(request: Request, me: Me) -> Response:
    options = deps.vault_of(request).passkey_registration_options(me, deps.ceremony(request))
    return Response(options, media_type="application/json")


@router.post("/account/passkeys", response_class=HTMLResponse, dependencies=[Csrf])
def register(
    request: Request,
    me: Me,
    credential: Annotated[str, Form(max_length=MAX_CREDENTIAL_JSON)] = "",
    label: Annotated[str, Form(max_length=MAX_LABEL * 2)] = "",
) -> Response:
    try:
        added = deps.vault_of(request).register_passkey(
            me, deps.ceremony(request), credential, label=label
        )
    except PasskeyRefused as exc:
        # One of a few fixed sentences. A session that has ended raises the plain
        # AuthenticationFailed instead, which the app turns into the login page.
        return _page(request, me, 400, error=str(exc))
    return _page(request, me, added=added.label)
