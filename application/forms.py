"""What an approval carries, checked before its command, whoever sends it: the size of its ``details``,
that its ``form`` is a JSON Schema (draft 2020-12), and that a decision's ``response`` fits that form; a
signal's payload is bounded alike. The domain records what passed here; jsonschema stays out of ``core``.
Every refusal is an ``InvalidCommand``."""

from __future__ import annotations

from typing import Any

import msgspec
import regex
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import SchemaError, ValidationError, best_match
from referencing import Registry
from referencing.exceptions import Unresolvable

from core.domain.errors import InvalidCommand

MAX_DETAILS_BYTES = 64 * 1024
MAX_FORM_BYTES = 16 * 1024
MAX_RESPONSE_BYTES = 64 * 1024
MAX_SIGNAL_PAYLOAD_BYTES = 64 * 1024
_REFERENCES = ("$ref", "$dynamicRef")
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})
_LOCAL_ONLY: Registry[Any] = Registry()
"""Without a retriever: a form's references resolve inside the form, and never make the gateway fetch a URL."""
PATTERN_SECONDS = 0.05
"""How long one ``pattern`` of a form may take on one string. A form comes from a worker, the string
from a person: with Python's backtracking ``re``, a pattern like ``(a+)+$`` on a long answer would hold
the gateway's event loop for minutes."""


class PatternTooSlow(Exception):
    pass


def _search(pattern: str, text: str) -> bool:
    try:
        return regex.search(pattern, text, timeout=PATTERN_SECONDS) is not None
    except TimeoutError:
        raise PatternTooSlow(pattern) from None


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Any:
    if validator.is_type(instance, "string") and not _search(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(validator: Any, patterns: dict[str, Any], instance: Any, schema: Any) -> Any:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for name, value in instance.items():
            if _search(pattern, name):
                yield from validator.descend(value, subschema, path=name, schema_path=pattern)


FormValidator = validators.extend(Draft202012Validator, {"pattern": _pattern, "patternProperties": _pattern_properties})
"""Draft 2020-12 with every pattern matched within :data:`PATTERN_SECONDS`."""


def holds_nul(value: Any) -> bool:
    """PostgreSQL cannot store NUL in text or JSON, so no string anywhere in a body may hold one."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(holds_nul(k) or holds_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(holds_nul(v) for v in value)
    return False


def check_details(details: Any) -> None:
    _bounded(details, MAX_DETAILS_BYTES, "details")


def check_signal_payload(payload: Any) -> None:
    """A signal's payload is kept in the task until a wait takes it: bounded like an approval's details."""
    _bounded(payload, MAX_SIGNAL_PAYLOAD_BYTES, "payload")


def check_form(form: dict[str, Any] | None) -> None:
    """Refuses (``InvalidCommand``) unless ``form`` is absent or a JSON Schema whose references all
    point inside it."""
    if form is None:
        return
    _bounded(form, MAX_FORM_BYTES, "form")
    try:
        Draft202012Validator.check_schema(form)
        remote = _remote_reference(form)
    except SchemaError as exc:
        raise InvalidCommand(
            f"form is not a valid JSON Schema (draft 2020-12): {exc.message} (at {exc.json_path})"
        ) from None
    except RecursionError:
        raise InvalidCommand("form nests schemas too deeply; flatten it") from None
    if remote is not None:
        raise InvalidCommand(f"form refers to {remote!r}: a form's $ref may only point inside it ('#/...')")


def check_response(form: dict[str, Any] | None, response: Any, *, required: bool) -> None:
    """Refuses (``InvalidCommand``) unless ``response`` is small enough and fits ``form``. An absent
    (null) response is checked too when ``required`` (an approval): a form that does not accept null
    asks for an answer."""
    _bounded(response, MAX_RESPONSE_BYTES, "response")
    if holds_nul(response):
        raise InvalidCommand("response: strings may not contain the NUL character (\\u0000)")
    if form is None or (response is None and not required):
        return
    try:
        error = best_match(FormValidator(form, registry=_LOCAL_ONLY).iter_errors(response))
    except (Unresolvable, RecursionError) as exc:
        raise InvalidCommand(f"the approval's form cannot be evaluated ({exc}); reject it instead") from None
    except PatternTooSlow as exc:
        raise InvalidCommand(
            f"the approval's form has a pattern too slow to match this response ({exc}); reject it instead"
        ) from None
    if error is None:
        return
    if response is None:
        raise InvalidCommand(f"this approval's form asks for a response: {error.message}")
    raise InvalidCommand(f"the response does not fit the approval's form: {error.message} (at {error.json_path})")


def _bounded(value: Any, limit: int, what: str) -> None:
    try:
        size = len(msgspec.json.encode(value))
    except (TypeError, UnicodeEncodeError, msgspec.EncodeError) as exc:  # a lone surrogate is no JSON text
        raise InvalidCommand(f"{what} is not JSON: {exc}") from None
    except RecursionError:
        raise InvalidCommand(f"{what} nests arrays or objects too deeply; flatten it") from None
    if size > limit:
        raise InvalidCommand(f"{what} is {size} bytes of JSON; the limit is {limit}: attach less, or a link to it")


def _remote_reference(schema: Any) -> str | None:
    """The first ``$ref`` (or ``$dynamicRef``) that does not point inside the schema, if any."""
    if isinstance(schema, list):
        return next((found for item in schema if (found := _remote_reference(item)) is not None), None)
    if not isinstance(schema, dict):
        return None
    for keyword, value in schema.items():
        if keyword in _REFERENCES and isinstance(value, str) and not value.startswith("#"):
            return value
        if keyword not in _DATA_KEYWORDS and (found := _remote_reference(value)) is not None:
            return found
    return None
