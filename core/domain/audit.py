"""The audit export and its hash chain. Pure: lines in, lines out; no I/O, no clock.

An export is JSON Lines: a header, one line per event in stream order, and an end line::

    {"format":"controlplane-audit/1","kind":"header","org":"acme","prev":"sha256:000…000","redacted":[…],"since":null,"hash":"sha256:…"}
    {"actor":"…","command_id":"…","event":{…},"kind":"event","prev":"sha256:…","seq":12,"stored_at":"…","subject":"cp.acme.task.…","time":"…","hash":"sha256:…"}
    {"events":1,"kind":"end","last_seq":12,"prev":"sha256:…","hash":"sha256:…"}

Canonical form: a line is the JSON of its fields except ``hash`` with keys sorted at every depth, no
whitespace, UTF-8 (what ``msgspec.json.encode(…, order="sorted")`` writes), followed by ``"hash"`` as
its last member. ``hash = "sha256:" + hex(sha256(prev + canonical))``, where ``prev`` is the hash of
the line before (its ASCII text) and ``canonical`` the line without ``hash``.

Chain start: the header's ``prev`` is :data:`GENESIS` (``"sha256:"`` and 64 zeros). The header records
the org and ``since``, so a file cannot be passed off as another org's or another range's export.
Chain end: the end line counts the event lines and names the last sequence, so dropping lines at the
end is detected like dropping them anywhere else. The end line's hash is the export's *head*.

Event lines carry ``seq``, ``subject``, ``time`` (the appending command's time, or the stored time
for an event without one), ``stored_at`` (when the log stored it, as the server wrote it), ``actor``,
``command_id``, ``correlation_id`` and ``causation_id`` (each only when present) and ``event``: the
stored JSON as it is in the log, not upcast, so the export shows exactly what was recorded, except
secret fields (``core.domain.public``: an API key's hash), which read ``"[redacted]"``. The header lists them
as ``Type.field`` in ``redacted``. The chain is computed over the lines as written, redacted, since that
is what the auditor holds and can check; the secrets never leave the log, not even as hash input.

What the chain proves: any edited, dropped, inserted or reordered line, and a truncated file, fail
:func:`verify_export`. What it cannot prove on its own: that nobody rewrote the whole file and every
hash after an edit. Keep the head printed by the export somewhere else and check it
(``controlplane audit verify FILE --head sha256:…``)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from itertools import chain, pairwise
from typing import Any

import msgspec

FORMAT = "controlplane-audit/1"
GENESIS = "sha256:" + "0" * 64

_canonical = msgspec.json.Encoder(order="sorted").encode
_decode = msgspec.json.Decoder().decode


def _digest(prev: str, body: bytes) -> str:
    return "sha256:" + hashlib.sha256(prev.encode() + body).hexdigest()


def _with_hash(body: bytes, digest: str) -> bytes:
    return body[:-1] + b',"hash":"' + digest.encode() + b'"}'


class AuditChain:
    """Writes an export line by line; each call returns the next line, newline included."""

    def __init__(self) -> None:
        self.head = GENESIS
        self.events = 0
        self.last_seq = 0

    def header(self, org: str, since: str | None, redacted: Sequence[str] = ()) -> bytes:
        """``redacted``: the ``Type.field`` names whose values the event lines hold as a marker."""
        fields: dict[str, Any] = {"kind": "header", "format": FORMAT, "org": org, "since": since}
        if redacted:
            fields["redacted"] = list(redacted)
        return self._line(fields)

    def event(
        self,
        *,
        seq: int,
        subject: str,
        event: Any,
        time: str,
        stored_at: str,
        actor: str | None = None,
        command_id: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
    ) -> bytes:
        fields: dict[str, Any] = {
            "kind": "event",
            "seq": seq,
            "subject": subject,
            "time": time,
            "stored_at": stored_at,
            "event": event,
        }
        optional = (
            ("actor", actor),
            ("command_id", command_id),
            ("correlation_id", correlation_id),
            ("causation_id", causation_id),
        )
        fields.update((name, value) for name, value in optional if value is not None)
        self.events += 1
        self.last_seq = seq
        return self._line(fields)

    def end(self) -> bytes:
        return self._line({"kind": "end", "events": self.events, "last_seq": self.last_seq})

    def _line(self, fields: dict[str, Any]) -> bytes:
        fields["prev"] = self.head
        body = _canonical(fields)
        self.head = _digest(self.head, body)
        return _with_hash(body, self.head) + b"\n"


class AuditProblem(msgspec.Struct, frozen=True):
    line: int
    reason: str


class AuditReport(msgspec.Struct, frozen=True):
    ok: bool
    org: str | None
    events: int
    lines: int
    head: str | None
    """The hash of the last line read: the export's head when the file is whole."""
    problem: AuditProblem | None = None


class _Bad(Exception):
    def __init__(self, line: int, reason: str) -> None:
        super().__init__(reason)
        self.line, self.reason = line, reason


class _Line(msgspec.Struct):
    number: int
    fields: dict[str, Any]

    @property
    def kind(self) -> Any:
        return self.fields.get("kind")

    @property
    def hash(self) -> Any:
        return self.fields.get("hash")

    @property
    def prev(self) -> Any:
        return self.fields.get("prev")


def verify_export(lines: Iterable[bytes], *, expected_head: str | None = None) -> AuditReport:
    """Check an export line by line and report the first bad line and why; ``expected_head`` is the
    head kept from the export (its end line's hash)."""
    state = _Verifier(expected_head)
    try:
        state.run(lines)
    except _Bad as bad:
        return state.report(AuditProblem(bad.line, bad.reason))
    return state.report(None)


def _parse(number: int, raw: bytes) -> _Line:
    """One line on its own: JSON, canonical form, and a hash that matches its content."""
    text = raw.rstrip(b"\r\n")
    try:
        fields = _decode(text)
    except msgspec.DecodeError:
        raise _Bad(number, "not JSON: the line was edited or cut") from None
    if not isinstance(fields, dict):
        raise _Bad(number, "not a JSON object: the line was edited")
    claimed, prev = fields.pop("hash", None), fields.get("prev")
    if not isinstance(claimed, str) or not isinstance(prev, str):
        raise _Bad(number, "no hash or prev: the line was edited or does not belong to an export")
    body = _canonical(fields)
    if _digest(prev, body) != claimed:
        raise _Bad(number, "its hash does not match its content: the line was edited")
    if _with_hash(body, claimed) != text:
        raise _Bad(number, "not in canonical form: the line was re-encoded or edited")
    fields["hash"] = claimed
    return _Line(number, fields)


def _parse_or_none(number: int, raw: bytes) -> _Line | None:
    try:
        return _parse(number, raw)
    except _Bad:
        return None


class _Verifier:
    def __init__(self, expected_head: str | None) -> None:
        self.expected_head = expected_head
        self.org: str | None = None
        self.events = 0
        self.lines = 0
        self.head: str | None = None

    def report(self, problem: AuditProblem | None) -> AuditReport:
        return AuditReport(problem is None, self.org, self.events, self.lines, self.head, problem)

    def run(self, raw_lines: Iterable[bytes]) -> None:
        previous: _Line | None = None
        last_seq = 0
        ended = False
        numbered = chain(enumerate(raw_lines, start=1), [None])
        lookahead: _Line | None = None
        for current, following in pairwise(numbered):
            assert current is not None
            line = lookahead if lookahead is not None else _parse(*current)
            lookahead = None
            self.lines = line.number
            if ended:
                raise _Bad(line.number, "a line follows the end line: lines were appended after the export")
            if previous is not None and line.prev != previous.hash and following is not None:
                lookahead = _parse_or_none(*following)  # only to explain the break; None if it is bad itself
            self._check_link(line, previous, lookahead, last_seq)
            if line.kind == "event":
                last_seq = self._check_event(line, last_seq)
            elif line.kind == "end":
                self._check_end(line, last_seq)
                ended = True
            self.head = line.hash
            previous = line
        if previous is None:
            raise _Bad(1, "the file is empty: no audit header")
        if not ended:
            raise _Bad(
                self.lines + 1,
                "the file ends without its end line: lines were dropped from its end (or the export was cut short)",
            )
        if self.expected_head is not None and self.head != self.expected_head:
            raise _Bad(
                self.lines,
                f"the head is {self.head}, not the expected {self.expected_head}: "
                "this is not the export whose head you kept (it was rewritten or is another export)",
            )

    def _check_link(self, line: _Line, previous: _Line | None, following: _Line | None, last_seq: int) -> None:
        if previous is None:
            if line.kind != "header" or line.fields.get("format") != FORMAT:
                raise _Bad(line.number, f"the first line is not a {FORMAT} header: lines were dropped or reordered")
            if line.prev != GENESIS:
                raise _Bad(line.number, "the header does not start the chain (prev is not the genesis hash)")
            org = line.fields.get("org")
            self.org = org if isinstance(org, str) else None
            return
        if line.kind == "header":
            raise _Bad(line.number, "a second header: another export was inserted or appended")
        if line.prev == previous.hash:
            return
        seq = line.fields.get("seq")
        if line.kind == "event" and isinstance(seq, int) and seq <= last_seq:
            raise _Bad(line.number, f"seq {seq} comes after seq {last_seq}: lines were reordered")
        if following is not None and following.prev == previous.hash:
            moved = "swapped with the next line" if line.prev == following.hash else "inserted or moved here"
            raise _Bad(line.number, f"this line does not follow line {previous.number}: it was {moved} (reordered)")
        raise _Bad(
            line.number,
            f"this line does not follow line {previous.number} (its prev is not that line's hash): "
            f"a line between them was dropped, or line {previous.number} was altered and re-hashed",
        )

    def _check_event(self, line: _Line, last_seq: int) -> int:
        seq, subject = line.fields.get("seq"), line.fields.get("subject")
        if not isinstance(seq, int) or seq <= last_seq:
            raise _Bad(line.number, f"seq {seq!r} does not come after seq {last_seq}: lines were reordered")
        if self.org is not None and not (isinstance(subject, str) and subject.startswith(f"cp.{self.org}.")):
            raise _Bad(line.number, f"an event of another org ({subject!r}) in an export of {self.org}")
        self.events += 1
        return seq

    def _check_end(self, line: _Line, last_seq: int) -> None:
        counted = line.fields.get("events")
        if counted != self.events or line.fields.get("last_seq") != last_seq:
            raise _Bad(
                line.number,
                f"the end line records {counted} events up to seq {line.fields.get('last_seq')}, the file holds "
                f"{self.events} up to seq {last_seq}: event lines were dropped or added",
            )
