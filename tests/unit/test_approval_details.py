"""An approval carries what is being approved and each decision's structured answer: through the pure
task decider, the event codec, and the gateway's form checks (pure functions, no servers)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from application.forms import MAX_DETAILS_BYTES, MAX_FORM_BYTES, check_details, check_form, check_response
from core.domain.approvals import Approval
from core.domain.commands import Actor, ClaimTask, DecideApproval, RequestApproval, SubmitTask
from core.domain.decider import DecisionContext
from core.domain.errors import InvalidCommand
from core.domain.events import ApprovalDecided, ApprovalRequested, ApprovalVoteCast, decode_event, encode_event
from core.domain.task import Task
from core.domain.task_decider import TASK
from gateway.problems import describe

T0 = datetime(2026, 1, 1, tzinfo=UTC)
WORKER = Actor("wkey", frozenset({"worker"}))
APPROVERS = [Actor(f"approver-{i}", frozenset({"approver"})) for i in range(3)]

TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)  # what JSON bodies carry
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
FORMS = st.none() | st.dictionaries(TEXT, JSON, max_size=4)


def run(state: Task | None, command: Any, actor: Actor, now: datetime) -> tuple[Task, list[Any]]:
    events = list(TASK.decide(state, command, DecisionContext("acme", now, actor)))
    folded = TASK.fold(events, state)
    assert folded is not None
    return folded, events


def asked(details: Any, form: dict[str, Any] | None, quorum: int = 3) -> Task:
    task, _ = run(None, SubmitTask(task_id="t1", task_type="deploy"), WORKER, T0)
    task, _ = run(task, ClaimTask(task_id="t1", worker_id="w1", lease_id="l1"), WORKER, T0)
    request = RequestApproval(
        task_id="t1",
        worker_id="w1",
        lease_id="l1",
        approval_id="t1-1",
        reason="ship it?",
        quorum=quorum,
        details=details,
        form=form,
    )
    task, _ = run(task, request, WORKER, T0)
    return task


# --- the decider ------------------------------------------------------------------------------------


@given(details=JSON, form=FORMS, responses=st.lists(JSON, min_size=1, max_size=3), reject_last=st.booleans())
def test_an_approval_keeps_what_was_asked_and_every_answer_as_given(
    details: Any, form: dict[str, Any] | None, responses: list[Any], reject_last: bool
) -> None:
    """Whatever JSON the requester attached and the deciders answered, the approval shows it unchanged,
    in the order the votes came, and so does a fold of the events after a trip through the codec."""
    task = asked(details, form)
    history: list[Any] = []
    for i, response in enumerate(responses):
        decision = "reject" if reject_last and i == len(responses) - 1 else "approve"
        vote = DecideApproval(task_id="t1", approval_id="t1-1", decision=decision, comment="why", response=response)
        task, events = run(task, vote, APPROVERS[i], T0 + timedelta(seconds=i + 1))
        history += events
    [approval] = task.approvals
    assert (approval.details, approval.form) == (details, form)
    assert [v.response for v in approval.decisions] == responses
    assert approval.status == ("rejected" if reject_last else "approved" if len(responses) == 3 else "pending")
    assert [decode_event(encode_event(e)) for e in history] == history
    # Every vote but the deciding one is an ApprovalVoteCast; the deciding one rides in ApprovalDecided.
    assert sum(isinstance(e, ApprovalVoteCast) for e in history) == len(approval.decisions) - (
        approval.status != "pending"
    )


@given(response=JSON, reject=st.booleans())
def test_a_decision_recorded_as_a_vote_then_a_decision_folds_as_the_one_event_does(response: Any, reject: bool) -> None:
    """Logs written before the deciding vote moved into ApprovalDecided hold it as an ApprovalVoteCast
    just before a decision without a vote: folded, both say the same."""
    task = asked(None, None, quorum=1)
    decision = "reject" if reject else "approve"
    vote = DecideApproval(task_id="t1", approval_id="t1-1", decision=decision, comment="why", response=response)
    now = T0 + timedelta(seconds=1)
    decided, [event] = run(task, vote, APPROVERS[0], now)
    assert isinstance(event, ApprovalDecided) and event.vote is not None
    recorded_before = [
        ApprovalVoteCast(
            at=now, approval_id="t1-1", by=APPROVERS[0].id, decision=decision, comment="why", response=response
        ),
        msgspec.structs.replace(event, vote=None),
    ]
    assert TASK.fold(recorded_before, task) == decided


def test_events_recorded_before_details_forms_and_responses_still_decode() -> None:
    requested = decode_event(
        b'{"type":"ApprovalRequested","v":1,"at":"2026-01-01T00:00:00Z","approval_id":"t1-1","lease_id":"l1",'
        b'"requested_by":"w1","requested_by_actor":"wkey","reason":"r","approvers":["role:approver"],"quorum":1,'
        b'"expires_at":null,"escalation":null}'
    )
    assert isinstance(requested, ApprovalRequested)
    assert (requested.details, requested.form) == (None, None)
    vote = decode_event(
        b'{"type":"ApprovalVoteCast","v":1,"at":"2026-01-01T00:00:00Z","approval_id":"t1-1","by":"a",'
        b'"decision":"approve","comment":null}'
    )
    assert isinstance(vote, ApprovalVoteCast)
    assert vote.response is None


def test_an_approval_folded_before_details_existed_reads_from_a_stored_row() -> None:
    """The read model keeps the folded approval as JSON: a row written by older code lacks the fields."""
    task = asked({"plan": "x"}, None)
    stored = msgspec.json.decode(msgspec.json.encode(task.approvals[0]))
    for field in ("details", "form"):
        del stored[field]
    old = msgspec.json.decode(msgspec.json.encode(stored), type=Approval)
    assert (old.details, old.form, old.id) == (None, None, "t1-1")


# --- the gateway's checks -----------------------------------------------------------------------------

ANSWER = {
    "type": "object",
    "properties": {"rollout_percent": {"type": "integer", "minimum": 1, "maximum": 100}, "note": {"type": "string"}},
    "required": ["rollout_percent"],
    "additionalProperties": False,
}


def refused(check: Any, *args: Any, **kwargs: Any) -> str:
    """The refusal's detail; the refusal answers HTTP with 422."""
    with pytest.raises(InvalidCommand) as caught:
        check(*args, **kwargs)
    status, detail, _ = describe(caught.value) or (None, "", {})
    assert status == 422
    return detail


def test_a_form_must_be_a_json_schema_whose_references_stay_inside_it() -> None:
    check_form(None)
    check_form({})
    check_form(ANSWER)
    check_form({"$defs": {"pct": {"type": "integer"}}, "$ref": "#/$defs/pct"})
    check_form({"const": {"$ref": "https://example.com/data"}})  # data, not a reference
    assert "'nope' is not valid under any of the given schemas" in refused(check_form, {"type": "nope"})
    assert "'one' is not of type 'number'" in refused(check_form, {"minimum": "one"})
    assert "http://169.254.169.254/x" in refused(check_form, {"$ref": "http://169.254.169.254/x"})
    assert "169.254.169.254" in refused(
        check_form, {"properties": {"a": {"items": {"$dynamicRef": "http://169.254.169.254/y"}}}}
    )
    big = {"description": "x" * MAX_FORM_BYTES}
    assert "the limit is" in refused(check_form, big)


def test_details_are_any_json_up_to_the_limit() -> None:
    check_details(None)
    check_details({"plan": "x" * (MAX_DETAILS_BYTES - 100)})
    assert f"the limit is {MAX_DETAILS_BYTES}" in refused(check_details, ["x" * MAX_DETAILS_BYTES])


def test_a_response_fits_the_form_or_is_refused_with_the_schemas_words() -> None:
    check_response(ANSWER, {"rollout_percent": 10}, required=True)
    check_response(ANSWER, {"rollout_percent": 10, "note": "slowly"}, required=False)
    assert "101 is greater than the maximum of 100" in refused(
        check_response, ANSWER, {"rollout_percent": 101}, required=True
    )
    assert "'rollout_percent' is a required property" in refused(check_response, ANSWER, {}, required=False)
    assert "asks for a response" in refused(check_response, ANSWER, None, required=True)
    check_response(ANSWER, None, required=False)  # a rejection may leave the form blank
    check_response({"properties": {"note": {"type": "string"}}}, None, required=True)  # null fits: none needed
    check_response(None, {"anything": [1, 2.5, None]}, required=True)
    assert "NUL" in refused(check_response, None, {"k": "a\x00b"}, required=False)


def test_a_form_never_makes_the_gateway_fetch_a_url() -> None:
    """A reference past the form check (hidden under a data keyword's name) cannot be resolved either."""
    form = {"properties": {"enum": {"$ref": "http://127.0.0.1:9/schema.json"}}}
    check_form(form)
    assert "cannot be evaluated" in refused(check_response, form, {"enum": 1}, required=True)


TYPES = {
    "null": st.none(),
    "boolean": st.booleans(),
    "string": st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8),  # NUL: refused first
    "array": st.lists(st.none()),
}


@given(data=st.data(), expected=st.sampled_from(sorted(TYPES)), given_type=st.sampled_from(sorted(TYPES)))
def test_a_response_fits_a_typed_form_exactly_when_it_has_that_type(
    data: st.DataObject, expected: str, given_type: str
) -> None:
    response = data.draw(TYPES[given_type])
    form = {"type": expected}
    if expected == given_type:
        check_response(form, response, required=True)
    else:
        assert f"is not of type '{expected}'" in refused(check_response, form, response, required=True)


@given(response=JSON)
def test_without_a_form_or_with_an_empty_one_any_json_answer_fits(response: Any) -> None:
    check_response(None, response, required=True)
    check_response({}, response, required=True)
