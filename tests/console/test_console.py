"""The operator console in a real browser against the real dev stack: signing in and out, the approvals
inbox live, deciding from the page through the API's command path, runs, state at a sequence, and the
walls between roles and orgs."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from tests.console.conftest import DevStack, screenshot

LIVE_WITHIN_MS = 5_000
"""What a live update may take here (the promise is 2 s; CI machines are shared and slow)."""


# --- helpers -------------------------------------------------------------------------------------------


def sign_in(page: Page, stack: DevStack, key: str) -> None:
    page.goto(f"{stack.gateway_url}/console")
    page.get_by_test_id("signin-key").fill(key)
    page.get_by_test_id("signin-submit").click()
    page.wait_for_url(re.compile(r"/console/approvals"))


@pytest.fixture
def contexts(browser: Browser) -> Iterator[Callable[[], BrowserContext]]:
    """Extra browser contexts (separate cookie jars: separate people), closed at the end."""
    opened: list[BrowserContext] = []

    def new() -> BrowserContext:
        context = browser.new_context()
        opened.append(context)
        return context

    yield new
    for context in opened:
        context.close()


def wait_for(check: Callable[[], Any], what: str, seconds: float = 30) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def submit(stack: DevStack, workflow: str, payload: dict[str, Any], org: str = "acme") -> str:
    with stack.client(org, "submitter") as client:
        answer = client.post("/v1/tasks", json={"type": workflow, "workflow": {"name": workflow}, "payload": payload})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


def task(stack: DevStack, task_id: str, org: str = "acme") -> dict[str, Any]:
    with stack.client(org, "viewer") as client:
        answer = client.get(f"/v1/tasks/{task_id}")
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def pending_approval(stack: DevStack, task_id: str, org: str = "acme") -> str:
    found = wait_for(
        lambda: next((a["id"] for a in task(stack, task_id, org)["approvals"] if a["status"] == "pending"), None),
        f"an approval on {task_id}",
    )
    return str(found)


def new_key(stack: DevStack, roles: list[str], org: str = "acme") -> tuple[str, str]:
    with stack.client(org, "admin") as admin:
        answer = admin.post("/v1/api-keys", json={"name": f"console-test-{'-'.join(roles)}", "roles": roles})
    assert answer.status_code == 201, answer.text
    return answer.json()["id"], answer.json()["key"]


def csrf_of(page: Page) -> str:
    return str(page.locator('meta[name="csrf-token"]').get_attribute("content"))


def cookie_header(context: BrowserContext) -> str:
    return "; ".join(f"{c['name']}={c['value']}" for c in context.cookies())


# --- signing in and out -----------------------------------------------------------------------------------


def test_signing_in_makes_a_strict_httponly_session_and_signing_out_ends_it(dev_stack: DevStack, page: Page) -> None:
    sign_in(page, dev_stack, dev_stack.key("acme", "approver"))
    expect(page.get_by_test_id("signed-in-as")).to_contain_text("acme")
    [session] = [c for c in page.context.cookies() if c["name"] == "cp_session"]
    assert session["httpOnly"] is True
    assert session["sameSite"] == "Strict"
    assert session["expires"] > time.time()
    stolen = session["value"]

    page.get_by_test_id("signout").click()
    page.wait_for_url(re.compile(r"/console(\?.*)?$"))
    expect(page.get_by_test_id("signin-key")).to_be_visible()
    # The old token is dead on the server, not just forgotten by this browser.
    with httpx.Client(base_url=dev_stack.gateway_url, trust_env=False, cookies={"cp_session": stolen}) as http:
        inbox = http.get("/console/approvals")
        assert inbox.status_code == 303
        assert inbox.headers["location"].startswith("/console?next=")
        assert http.get("/v1/events").status_code == 401


def test_a_bad_or_revoked_key_cannot_sign_in_and_revoking_ends_its_sessions(dev_stack: DevStack, page: Page) -> None:
    page.goto(f"{dev_stack.gateway_url}/console")
    page.get_by_test_id("signin-key").fill("cp_not-a-real-key")
    page.get_by_test_id("signin-submit").click()
    expect(page.get_by_test_id("signin-error")).to_be_visible()
    assert "cp_session" not in {c["name"] for c in page.context.cookies()}

    key_id, key = new_key(dev_stack, ["approver"])
    sign_in(page, dev_stack, key)
    with dev_stack.client("acme", "admin") as admin:
        assert admin.delete(f"/v1/api-keys/{key_id}").status_code == 204
    # Another gateway would honour the key for its cache time (5 s); this one knows at once.
    page.goto(f"{dev_stack.gateway_url}/console/tasks")
    page.wait_for_url(re.compile(r"/console\?next="), timeout=10_000)
    page.get_by_test_id("signin-key").fill(key)
    page.get_by_test_id("signin-submit").click()
    expect(page.get_by_test_id("signin-error")).to_contain_text("revoked")


def test_the_sign_in_form_refuses_a_post_without_its_token(dev_stack: DevStack) -> None:
    with httpx.Client(base_url=dev_stack.gateway_url, trust_env=False) as http:
        refused = http.post("/console/sign-in", data={"key": dev_stack.key("acme", "approver")})
    assert refused.status_code == 403
    assert "cp_session" not in refused.cookies


# --- the inbox, live ------------------------------------------------------------------------------------


def test_an_agent_deploy_to_prod_appears_live_shows_its_plan_and_is_approved_from_the_page(
    dev_stack: DevStack, page: Page, contexts: Callable[[], BrowserContext]
) -> None:
    sign_in(page, dev_stack, dev_stack.key("acme", "approver"))
    expect(page.get_by_test_id("approval-row").first.or_(page.get_by_test_id("inbox-empty"))).to_be_visible()

    task_id = submit(dev_stack, "agent-deploy", {"environment": "prod", "goal": "deploy the billing service"})
    row = page.locator(f'[data-testid="approval-row"][data-task-id="{task_id}"]')
    expect(row).to_be_visible(timeout=30_000)  # the runner plans with the LLM first; then it is live
    details = row.get_by_test_id("approval-details")
    expect(details).to_contain_text("build the image")  # the plan the (mock) LLM wrote
    expect(details).to_contain_text("prod")
    expect(row.get_by_test_id("approval-quorum")).to_have_text("0 of 1")
    screenshot(page, "inbox")

    run_page = contexts().new_page()
    sign_in(run_page, dev_stack, dev_stack.key("acme", "viewer"))
    run_page.goto(f"{dev_stack.gateway_url}/console/tasks/{task_id}")
    expect(run_page.get_by_test_id("task-status")).to_have_text("awaiting_approval")

    row.get_by_test_id("comment").fill("plan reviewed")
    row.get_by_test_id("approve").click()
    expect(row).to_have_count(0, timeout=LIVE_WITHIN_MS)
    expect(run_page.get_by_test_id("task-status")).to_have_text("completed", timeout=30_000)
    expect(run_page.get_by_test_id("result")).to_contain_text("Rolled out")
    expect(run_page.get_by_test_id("journal")).to_contain_text("gpt-4o-mini")
    expect(run_page.get_by_test_id("approvals")).to_contain_text("plan reviewed")
    screenshot(run_page, "run")

    approval = task(dev_stack, task_id)["approvals"][0]
    assert approval["status"] == "approved"
    assert [(d["decision"], d["comment"]) for d in approval["decisions"]] == [("approve", "plan reviewed")]
    assert approval["decisions"][0]["by"].startswith("key:")


def test_an_approval_decided_elsewhere_leaves_the_open_inbox(dev_stack: DevStack, page: Page) -> None:
    sign_in(page, dev_stack, dev_stack.key("acme", "approver"))
    task_id = submit(dev_stack, "two-person-change", {"change": "decided elsewhere"})
    approval_id = pending_approval(dev_stack, task_id)
    row = page.locator(f'[data-testid="approval-row"][data-approval-id="{approval_id}"]')
    expect(row).to_be_visible(timeout=LIVE_WITHIN_MS)
    with dev_stack.client("acme", "admin") as admin:
        rejected = admin.post(f"/v1/approvals/{approval_id}/reject", json={"reason": "not today"})
    assert rejected.status_code == 200, rejected.text
    expect(row).to_have_count(0, timeout=LIVE_WITHIN_MS)


def test_a_two_person_change_needs_two_different_approvers(
    dev_stack: DevStack, page: Page, contexts: Callable[[], BrowserContext]
) -> None:
    _, second_key = new_key(dev_stack, ["approver"])
    first, second = page, contexts().new_page()
    sign_in(first, dev_stack, dev_stack.key("acme", "approver"))
    sign_in(second, dev_stack, second_key)
    task_id = submit(dev_stack, "two-person-change", {"change": "rotate the payments database credentials"})
    approval_id = pending_approval(dev_stack, task_id)

    selector = f'[data-testid="approval-row"][data-approval-id="{approval_id}"]'
    first_row, second_row = first.locator(selector), second.locator(selector)
    expect(first_row).to_be_visible(timeout=LIVE_WITHIN_MS)
    expect(second_row).to_be_visible(timeout=LIVE_WITHIN_MS)
    first_row.get_by_test_id("approve").click()

    expect(first_row.get_by_test_id("approval-quorum")).to_have_text("1 of 2", timeout=LIVE_WITHIN_MS)
    expect(second_row.get_by_test_id("approval-quorum")).to_have_text("1 of 2", timeout=LIVE_WITHIN_MS)
    expect(first_row.get_by_test_id("cannot-decide")).to_contain_text("already voted")
    expect(first_row.get_by_test_id("approve")).to_have_count(0)
    assert task(dev_stack, task_id)["approvals"][0]["status"] == "pending"
    screenshot(first, "inbox-one-of-two")

    second_row.get_by_test_id("approve").click()
    expect(second_row).to_have_count(0, timeout=LIVE_WITHIN_MS)
    expect(first_row).to_have_count(0, timeout=LIVE_WITHIN_MS)
    approval = wait_for(
        lambda: (a := task(dev_stack, task_id)["approvals"][0])["status"] == "approved" and a, "the approval decided"
    )
    assert len({d["by"] for d in approval["decisions"]}) == 2


def test_a_rejection_from_the_page_needs_a_reason(dev_stack: DevStack, page: Page) -> None:
    sign_in(page, dev_stack, dev_stack.key("acme", "approver"))
    task_id = submit(dev_stack, "two-person-change", {"change": "reject me"})
    approval_id = pending_approval(dev_stack, task_id)
    row = page.locator(f'[data-testid="approval-row"][data-approval-id="{approval_id}"]')
    row.get_by_test_id("reject").click()
    expect(row.get_by_test_id("action-error")).to_contain_text("reason")
    assert task(dev_stack, task_id)["approvals"][0]["decisions"] == []
    row.get_by_test_id("comment").fill("wrong window")
    row.get_by_test_id("reject").click()
    expect(row).to_have_count(0, timeout=LIVE_WITHIN_MS)
    assert wait_for(lambda: task(dev_stack, task_id)["status"] == "completed", "the workflow to finish")
    assert task(dev_stack, task_id)["result"]["decision"] == "rejected"


# --- roles, CSRF and orgs ---------------------------------------------------------------------------------


def test_a_viewer_sees_why_instead_of_buttons_and_a_forged_post_is_refused(dev_stack: DevStack, page: Page) -> None:
    task_id = submit(dev_stack, "two-person-change", {"change": "viewer cannot decide"})
    approval_id = pending_approval(dev_stack, task_id)
    sign_in(page, dev_stack, dev_stack.key("acme", "viewer"))
    row = page.locator(f'[data-testid="approval-row"][data-approval-id="{approval_id}"]')
    expect(row.get_by_test_id("cannot-decide")).to_contain_text("approver or admin role")
    expect(row.get_by_test_id("approve")).to_have_count(0)
    expect(row.get_by_test_id("reject")).to_have_count(0)

    # The viewer's own session, with its valid CSRF token, posting what the button would have posted.
    forged = page.request.post(
        f"{dev_stack.gateway_url}/console/approvals/{approval_id}/approve",
        form={"csrf": csrf_of(page), "comment": "forged"},
        headers={"Accept": "application/json"},
    )
    assert forged.status == 403, forged.text()
    assert "may not decide" in forged.json()["detail"]
    assert task(dev_stack, task_id)["approvals"][0]["decisions"] == []


def test_a_post_without_the_csrf_token_or_from_another_site_is_refused(dev_stack: DevStack, page: Page) -> None:
    task_id = submit(dev_stack, "two-person-change", {"change": "csrf"})
    approval_id = pending_approval(dev_stack, task_id)
    sign_in(page, dev_stack, dev_stack.key("acme", "approver"))
    url = f"{dev_stack.gateway_url}/console/approvals/{approval_id}/approve"
    without = page.request.post(url, form={"comment": "no token"})
    assert without.status == 403
    wrong = page.request.post(url, form={"csrf": "x" * 43, "comment": "wrong token"})
    assert wrong.status == 403
    elsewhere = page.request.post(
        url, form={"csrf": csrf_of(page), "comment": "cross-site"}, headers={"Origin": "https://evil.example"}
    )
    assert elsewhere.status == 403
    # A cookie alone never writes through the API either: it wants the bearer header.
    api = page.request.post(f"{dev_stack.gateway_url}/v1/approvals/{approval_id}/approve", data={})
    assert api.status == 401
    assert task(dev_stack, task_id)["approvals"][0]["decisions"] == []


def globex_approval_request(stack: DevStack, reason: str) -> tuple[str, str]:
    """A globex task waiting for a human (the dev runner works for acme, so a globex worker asks)."""
    with stack.client("globex", "submitter") as submitter, stack.client("globex", "worker") as worker:
        submitted = submitter.post("/v1/tasks", json={"type": "globex-secret", "queue": "globex-q"})
        assert submitted.status_code == 201, submitted.text
        claimed = worker.post("/v1/tasks/claim", json={"worker_id": "globex-w", "queue": "globex-q"})
        assert claimed.status_code == 200, claimed.text
        asked = worker.post(
            f"/v1/tasks/{claimed.json()['task']['id']}/approval-requests",
            json={"worker_id": "globex-w", "lease_id": claimed.json()["lease"]["id"], "reason": reason},
        )
        assert asked.status_code == 201, asked.text
    return claimed.json()["task"]["id"], asked.json()["id"]


def test_an_acme_session_never_sees_globex_data(dev_stack: DevStack, page: Page) -> None:
    globex_task, globex_approval = globex_approval_request(dev_stack, "globex secret change")
    sign_in(page, dev_stack, dev_stack.key("acme", "admin"))

    expect(page.locator(f'[data-approval-id="{globex_approval}"]')).to_have_count(0)
    assert "globex secret change" not in page.content()
    for path in (
        f"/console/tasks/{globex_task}",
        f"/console/tasks/{globex_task}/live",
        f"/console/approvals/{globex_approval}/row",
        f"/v1/tasks/{globex_task}",
    ):
        answer = page.request.get(f"{dev_stack.gateway_url}{path}")
        assert answer.status == 404, (path, answer.status)
    page.goto(f"{dev_stack.gateway_url}/console/tasks")
    expect(page.locator(f'[data-task-id="{globex_task}"]')).to_have_count(0)

    # The org feed the console follows, read with the session: acme's events only.
    feed = page.evaluate(
        """async () => {
            const response = await fetch('/v1/events?after=0');
            const reader = response.body.getReader();
            let text = '';
            const deadline = Date.now() + 3000;
            while (Date.now() < deadline) {
                const {value, done} = await Promise.race([
                    reader.read(), new Promise((r) => setTimeout(() => r({value: null, done: false}), 500))]);
                if (done) break;
                if (value) text += new TextDecoder().decode(value);
            }
            reader.cancel();
            return text;
        }"""
    )
    assert '"org":"acme"' in feed
    assert '"org":"globex"' not in feed
    assert globex_task not in feed


# --- runs, state at a sequence, the other pages ------------------------------------------------------------


def test_state_at_a_sequence_shows_the_run_as_it_was_before_the_approval(dev_stack: DevStack, page: Page) -> None:
    task_id = submit(dev_stack, "agent-deploy", {"environment": "prod", "goal": "roll back"})
    approval_id = pending_approval(dev_stack, task_id)
    with dev_stack.client("acme", "approver") as approver:
        assert approver.post(f"/v1/approvals/{approval_id}/approve", json={}).status_code == 200
    wait_for(lambda: task(dev_stack, task_id)["status"] == "completed", "the run to complete")

    sign_in(page, dev_stack, dev_stack.key("acme", "viewer"))
    page.goto(f"{dev_stack.gateway_url}/console/tasks/{task_id}")
    expect(page.get_by_test_id("task-status")).to_have_text("completed")
    requested = page.locator('[data-testid="timeline-event"][data-type="ApprovalRequested"]')
    before_vote = int(str(requested.get_attribute("data-seq")))
    page.get_by_test_id("state-at").fill(str(before_vote))
    page.get_by_test_id("state-at").press("Enter")
    expect(page.get_by_test_id("state-at-status")).to_have_text("awaiting_approval")

    # Picking an event on the timeline does the same.
    page.locator('[data-testid="timeline-event"][data-type="TaskSubmitted"] a').click()
    expect(page.get_by_test_id("state-at-status")).to_have_text("pending")
    screenshot(page, "run-state-at")


def test_runs_filter_and_update_their_status_live(dev_stack: DevStack, page: Page) -> None:
    sign_in(page, dev_stack, dev_stack.key("acme", "viewer"))
    page.goto(f"{dev_stack.gateway_url}/console/tasks?workflow=two-person-change")
    task_id = submit(dev_stack, "two-person-change", {"change": "watch me"})
    row = page.locator(f'[data-testid="task-row"][data-task-id="{task_id}"]')
    expect(row).to_have_attribute("data-status", "awaiting_approval", timeout=30_000)
    approval_id = pending_approval(dev_stack, task_id)
    with dev_stack.client("acme", "admin") as admin:
        admin.post(f"/v1/approvals/{approval_id}/reject", json={"reason": "no"})
    expect(row).to_have_attribute("data-status", "completed", timeout=30_000)
    for status in page.locator('[data-testid="task-row"]').evaluate_all("rows => rows.map(r => r.dataset.status)"):
        assert status in {"pending", "running", "awaiting_approval", "completed", "failed", "cancelled", "timed_out"}
    screenshot(page, "runs")

    page.goto(f"{dev_stack.gateway_url}/console/tasks?status=bogus")
    expect(page.get_by_test_id("error-detail")).to_contain_text("status")
    page.goto(f"{dev_stack.gateway_url}/console/tasks/{task_id}?at=%C2%B2")  # a superscript two is no sequence
    expect(page.get_by_test_id("error-detail")).to_contain_text("at")


def test_a_submitter_cancels_a_run_from_its_page_and_a_viewer_has_no_button(dev_stack: DevStack, page: Page) -> None:
    task_id = submit(dev_stack, "two-person-change", {"change": "cancel me"})
    pending_approval(dev_stack, task_id)
    sign_in(page, dev_stack, dev_stack.key("acme", "viewer"))
    page.goto(f"{dev_stack.gateway_url}/console/tasks/{task_id}")
    expect(page.get_by_test_id("cancel")).to_have_count(0)
    page.get_by_test_id("signout").click()

    sign_in(page, dev_stack, dev_stack.key("acme", "submitter"))
    page.goto(f"{dev_stack.gateway_url}/console/tasks/{task_id}")
    page.get_by_label("Reason").fill("changed my mind")
    page.get_by_test_id("cancel").click()
    expect(page.get_by_test_id("task-status")).to_have_text("cancelled", timeout=LIVE_WITHIN_MS)
    assert task(dev_stack, task_id)["cancellation_reason"] == "changed my mind"


def test_workers_usage_and_policies_pages(dev_stack: DevStack, page: Page) -> None:
    sign_in(page, dev_stack, dev_stack.key("acme", "viewer"))
    page.goto(f"{dev_stack.gateway_url}/console/workers")
    runner = page.locator('[data-testid="worker-row"]').first
    expect(runner).to_have_attribute("data-status", re.compile("ready|busy"))
    screenshot(page, "workers")

    task_id = submit(dev_stack, "agent-deploy", {"environment": "staging"})  # no approval in staging
    wait_for(lambda: task(dev_stack, task_id)["status"] == "completed", "a staging deploy to complete")
    page.goto(f"{dev_stack.gateway_url}/console/usage")
    row = page.locator('[data-testid="usage-row"][data-model="gpt-4o-mini"]')
    expect(row).to_have_count(1, timeout=10_000)
    screenshot(page, "usage")

    page.goto(f"{dev_stack.gateway_url}/console/policies")
    expect(page.get_by_test_id("policy-current")).to_contain_text("digest")


def test_pages_answer_with_a_content_security_policy_and_load_nothing_from_outside(
    dev_stack: DevStack, page: Page
) -> None:
    outside: list[str] = []
    page.on(
        "request",
        lambda request: None if request.url.startswith(dev_stack.gateway_url) else outside.append(request.url),
    )
    sign_in(page, dev_stack, dev_stack.key("acme", "admin"))
    for path in ("/console/approvals", "/console/tasks", "/console/workers", "/console/usage", "/console/policies"):
        response = page.goto(f"{dev_stack.gateway_url}{path}")
        assert response is not None and response.status == 200, path
        assert "default-src 'self'" in response.headers["content-security-policy"]
    assert outside == []


def test_the_inbox_and_a_run_read_on_a_phone_without_sideways_scrolling(
    dev_stack: DevStack, contexts: Callable[[], BrowserContext]
) -> None:
    task_id = submit(dev_stack, "agent-deploy", {"environment": "prod", "goal": "deploy from a phone"})
    pending_approval(dev_stack, task_id)
    phone = contexts()
    phone_page = phone.new_page()
    phone_page.set_viewport_size({"width": 390, "height": 844})
    sign_in(phone_page, dev_stack, dev_stack.key("acme", "approver"))
    for path, name in (
        (f"/console/approvals#approval-{task_id}-1", "phone-inbox"),
        (f"/console/tasks/{task_id}", "phone-run"),
    ):
        phone_page.goto(f"{dev_stack.gateway_url}{path}")
        overflow = phone_page.evaluate("document.scrollingElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{path} scrolls sideways by {overflow} px on a phone"
        screenshot(phone_page, name)
    # Keyboard only: tab to the approve button of the row and press Enter.
    phone_page.goto(f"{dev_stack.gateway_url}/console/approvals")
    row = phone_page.locator(f'[data-testid="approval-row"][data-task-id="{task_id}"]')
    row.get_by_test_id("comment").focus()
    phone_page.keyboard.press("Tab")
    phone_page.keyboard.press("Enter")
    expect(row).to_have_count(0, timeout=LIVE_WITHIN_MS)
