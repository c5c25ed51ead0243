"""``controlplane notify ORG [ORG ...]``: the notifier process (integrations/notify.py) for some orgs."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

import httpx
import uvloop

from controlplane.connection import gateway_url_argument, nats_url_argument, without_credentials
from controlplane.integrations import delivery_arguments
from core.domain.ids import validate_token
from core.domain.notifications import check_channel_url
from core.log.handler import CommandHandler
from core.log.store import JetStreamEventStore
from core.secret_box import MASTER_KEY_ENV, PREVIOUS_KEYS_ENV, SecretBox
from integrations.consumer import SubscriptionError, consumer_name
from integrations.notify import Notifier, notifier_subscription

log = logging.getLogger(__name__)

PUBLIC_URL_ENV = "CP_PUBLIC_URL"
READY_LINE = "notifying"
"""The start of the line on stderr that says the notifier is following the log (tests wait for it)."""

_EXAMPLES = """\
examples:
  controlplane notify acme globex
  CP_PUBLIC_URL=https://cp.example.com controlplane notify acme --max-deliveries 10

Channels and rules are the org's, set by an admin (POST /v1/notification-channels, POST
/v1/notification-rules); this process sends what they say. Each message links to the console under
--public-url. Each notification is recorded on the log (NotificationSent) before its event is
acknowledged; one the channel refused, or that failed --max-deliveries times, is recorded as
NotificationDeadLettered and its event goes to cpdlq.<org>.<name>. SIGINT or SIGTERM stops after the
event in hand.
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    notify = commands.add_parser(
        "notify",
        help="send the orgs' notifications (Slack, e-mail, Standard Webhooks) as their rules say",
        description="Follow each ORG's events through a durable consumer NAME@ORG and send the notifications "
        "its rules ask for, until SIGINT or SIGTERM. Runs with the control plane's NATS login: it reads the "
        "log and records each notification on it.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    notify.add_argument("orgs", nargs="+", metavar="ORG")
    nats_url_argument(notify)
    gateway_url_argument(notify)
    notify.add_argument(
        "--public-url",
        default=os.environ.get(PUBLIC_URL_ENV),
        help=f"where people reach the console, for the links in messages; default: ${PUBLIC_URL_ENV}, else --url",
    )
    notify.add_argument("--name", default="notify", help="integration name: the consumers are NAME@ORG")
    notify.add_argument("--timeout", type=float, default=10.0, help="seconds per POST or e-mail (default: 10)")
    notify.add_argument(
        "--ack-wait",
        type=float,
        default=30.0,
        help="seconds before an event a dead notifier held is delivered again (default: 30; at least 3 x --timeout)",
    )
    delivery_arguments(notify)
    notify.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    orgs = list(dict.fromkeys(validate_token(org, "org") for org in args.orgs))
    for org in orgs:
        consumer_name(org, args.name)
    args.public_url = check_channel_url(args.public_url or args.url)
    if args.timeout <= 0 or args.max_deliveries < 1:
        raise ValueError("--timeout must be positive and --max-deliveries at least 1")
    if args.ack_wait < args.timeout * 3:
        raise ValueError("--ack-wait must be at least 3 x --timeout, or an event in flight is delivered again")
    box = SecretBox.from_env()
    if box is None:
        raise ValueError(
            f"channels' URLs and secrets are sealed with the gateway's master key: give the notifier the same "
            f"{MASTER_KEY_ENV} (and {PREVIOUS_KEYS_ENV}) as the gateway, in its environment"
        )
    return uvloop.run(_notify(args, orgs, box))


async def _notify(args: argparse.Namespace, orgs: list[str], box: SecretBox) -> int:
    store = await JetStreamEventStore.connect(args.nats_url, name="controlplane-notify")
    handler = CommandHandler(store)
    try:
        async with httpx.AsyncClient(timeout=args.timeout) as http:
            notifiers = [
                Notifier(
                    notifier_subscription(
                        store.nc,
                        org,
                        args.name,
                        max_deliveries=args.max_deliveries,
                        ack_wait=args.ack_wait,
                        retry_delay=args.retry_delay,
                        max_retry_delay=args.max_retry_delay,
                        start_from=args.start_from,
                    ),
                    store,
                    handler,
                    console_url=args.public_url,
                    http=http,
                    box=box,
                    smtp_timeout=args.timeout,
                )
                for org in orgs
            ]
            for notifier in notifiers:
                await notifier.start()

            def stop() -> None:
                for notifier in notifiers:
                    notifier.stop()

            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, stop)
            server = without_credentials(args.nats_url)
            log.info(
                "%s %s on %s; links to %s; dead letters go to cpdlq.<org>.%s",
                READY_LINE,
                ", ".join(orgs),
                server,
                args.public_url,
                args.name,
            )
            await asyncio.gather(*(notifier.run() for notifier in notifiers))
    except SubscriptionError as exc:
        print(f"controlplane: {exc}", file=sys.stderr)
        return 1
    finally:
        await store.close()
    log.info("stopped")
    return 0
