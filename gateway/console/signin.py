"""Signing in with an API key or a JWT, and out. The sign-in form carries a token that must match a
short-lived cookie (so another site cannot sign a browser in with its own key), and the credential is
checked exactly as a bearer header is."""

from __future__ import annotations

import hmac
import secrets

import jwt
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from gateway.console.sessions import SESSION_COOKIE
from gateway.console.web import (
    CSRF_FIELD,
    SignedIn,
    back_to,
    console_page,
    form_of,
    render,
    same_origin,
)
from gateway.http import client_address, services
from gateway.problems import Problem

SIGNIN_COOKIE = "cp_signin"
SIGNIN_FORM_SECONDS = 3600
MAX_CREDENTIAL_CHARS = 8192


def _secure(request: Request) -> bool:
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"


async def root(request: Request) -> Response:
    return RedirectResponse("/console", status_code=307)


async def signin_page(request: Request) -> Response:
    """The sign-in form, or straight to the inbox for a browser that has a session."""
    if await services(request).sessions.find(request.cookies.get(SESSION_COOKIE)) is not None:
        return RedirectResponse(back_to(request, "/console/approvals"), status_code=303)
    return _form(request, status=200, error=None)


def _form(request: Request, *, status: int, error: str | None) -> Response:
    form_token = secrets.token_urlsafe(24)
    response = render(
        request,
        "signin.html",
        {"form_token": form_token, "error": error, "next": back_to(request, "/console/approvals")},
        status=status,
    )
    response.set_cookie(
        SIGNIN_COOKIE,
        form_token,
        max_age=SIGNIN_FORM_SECONDS,
        path="/console",
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )
    return response


async def sign_in(request: Request) -> Response:
    svc = services(request)
    form = await form_of(request)
    offered, expected = form.get(CSRF_FIELD), request.cookies.get(SIGNIN_COOKIE)
    if (
        not same_origin(request)
        or not isinstance(offered, str)
        or not expected
        or not hmac.compare_digest(offered.encode(), expected.encode())
    ):
        return _form(request, status=403, error="The sign-in form expired or came from another site; try again.")
    credential = form.get("key")
    credential = credential.strip() if isinstance(credential, str) else ""
    if not credential:
        return _form(request, status=422, error="Paste an API key or a JWT.")
    if len(credential) > MAX_CREDENTIAL_CHARS:
        return _form(request, status=422, error="That credential is too long to be an API key or a JWT.")
    address = client_address(request)
    if wait := svc.failed_auth.blocked_for(address):
        return _form(request, status=429, error=f"Too many refused credentials from here; wait {wait:.0f} s.")
    try:
        who = await svc.auth.authenticate(f"Bearer {credential}")
    except Problem as exc:
        svc.failed_auth.retry_after(address)
        return _form(request, status=401, error=f"Sign-in refused: {exc.detail}.")
    token, session = await svc.sessions.start(who, not_after=_jwt_expiry(credential))
    response = RedirectResponse(back_to(request, "/console/approvals"), status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=max(1, int(session.expires_at - svc.sessions.now())),
        path="/",
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )
    response.delete_cookie(SIGNIN_COOKIE, path="/console")
    return response


def _jwt_expiry(credential: str) -> float | None:
    """A session never outlives the JWT it was made from (the token was verified just before)."""
    if credential.count(".") != 2:
        return None
    try:
        expiry = jwt.decode(credential, options={"verify_signature": False}).get("exp")
    except jwt.PyJWTError:
        return None
    return float(expiry) if isinstance(expiry, int | float) else None


@console_page
async def sign_out(request: Request, user: SignedIn) -> Response:
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        await services(request).sessions.end(token)
    response = RedirectResponse("/console", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
