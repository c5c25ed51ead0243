"""Submitting a task, the one path for the API, the console and schedules: route it by the org's
environments (the server's answer, never the submitter's word), ask the submit policy, pin its
workflow to the newest version a live runner hosts, append. A denial is recorded too: its outcome holds
no task."""

from __future__ import annotations

from dataclasses import dataclass

from application.bodies import SubmitTaskBody, WorkflowBody
from application.environments import EnvironmentDirectory
from application.errors import PolicyUnavailable
from application.policy import SubmitGate
from application.principal import require
from core.domain.commands import Actor, SubmitTask
from core.domain.errors import InvalidCommand
from core.domain.events import PolicyDecision, TaskSubmissionDenied, WorkflowRef
from core.domain.task import hosted_workflow_versions, workflow_capability
from core.log.handler import CommandHandler, Outcome
from policies_wasm import PolicyError
from projections.read import DATABASE_UNAVAILABLE, ReadModel

DEFAULT_QUEUE = "default"


@dataclass(frozen=True)
class SubmitPath:
    """Submitting a task: route it by the org's environments, ask the submit policy, pin its workflow
    (from the read model), append it to the log."""

    handler: CommandHandler
    gate: SubmitGate
    environments: EnvironmentDirectory
    read_model: ReadModel

    async def submit(
        self, org: str, spec: SubmitTaskBody, *, task_id: str, actor: Actor, command_id: str | None
    ) -> Outcome:
        """Submit ``spec`` as task ``task_id`` for ``actor`` (who must be allowed to submit). Raises
        ``InvalidCommand`` when it cannot be routed, ``PolicyUnavailable`` when the policy cannot
        decide, and the handler's ``Rejected`` (``AlreadyExists``: the task id is taken by another
        submission); a denial is an outcome whose state is None (:func:`denial_reasons` says why)."""
        command = await self.prepare(org, spec, task_id=task_id, actor=actor)
        return await self.handler.handle(org, command, actor=actor, command_id=command_id)

    async def prepare(self, org: str, spec: SubmitTaskBody, *, task_id: str, actor: Actor) -> SubmitTask:
        """The submit command for ``spec``, routed, decided by the submit policy (``command.policy``
        says whether it allows) and pinned, not yet appended: for a caller that records what it will
        submit before it does (a schedule's run). Raises as :meth:`submit` does before appending."""
        require(actor, "submit")
        queue, environment = await route(self.environments, org, spec)
        decision, policy_version = await _decide(self.gate, org, spec, queue, environment)
        return SubmitTask(
            task_id=task_id,
            task_type=spec.type,
            payload=spec.payload,
            queue=queue,
            priority=spec.priority,
            required_capabilities=spec.required_capabilities,
            max_retries=spec.max_retries,
            timeout_seconds=spec.timeout_seconds,
            retry_backoff_seconds=spec.retry_backoff_seconds,
            metadata=spec.metadata,
            workflow=None
            if spec.workflow is None
            else await _pinned_workflow(self.read_model, org, spec.workflow, queue),
            policy=decision,
            policy_version=policy_version,
            environment=environment,
            excluded_workers=spec.excluded_workers,
        )


def denial_reasons(outcome: Outcome) -> list[str]:
    """Why the submit policy denied a submission whose outcome holds no task."""
    denied = outcome.events[0].event
    return denied.decision.reasons if isinstance(denied, TaskSubmissionDenied) else []


async def route(environments: EnvironmentDirectory, org: str, spec: SubmitTaskBody) -> tuple[str, str | None]:
    """The task's queue and that queue's environment, from the org's environments as the log holds them
    now. A submit naming an environment and no queue goes to the environment's first queue; naming
    both, the queue must be one of the environment's. The submitter's metadata plays no part. Raises
    ``InvalidCommand`` for a submission that cannot be routed."""
    defined, _ = await environments.current(org)
    if spec.environment is None:
        queue = spec.queue or DEFAULT_QUEUE
        holder = defined.of_queue(queue)
        return queue, None if holder is None else holder.name
    named = defined.get(spec.environment)
    if named is None:
        raise InvalidCommand(
            f"environment {spec.environment} is not defined in this org; GET /v1/environments lists them, "
            "or name a queue instead"
        )
    if spec.queue is None:
        if not named.queues:
            raise InvalidCommand(
                f"environment {named.name} holds no queue to submit to; name a queue, or give the environment one "
                f"(PUT /v1/environments/{named.name})"
            )
        return named.queues[0], named.name
    if spec.queue not in named.queues:
        raise InvalidCommand(
            f"queue {spec.queue} is not in environment {named.name} (its queues: "
            f"{', '.join(named.queues) or 'none'}); name one of those, or leave queue out"
        )
    return spec.queue, named.name


async def _decide(
    gate: SubmitGate, org: str, spec: SubmitTaskBody, queue: str, environment: str | None
) -> tuple[PolicyDecision, int | None]:
    try:
        return await gate.decide(
            org,
            task_type=spec.type,
            payload=spec.payload,
            metadata=spec.metadata,
            workflow=None if spec.workflow is None else spec.workflow.name,
            queue=queue,
            environment=environment,
        )
    except PolicyError as exc:
        raise PolicyUnavailable(f"the submit policy could not decide ({exc}); nothing was submitted") from exc


async def _pinned_workflow(read_model: ReadModel, org: str, workflow: WorkflowBody, queue: str) -> WorkflowRef:
    """A workflow named without a version is pinned to the newest version a live runner on the task's
    queue hosts. Without one (or without the read model) the first claim pins it instead."""
    name, version = workflow.name, workflow.version
    if version is None:
        try:
            runners = await read_model.list_workers(org, queue=queue, capability=workflow_capability(name, None))
        except DATABASE_UNAVAILABLE:  # submitting needs only the log
            runners = []
        hosted = [
            hosted_workflow_versions(worker.capabilities).get(name, set())
            for worker, _, _ in runners
            if worker.status not in ("offline", "failed")
        ]
        version = max(set().union(*hosted), default=None)
    return WorkflowRef(name, version)
