"""Hostile forms to every state-changing console route, from a signed-in session with a valid CSRF
token: never a 5xx, and a refusal changes nothing. (The API's routes have their own campaign in
tests/chaos/test_bad_input.py.)"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.routing import Route

from gateway.console.routes import ROUTES as CONSOLE_ROUTES
from tests.console.conftest import DevStack

EXAMPLES = int(os.environ.get("CP_BAD_INPUT_EXAMPLES", "150"))


@dataclass(frozen=True)
class Session:
    http: httpx.Client
    csrf: str


def signed_in(stack: DevStack, key: str) -> Session:
    http = httpx.Client(base_url=stack.gateway_url, trust_env=False, timeout=20, follow_redirects=False)
    form = http.get("/console")
    token = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert token, form.text
    answer = http.post("/console/sign-in", data={"csrf": token.group(1), "key": key})
    assert answer.status_code == 303, answer.text
    inbox = http.get("/console/approvals")
    csrf = re.search(r'<meta name="csrf-token" content="([^"]+)"', inbox.text)
    assert csrf, inbox.text
    return Session(http, csrf.group(1))


@pytest.fixture(scope="module")
def target(dev_stack: DevStack) -> Iterator[tuple[Session, str, str]]:
    """An approver's session and a pending two-person approval (quorum 2: one vote never decides it)."""
    with dev_stack.client("acme", "submitter") as client:
        submitted = client.post(
            "/v1/tasks", json={"type": "x", "workflow": {"name": "two-person-change"}, "payload": {"change": "fuzz"}}
        )
        task_id = submitted.json()["id"]
        deadline = time.monotonic() + 30
        while not (approvals := client.get(f"/v1/tasks/{task_id}").json()["approvals"]):
            assert time.monotonic() < deadline
            time.sleep(0.2)
    session = signed_in(dev_stack, dev_stack.key("acme", "approver"))
    yield session, task_id, approvals[0]["id"]
    session.http.close()


def console_post_routes() -> list[str]:
    """Every console route that takes a POST, read from the routes so one added later is fuzzed too;
    but signing out, which would end the campaign's session (tests of its own cover it)."""
    routes = [
        route.path
        for route in CONSOLE_ROUTES
        if isinstance(route, Route) and "POST" in (route.methods or ()) and route.path != "/console/sign-out"
    ]
    assert len(routes) >= 5, routes
    return routes


ROUTES = console_post_routes()
text = st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1"))
ids = st.sampled_from(["{task}", "{approval}", "nope", "..", "%2e%2e", "a" * 300, "x.y", "*", ">"])
fields = st.dictionaries(
    st.sampled_from(["comment", "reason", "idempotency_key", "response_json", "response.x", "key", "at", "zzz"]) | text,
    text | st.just("x" * 300_000),
    max_size=6,
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    route=st.sampled_from(ROUTES),
    path_id=ids,
    form=fields,
    encoding=st.sampled_from(["form", "multipart", "json", "raw"]),
    with_csrf=st.booleans(),
)
def test_hostile_console_forms_get_no_5xx_and_a_refusal_changes_nothing(
    dev_stack: DevStack,
    target: tuple[Session, str, str],
    route: str,
    path_id: str,
    form: dict[str, str],
    encoding: str,
    with_csrf: bool,
) -> None:
    session, task_id, approval_id = target
    path = route.replace("{task_id}", path_id).replace("{approval_id}", path_id)
    path = path.replace("{task}", task_id).replace("{approval}", approval_id)
    if with_csrf:
        form = {**form, "csrf": session.csrf}
    before = _state(dev_stack, task_id)
    request: dict[str, Any] = {"headers": {"Accept": "application/json"}}
    if encoding == "form":
        request["data"] = form
    elif encoding == "multipart":
        request["files"] = {name: (None, value.encode("utf-8", "surrogatepass")) for name, value in form.items()}
    elif encoding == "json":
        request["json"] = form
    else:
        request["content"] = "&".join(f"{k}={v}" for k, v in form.items()).encode("utf-8", "surrogatepass")
        request["headers"]["content-type"] = "application/x-www-form-urlencoded"
    try:
        response = session.http.post(path, **request)
    except httpx.InvalidURL:  # a path no client can send
        return
    assert response.status_code < 500, (path, response.status_code, response.text[:500])
    if response.status_code >= 400:
        assert _state(dev_stack, task_id) == before, (path, response.status_code, response.text[:300])


def _state(stack: DevStack, task_id: str) -> tuple[str, list[Any]]:
    with stack.client("acme", "viewer") as client:
        task = client.get(f"/v1/tasks/{task_id}").json()
    return task["status"], [a["decisions"] for a in task["approvals"]]
