"""Property-based tests of notifications: the org's channels and rules (a rule always names a channel
that exists, a refused command changes nothing, the state is the fold of the events), rule matching
(exactly the rules whose trigger and filters fit), what an event means for people (a timer that
changed nothing means nothing), what a message says and where it links, and one record per
notification."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.domain.commands import (
    SYSTEM,
    ClaimTask,
    DefineNotificationChannel,
    DefineNotificationRule,
    DeleteNotificationChannel,
    DeleteNotificationRule,
    RecordNotification,
    RequestApproval,
    RewrapNotificationChannel,
    SmtpSpec,
    SubmitTask,
)
from core.domain.decider import DecisionContext
from core.domain.errors import AlreadyExists, InvalidCommand, NotFound, Rejected
from core.domain.events import (
    ApprovalEscalated,
    ApprovalTimedOut,
    Escalation,
    Event,
    NotificationChannelDefined,
    NotificationChannelRewrapped,
    PolicyDecision,
    SealedText,
    WorkflowRef,
    decode_event,
    encode_event,
)
from core.domain.ids import validate_token
from core.domain.notification_messages import Happening, compose, happening, matching_rules
from core.domain.notifications import (
    NOTIFICATION,
    NOTIFICATIONS,
    AlreadyRecorded,
    ChannelInUse,
    ChannelRedefined,
    NotificationSettings,
    check_channel_url,
    notification_id,
    sealing_purpose,
)
from core.domain.public import REDACTED, public_event
from core.domain.task import Task
from core.domain.task_decider import TASK
from core.secret_box import SecretBox, SecretUnreadable

START = datetime(2026, 1, 1, tzinfo=UTC)
CHANNELS = ["ops", "mail", "hook"]
RULES = ["r1", "r2", "r3"]
TRIGGERS = ["approval_requested", "approval_escalated", "approval_timed_out", "task_failed", "task_parked"]
QUEUES = ["q1", "q2"]
ENVIRONMENTS = ["prod", "dev"]
WORKFLOWS = ["deploy", "chat"]


def context(step: int = 0) -> DecisionContext:
    return DecisionContext(org="acme", now=START + timedelta(seconds=step), actor=SYSTEM)


SMTP = SmtpSpec(host="127.0.0.1", port=2525, sender="cp@example.com", recipients=("ops@example.com",))
BOX = SecretBox(bytes(32))


def sealed(command: DefineNotificationChannel) -> DefineNotificationChannel:
    """The command as the gateway hands it on: its url and secret sealed."""

    def seal(field: str, value: str | None) -> SealedText | None:
        return None if value is None else BOX.seal_text("acme", sealing_purpose(command.name, field), value)

    return msgspec.structs.replace(
        command, sealed_url=seal("url", command.url), sealed_secret=seal("secret", command.secret)
    )


channels = st.one_of(
    st.builds(
        DefineNotificationChannel,
        name=st.sampled_from(CHANNELS),
        kind=st.just("slack"),
        url=st.just("https://hooks.example.com/services/T/B/x"),
        replace=st.booleans(),
    ),
    st.builds(
        DefineNotificationChannel,
        name=st.sampled_from(CHANNELS),
        kind=st.just("email"),
        smtp=st.just(SMTP),
        replace=st.booleans(),
    ),
    st.builds(
        DefineNotificationChannel,
        name=st.sampled_from(CHANNELS),
        kind=st.just("webhook"),
        url=st.just("http://127.0.0.1:9000/in"),
        secret=st.sampled_from(["whsec_c2VjcmV0", "plain text secret"]),
        replace=st.booleans(),
    ),
).map(sealed)
rules = st.builds(
    DefineNotificationRule,
    rule_id=st.sampled_from(RULES),
    channel=st.sampled_from(CHANNELS),
    on=st.lists(st.sampled_from(TRIGGERS), min_size=1, max_size=3).map(tuple),
    queue=st.sampled_from([None, *QUEUES]),
    environment=st.sampled_from([None, *ENVIRONMENTS]),
    workflow=st.sampled_from([None, *WORKFLOWS]),
)
deletions = st.one_of(
    st.builds(DeleteNotificationChannel, name=st.sampled_from(CHANNELS)),
    st.builds(DeleteNotificationRule, rule_id=st.sampled_from(RULES)),
)
Command = DefineNotificationChannel | DefineNotificationRule | DeleteNotificationChannel | DeleteNotificationRule


@given(st.lists(st.one_of(channels, rules, deletions), max_size=40))
def test_every_rule_names_a_channel_that_exists_whatever_the_commands(commands: list[Command]) -> None:
    state = NOTIFICATIONS.initial
    recorded: list[Event] = []
    for step, command in enumerate(commands):
        try:
            events = NOTIFICATIONS.decide(state, command, context(step))
        except Rejected as refused:
            _refused_for_a_reason(state, command, refused)
            continue
        for event in events:
            assert decode_event(encode_event(event)) == event
            state = NOTIFICATIONS.evolve(state, event)
            recorded.append(event)
        assert all(rule.channel in state.channels for rule in state.rules.values()), state
    assert NOTIFICATIONS.fold(recorded) == state, "the fold of the recorded events is the state"


def _refused_for_a_reason(state: NotificationSettings, command: Command, refused: Rejected) -> None:
    """Every refusal is one the rules call for."""
    match command:
        case DefineNotificationChannel():
            assert isinstance(refused, AlreadyExists) and command.name in state.channels and not command.replace
        case DeleteNotificationChannel():
            if isinstance(refused, ChannelInUse):
                assert state.rules_using(command.name)
            else:
                assert isinstance(refused, NotFound) and command.name not in state.channels
        case DefineNotificationRule():
            if isinstance(refused, AlreadyExists):
                assert command.rule_id in state.rules
            else:
                assert isinstance(refused, InvalidCommand)
                assert command.channel not in state.channels or len(set(command.on)) < len(command.on)
        case DeleteNotificationRule():
            assert isinstance(refused, NotFound) and command.rule_id not in state.rules


@pytest.mark.parametrize(
    ("command", "says"),
    [
        (DefineNotificationChannel(name="x", kind="slack"), "needs url"),
        (DefineNotificationChannel(name="x", kind="slack", url="https://h/x", secret="s"), "takes no secret"),
        (DefineNotificationChannel(name="x", kind="slack", url="https://h/x", smtp=SMTP), "takes no smtp"),
        (DefineNotificationChannel(name="x", kind="webhook", url="https://h/x"), "needs secret"),
        (DefineNotificationChannel(name="x", kind="webhook", url="https://h/x", secret="whsec_!!"), "base64"),
        (DefineNotificationChannel(name="x", kind="webhook", url="https://:80/x", secret="s"), "http(s)://host"),
        (DefineNotificationChannel(name="x", kind="email"), "needs smtp"),
        (DefineNotificationChannel(name="x", kind="email", smtp=SMTP, url="https://h/x"), "takes no url"),
        (DefineNotificationChannel(name="x", kind="email", smtp=SMTP, secret="pw"), "smtp.username"),
    ],
)
def test_a_channel_that_misses_what_its_kind_needs_is_refused_saying_what(
    command: DefineNotificationChannel, says: str
) -> None:
    with pytest.raises(InvalidCommand) as refused:
        NOTIFICATIONS.decide(NOTIFICATIONS.initial, sealed(command), context())
    assert says in refused.value.detail


def test_a_channels_url_and_secret_reach_the_log_only_sealed_and_open_only_for_that_channel() -> None:
    url, secret = "https://hooks.example.com/services/T0/B0/tok3n", "whsec_c2VjcmV0"
    command = DefineNotificationChannel(name="hook", kind="webhook", url=url, secret=secret)
    with pytest.raises(InvalidCommand, match="only sealed"):
        NOTIFICATIONS.decide(NOTIFICATIONS.initial, command, context())
    [event] = NOTIFICATIONS.decide(NOTIFICATIONS.initial, sealed(command), context())
    stored = encode_event(event)
    assert url.encode() not in stored and b"tok3n" not in stored and secret.encode() not in stored
    assert isinstance(event, NotificationChannelDefined) and event.endpoint == "https://hooks.example.com/…"
    assert event.url is not None and event.secret is not None
    assert BOX.open_text("acme", sealing_purpose("hook", "url"), event.url) == url
    with pytest.raises(SecretUnreadable):
        BOX.open_text("acme", sealing_purpose("other", "url"), event.url)
    with pytest.raises(SecretUnreadable):
        BOX.open_text("globex", sealing_purpose("hook", "url"), event.url)


def test_a_rewrap_moves_a_channels_sealed_fields_to_the_new_key_unless_it_was_defined_again() -> None:
    url, secret = "https://hooks.example.com/services/T0/B0/tok3n", "whsec_c2VjcmV0"
    command = sealed(DefineNotificationChannel(name="hook", kind="webhook", url=url, secret=secret))
    [defined] = NOTIFICATIONS.decide(NOTIFICATIONS.initial, command, context())
    state = NOTIFICATIONS.evolve(NOTIFICATIONS.initial, defined)
    channel = state.channels["hook"]
    assert channel.url is not None and channel.secret is not None
    rotated = SecretBox(b"\x01" * 32, [bytes(32)])
    rewrap = RewrapNotificationChannel(
        name="hook",
        defined_at=channel.updated_at,
        url=rotated.rewrap_text("acme", sealing_purpose("hook", "url"), channel.url),
        secret=rotated.rewrap_text("acme", sealing_purpose("hook", "secret"), channel.secret),
    )
    [rewrapped] = NOTIFICATIONS.decide(state, rewrap, context(1))
    assert isinstance(rewrapped, NotificationChannelRewrapped)
    assert decode_event(encode_event(rewrapped)) == rewrapped
    assert (public_event(rewrapped).url, public_event(rewrapped).secret) == (REDACTED, REDACTED)
    after = NOTIFICATIONS.evolve(state, rewrapped)
    moved = after.channels["hook"]
    assert moved == msgspec.structs.replace(channel, url=rewrap.url, secret=rewrap.secret)
    assert moved.url is not None and moved.secret is not None
    retired = SecretBox(b"\x01" * 32)  # the old key gone: the new one alone opens them
    assert retired.open_text("acme", sealing_purpose("hook", "url"), moved.url) == url
    assert retired.open_text("acme", sealing_purpose("hook", "secret"), moved.secret) == secret

    [again] = NOTIFICATIONS.decide(after, msgspec.structs.replace(command, replace=True), context(2))
    redefined = NOTIFICATIONS.evolve(after, again)
    with pytest.raises(ChannelRedefined, match="defined again"):
        NOTIFICATIONS.decide(redefined, rewrap, context(3))
    assert NOTIFICATIONS.evolve(redefined, rewrapped) == redefined, "a stale re-wrap folds as nothing"


def test_check_channel_url_takes_http_and_https_with_a_host_only() -> None:
    assert check_channel_url("https://hooks.example.com/x?y=1") == "https://hooks.example.com/x?y=1"
    for bad in ("ftp://h/x", "https:///x", "mailto:a@b", "http://h:99999/x", "no url"):
        with pytest.raises(ValueError, match="channel URL"):
            check_channel_url(bad)


def test_a_channels_url_and_secret_never_leave_the_log() -> None:
    [event] = NOTIFICATIONS.decide(
        NOTIFICATIONS.initial,
        sealed(
            DefineNotificationChannel(name="hook", kind="webhook", url="https://h/x?token=t", secret="whsec_c2VjcmV0")
        ),
        context(),
    )
    assert isinstance(event, NotificationChannelDefined)
    shown = public_event(event)
    assert (shown.url, shown.secret) == (REDACTED, REDACTED)
    assert shown.name == "hook"


# --- matching ---------------------------------------------------------------------------------------


def task(queue: str = "q1", environment: str | None = "prod", workflow: str | None = "deploy") -> Task:
    submitted = SubmitTask(
        task_id="t1",
        task_type="deploy",
        queue=queue,
        environment=environment,
        workflow=None if workflow is None else WorkflowRef(name=workflow, version=1),
    )
    [event] = TASK.decide(None, submitted, context())
    state = TASK.evolve(None, event)
    assert state is not None
    return state


def _settings_with(defined: list[DefineNotificationRule]) -> NotificationSettings:
    state = NOTIFICATIONS.fold(
        NOTIFICATIONS.decide(
            NOTIFICATIONS.initial, DefineNotificationChannel(name=name, kind="email", smtp=SMTP), context()
        )[0]
        for name in CHANNELS
    )
    for command in defined:
        try:
            state = NOTIFICATIONS.fold(NOTIFICATIONS.decide(state, command, context()), state)
        except Rejected:
            continue
    return state


@given(
    st.lists(rules, max_size=6),
    st.sampled_from(TRIGGERS),
    st.sampled_from(QUEUES),
    st.sampled_from([None, *ENVIRONMENTS]),
    st.sampled_from([None, *WORKFLOWS]),
)
def test_exactly_the_rules_whose_trigger_and_every_filter_fit_match(
    defined: list[DefineNotificationRule],
    trigger: Any,
    queue: str,
    environment: str | None,
    workflow: str | None,
) -> None:
    settings = _settings_with(defined)
    what = Happening(trigger, task(queue, environment, workflow))
    expected = sorted(
        rule.id
        for rule in settings.rules.values()
        if trigger in rule.on
        and (rule.queue is None or rule.queue == queue)
        and (rule.environment is None or rule.environment == environment)
        and (rule.workflow is None or rule.workflow == workflow)
    )
    assert [rule.id for rule in matching_rules(settings, what)] == expected


@given(rules, st.sampled_from(TRIGGERS), st.sampled_from(QUEUES), st.sampled_from(ENVIRONMENTS))
def test_leaving_a_filter_out_never_matches_fewer_tasks(
    rule: DefineNotificationRule, trigger: Any, queue: str, environment: str
) -> None:
    what = Happening(trigger, task(queue, environment, "deploy"))
    narrow = _settings_with([rule])
    wider = _settings_with([msgspec.structs.replace(rule, queue=None, environment=None, workflow=None)])
    if matching_rules(narrow, what):
        assert matching_rules(wider, what)


@given(st.sampled_from(RULES), st.sampled_from(RULES), st.integers(1, 2**63 - 1), st.integers(1, 2**63 - 1))
def test_a_notification_id_is_the_same_for_one_rule_and_event_and_differs_otherwise(
    rule_a: str, rule_b: str, seq_a: int, seq_b: int
) -> None:
    a, b = notification_id("acme", rule_a, seq_a), notification_id("acme", rule_b, seq_b)
    assert a == notification_id("acme", rule_a, seq_a)
    assert (a == b) == ((rule_a, seq_a) == (rule_b, seq_b))
    assert notification_id("globex", rule_a, seq_a) != a, "another org's event is another notification"
    assert validate_token(a, "notification id") == a, "it names a subject"


# --- what happened, and what people read ---------------------------------------------------------


def awaiting(escalate_after: float | None = None, timeout: float | None = None) -> Task:
    """A task waiting for approval t1-1 (a plan as details), asked by worker w1."""
    state = task()
    for command in (
        ClaimTask(task_id="t1", worker_id="w1", lease_id="l1", queue="q1", capabilities=("workflow:deploy@v1",)),
        RequestApproval(
            task_id="t1",
            worker_id="w1",
            lease_id="l1",
            approval_id="t1-1",
            reason="deploy v2 to prod",
            approvers=("role:approver",),
            timeout_seconds=timeout,
            escalation=None if escalate_after is None else Escalation(escalate_after, ("key:oncall",)),
            details={"plan": "roll out 3 pods\nthen 10"},
        ),
    ):
        state = TASK.fold(TASK.decide(state, command, context(1)), state)
    assert state is not None
    return state


def test_a_submit_the_policy_gates_asks_for_approval_and_a_plain_submit_tells_nobody() -> None:
    decision = PolicyDecision(
        entrypoint="controlplane/submit",
        value={"allow": True, "require_approval": True, "reasons": ["prod needs a human"]},
        engine="regopy",
        bundle_digest="sha256:" + "0" * 64,
        input_digest="sha256:" + "1" * 64,
        duration_ms=1.0,
    )
    for policy, expected in ((decision, "approval_requested"), (None, None)):
        [submitted] = TASK.decide(None, SubmitTask(task_id="t1", task_type="deploy", policy=policy), context())
        what = happening(submitted, None, TASK.evolve(None, submitted))
        assert (what and what.trigger) == expected
    assert what is None or what.approval is not None


def test_a_timer_that_changed_nothing_is_nothing_to_tell() -> None:
    before = awaiting(escalate_after=60, timeout=600)
    escalated = ApprovalEscalated(at=START + timedelta(seconds=61), approval_id="t1-1", approvers=("key:oncall",))
    after = TASK.evolve(before, escalated)
    what = happening(escalated, before, after)
    assert what is not None and what.trigger == "approval_escalated"
    assert happening(escalated, after, TASK.evolve(after, escalated)) is None, "a second firing reminds nobody"
    timed_out = ApprovalTimedOut(at=START + timedelta(seconds=601), approval_id="t1-1")
    closed = TASK.evolve(after, timed_out)
    assert happening(timed_out, after, closed) is not None
    assert happening(timed_out, closed, TASK.evolve(closed, timed_out)) is None
    assert happening(escalated, closed, TASK.evolve(closed, escalated)) is None, "no reminder once it closed"


@given(st.text(min_size=1, max_size=400), st.sampled_from(["https://cp.example.com", "http://127.0.0.1:8080/"]))
def test_a_message_says_what_waits_for_whom_until_when_and_links_to_the_approval(plan: str, console: str) -> None:
    waiting = awaiting(timeout=600)
    approval = waiting.approvals[0]
    approval = msgspec.structs.replace(approval, details={"plan": plan})
    message = compose("acme", Happening("approval_requested", waiting, approval), console)
    base = console.rstrip("/")
    assert message.link == f"{base}/console/approvals#approval-t1-1"
    assert message.task_link == f"{base}/console/tasks/t1"
    text = "\n".join(message.lines)
    assert "deploy v2 to prod" in message.title and message.title.startswith("[acme] Approval requested")
    assert "Waits for: role:approver" in text
    assert "Until: 2026-01-01 00:10:01 UTC" in text
    assert "queue q1, environment prod, workflow deploy" in text
    assert f"Open: {message.link}" in text
    details = next(line for line in message.lines if line.startswith("Details: "))
    assert "\n" not in details and len(details) <= len("Details: ") + 300
    assert "\n" not in message.title and "\r" not in message.title


def test_a_reminder_names_who_it_was_escalated_to_and_a_failure_links_to_the_run() -> None:
    escalated = awaiting(escalate_after=60)
    reminder = compose("acme", Happening("approval_escalated", escalated, escalated.approvals[0]), "https://cp")
    assert reminder.title.startswith("[acme] Reminder") and "Escalated to: key:oncall" in reminder.lines
    failed = compose("acme", Happening("task_failed", msgspec.structs.replace(task(), error={"boom": 1})), "https://cp")
    assert failed.link == "https://cp/console/tasks/t1" and 'Error: {"boom":1}' in failed.lines


# --- one record per notification ------------------------------------------------------------------


def test_a_notification_is_recorded_once() -> None:
    record = RecordNotification(
        notification_id="n1",
        outcome="sent",
        rule_id="r1",
        channel="ops",
        kind="email",
        trigger="approval_requested",
        source_seq=7,
        source_type="ApprovalRequested",
        task_id="t1",
        approval_id="t1-1",
        message_id="<n1@acme.controlplane>",
    )
    [sent] = NOTIFICATION.decide(None, record, context())
    assert decode_event(encode_event(sent)) == sent
    state = NOTIFICATION.evolve(None, sent)
    for again in (record, msgspec.structs.replace(record, outcome="dead_lettered", error="refused")):
        with pytest.raises(AlreadyRecorded):
            NOTIFICATION.decide(state, again, context(1))
