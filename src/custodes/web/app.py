"""The app factory: one Vault, the security middleware, the login pages, the dashboard and
the API, and one translation of every refusal into a status code that carries no value.
"""

from __future__ import annotations

import importlib
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from custodes.errors import (
    AccessDenied,
    AuditUnavailable,
    AuthenticationFailed,
    CustodesError,
    InvalidQuery,
    PurposeRequired,
    RecordNotFound,
)
from custodes.vault import Vault
from custodes.web import account, auth, deps
from custodes.web.security import SecurityHeaders
from custodes.web.templating import STATIC, render

log = logging.getLogger("custodes.web")

API_PREFIX = "/api/"

# The most specific class wins: PurposeRequired is an AccessDenied, but a 422.
_PAGE_STATUS: tuple[tuple[type[BaseException], int, str], ...] = (
    (deps.CsrfRejected, 403, "The form was stale or came from elsewhere: reload and retry."),
    (PurposeRequired, 422, ""),
    (InvalidQuery, 422, ""),
    (AccessDenied, 403, ""),
    (RecordNotFound, 404, "Nothing here, or nothing this account may see."),
    (AuditUnavailable, 503, "The access log cannot record this access, so it was refused."),
)


def create_app(vault: Vault, *, tls: bool = False) -> FastAPI:
    """The web app around one opened vault. There is no setting that serves anything
    personal without a session: every page and API route asks the vault."""
    # No interactive docs: they load scripts from a CDN, which the CSP forbids anyway.
    app = FastAPI(
        title="custodes",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        # No request telemetry: spans and metrics would describe officials' requests to
        # whatever collector the environment names, and cost every request a provider
        # lookup. An operator who wants metrics adds them deliberately.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.vault = vault
    app.state.tls = tls
    app.state.vault_threads = deps.vault_threads()
    app.add_middleware(SecurityHeaders, tls=tls)
    # The API first: its routes are the busiest, and Starlette tries routes in order.
    for module in ("custodes.web.api", "custodes.web.pages"):
        try:
            router = importlib.import_module(module).router
        except ImportError:  # a part not built yet; the rest still serves
            log.warning("%s is not available", module)
            continue
        app.include_router(router)
    app.include_router(auth.router)
    app.include_router(account.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    async def refused(request: Request, exc: Exception) -> Response:
        return _refusal(request, exc)

    for cls in (
        deps.NotAuthenticated,
        deps.CsrfRejected,
        CustodesError,
        RequestValidationError,
        StarletteHTTPException,
    ):
        app.add_exception_handler(cls, refused)
    return app


def _refusal(request: Request, exc: Exception) -> Response:
    if request.url.path.startswith(API_PREFIX):
        return _api_refusal(exc)
    if isinstance(exc, deps.NotAuthenticated | AuthenticationFailed):
        response = RedirectResponse("/login", status_code=303)
        if request.cookies.get(deps.cookie_name(request)):
            response.delete_cookie(deps.cookie_name(request), path="/")
        return response
    for cls, status, message in _PAGE_STATUS:
        if isinstance(exc, cls):
            return _error_page(request, status, message or str(exc))
    if isinstance(exc, RequestValidationError):
        # FastAPI's own report repeats the input, which may be a personal value.
        return _error_page(request, 422, "Some fields of the form are missing or malformed.")
    if isinstance(exc, StarletteHTTPException):
        return _error_page(request, exc.status_code, _HTTP_MESSAGES.get(exc.status_code, ""))
    if isinstance(exc, CustodesError):
        return _error_page(request, 400, str(exc))
    return _error_page(request, 500, "The server failed; nothing was returned.")


_HTTP_MESSAGES = {
    404: "Nothing here, or nothing this account may see.",
    405: "This page does not accept that kind of request.",
}


def _error_page(request: Request, status: int, message: str) -> Response:
    title = {403: "Refused", 404: "Not found", 422: "Check the form", 503: "Unavailable"}
    try:
        return render(
            request,
            "error.html",
            status_code=status,
            title=title.get(status, "Refused"),
            message=message or "This request was refused.",
        )
    except Exception:  # no error template yet: a plain answer, still without values
        return Response(message or "refused", status_code=status, media_type="text/plain")


def _api_refusal(exc: Exception) -> Response:
    try:
        api = importlib.import_module("custodes.web.api")
    except ImportError:
        api = None
    if api is not None and hasattr(api, "api_error"):
        response: Response = api.api_error(exc)
        return response
    status, code = 500, "internal_error"
    if isinstance(exc, deps.NotAuthenticated | AuthenticationFailed):
        status, code = 401, "unauthenticated"
    elif isinstance(exc, deps.CsrfRejected):
        status, code = 403, "csrf_rejected"
    elif isinstance(exc, PurposeRequired | InvalidQuery | RequestValidationError):
        status, code = 422, "invalid_request"
    elif isinstance(exc, AccessDenied):
        status, code = 403, "access_denied"
    elif isinstance(exc, RecordNotFound):
        status, code = 404, "not_found"
    elif isinstance(exc, AuditUnavailable):
        status, code = 503, "audit_unavailable"
    elif isinstance(exc, StarletteHTTPException):
        status, code = exc.status_code, "http_error"
    message = str(exc) if isinstance(exc, CustodesError) and str(exc) else code
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)
