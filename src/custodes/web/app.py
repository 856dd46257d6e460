"""The app factory: one Vault, the security middleware, the login pages, the dashboard and
the API, and every refusal answered from the one table in `refusals`, as a page or as JSON,
never with a value.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from custodes.errors import CustodesError
from custodes.vault import Vault
from custodes.web import account, api, auth, deps, pages, refusals
from custodes.web.security import SecurityHeaders, trusted_networks
from custodes.web.templating import STATIC, render

API_PREFIX = "/api/"


def create_app(
    vault: Vault,
    *,
    tls: bool = False,
    trusted_proxies: Sequence[str] = (),
    behind_tls_proxy: bool = False,
) -> FastAPI:
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
    app.add_middleware(
        SecurityHeaders,
        tls=tls,
        trusted_proxies=trusted_networks(trusted_proxies),
        behind_tls_proxy=behind_tls_proxy,
    )
    # The API first: its routes are the busiest, and Starlette tries routes in order.
    app.include_router(api.router)
    app.include_router(pages.router)
    app.include_router(auth.router)
    app.include_router(account.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    async def refused(request: Request, exc: Exception) -> Response:
        return refusal_response(request, exc)

    # Anything else never reaches a handler here: Starlette hands Exception to its
    # outermost middleware, and SecurityHeaders answers first with a plain 500.
    for cls in (
        deps.NotAuthenticated,
        deps.CsrfRejected,
        CustodesError,
        RequestValidationError,
        StarletteHTTPException,
    ):
        app.add_exception_handler(cls, refused)
    return app


def refusal_response(request: Request, exc: BaseException) -> Response:
    """The answer to an error raised while serving `request`: JSON under /api/, a page
    elsewhere; the status and the words come from the one refusal table either way."""
    if request.url.path.startswith(API_PREFIX):
        return api.api_error(exc)
    return page_error(request, exc)


def page_error(request: Request, exc: BaseException) -> Response:
    """A page's answer to an error: the error page at the table's status, or the login
    form for a browser without a live session."""
    row = refusals.refusal_for(exc)
    if row.to_login:
        response: Response = RedirectResponse("/login", status_code=303)
        if request.cookies.get(deps.cookie_name(request)):
            response.delete_cookie(deps.cookie_name(request), path="/")
        return response
    response = _error_page(request, row, refusals.message_for(exc, row, page=True))
    wait = refusals.retry_after(exc)
    if wait is not None:
        response.headers["Retry-After"] = str(wait)
    return response


def _error_page(request: Request, row: refusals.Refusal, message: str) -> Response:
    try:
        return render(
            request, "error.html", status_code=row.status, title=row.title, message=message
        )
    except Exception:
        # Rendering failed too (the header's session lookup, say): the same refusal in
        # plain text, still without values, rather than a 500 that hides the status.
        return Response(message, status_code=row.status, media_type="text/plain")
