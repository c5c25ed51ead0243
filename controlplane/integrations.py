"""CLI commands for nats-config and the webhook forwarder: integrations on the log."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import signal
import sys

import httpx
import nats
import uvloop

from controlplane.connection import nats_url_argument
from core.domain.ids import validate_token
from core.log.store import server_urls
from integrations.consumer import (
    CONFINED_JS_API_PREFIX,
    DEFAULT_JS_API_PREFIX,
    EventSubscription,
    SubscriptionError,
    check_event_types,
    consumer_name,
)
from integrations.permissions import CP_ACCOUNT, DEFAULT_INTEGRATION_NAMES, default_user, nats_config
from integrations.webhook import WebhookForwarder, check_url, display_url, webhook_secret

log = logging.getLogger(__name__)

_NATS_CONFIG_EXAMPLES = """\
examples:
  controlplane nats-config acme > acme-account.conf
  controlplane nats-config acme --user acme-crm --password "$(nats server passwd)" --integration crm-sync
  controlplane nats-config acme --nkey UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4
"""

_WEBHOOK_EXAMPLES = """\
examples:
  export HOOK_SECRET=whsec_$(openssl rand -base64 32)
  controlplane webhook acme --url https://hooks.example.com/cp --secret-env HOOK_SECRET
  controlplane webhook acme --url http://127.0.0.1:9000/in --secret-env HOOK_SECRET \\
      --types TaskCompleted,TaskFailed --name ops-hook
  # as the confined user of `controlplane nats-config acme`:
  NATS_PW=... controlplane webhook acme --confined --nats-user integration-acme --nats-password-env NATS_PW \\
      --url https://hooks.example.com/cp --secret-env HOOK_SECRET

Each event is POSTed as JSON, signed the Standard Webhooks way: webhook-id (the delivery id, the same
on every attempt: deduplicate on it), webhook-timestamp and webhook-signature (v1,<base64 HMAC-SHA256 of
"id.timestamp.body">). Receivers verify with any Standard Webhooks library (Python: standardwebhooks,
Webhook(secret).verify(body, headers)) or integrations.webhook.verify_delivery, which refuse deliveries
more than 5 minutes old. The secret is whsec_<base64>, or any other text used as its bytes (then give
receivers whsec_ + the base64 of those bytes). X-CP-Event-Type and X-CP-Seq help routing. Secret event
fields (an API key's hash) arrive as "[redacted]". 2xx delivers; 408, 429, 5xx, timeouts and refused
connections are retried with doubling delays; other answers, and the last failed retry, go to the
dead-letter subject cpdlq.<org>.<name>. SIGINT or SIGTERM stops after the event in hand.
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's subcommands; each sets ``run=fn(args) -> exit code`` as its default."""
    config = commands.add_parser(
        "nats-config",
        help="print a NATS account that confines an org's integrations to its own events",
        description="Print the NATS server configuration of an account for ORG's integrations: its user may "
        "create, fetch from and acknowledge only its own consumers on cp.ORG.> and publish only their dead "
        "letters; it cannot read other orgs, write to the log or manage streams. The comments say what to "
        "add to the account that holds CP_EVENTS.",
        epilog=_NATS_CONFIG_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    config.add_argument("org")
    config.add_argument("--user", help="user name (default: integration-ORG)")
    credentials = config.add_mutually_exclusive_group()
    credentials.add_argument(
        "--password", help="plain, or a bcrypt hash from `nats server passwd` (default: a generated one)"
    )
    credentials.add_argument("--nkey", help="a user public nkey (U...) instead of a user name and password")
    config.add_argument(
        "--integration",
        dest="names",
        action="append",
        metavar="NAME",
        help="an integration (consumer) name the account may use; repeatable (default: webhook)",
    )
    config.add_argument("--cp-account", default=CP_ACCOUNT, help="the account that holds CP_EVENTS (default: CP)")
    config.set_defaults(run=_run_nats_config)

    webhook = commands.add_parser(
        "webhook",
        help="forward an org's events to a URL as signed POSTs",
        description="Forward ORG's events to --url through a durable consumer, until SIGINT or SIGTERM.",
        epilog=_WEBHOOK_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    webhook.add_argument("org")
    webhook.add_argument("--url", required=True, help="the receiver's http(s) URL")
    webhook.add_argument(
        "--secret-env",
        required=True,
        metavar="VAR",
        help="environment variable holding the signing secret: whsec_<base64>, or any other text",
    )
    webhook.add_argument("--types", help="comma-separated event types to forward (default: all)")
    webhook.add_argument("--name", default="webhook", help="integration name: the consumer is NAME@ORG")
    nats_url_argument(webhook)
    webhook.add_argument("--nats-user", help="NATS user name")
    webhook.add_argument("--nats-password-env", metavar="VAR", help="environment variable holding the NATS password")
    webhook.add_argument(
        "--confined",
        action="store_true",
        help=f"connect as a `controlplane nats-config` user: JetStream API through {CONFINED_JS_API_PREFIX}; "
        "the dead-letter stream must already exist",
    )
    webhook.add_argument("--timeout", type=float, default=10.0, help="seconds per POST (default: 10)")
    delivery_arguments(webhook)
    webhook.set_defaults(run=_run_webhook)


def delivery_arguments(parser: argparse.ArgumentParser) -> None:
    """How a durable org subscription retries and dead-letters, and where a new one starts: the options
    every process delivering from ``integrations.consumer`` takes."""
    parser.add_argument("--max-deliveries", type=int, default=8, help="attempts before dead-lettering (default: 8)")
    parser.add_argument("--retry-delay", type=float, default=1.0, help="first retry delay, doubling (default: 1)")
    parser.add_argument("--max-retry-delay", type=float, default=300.0, help="longest retry delay (default: 300)")
    parser.add_argument(
        "--from",
        dest="start_from",
        choices=("beginning", "now"),
        default="now",
        help="where a new consumer starts: the org's first event or the next one (default: now)",
    )


def _run_nats_config(args: argparse.Namespace) -> int:
    password = args.password
    if password is None and args.nkey is None:
        password = secrets.token_urlsafe(24)
        who = args.user or default_user(validate_token(args.org, "org"))
        print(f"controlplane: generated a password for {who}; it is in the printed account", file=sys.stderr)
    names = args.names or list(DEFAULT_INTEGRATION_NAMES)
    print(nats_config(args.org, names, user=args.user, password=password, nkey=args.nkey, cp_account=args.cp_account))
    return 0


def _run_webhook(args: argparse.Namespace) -> int:
    org = validate_token(args.org, "org")
    consumer_name(org, args.name)
    check_url(args.url)
    configured = os.environ.get(args.secret_env, "")
    if not configured:
        raise ValueError(f"environment variable {args.secret_env} is unset or empty; it must hold the webhook secret")
    secret = webhook_secret(configured)
    types = check_event_types(t.strip() for t in args.types.split(",") if t.strip()) if args.types else None
    nats_password = None
    if args.nats_password_env:
        nats_password = os.environ.get(args.nats_password_env) or None
        if nats_password is None:
            raise ValueError(f"environment variable {args.nats_password_env} is unset or empty")
    if args.timeout <= 0 or args.max_deliveries < 1:
        raise ValueError("--timeout must be positive and --max-deliveries at least 1")
    return uvloop.run(_forward(args, org, secret, types, nats_password))


async def _forward(
    args: argparse.Namespace, org: str, secret: bytes, types: frozenset[str] | None, nats_password: str | None
) -> int:
    nc = await nats.connect(
        server_urls(args.nats_url),
        user=args.nats_user,
        password=nats_password,
        name=f"controlplane-webhook {consumer_name(org, args.name)}",
        max_reconnect_attempts=-1,
    )
    try:
        subscription = EventSubscription(
            nc,
            org,
            args.name,
            types=types,
            max_deliveries=args.max_deliveries,
            # Above the POST timeout, so an event in flight is not redelivered elsewhere meanwhile.
            ack_wait=max(30.0, args.timeout * 3),
            retry_delay=args.retry_delay,
            max_retry_delay=args.max_retry_delay,
            start_from=args.start_from,
            js_api_prefix=CONFINED_JS_API_PREFIX if args.confined else DEFAULT_JS_API_PREFIX,
            ensure_dead_letter_stream=not args.confined,
        )
        async with httpx.AsyncClient(timeout=args.timeout) as client:
            forwarder = WebhookForwarder(subscription, args.url, secret, client=client)
            await subscription.start()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, forwarder.stop)
            log.info(
                "forwarding events of %s (%s) to %s; dead letters go to %s",
                org,
                ", ".join(sorted(types)) if types else "all types",
                display_url(args.url),
                subscription.dead_letter_subject,
            )
            await forwarder.run()
    except SubscriptionError as exc:
        print(f"controlplane: {exc}", file=sys.stderr)
        return 1
    finally:
        await nc.drain()
    log.info("stopped")
    return 0
