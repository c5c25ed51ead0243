"""Typed domain rejections. Each says what was wrong and, where it helps, what to do instead.
The gateway maps them to HTTP in one place, by ``kind``."""

from __future__ import annotations

from typing import ClassVar, Literal

RejectionKind = Literal["not_found", "conflict", "forbidden", "invalid", "unavailable"]
"""``unavailable``: something the operation needs could not answer (the application layer's, never a
decider's); the same request may succeed later."""


class Rejected(Exception):
    """The command is not valid against the current state, or could not be decided now (``kind``
    says which); nothing was appended."""

    kind: ClassVar[RejectionKind] = "conflict"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(Rejected):
    kind = "not_found"


class AlreadyExists(Rejected):
    pass


class AlreadyTerminal(Rejected):
    pass


class InvalidTransition(Rejected):
    pass


class LeaseLost(Rejected):
    pass


class NotReady(Rejected):
    pass


class CapabilityMismatch(Rejected):
    pass


class AlreadyDecided(Rejected):
    pass


class NotPermitted(Rejected):
    kind = "forbidden"


class InvalidCommand(Rejected):
    kind = "invalid"


class CommandIdTaken(Rejected):
    """The command id (an Idempotency-Key's) was already used by a command on another aggregate."""


class ConcurrencyExhausted(Rejected):
    """Every bounded retry lost the optimistic-concurrency race; the caller may try again."""
