"""What every console page shares: who is signed in, CSRF checks, rendering with safe headers, and
errors shown as a page (or as problem+json to the console's own script)."""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit

import jinja2
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from application.principal import Principal
from gateway.console.sessions import SESSION_COOKIE, ConsoleSession
from gateway.http import client_address, keyed_command_id, services, valid_idempotency_key
from gateway.http import json as json_response
from gateway.problems import Problem, describe, problem_response

CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
MAX_FORM_BYTES = 256 * 1024
# Nothing is loaded from outside the gateway, and nothing inline runs: the console's script and style
# are files it serves itself.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
NAVIGATION = (
    ("approvals", "Approvals"),
    ("tasks", "Runs"),
    ("workers", "Workers"),
    ("schedules", "Schedules"),
    ("usage", "Usage"),
    ("policies", "Policies"),
)


def _pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False, default=str)


def _when(value: datetime | str | None) -> str:
    if value is None:
        return "—"
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _iso(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def relative(moment: datetime | None, now: datetime) -> str:
    """ "in 5 min", "3 h ago": how far a moment is from now, in the largest unit that fits."""
    if moment is None:
        return "—"
    seconds = (moment - now).total_seconds()
    span = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if span >= size:
            amount = f"{int(span // size)} {unit}"
            break
    else:
        amount = f"{int(span)} s"
    return f"in {amount}" if seconds >= 0 else f"{amount} ago"


templates = jinja2.Environment(
    loader=jinja2.PackageLoader("gateway.console", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
templates.filters["pretty_json"] = _pretty_json
templates.filters["when"] = _when
templates.filters["iso"] = _iso
templates.globals["navigation"] = NAVIGATION


@dataclass(frozen=True)
class SignedIn:
    session: ConsoleSession
    who: Principal

    def may(self, permission: str) -> bool:
        return self.who.may(permission)


def render(
    request: Request, template: str, context: dict[str, Any], *, status: int = 200, user: SignedIn | None = None
) -> HTMLResponse:
    page = templates.get_template(template).render(
        request_path=request.url.path,
        user=user,
        csrf_token=user.session.csrf_token if user else "",
        **context,
    )
    return HTMLResponse(page, status_code=status, headers=SECURITY_HEADERS)


def wants_json(request: Request) -> bool:
    """The console's script asks for JSON; a plain form post (no script) gets pages and redirects."""
    return "application/json" in request.headers.get("accept", "")


def error_response(request: Request, status: int, detail: str, user: SignedIn | None = None) -> Response:
    if wants_json(request):
        return problem_response(status, detail)
    return render(request, "error.html", {"status": status, "detail": detail}, status=status, user=user)


def back_to(request: Request, fallback: str) -> str:
    """Where a form sends the browser afterwards: its ``next`` field, if it points inside the console."""
    wanted = request.query_params.get("next", "")
    parts = urlsplit(wanted)
    return wanted if wanted.startswith("/console") and not parts.netloc and not parts.scheme else fallback


def sign_in_redirect(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/console?next={quote(target, safe='')}", status_code=303)


Handler = Callable[[Request, SignedIn], Awaitable[Response]]


def console_page(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """A page or action for a signed-in person. No session: the sign-in page (or 401 for the script).
    State-changing requests must carry the session's CSRF token and come from the console's own origin.
    Errors the API would explain become an error page with the same status and message."""

    @functools.wraps(handler)
    async def run(request: Request) -> Response:
        svc, cookie = services(request), request.cookies.get(SESSION_COOKIE)
        # A made-up cookie costs a session lookup: such lookups are throttled per client address with
        # the API's refused credentials, before the lookup.
        address = client_address(request)
        if cookie and (wait := svc.failed_auth.blocked_for(address)) > 0:
            return error_response(
                request, 429, f"too many requests from this address had no valid session; retry in {wait:.0f} s"
            )
        session = await svc.sessions.find(cookie)
        if session is None and cookie:
            svc.failed_auth.retry_after(address)
        if session is None:
            if request.method == "GET" and not wants_json(request):
                return sign_in_redirect(request)
            return error_response(request, 401, "the console session has ended; sign in again")
        user = SignedIn(session, session.principal())
        try:
            if request.method != "GET":
                await check_csrf(request, session)
            return await handler(request, user)
        except Exception as exc:
            if (described := describe(exc)) is None:
                raise
            status, detail, _ = described
            return error_response(request, status, detail, user)

    return run


def same_origin(request: Request) -> bool:
    """A browser names the page a request came from; one from another site is refused even before the
    token is checked (a SameSite=Strict cookie would not be sent with it anyway)."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if origin is None:
        return True  # not a browser, or one that hides it: the token alone decides
    parts = urlsplit(origin)
    return f"{parts.scheme}://{parts.netloc}" == f"{request.url.scheme}://{request.url.netloc}"


async def form_of(request: Request) -> FormData:
    """The posted form, once (Starlette caches it), within the console's size limit."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_FORM_BYTES:
        raise Problem(413, f"the form is {declared} bytes; the limit is {MAX_FORM_BYTES}")
    return await request.form(max_files=0, max_fields=200, max_part_size=MAX_FORM_BYTES)


async def check_csrf(request: Request, session: ConsoleSession) -> None:
    if not same_origin(request):
        raise Problem(403, "this request came from another site; use the console's own forms")
    offered = request.headers.get(CSRF_HEADER)
    if offered is None:
        field = (await form_of(request)).get(CSRF_FIELD)
        offered = field if isinstance(field, str) else None
    if not session.csrf_matches(offered):
        raise Problem(403, "the form's CSRF token is missing or wrong; reload the page and try again")


def done(request: Request, fallback: str, message: str, data: dict[str, Any] | None = None) -> Response:
    """An action's answer: JSON for the script, else back to the page it came from, with a notice."""
    if wants_json(request):
        return json_response({"message": message, **(data or {})})
    target = back_to(request, fallback)
    separator = "&" if "?" in target else "?"
    return RedirectResponse(f"{target}{separator}notice={quote(message)}", status_code=303)


def form_command_id(user: SignedIn, form: FormData, *scope: str) -> str | None:
    """The command id of a form's ``idempotency_key`` (one per rendering), derived as the API derives an
    ``Idempotency-Key``: a form posted twice records nothing new."""
    key = form.get("idempotency_key")
    return keyed_command_id(user.who, key, *scope) if isinstance(key, str) and valid_idempotency_key(key) else None
