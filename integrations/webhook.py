"""Forward an org's events to an HTTP endpoint as signed POSTs, on ``integrations.consumer``.

Deliveries are signed the Standard Webhooks way (https://www.standardwebhooks.com), so receivers can
check them with ``verify_delivery`` here or any Standard Webhooks library (``standardwebhooks`` on
PyPI: ``Webhook(secret).verify(body, headers)``). Each event is one POST of a JSON ``WebhookBody`` with

* ``webhook-id``: the delivery id ``<consumer>:<seq>``, the same on every attempt for one event;
  receivers deduplicate on it, because delivery is at least once;
* ``webhook-timestamp``: when this attempt was sent, in whole seconds since the epoch;
* ``webhook-signature``: ``v1,<base64 of HMAC-SHA256("<id>.<timestamp>.<body>")>`` keyed with the
  shared secret, so neither the body, the id nor the time can be changed;
* ``X-CP-Event-Type``, ``X-CP-Seq``, ``X-CP-Delivery-Id`` (the webhook-id), ``X-CP-Delivery-Attempt``
  (1, 2, …): unsigned, for routing; the body holds all but the attempt, signed.

A receiver refuses a delivery whose signature does not match, and one whose timestamp is more than
``DEFAULT_TOLERANCE_SECONDS`` (5 minutes) from its own clock: a delivery captured on the way cannot be
replayed later. Each retry is signed afresh with its own time.

The secret is ``whsec_<base64>`` as Standard Webhooks libraries take it (``echo whsec_$(openssl rand
-base64 32)``), or any other text, used as its UTF-8 bytes (secrets configured before this scheme keep
working: receivers then hold ``whsec_`` + the base64 of those bytes, or pass the bytes themselves).

The body carries the event in its public form (``core.domain.public``): secret fields read ``"[redacted]"``.

A 2xx answer delivers the event. 408, 429, 5xx, timeouts and connection errors are retried with doubling
delays, and the subscription's ``max_deliveries``-th failure dead-letters the event. Any other answer
(3xx: redirects are not followed; other 4xx) means the receiver refuses this event: it is dead-lettered
at once, with the status in ``Cp-Dlq-Error``. Error messages name the URL without its credentials or
query string, which may hold a token.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from math import floor

import httpx
import msgspec
from standardwebhooks import Webhook

from core.domain.events import AnyEvent
from core.domain.notifications import webhook_secret
from core.domain.public import public_event
from integrations.consumer import DeadLetter, Delivery, EventSubscription

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
EVENT_TYPE_HEADER = "X-CP-Event-Type"
SEQ_HEADER = "X-CP-Seq"
DELIVERY_ID_HEADER = "X-CP-Delivery-Id"
ATTEMPT_HEADER = "X-CP-Delivery-Attempt"

DEFAULT_TOLERANCE_SECONDS = 300
"""How far a delivery's timestamp may be from the receiver's clock (the Standard Webhooks default)."""

_RETRYABLE_CLIENT_ERRORS = frozenset({408, 429})
_MAX_ERROR_BODY = 200
_MAX_TIMESTAMP_DIGITS = 12


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


class WebhookRefused(ValueError):
    """A request is not a delivery signed with our secret, or not a fresh one: answer it with a 4xx.
    The message says which check failed."""


def sign_delivery(secret: bytes, delivery_id: str, timestamp: datetime, body: bytes) -> str:
    """The ``webhook-signature`` of ``body`` sent as ``delivery_id`` at ``timestamp`` (whole seconds)."""
    return Webhook(secret).sign(delivery_id, timestamp, body)


def verify_delivery(
    body: bytes,
    headers: Mapping[str, str],
    secret: bytes | str,
    *,
    tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS,
    now: datetime | None = None,
) -> None:
    """Raise ``WebhookRefused`` unless ``body`` with ``headers`` (names in any case) is a delivery signed
    with ``secret`` (``webhook_secret`` text, or the key's bytes) and sent within ``tolerance_seconds``
    of ``now`` (default: this machine's clock). Pass the body exactly as received, before parsing it."""
    key = webhook_secret(secret) if isinstance(secret, str) else secret
    if not key:
        raise ValueError("the webhook secret is empty")
    lowered = {name.lower(): value for name, value in headers.items()}
    delivery_id = _header(lowered, ID_HEADER)
    sent_text = _header(lowered, TIMESTAMP_HEADER)
    signatures = _header(lowered, SIGNATURE_HEADER)
    if not sent_text.isdigit() or len(sent_text) > _MAX_TIMESTAMP_DIGITS:
        raise WebhookRefused(f"the {TIMESTAMP_HEADER} header is not whole seconds since the epoch")
    sent = int(sent_text)
    current = (now or datetime.now(UTC)).timestamp()
    if sent < current - tolerance_seconds:
        raise WebhookRefused(
            f"the delivery is too old: {TIMESTAMP_HEADER} is {current - sent:.0f} s ago, more than the "
            f"{tolerance_seconds:.0f} s allowed (a replayed delivery, or a clock that is off)"
        )
    if sent > current + tolerance_seconds:
        raise WebhookRefused(
            f"the delivery is from {sent - current:.0f} s in the future, more than the {tolerance_seconds:.0f} s "
            f"allowed (a clock that is off)"
        )
    expected = sign_delivery(key, delivery_id, datetime.fromtimestamp(sent, UTC), body).encode()
    if not any(hmac.compare_digest(expected, candidate.encode()) for candidate in signatures.split(" ")):
        raise WebhookRefused(
            f"no {SIGNATURE_HEADER} matches: the body, id or timestamp was altered, or it was signed with "
            f"another secret"
        )


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if not value:
        raise WebhookRefused(f"the {name} header is missing: not a signed delivery")
    if not value.isascii():
        raise WebhookRefused(f"the {name} header is not ASCII: not a delivery of ours")
    return value


def check_url(url: str) -> str:
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"invalid webhook URL {url!r}: expected http(s)://host[:port]/path")
    return url


def display_url(url: str) -> str:
    """``url`` for logs and error messages: without user, password or query string, which may hold a
    token."""
    parsed = httpx.URL(url)
    shown = str(parsed.copy_with(username=None, password=None, query=None, fragment=None))
    return shown + ("?…" if parsed.query else "")


def _utc_now() -> datetime:
    return datetime.now(UTC)


_encoder = msgspec.json.Encoder()


class WebhookForwarder:
    """POSTs every event of ``subscription`` to ``url``. The caller owns ``client`` (its timeout bounds
    each attempt; keep it below the subscription's ack_wait, or the event is redelivered meanwhile).
    ``clock`` gives each attempt its ``webhook-timestamp``."""

    def __init__(
        self,
        subscription: EventSubscription,
        url: str,
        secret: bytes,
        *,
        client: httpx.AsyncClient,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        if not secret:
            raise ValueError("the webhook secret is empty: receivers could not tell forged requests from ours")
        self.subscription = subscription
        self.url = check_url(url)
        self._signer = Webhook(secret)
        self._client = client
        self._clock = clock

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
                event=public_event(recorded.event),
            )
        )
        headers = {
            **signed_headers(self._signer, delivery_id, self._clock(), body),
            EVENT_TYPE_HEADER: event_type,
            SEQ_HEADER: str(recorded.seq),
            DELIVERY_ID_HEADER: delivery_id,
            ATTEMPT_HEADER: str(delivery.delivery_count),
        }
        await post(self._client, self.url, body, headers)


def signed_headers(signer: Webhook, delivery_id: str, sent_at: datetime, body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers of ``body`` sent as ``delivery_id`` at ``sent_at``, with its content type."""
    return {
        "Content-Type": "application/json",
        ID_HEADER: delivery_id,
        TIMESTAMP_HEADER: str(floor(sent_at.timestamp())),
        SIGNATURE_HEADER: signer.sign(delivery_id, sent_at, body),
    }


async def post(client: httpx.AsyncClient, url: str, body: bytes, headers: Mapping[str, str]) -> None:
    """POST ``body`` to ``url`` once: return on 2xx; raise ``ReceiverUnavailable`` (retry later) on 408,
    429, 5xx, a timeout or no connection; raise ``DeadLetter`` on any other answer. Messages name the
    URL as ``display_url`` shows it."""
    shown = display_url(url)
    try:
        response = await client.post(url, content=body, headers=headers)
    except httpx.TimeoutException as exc:
        raise ReceiverUnavailable(f"{shown} did not answer in time ({type(exc).__name__})") from exc
    except httpx.TransportError as exc:
        raise ReceiverUnavailable(f"cannot reach {shown}: {exc!r}") from exc
    status = response.status_code
    if 200 <= status < 300:
        return
    if status >= 500 or status in _RETRYABLE_CLIENT_ERRORS:
        raise ReceiverUnavailable(f"{shown} answered {status}")
    raise DeadLetter(f"{shown} refused the event with {status}: {response.text[:_MAX_ERROR_BODY]}")
