"""Re-execute recorded workflow histories against the current code, without side effects.

Each task's workflow function runs from the start on a context that answers every operation from
the task's journal, exactly as a runner's replay does. Nothing may run for real: asking for an
operation past the end of the journal raises :class:`JournalExhausted` instead of running a step,
calling a model or starting a wait, and the context's API refuses every call, so nothing can be
written. The result is classified:

* **ok**: the code consumed the whole journal and then, for a completed task, returned the recorded
  result; or stopped at the approval the task is waiting for; or asked for the next operation while
  the task is still pending, running or awaiting approval (a runner would continue there); or, for a
  task that failed, was cancelled or timed out, behaved as recorded up to where the run ended.
* **divergence**: the code asked for another operation than the journal holds (both sides are
  reported); a completed task's code asks for more operations or returns another result; the code
  finished (returned, raised or waited) before consuming the whole journal; it raised where the
  recorded run did not; it did not finish within the time limit; it tried a side effect; it asked a
  policy with another input than the recorded decision was made for; or (given the bundles) the
  bundle that recorded a policy decision decides that input otherwise today (an engine change).
* **skipped**: the task has no workflow, or its workflow is not one this code hosts.

Workflow code that reaches the world without the context (a clock, an HTTP call) escapes these
guards, as it escapes replay in production: that is a bug in the workflow."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, Literal, NoReturn

import msgspec

from policies_wasm import Bundle, EngineCache, PolicyError
from runners.client import TaskApi
from runners.context import NonDeterminism, Suspended, WorkflowContext
from runners.registry import Registry

SECRET_STAND_IN = "[secret {name}]"
"""What ``ctx.secret(name)`` returns during verification."""
ACTIVE_STATUSES = frozenset({"pending", "running", "awaiting_approval"})
DEFAULT_TIMEOUT_SECONDS = 10.0

Outcome = Literal["ok", "divergence", "skipped"]


class JournalExhausted(Exception):
    """The code asked for operation ``index`` (``kind`` ``name``) and the journal ends before it."""

    def __init__(self, kind: str, name: str, index: int) -> None:
        super().__init__(f"operation {index} ({kind} {name!r}) is past the end of the journal")
        self.kind, self.name, self.index = kind, name, index

    @property
    def asked(self) -> dict[str, Any]:
        return {"index": self.index, "kind": self.kind, "name": self.name}


class SideEffectRefused(RuntimeError):
    """Verification never writes: the workflow context tried to call the control plane."""


class _RefusingApi(TaskApi):
    """A TaskApi with no connection behind it: every call raises."""

    def __init__(self) -> None:  # no HTTP client on purpose: there is nothing to send requests with
        pass

    async def close(self) -> None:
        return None

    async def claim(self, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        raise SideEffectRefused("verification tried to claim a task")

    async def lease_call(self, task_id: str, action: str, body: dict[str, Any]) -> dict[str, Any]:
        raise SideEffectRefused(f"verification tried to record {action!r} on task {task_id}")

    async def policy_bundle(self, version: int) -> dict[str, Any]:
        raise SideEffectRefused(f"verification tried to decide a policy anew (bundle version {version})")

    async def _call(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        raise SideEffectRefused(f"verification tried {method} {path}")


class ReplayOnlyContext(WorkflowContext):
    """Answers from the journal only. Remembers the first mismatch and the first operation asked past
    the journal, so a workflow that catches the exception (``except Exception``) cannot hide it."""

    def __init__(self, task: dict[str, Any]) -> None:
        super().__init__(_RefusingApi(), task, lease_id="verify", worker_id="verify")
        self.mismatch: NonDeterminism | None = None
        self.exhausted: JournalExhausted | None = None
        self.policy_calls: list[PolicyCall] = []

    @property
    def replayed(self) -> int:
        """Journal positions the code has consumed so far."""
        return self._position

    def _diverged(self, index: int, expected: dict[str, Any], actual: dict[str, Any]) -> NoReturn:
        try:
            super()._diverged(index, expected, actual)
        except NonDeterminism as exc:
            self.mismatch = self.mismatch or exc
            raise

    async def secret(self, name: str) -> str:
        """A stand-in, not the value: verification holds no worker key and writes nothing (a read is an
        audited event), and a secret read is no journal operation, so there is nothing to compare. Code
        that branches on a secret's value escapes verification, as it would escape any replay check."""
        return SECRET_STAND_IN.format(name=name)

    def _answered(self, path: str, asked: dict[str, Any], decision: dict[str, Any]) -> None:
        super()._answered(path, asked, decision)
        self.policy_calls.append(PolicyCall(self._position - 1, path, asked, decision))

    def _next(self, kind: str, name: str) -> int | None:
        index = super()._next(kind, name)
        if index is None:
            return None
        self.exhausted = self.exhausted or JournalExhausted(kind, name, index)
        raise self.exhausted


class PolicyCall(msgspec.Struct, frozen=True):
    """A policy decision the replay was answered with, and the input the code asked it for."""

    index: int
    path: str
    input: dict[str, Any]
    recorded: dict[str, Any]


class SameBundles:
    """The bundles recorded decisions name, by digest, to decide their inputs again: does the engine
    in use today decide as the one that recorded them did?"""

    def __init__(self, bundles: Iterable[Bundle]) -> None:
        self._bundles = {bundle.digest: bundle for bundle in bundles}
        self._engines = EngineCache()

    async def recheck(self, calls: Iterable[PolicyCall]) -> tuple[PolicyCall | None, Any, int]:
        """The first call the same bundle now decides otherwise (and its new value), and how many calls
        could not be re-checked because their bundle is not known here."""
        unknown = 0
        for call in calls:
            bundle = self._bundles.get(call.recorded["bundle_digest"])
            if bundle is None:
                unknown += 1
                continue
            try:
                value = (await self._engines.engine(bundle)).evaluate(call.path, call.input).value
            except PolicyError as exc:
                return call, {"error": f"{type(exc).__name__}: {exc}"}, unknown
            if value != call.recorded["value"]:
                return call, value, unknown
        return None, None, unknown


class Verification(msgspec.Struct, frozen=True):
    task_id: str
    workflow: str | None
    status: str
    outcome: Outcome
    reason: str
    replayed: int = 0
    journal: int = 0
    recorded: Any = None
    """The log's side of a divergence."""
    code: Any = None
    """The code's side of a divergence."""


class _Returned(msgspec.Struct, frozen=True):
    value: Any


class _Waiting(msgspec.Struct, frozen=True):
    why: str


class _Raised(msgspec.Struct, frozen=True):
    error: dict[str, str]


class _TimedOut(msgspec.Struct, frozen=True):
    seconds: float


Ended = _Returned | _Waiting | _Raised | _TimedOut


async def verify_task(
    task: dict[str, Any],
    registry: Registry,
    *,
    time_limit: float = DEFAULT_TIMEOUT_SECONDS,
    bundles: SameBundles | None = None,
) -> Verification:
    """Replay ``task`` (the API's task object, as a runner receives it) on the workflow ``registry``
    holds for it, and classify what the code did. With ``bundles``, every policy decision the replay
    was answered with is also decided again by the bundle that recorded it."""
    ref = task.get("workflow")
    base = {"task_id": task["id"], "status": task["status"], "journal": len(task["journal"])}
    if ref is None:
        return Verification(**base, workflow=None, outcome="skipped", reason="not a workflow task")
    label = ref["name"] if ref.get("version") is None else f"{ref['name']}@v{ref['version']}"
    found = registry.find(ref["name"], ref.get("version"))
    if found is None:
        if registry.find(ref["name"], None) is not None and task["status"] in ACTIVE_STATUSES:
            return Verification(
                **base,
                workflow=label,
                outcome="divergence",
                reason=f"the task is pinned to {label}, which this code no longer hosts: no runner could continue it",
            )
        return Verification(**base, workflow=label, outcome="skipped", reason=f"{label} is not hosted by this code")
    context = ReplayOnlyContext(task)
    ended = await _run(found.fn, context, task["payload"], time_limit)
    outcome, reason, recorded, code = _classify(task, context, ended)
    if outcome == "ok" and bundles is not None:
        outcome, reason, recorded, code = await _rechecked(context.policy_calls, bundles, reason)
    if outcome == "ok" and task.get("parked"):
        reason += f"; the task is parked ({task['parked']}): `controlplane tasks resume` lets a runner continue it"
    return Verification(
        **base,
        workflow=label,
        outcome=outcome,
        reason=reason,
        replayed=context.replayed,
        recorded=recorded,
        code=code,
    )


async def _run(fn: Any, context: ReplayOnlyContext, payload: Any, time_limit: float) -> Ended:
    deadline = asyncio.timeout(time_limit)
    try:
        async with deadline:
            return _Returned(await fn(context, payload))
    except Suspended as exc:
        return _Waiting(str(exc))
    except (Exception, NonDeterminism) as exc:  # the workflow's own error, or our guards (recorded on the context)
        if isinstance(exc, TimeoutError) and deadline.expired():
            return _TimedOut(time_limit)
        return _Raised({"type": type(exc).__name__, "message": str(exc)})


Classified = tuple[Outcome, str, Any, Any]


def _classify(task: dict[str, Any], context: ReplayOnlyContext, ended: Ended) -> Classified:
    status, journal = task["status"], task["journal"]
    length, replayed = len(journal), context.replayed
    if context.mismatch is not None:
        found = context.mismatch
        return (
            "divergence",
            f"operation {found.index}: the journal holds {_op(found.expected)}, the code asks for {_op(found.actual)}",
            found.expected,
            found.actual,
        )
    if context.exhausted is not None:
        return _asked_past_journal(task, context.exhausted)
    if isinstance(ended, _TimedOut):
        return (
            "divergence",
            f"the replay did not finish within {ended.seconds:g} s: does the workflow wait on something "
            "outside its context?",
            None,
            None,
        )
    if isinstance(ended, _Raised) and ended.error["type"] == SideEffectRefused.__name__:
        return "divergence", f"the code tried a side effect during replay: {ended.error['message']}", None, ended.error
    if replayed < length:
        return (
            "divergence",
            f"the code {_verb(ended)} after {replayed} of the {length} recorded operations",
            journal[replayed],
            _code_side(ended),
        )
    match ended:
        case _Waiting():
            if status == "completed":
                return "divergence", f"the recorded run completed; the code waits ({ended.why})", task["result"], None
            return "ok", f"waits where the task waits ({ended.why}) after replaying {length} operations", None, None
        case _Returned():
            return _returned(task, ended.value)
        case _Raised():
            return _raised(task, ended.error)
    raise AssertionError(f"unexpected end {ended!r}")


async def _rechecked(calls: list[PolicyCall], bundles: SameBundles, reason: str) -> Classified:
    changed, now, unknown = await bundles.recheck(calls)
    if changed is not None:
        return (
            "divergence",
            f"operation {changed.index}: policy {changed.path}, decided again by the bundle that recorded it "
            f"({changed.recorded['bundle_digest']}), no longer gives the recorded answer",
            changed.recorded["value"],
            now,
        )
    if calls:
        checked = len(calls) - unknown
        reason += f"; {checked} of {len(calls)} policy decision(s) decided again by their own bundle, unchanged"
        if unknown:
            reason += f" ({unknown} name a bundle not known here)"
    return "ok", reason, None, None


def _asked_past_journal(task: dict[str, Any], asked: JournalExhausted) -> Classified:
    status, length = task["status"], len(task["journal"])
    next_op = f"{asked.kind} {asked.name!r}"
    if status == "completed":
        return (
            "divergence",
            f"the recorded run completed after {length} operations; the code asks for operation {asked.index} "
            f"({next_op})",
            {"result": task["result"]},
            asked.asked,
        )
    if status in ACTIVE_STATUSES:
        return "ok", f"replays all {length} operations; a runner would continue with {next_op}", None, None
    return (
        "ok",
        f"replays all {length} operations of a run that ended {status}; the code goes on to {next_op}",
        None,
        None,
    )


def _returned(task: dict[str, Any], value: Any) -> Classified:
    try:
        result = msgspec.json.decode(msgspec.json.encode(value))
    except (TypeError, msgspec.EncodeError) as exc:
        return "divergence", f"the code returns a result that is not JSON: {exc}", task["result"], repr(value)
    status = task["status"]
    if status == "completed":
        if result == task["result"]:
            return "ok", f"replays all {len(task['journal'])} operations and returns the recorded result", None, None
        return "divergence", "the code returns another result than the recorded one", task["result"], result
    if status in ACTIVE_STATUSES:
        return "ok", "replays the whole journal; a runner would complete the task now", None, None
    return "ok", f"replays the whole journal of a run that ended {status}; the code returns a result", None, None


def _raised(task: dict[str, Any], error: dict[str, str]) -> Classified:
    status = task["status"]
    if task["error"] == error:
        return "ok", f"raises the recorded error ({error['type']})", None, None
    if status == "completed" or status in ACTIVE_STATUSES or status == "failed":
        recorded = {"result": task["result"]} if status == "completed" else {"error": task["error"]}
        return "divergence", f"the code raises {error['type']}: {error['message']}", recorded, error
    return "ok", f"the recorded run ended {status}; the code raises {error['type']} at its end", None, None


def _op(side: Any) -> str:
    if isinstance(side, dict) and {"kind", "name"} <= side.keys():
        return f"{side['kind']} {side['name']!r}"
    return repr(side)


def _verb(ended: Ended) -> str:
    match ended:
        case _Returned():
            return "returned"
        case _Waiting():
            return f"waits ({ended.why})"
        case _Raised():
            return f"raised {ended.error['type']}: {ended.error['message']}"
    return "stopped"


def _code_side(ended: Ended) -> Any:
    match ended:
        case _Returned():
            return {"returned": ended.value}
        case _Waiting():
            return {"waits": ended.why}
        case _Raised():
            return {"raised": ended.error}
    return None
