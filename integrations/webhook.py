"""Forward an org's events to an HTTP endpoint as signed POSTs, on ``integrations.consumer``.

Each event is one POST of a JSON ``WebhookBody`` with the headers

* ``X-CP-Signature: sha256=<hex>``: HMAC-SHA256 of the exact body bytes, keyed with the shared secret
  (check it with ``verify_signature`` or any HMAC library, comparing in constant time);
* ``X-CP-Event-Type``, ``X-CP-Seq`` (the stream sequence);
* ``X-CP-Delivery-Id``: the same on every attempt for one event; receivers deduplicate on it, because
  delivery is at least once;
* ``X-CP-Delivery-Attempt``: 1, 2, …

A 2xx answer delivers the event. 408, 429, 5xx, timeouts and connection errors are retried with doubling
delays, and the subscription's ``max_deliveries``-th failure dead-letters the event. Any other answer
(3xx: redirects are not followed; other 4xx) means the receiver refuses this event: it is dead-lettered
at once, with the status in ``Cp-Dlq-Error``.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime

import httpx
import msgspec

from core.events import AnyEvent
from integrations.consumer import DeadLetter, Delivery, EventSubscription

SIGNATURE_HEADER = "X-CP-Signature"
EVENT_TYPE_HEADER = "X-CP-Event-Type"
SEQ_HEADER = "X-CP-Seq"
DELIVERY_ID_HEADER = "X-CP-Delivery-Id"
ATTEMPT_HEADER = "X-CP-Delivery-Attempt"

_RETRYABLE_CLIENT_ERRORS = frozenset({408, 429})
_MAX_ERROR_BODY = 200


class WebhookBody(msgspec.Struct, frozen=True):
    """What a receiver gets: the event and where it sits in the log. All of it is covered by the
    signature, unlike the ``X-CP-*`` headers, which only repeat parts of it for routing."""

    delivery_id: str
    org: str
    seq: int
    subject: str
    type: str
    recorded_at: datetime
    actor: str | None
    command_id: str | None
    correlation_id: str | None
    causation_id: str | None
    event: AnyEvent


class ReceiverUnavailable(Exception):
    """The receiver did not take the event this time (5xx, 408, 429, timeout, no connection): retry."""


def sign(body: bytes, secret: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_signature(body: bytes, secret: bytes, signature: str | None) -> bool:
    """Whether ``signature`` (the ``X-CP-Signature`` header) was made with ``secret`` over ``body``."""
    return signature is not None and hmac.compare_digest(sign(body, secret), signature)


def check_url(url: str) -> str:
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"invalid webhook URL {url!r}: expected http(s)://host[:port]/path")
    return url


_encoder = msgspec.json.Encoder()


class WebhookForwarder:
    """POSTs every event of ``subscription`` to ``url``. The caller owns ``client`` (its timeout bounds
    each attempt; keep it below the subscription's ack_wait, or the event is redelivered meanwhile)."""

    def __init__(self, subscription: EventSubscription, url: str, secret: bytes, *, client: httpx.AsyncClient):
        if not secret:
            raise ValueError("the webhook secret is empty: receivers could not tell forged requests from ours")
        self.subscription = subscription
        self.url = check_url(url)
        self._secret = secret
        self._client = client

    async def run(self) -> None:
        """Forward until ``stop()``."""
        await self.subscription.run(self.forward)

    def stop(self) -> None:
        self.subscription.stop()

    async def forward(self, delivery: Delivery) -> None:
        recorded = delivery.recorded
        delivery_id = f"{self.subscription.consumer}:{recorded.seq}"
        event_type = str(type(recorded.event).__struct_config__.tag)
        body = _encoder.encode(
            WebhookBody(
                delivery_id=delivery_id,
                org=self.subscription.org,
                seq=recorded.seq,
                subject=recorded.subject,
                type=event_type,
                recorded_at=recorded.recorded_at,
                actor=recorded.actor,
                command_id=recorded.command_id,
                correlation_id=recorded.correlation_id,
                causation_id=recorded.causation_id,
                event=recorded.event,
            )
        )
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(body, self._secret),
            EVENT_TYPE_HEADER: event_type,
            SEQ_HEADER: str(recorded.seq),
            DELIVERY_ID_HEADER: delivery_id,
            ATTEMPT_HEADER: str(delivery.delivery_count),
        }
        try:
            response = await self._client.post(self.url, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            raise ReceiverUnavailable(f"{self.url} did not answer in time ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise ReceiverUnavailable(f"cannot reach {self.url}: {exc!r}") from exc
        status = response.status_code
        if 200 <= status < 300:
            return
        if status >= 500 or status in _RETRYABLE_CLIENT_ERRORS:
            raise ReceiverUnavailable(f"{self.url} answered {status}")
        raise DeadLetter(f"{self.url} refused the event with {status}: {response.text[:_MAX_ERROR_BODY]}")
