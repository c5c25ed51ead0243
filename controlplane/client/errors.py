"""The API's problem+json answers as exceptions: one class per status the contract names, so callers
catch what they mean (``except NotFound``) instead of comparing numbers."""

from __future__ import annotations


class ProblemError(Exception):
    """An error answer of the API (RFC 9457 problem+json): ``status``, ``title``, ``detail``, ``type``.
    ``retry_after`` is the answer's ``Retry-After`` in seconds, when it had one."""

    def __init__(
        self, status: int, title: str, detail: str, type: str = "about:blank", *, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status, self.title, self.detail, self.type = status, title, detail, type
        self.retry_after = retry_after


class BadRequest(ProblemError):
    """400: the body is not JSON, or not an object."""


class Unauthorized(ProblemError):
    """401: no credential, or one the server does not accept."""


class Forbidden(ProblemError):
    """403: the credential's role may not do this (or a policy denied it)."""


class NotFound(ProblemError):
    """404: no such object in the credential's org."""


class Conflict(ProblemError):
    """409: the object's state does not allow the command, or the lease is no longer held."""


class PayloadTooLarge(ProblemError):
    """413: the body is over the server's limit."""


class Unprocessable(ProblemError):
    """422: a field's value is invalid (the detail says which)."""


class RateLimited(ProblemError):
    """429: too many requests; ``retry_after`` says when to come back."""


class Unavailable(ProblemError):
    """503, or the server kept answering 429/502/503/504 or could not be reached for the whole retry
    budget (then ``__cause__`` is the last failure)."""


_BY_STATUS: dict[int, type[ProblemError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: Unprocessable,
    429: RateLimited,
    503: Unavailable,
}


def problem_class(status: int) -> type[ProblemError]:
    return _BY_STATUS.get(status, ProblemError)
