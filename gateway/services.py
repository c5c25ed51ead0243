"""Everything a request handler needs, built once per process and wired explicitly: the application
layer's parts (command handler, claim index, submit gate, environments, idempotency records) and the
gateway's own (credentials, sessions, limits, metrics)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from application.claim_index import ClaimIndex
from application.environments import EnvironmentDirectory
from application.idempotency import IdempotencyRecords
from application.policy import SubmitGate
from application.submit import SubmitPath
from core.log.handler import CommandHandler, utc_now
from core.log.store import JetStreamEventStore
from core.lru import Lru
from core.secret_box import SecretBox
from gateway.auth import Authenticator
from gateway.console.sessions import SessionStore
from gateway.metrics import EventMetrics, LabelBudget
from gateway.queue_gauges import QueueGauges, cache_seconds
from projections.read import ReadModel

if TYPE_CHECKING:
    from gateway.scheduler import Scheduler


@dataclass
class Limits:
    max_body_bytes: int = 1024 * 1024
    requests_per_second: float = 2000.0
    burst: float = 4000.0
    sse_keepalive_seconds: float = 15.0
    max_block_ms: int = 30_000
    """Upper bound on a claim's long-poll, whatever the client asks (operators may lower it)."""
    failed_auth_per_second: float = 10.0
    failed_auth_burst: float = 100.0
    """Requests whose credential was refused (401), per client address: ``failed_auth_burst`` at once,
    then ``failed_auth_per_second``. An address past that gets 429 before its credential is looked at."""
    sse_max_per_credential: int = 16
    sse_max_per_org: int = 256
    """Open SSE streams (each a JetStream consumer replaying the log) one credential, one org may hold."""
    max_json_depth: int = 64
    """How deep arrays and objects may nest in a body (the body itself is 1 deep)."""


RATE_LIMITER_BUCKETS = 16_384


class RateLimiter:
    """A token bucket per credential (or client address): ``burst`` requests at once, refilled at ``rate``
    per second. At most ``size`` buckets are kept, the least recently used forgotten first: forgetting
    one only gives back a full bucket to someone who has not asked for a while."""

    def __init__(
        self,
        rate: float,
        burst: float,
        clock: Callable[[], float] = time.monotonic,
        size: int = RATE_LIMITER_BUCKETS,
    ) -> None:
        self._rate, self._burst, self._clock = rate, burst, clock
        self._buckets: Lru[str, tuple[float, float]] = Lru(size)

    def blocked_for(self, credential: str) -> float:
        """What ``retry_after`` would answer, without taking a token."""
        tokens, _ = self._refilled(credential)
        return 0.0 if tokens >= 1 else (1 - tokens) / self._rate

    def retry_after(self, credential: str) -> float:
        """0 if the request may proceed, else the seconds until a token is available."""
        tokens, now = self._refilled(credential)
        if tokens >= 1:
            self._buckets.put(credential, (tokens - 1, now))
            return 0.0
        self._buckets.put(credential, (tokens, now))
        return (1 - tokens) / self._rate

    def _refilled(self, credential: str) -> tuple[float, float]:
        """The bucket's tokens now, and now."""
        now = self._clock()
        tokens, last = self._buckets.get(credential) or (self._burst, now)
        return min(self._burst, tokens + (now - last) * self._rate), now


class StreamSlots:
    """Counts the open SSE streams per credential and per org. Each holds a JetStream consumer that may
    replay the org's whole history, so one credential gets at most ``per_credential`` and one org at
    most ``per_org``. An entry exists only while its streams are open, so the counts stay small."""

    def __init__(self, per_credential: int, per_org: int) -> None:
        self.per_credential, self.per_org = per_credential, per_org
        self._credentials: dict[str, int] = {}
        self._orgs: dict[str, int] = {}

    def open(self, org: str, credential: str) -> str | None:
        """Counts one more stream and answers None, or answers why it may not open (counting nothing)."""
        if self._credentials.get(credential, 0) >= self.per_credential:
            return f"this credential has {self.per_credential} event streams open already; close one first"
        if self._orgs.get(org, 0) >= self.per_org:
            return f"this org has {self.per_org} event streams open already; close some first"
        self._credentials[credential] = self._credentials.get(credential, 0) + 1
        self._orgs[org] = self._orgs.get(org, 0) + 1
        return None

    def close(self, org: str, credential: str) -> None:
        """Counts one stream fewer; call once for each ``open`` that answered None."""
        for counts, key in ((self._credentials, credential), (self._orgs, org)):
            if (left := counts.get(key, 0) - 1) > 0:
                counts[key] = left
            else:
                counts.pop(key, None)

    def open_for(self, org: str, credential: str) -> tuple[int, int]:
        """(streams open for the credential, for the org)."""
        return self._credentials.get(credential, 0), self._orgs.get(org, 0)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.requests = Counter(
            "cp_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "cp_http_request_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.projection_lag = Gauge(
            "cp_projection_lag_events", "Events in the log not yet folded", ["projection"], registry=self.registry
        )
        # What operators alert on (ADR 0009): folded from the log the claim index follows (gateway/metrics.py),
        # and read from the read model at scrape time (gateway/queue_gauges.py).
        self.labels = LabelBudget.from_env()
        self.events = EventMetrics(self.registry, self.labels)
        self.queues = QueueGauges(self.registry, self.labels, ttl=cache_seconds())


@dataclass
class Services:
    store: JetStreamEventStore
    handler: CommandHandler
    read_model: ReadModel
    claim_index: ClaimIndex
    submit_gate: SubmitGate
    auth: Authenticator
    idempotency: IdempotencyRecords
    sessions: SessionStore
    limits: Limits = field(default_factory=Limits)
    metrics: Metrics = field(default_factory=Metrics)
    clock: Callable[[], datetime] = utc_now
    rate_limiter: RateLimiter = field(init=False)
    failed_auth: RateLimiter = field(init=False)
    """Requests whose credential was refused (API calls and console sign-ins), per client address (see
    ``Limits``)."""
    streams: StreamSlots = field(init=False)
    environments: EnvironmentDirectory = field(init=False)
    """Each org's environments, read from the log at every use (a submit's environment gates it)."""
    secret_box: SecretBox | None = None
    """Seals and opens secret values (``CP_SECRETS_KEY``); None: the secrets endpoints answer 503."""
    scheduler: Scheduler | None = None
    """The schedules' fire runner this process runs (gateway/scheduler.py), started and stopped with it."""

    @property
    def submit_path(self) -> SubmitPath:
        """Submitting a task as the API, the console and the scheduler do."""
        return SubmitPath(self.handler, self.submit_gate, self.environments, self.read_model)

    def __post_init__(self) -> None:
        self.rate_limiter = RateLimiter(self.limits.requests_per_second, self.limits.burst)
        self.failed_auth = RateLimiter(self.limits.failed_auth_per_second, self.limits.failed_auth_burst)
        self.streams = StreamSlots(self.limits.sse_max_per_credential, self.limits.sse_max_per_org)
        self.environments = EnvironmentDirectory(self.store)
