"""Login, logout and second-factor enrolment pages: the only pages served without a session.

A login form carries a pre-session token (double-submitted in a cookie) so that another
site cannot log a browser into an account of its choosing.
"""

from __future__ import annotations

import contextlib
import hmac
import secrets
from typing import Annotated

import segno
from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from markupsafe import Markup

from custodes.errors import AuthenticationFailed, CodeUsed, LoginThrottled
from custodes.passkeys import MAX_CREDENTIAL_JSON, Assertion
from custodes.vault import Session
from custodes.web import deps
from custodes.web.templating import render

router = APIRouter(include_in_schema=False)

PRELOGIN_COOKIE = "custodes_prelogin"
TLS_PRELOGIN_COOKIE = "__Host-custodes-prelogin"

Csrf = Depends(deps.verify_csrf)
Me = Annotated[Session, Depends(deps.require_session)]


def _prelogin_name(request: Request) -> str:
    return TLS_PRELOGIN_COOKIE if deps.is_tls(request) else PRELOGIN_COOKIE


def _with_form_token(request: Request, name: str, status: int = 200, **context: object) -> Response:
    """Render a pre-session form with a fresh token, set in a cookie as well."""
    token = secrets.token_urlsafe(24)
    response = render(request, name, status_code=status, form_token=token, **context)
    response.set_cookie(
        _prelogin_name(request),
        token,
        max_age=3600,
        path="/",
        secure=deps.is_tls(request),
        httponly=True,
        samesite="strict",
    )
    return response


def _form_token_ok(request: Request, sent: str) -> bool:
    held = request.cookies.get(_prelogin_name(request), "")
    return bool(held) and hmac.compare_digest(held.encode(), sent.encode())


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request) -> Response:
    return _with_form_token(request, "login.html")


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    username: Annotated[str, Form(max_length=64)] = "",
    password: Annotated[str, Form(max_length=1024)] = "",
    totp: Annotated[str, Form(max_length=16)] = "",
    passkey: Annotated[str, Form(max_length=MAX_CREDENTIAL_JSON)] = "",
    form_token: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    if not _form_token_ok(request, form_token):
        raise deps.CsrfRejected()
    vault = deps.vault_of(request)
    # A passkey's answer replaces the code; its challenge was bound to this form's token.
    answer = Assertion(passkey, deps.ceremony(request), form_token.encode()) if passkey else None
    try:
        session = vault.login(
            username,
            password,
            totp=totp or None,
            passkey=answer,
            client=deps.client_address(request),
        )
    except LoginThrottled as exc:
        response = _with_form_token(request, "login.html", 429, error=str(exc))
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    except CodeUsed as exc:
        return _with_form_token(request, "login.html", 401, error=f"{str(exc).capitalize()}.")
    except AuthenticationFailed:
        return _with_form_token(
            request,
            "login.html",
            401,
            error="Account name, password, one-time code or passkey not accepted.",
        )
    # Whatever session the browser held before is ended: the new one has a new token.
    previous = request.cookies.get(deps.cookie_name(request))
    if previous:
        with contextlib.suppress(AuthenticationFailed):
            vault.logout(vault.session_for(previous))
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(
        deps.cookie_name(request),
        session.token,
        path="/",
        secure=deps.is_tls(request),
        httponly=True,
        samesite="strict",
    )
    response.delete_cookie(_prelogin_name(request), path="/")
    return response


@router.post("/login/passkey")
def login_passkey_options(
    request: Request,
    username: Annotated[str, Form(max_length=64)] = "",
    form_token: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    """Options for logging in with a passkey, bound to the name and this login form. The
    same answer for every name: whether the account exists or has a passkey is not said."""
    if not _form_token_ok(request, form_token):
        return JSONResponse({"error": "the form was stale: reload and retry"}, status_code=403)
    options = deps.vault_of(request).passkey_login_options(
        username, deps.ceremony(request), binding=form_token.encode()
    )
    return Response(options, media_type="application/json")


@router.post("/logout", dependencies=[Csrf])
def logout(request: Request, me: Me) -> Response:
    deps.vault_of(request).logout(me)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(deps.cookie_name(request), path="/")
    return response


@router.get("/enrol", response_class=HTMLResponse)
def enrol_form(request: Request, code: str = "") -> Response:
    try:
        enrolment = deps.vault_of(request).enrolment(code[:64])
    except AuthenticationFailed as exc:
        return render(request, "enrol.html", status_code=404, error=str(exc))
    qr = segno.make(enrolment.uri, error="m").svg_inline(scale=5, border=2)
    return _with_form_token(
        request,
        "enrol.html",
        code=code,
        username=enrolment.username,
        secret=enrolment.secret,
        uri=enrolment.uri,
        qr=Markup(qr),  # noqa: S704 - segno's own SVG markup, built from our own URI
    )


@router.post("/enrol", response_class=HTMLResponse)
def enrol(
    request: Request,
    code: Annotated[str, Form(max_length=64)] = "",
    totp: Annotated[str, Form(max_length=16)] = "",
    form_token: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    if not _form_token_ok(request, form_token):
        raise deps.CsrfRejected()
    try:
        username = deps.vault_of(request).complete_enrolment(code, totp)
    except AuthenticationFailed as exc:
        return render(request, "enrol.html", status_code=400, error=str(exc), retry=code)
    return render(request, "enrol.html", done=username)
