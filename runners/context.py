"""The workflow context: the only way workflow code touches the world. Each call takes the next
position in the task's journal; while the journal holds that position the recorded result is
returned (replay), past its end the call runs once and is recorded. A call that does not match the
recorded one is non-determinism: nothing is guessed."""

from __future__ import annotations

import inspect
import json
import re
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, NoReturn

import msgspec

from core import telemetry
from core.domain.commands import SECRET_NAME_PATTERN
from core.domain.events import LlmSettings
from policies_wasm import input_digest
from runners.client import LeaseLost, TaskApi, Unavailable
from runners.llm import recorded_completion
from runners.operation_spans import record_wait, result_attributes
from runners.policies import Policies

TOOL_POLICY = "controlplane/tool"
_SECRET_NAME = re.compile(SECRET_NAME_PATTERN)


class ControlFlow(BaseException):
    """Raised by the context to stop the workflow's code where it stands. Not an error of the workflow:
    a ``BaseException``, so the workflow's own ``except Exception`` never catches it and runs on as if
    the call had happened (Restate and DBOS made their suspensions BaseExceptions for this reason).
    Only the runtime catches these."""


class Suspended(ControlFlow):
    """The workflow waits (a durable sleep, a human): the lease is released; a later claim replays."""


class NonDeterminism(ControlFlow):
    def __init__(self, index: int, expected: dict[str, Any], actual: dict[str, Any]) -> None:
        super().__init__(f"operation {index}: the journal holds {expected}, the code asked for {actual}")
        self.index, self.expected, self.actual = index, expected, actual


class Interrupted(ControlFlow):
    """The control plane could not record the workflow's next operation: the lease is lost (409), or the
    gateway stayed unavailable past the retry budget. The run stops without reporting anything; the
    task continues from its journal at a later claim."""

    def __init__(self, reason: LeaseLost | Unavailable) -> None:
        super().__init__(str(reason))
        self.reason = reason


_GONE = (LeaseLost, Unavailable)


class PolicyDenied(Exception):
    """A policy refused a call the workflow asked for (or a human refused the approval it required).
    The call did not happen; the task fails without retrying unless the workflow handles it."""

    def __init__(self, what: str, reasons: list[str]) -> None:
        super().__init__(f"{what} denied: {'; '.join(reasons) or 'no reason given'}")
        self.reasons = reasons


class QuestionDeclined(PolicyDenied):
    """The human a workflow asked (``ctx.ask``) rejected the question or let it time out: there is no
    answer. The task fails without retrying unless the workflow handles it."""

    def __init__(self, question: str, status: str, reasons: list[str]) -> None:
        Exception.__init__(self, f"question {question[:200]!r} was {status}: {'; '.join(reasons) or 'no reason given'}")
        self.question, self.status, self.reasons = question, status, reasons


QUESTION_FORM: dict[str, Any] = {
    "type": "object",
    "properties": {"answer": {"type": "string", "title": "Your answer", "minLength": 1}},
    "required": ["answer"],
}
"""What ``ctx.ask`` shows a human when the workflow gives no form: one required text answer."""
MAX_REASON_CHARS = 4096


class WorkflowContext:
    def __init__(
        self,
        api: TaskApi,
        task: dict[str, Any],
        lease_id: str,
        worker_id: str,
        *,
        policies: Policies | None = None,
        llm: LlmSettings | None = None,
    ) -> None:
        self._api = api
        self._policies = policies or Policies()
        self._llm = llm or LlmSettings()
        """The org's LLM settings for this worker (registration's ``config.llm``): they win over the workflow's."""
        self.task_id: str = task["id"]
        workflow = task.get("workflow") or {}
        self.scope: dict[str, Any] = {"org": task["org"], "queue": task["queue"], "task_type": task["type"]}
        """What every policy input says about where the call comes from."""
        if workflow.get("name"):
            self.scope["workflow"] = workflow["name"]
        self._policy_pin: dict[str, Any] | None = task.get("policy")
        self._journal: list[dict[str, Any]] = task["journal"]
        self._approvals = {a["id"]: a for a in task["approvals"]}
        self._lease = {"worker_id": worker_id, "lease_id": lease_id}
        self._position = 0

    @property
    def replaying(self) -> bool:
        return self._position < len(self._journal)

    async def step(self, name: str, fn: Callable[..., Any], *args: Any, tool: str | None = None) -> Any:
        """Run ``fn(*args, idempotency_key=...)`` once; its result is recorded and replayed. The key is
        stable for this position, so an external system can drop a repeat after a crash. A step that
        uses a ``tool`` runs only if the tool policy allows it, after a human approved if it says so."""
        if tool is not None:
            await self._permitted(f"tool {tool}", {"tool": tool})

        async def run(index: int) -> Any:
            result = fn(*args, idempotency_key=f"{self.task_id}:{index}")
            return await result if inspect.isawaitable(result) else result

        return await self._operation("step", name, run)

    async def llm(self, name: str, *, model: str, messages: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
        """A LiteLLM completion (its own retries and fallbacks apply). The request, response, token
        usage and cost are recorded; a replay returns the recording and never calls the model again.
        The org's LLM settings apply first: its ``model_override`` replaces ``model``, its ``api_base`` and
        ``fallbacks`` replace those options; the request recorded is the one made (with the workflow's
        model as ``workflow_model`` when overridden). The tool policy is asked first whether the model
        used may be called (and whether a human must agree)."""
        used = self._llm.model_override or model
        if self._llm.api_base is not None:
            options = {**options, "api_base": self._llm.api_base}
        if self._llm.fallbacks is not None:
            options = {**options, "fallbacks": list(self._llm.fallbacks)}
        await self._permitted(f"model {used}", {"model": used})

        async def call(index: int) -> dict[str, Any]:
            return await recorded_completion(used, messages, options, workflow_model=model)

        return await self._operation("llm", name, call)  # type: ignore[no-any-return]

    async def policy(self, path: str, input: dict[str, Any]) -> Any:
        """The decision of policy entrypoint ``path`` on ``input`` (with ``scope`` added), recorded as a
        ``PolicyDecided`` event: a replay returns it, never re-deciding under a newer bundle."""

        asked = {**self.scope, **input}

        async def decide(index: int) -> dict[str, Any]:
            try:
                decision = await self._policies.evaluate(
                    path, asked, org=self.scope["org"], pinned=self._policy_pin, api=self._api
                )
            except _GONE as exc:  # fetching the task's bundle failed: not the policy's answer
                raise Interrupted(exc) from exc
            return msgspec.to_builtins(decision)  # type: ignore[no-any-return]

        decision = await self._operation("policy", path, decide)
        self._answered(path, asked, decision)
        return decision["value"]

    def _answered(self, path: str, asked: dict[str, Any], decision: dict[str, Any]) -> None:
        """A recorded decision answers only the input it was made for: asked with another one (the
        code computes it differently now), the replay has diverged, whatever the old answer was."""
        digest = input_digest(asked)
        if decision["input_digest"] != digest:
            self._diverged(
                self._position - 1,
                {"kind": "policy", "name": path, "input_digest": decision["input_digest"]},
                {"kind": "policy", "name": path, "input_digest": digest},
            )

    async def _permitted(self, what: str, call: dict[str, Any]) -> None:
        verdict = await self.policy(TOOL_POLICY, call)
        if not verdict.get("allow", False):
            raise PolicyDenied(what, verdict.get("reasons", []))
        if verdict.get("require_approval", False):
            reasons = verdict.get("reasons", [])
            approval = await self.request_approval(
                f"{what}: {'; '.join(reasons)}", details={**call, "policy_reasons": reasons}
            )
            if approval["status"] != "approved":
                raise PolicyDenied(what, [f"the approval it required was {approval['status']}"])

    async def secret(self, name: str) -> str:
        """The value of the org's secret ``name`` for this task (its environment's own version, else the
        org-wide one). Never journaled: the value is not written to the log, so a replay reads it again
        (the task's first read pinned the version, so it gets the same one even after a rotation). Each
        read is audited on the task (``SecretRead``). Keep the value out of step names, results, model
        messages and logs: what they hold is recorded."""
        if not _SECRET_NAME.fullmatch(name):
            raise ValueError(f"secret name {name[:64]!r} must match {SECRET_NAME_PATTERN}")
        try:
            answer = await self._api.secret(self.task_id, name, self._lease)
        except _GONE as exc:
            raise Interrupted(exc) from exc
        value: str = answer["value"]
        return value

    async def now(self) -> datetime:
        async def read(index: int) -> str:
            return datetime.now(UTC).isoformat()

        return datetime.fromisoformat(await self._operation("now", "now", read))

    async def uuid(self) -> str:
        async def draw(index: int) -> str:
            return str(uuid.uuid4())

        return await self._operation("uuid", "uuid", draw)  # type: ignore[no-any-return]

    async def sleep(self, seconds: float) -> None:
        index = self._next("sleep", "sleep")
        if index is None:
            return  # slept already: the claim that brought us here came after the wake-up time
        await self._record("sleep", {**self._lease, "index": index, "seconds": seconds})
        raise Suspended(f"sleeping {seconds} s")

    async def wait_for_signal(self, name: str, timeout_seconds: float | None = None) -> dict[str, Any] | None:
        """Wait for the signal ``name`` (sent with ``POST /v1/tasks/{id}/signals``) and return it as
        ``{name, payload, by, at}``, or None when ``timeout_seconds`` passed first. A signal sent before
        the workflow got here was kept and is taken at once; signals of a name are delivered in the
        order sent, each once. Otherwise the lease is released and no runner claims the task until the
        signal or the timeout comes; the claim after that replays to here and returns it."""
        index = self._next("signal", name)
        if index is None:
            return self._journal[self._position - 1]["result"]  # type: ignore[no-any-return]
        body = {**self._lease, "index": index, "name": name, "timeout_seconds": timeout_seconds}
        answer = await self._record("signal-waits", body)
        if answer.get("waiting", True):
            raise Suspended(f"waiting for signal {name!r}")
        signal: dict[str, Any] = answer["signal"]
        self._journal.append({"index": index, "kind": "signal", "name": name, "result": signal})
        self._position += 1
        return signal

    async def ask(
        self,
        question: str,
        form: dict[str, Any] | None = None,
        timeout_seconds: float | None = None,
        approvers: tuple[str, ...] = ("role:approver",),
    ) -> Any:
        """Ask a human ``question`` and return the answer: an approval labelled as a question in the
        console inbox, whose ``details`` carry the question. With a ``form`` (a JSON Schema) the answer
        is the response that fits it; without one the human types a text and that string is returned.
        Raises :class:`QuestionDeclined` if the human rejects the question or it times out."""
        reason = question if len(question) <= MAX_REASON_CHARS else question[: MAX_REASON_CHARS - 1] + "…"
        approval = await self._ask_humans(
            reason,
            approvers=approvers,
            quorum=1,
            timeout_seconds=timeout_seconds,
            escalation=None,
            details={"question": question},
            form=QUESTION_FORM if form is None else form,
            kind="question",
        )
        if approval["status"] != "approved":
            reasons = [d["comment"] for d in approval["decisions"] if d["decision"] == "reject" and d["comment"]]
            raise QuestionDeclined(question, approval["status"], reasons)
        response = [d["response"] for d in approval["decisions"] if d["decision"] == "approve"][-1]
        return response["answer"] if form is None else response

    async def request_approval(
        self,
        reason: str,
        *,
        approvers: tuple[str, ...] = ("role:approver",),
        quorum: int = 1,
        timeout_seconds: float | None = None,
        escalate_after_seconds: float | None = None,
        escalate_to: tuple[str, ...] = ("role:admin",),
        details: Any = None,
        form: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Park until humans decide; returns the approval (``status`` approved, rejected or timed_out;
        ``decisions``, each with its ``response``). ``details`` is what they approve (the plan, the tool
        call and its arguments: JSON, ≤ 64 KiB); ``form`` a JSON Schema every ``response`` must fit.
        ``escalate_after_seconds``: if still undecided then, ``escalate_to`` may decide too."""
        escalation = (
            None
            if escalate_after_seconds is None
            else {"after_seconds": escalate_after_seconds, "approvers": list(escalate_to)}
        )
        return await self._ask_humans(
            reason,
            approvers=approvers,
            quorum=quorum,
            timeout_seconds=timeout_seconds,
            escalation=escalation,
            details=details,
            form=form,
            kind="approval",
        )

    async def _ask_humans(
        self,
        reason: str,
        *,
        approvers: tuple[str, ...],
        quorum: int,
        timeout_seconds: float | None,
        escalation: dict[str, Any] | None,
        details: Any,
        form: dict[str, Any] | None,
        kind: str,
    ) -> dict[str, Any]:
        index = self._next("approval", "approval")
        if index is None:
            approval = self._approvals[self._journal[self._position - 1]["result"]]
            self._asked_as_recorded(self._position - 1, approval, details, form)
            if approval["status"] == "pending":
                raise Suspended("still waiting for a decision")
            if self._position == len(self._journal):  # this claim resumes the workflow from the decision
                record_wait(approval)
            return approval
        body = {
            **self._lease,
            "reason": reason,
            "approvers": list(approvers),
            "quorum": quorum,
            "timeout_seconds": timeout_seconds,
            "journal_index": index,
            "details": details,
            "form": form,
            "escalation": escalation,
            "kind": kind,
        }
        attributes = {
            "cp.approval.approvers": ",".join(approvers),
            "cp.approval.quorum": quorum,
            "cp.operation.index": index,
        }
        with telemetry.span(f"{kind} request", attributes):
            await self._record("approval-requests", body)
        raise Suspended("waiting for a human")

    def _asked_as_recorded(self, index: int, approval: dict[str, Any], details: Any, form: Any) -> None:
        """The humans decided on the details and form they were shown: a replay asking with others (the
        code computes them differently now) has diverged. An approval recorded with neither (by code
        older than them) answers whatever is asked."""
        recorded = {"details": approval.get("details"), "form": approval.get("form")}
        if recorded == {"details": None, "form": None}:
            return
        asked = json.loads(json.dumps({"details": details, "form": form}))  # as the request carried them
        if asked != recorded:
            self._diverged(
                index,
                {"kind": "approval", "name": "approval", "request_digest": input_digest(recorded)},
                {"kind": "approval", "name": "approval", "request_digest": input_digest(asked)},
            )

    async def _operation(self, kind: str, name: str, run: Callable[[int], Awaitable[Any]]) -> Any:
        index = self._next(kind, name)
        if index is None:
            return self._journal[self._position - 1]["result"]
        # A span only for an operation that runs now: a replayed one did its work in an earlier claim's span.
        attributes = {"cp.operation.kind": kind, "cp.operation.name": name, "cp.operation.index": index}
        with telemetry.span(f"{kind} {name}", attributes) as span:
            result = await run(index)
            telemetry.set_attributes(span, result_attributes(kind, result))
            await self._record(
                "operations", {**self._lease, "index": index, "kind": kind, "name": name, "result": result}
            )
        self._journal.append({"index": index, "kind": kind, "name": name, "result": result})
        self._position += 1
        return result

    async def _record(self, action: str, body: dict[str, Any]) -> dict[str, Any]:
        """A lease-bound call for the workflow, and its answer; one that cannot be made stops the
        workflow's code."""
        try:
            return await self._api.lease_call(self.task_id, action, body)
        except _GONE as exc:
            raise Interrupted(exc) from exc

    def _diverged(self, index: int, expected: dict[str, Any], actual: dict[str, Any]) -> NoReturn:
        raise NonDeterminism(index, expected, actual)

    def _next(self, kind: str, name: str) -> int | None:
        """None when replaying this position (after checking it matches), else the index to record at."""
        index = self._position
        if index < len(self._journal):
            entry = self._journal[index]
            if (entry["kind"], entry["name"]) != (kind, name):
                self._diverged(index, {"kind": entry["kind"], "name": entry["name"]}, {"kind": kind, "name": name})
            self._position += 1
            return None
        return index
