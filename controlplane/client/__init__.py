"""A typed Python client of the controlplane HTTP API (docs/client.md): :class:`Client` (blocking) and
:class:`AsyncClient` (asyncio) with the same methods, msgspec types for the API's objects, and one
exception class per problem status."""

from controlplane.client.async_client import AsyncClient
from controlplane.client.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    ProblemError,
    RateLimited,
    Unauthorized,
    Unavailable,
    Unprocessable,
)
from controlplane.client.models import Approval, ApprovalDecision, Claim, Event, Lease, Page, Task, Worker
from controlplane.client.sync_client import Client

__all__ = [
    "Approval",
    "ApprovalDecision",
    "AsyncClient",
    "BadRequest",
    "Claim",
    "Client",
    "Conflict",
    "Event",
    "Forbidden",
    "Lease",
    "NotFound",
    "Page",
    "PayloadTooLarge",
    "ProblemError",
    "RateLimited",
    "Task",
    "Unauthorized",
    "Unavailable",
    "Unprocessable",
    "Worker",
]
