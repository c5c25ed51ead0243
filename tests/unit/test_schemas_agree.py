"""A request body and the command it becomes declare each shared field's constraints once: for every body
that converts into a command, each field present in both accepts exactly the same values (the same JSON
Schema), so HTTP input and commands from any other entry point cannot drift apart."""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any

import msgspec
import pytest

from application import bodies
from core.domain import commands

COMMAND_OF: dict[type[msgspec.Struct], type[commands.Command]] = {
    bodies.SubmitTaskBody: commands.SubmitTask,
    bodies.ClaimBody: commands.ClaimTask,
    bodies.ClaimBatchBody: commands.ClaimTask,
    bodies.HeartbeatBody: commands.HeartbeatTask,
    bodies.ApprovalRequestBody: commands.RequestApproval,
    bodies.OperationBody: commands.RecordOperation,
    bodies.SleepBody: commands.StartSleep,
    bodies.SignalWaitBody: commands.WaitForSignal,
    bodies.SignalBody: commands.SignalTask,
    bodies.NonDeterminismBody: commands.ReportNonDeterminism,
    bodies.NoBody: commands.ResumeTask,
    bodies.CompleteBody: commands.CompleteTask,
    bodies.FailBody: commands.FailTask,
    bodies.CancelBody: commands.CancelTask,
    bodies.ApproveBody: commands.DecideApproval,
    bodies.RejectBody: commands.DecideApproval,
    bodies.WorkerHeartbeatBody: commands.HeartbeatWorker,
    bodies.CreateApiKeyBody: commands.CreateApiKey,
    bodies.SecretBody: commands.SetSecret,
    bodies.SecretReadBody: commands.ReadSecret,
    bodies.WorkerConfigBody: commands.SetWorkerConfig,
    bodies.QueueSettingsBody: commands.ConfigureQueue,
    bodies.BreakerSettings: commands.ConfigureQueue,
    bodies.EnvironmentBody: commands.DefineEnvironment,
    bodies.EnvironmentReplaceBody: commands.DefineEnvironment,
    bodies.PolicyBundleBody: commands.PushPolicyBundle,
    bodies.ScheduleBody: commands.CreateSchedule,
    bodies.NotificationChannelReplaceBody: commands.DefineNotificationChannel,
    bodies.NotificationChannelBody: commands.DefineNotificationChannel,
    bodies.NotificationRuleBody: commands.DefineNotificationRule,
}
NO_COMMAND = {
    bodies.LeaseBody: "the lease fields every lease-bound body starts with",
    bodies.WorkflowBody: "a submit names a workflow; the command carries the version the server pinned",
}
RENAMED = {
    (bodies.SubmitTaskBody, "type"): "task_type",
    (bodies.BreakerSettings, "failures"): "breaker_failures",
    (bodies.BreakerSettings, "cooldown_seconds"): "breaker_cooldown_seconds",
    (bodies.ScheduleBody, "id"): "schedule_id",
    (bodies.NotificationRuleBody, "id"): "rule_id",
}
DIFFERENT_BY_DESIGN = {
    (bodies.SubmitTaskBody, "workflow"): "a name and maybe a version; the command holds the pinned WorkflowRef",
    (bodies.ScheduleBody, "task"): "a submit body, checked; the command keeps it as the plain document to submit",
}


def test_every_body_is_known_to_convert_into_a_command_or_not() -> None:
    declared = {
        kind
        for _, kind in inspect.getmembers(bodies, inspect.isclass)
        if issubclass(kind, msgspec.Struct) and kind.__module__ == bodies.__name__
    }
    assert declared == set(COMMAND_OF) | set(NO_COMMAND)


@pytest.mark.parametrize("body", list(COMMAND_OF), ids=lambda body: body.__name__)
def test_a_body_field_accepts_what_its_command_field_accepts(body: type[msgspec.Struct]) -> None:
    command = COMMAND_OF[body]
    command_types = typing.get_type_hints(command, include_extras=True)
    disagreeing = {}
    for name, body_type in typing.get_type_hints(body, include_extras=True).items():
        command_name = RENAMED.get((body, name), name)
        if command_name not in command_types or (body, name) in DIFFERENT_BY_DESIGN:
            continue
        body_schema, command_schema = _value_schemas(body_type, command_types[command_name])
        if body_schema != command_schema:
            disagreeing[name] = {"body": body_schema, "command": command_schema}
    assert disagreeing == {}


def test_renamed_and_different_fields_name_fields_that_exist() -> None:
    for body, name in (*RENAMED, *DIFFERENT_BY_DESIGN):
        assert name in body.__struct_fields__, (body.__name__, name)
    for (body, _), command_name in RENAMED.items():
        assert command_name in COMMAND_OF[body].__struct_fields__, (body.__name__, command_name)


def _value_schemas(body_type: Any, command_type: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The JSON Schemas of the values both sides accept. Whether a field may be null is each side's own
    (a body may leave to the server what the command must be told), so a ``| None`` on one side only is
    set aside; the constraints on the values are not."""
    body_optional, command_optional = _is_optional(body_type), _is_optional(command_type)
    if body_optional != command_optional:
        body_type, command_type = _without_none(body_type), _without_none(command_type)
    return msgspec.json.schema(body_type), msgspec.json.schema(command_type)


def _is_optional(kind: Any) -> bool:
    return typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind)


def _without_none(kind: Any) -> Any:
    if not _is_optional(kind):
        return kind
    rest = [arg for arg in typing.get_args(kind) if arg is not type(None)]
    return rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]  # noqa: UP007 (built from a list)
