"""Everything a request handler needs, built once per process and wired explicitly."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from core.handler import CommandHandler, utc_now
from core.store import JetStreamEventStore
from gateway.auth import Authenticator
from gateway.claims import ClaimIndex
from gateway.console.sessions import SessionStore
from gateway.idempotency import IdempotencyRecords
from gateway.policy import SubmitGate
from projections.read import ReadModel


@dataclass
class Limits:
    max_body_bytes: int = 1024 * 1024
    requests_per_second: float = 2000.0
    burst: float = 4000.0
    sse_keepalive_seconds: float = 15.0
    max_block_ms: int = 30_000
    """Upper bound on a claim's long-poll, whatever the client asks (operators may lower it)."""


class RateLimiter:
    """A token bucket per credential: ``burst`` requests at once, refilled at ``rate`` per second."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate, self._burst, self._clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def blocked_for(self, credential: str) -> float:
        """What ``retry_after`` would answer, without taking a token."""
        now = self._clock()
        tokens, last = self._buckets.get(credential, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        return 0.0 if tokens >= 1 else (1 - tokens) / self._rate

    def retry_after(self, credential: str) -> float:
        """0 if the request may proceed, else the seconds until a token is available."""
        now = self._clock()
        tokens, last = self._buckets.get(credential, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        if tokens >= 1:
            self._buckets[credential] = (tokens - 1, now)
            return 0.0
        self._buckets[credential] = (tokens, now)
        return (1 - tokens) / self._rate


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
    failed_signins: RateLimiter = field(init=False)
    """Console sign-ins that failed, per client address: 20 at once, then one every 5 s."""
    claims_in_flight: set[str] = field(default_factory=set)
    """Tasks a claim request of this gateway is trying right now: concurrent claimers try others first."""

    def __post_init__(self) -> None:
        self.rate_limiter = RateLimiter(self.limits.requests_per_second, self.limits.burst)
        self.failed_signins = RateLimiter(0.2, 20.0)
