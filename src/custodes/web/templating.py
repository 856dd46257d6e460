"""Jinja2 templates, autoescaped, with what every page needs: the session's name and role,
its CSRF token for forms, and the vendored htmx."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from custodes.web import deps

HERE = Path(__file__).parent
STATIC = HERE / "static"
# Autoescaping everywhere, not only for .html names: a value must never become markup.
templates = Jinja2Templates(
    env=jinja2.Environment(loader=jinja2.FileSystemLoader(str(HERE / "templates")), autoescape=True)
)


def render(request: Request, name: str, *, status_code: int = 200, **context: Any) -> HTMLResponse:
    """Render a page. Pages behind a session get `me` (the session) and `csrf`."""
    token = deps.session_token(request)
    me = None
    csrf = ""
    if token:
        try:
            me = deps.require_session(request)
            csrf = deps.vault_of(request).csrf_token(me)
        except deps.NotAuthenticated:
            me = None
    response: HTMLResponse = templates.TemplateResponse(
        request, name, {"me": me, "csrf": csrf, **context}, status_code=status_code
    )
    return response
