"""The audit export (``controlplane export``): every event of an org, read from the log in stream order,
written as hash-chained JSON Lines (the format and its check are ``core.domain.audit``'s)."""

from __future__ import annotations

import base64
from contextlib import aclosing
from datetime import datetime
from typing import Any, BinaryIO

import msgspec

from controlplane.task_log import BULK_READ_BATCH
from core.domain.audit import AuditChain
from core.domain.ids import validate_token
from core.domain.public import public_payload, redacted_fields
from core.domain.records import rfc3339
from core.domain.subjects import org_events_filter
from core.log.reader import LogReader, Progress
from core.log.store import H_ACTOR, H_CAUSATION, H_CORRELATION, H_TIME, MSG_ID, command_id_of


async def export_org(
    reader: LogReader, org: str, out: BinaryIO, *, since: datetime | None = None, progress: Progress | None = None
) -> AuditChain:
    """Write the audit export of ``org`` and return its chain: the events stored at or after ``since``
    (all by default). Secret fields are redacted (``core.domain.public``) before a line is written and
    hashed; a payload that is not JSON is exported as stored (base64), never dropped."""
    chain = AuditChain()
    out.write(chain.header(validate_token(org, "org"), None if since is None else rfc3339(since), redacted_fields()))
    decode = msgspec.json.decode
    batches = reader.batches(org_events_filter(org), start_time=since, batch=BULK_READ_BATCH, progress=progress)
    async with aclosing(batches) as reading:
        async for batch in reading:
            lines = []
            for msg in batch:
                headers: dict[str, str] = msg.headers  # type: ignore[assignment]
                try:
                    event: Any = public_payload(decode(msg.data))
                except msgspec.DecodeError:
                    event = {"base64": base64.b64encode(msg.data).decode()}
                stored_at = headers["Nats-Time-Stamp"]
                lines.append(
                    chain.event(
                        seq=int(headers["Nats-Sequence"]),
                        subject=headers["Nats-Subject"],
                        event=event,
                        time=headers.get(H_TIME, stored_at),
                        stored_at=stored_at,
                        actor=headers.get(H_ACTOR),
                        command_id=command_id_of(headers.get(MSG_ID)),
                        correlation_id=headers.get(H_CORRELATION),
                        causation_id=headers.get(H_CAUSATION),
                    )
                )
            out.write(b"".join(lines))
    out.write(chain.end())
    return chain
