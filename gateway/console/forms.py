"""An approval's ``form`` (a JSON Schema) as HTML fields, and the posted fields back as the structured
``response`` the schema describes. Only flat objects of scalars get fields of their own; any other
schema is answered as JSON in one text box. The schema itself is checked where the decision is made."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import FormData

from gateway.http import json_depth
from gateway.problems import Problem

FIELD_PREFIX = "response."
RAW_FIELD = "response_json"
SCALAR_TYPES = ("string", "integer", "number", "boolean")


@dataclass(frozen=True)
class FormField:
    name: str
    label: str
    kind: str
    """``text``, ``textarea``, ``select``, ``checkbox``, ``integer`` or ``number``."""
    required: bool
    help: str
    choices: tuple[str, ...] = ()
    default: Any = None

    @property
    def input_name(self) -> str:
        return FIELD_PREFIX + self.name


def form_fields(schema: dict[str, Any] | None) -> list[FormField] | None:
    """Fields for a flat object schema; None when the answer must be written as JSON (or no form)."""
    if not schema or schema.get("type") != "object" or not isinstance(schema.get("properties"), dict):
        return None
    required = set(schema.get("required") or ())
    fields = []
    for name, spec in schema["properties"].items():
        if not isinstance(spec, dict) or spec.get("type") not in SCALAR_TYPES:
            return None
        kind = {"integer": "integer", "number": "number", "boolean": "checkbox"}.get(spec["type"], "text")
        choices = tuple(str(choice) for choice in spec.get("enum") or ())
        if choices:
            kind = "select"
        elif kind == "text" and (spec.get("maxLength") or 0) > 200:
            kind = "textarea"
        fields.append(
            FormField(
                name=str(name),
                label=str(spec.get("title") or name),
                kind=kind,
                required=name in required,
                help=str(spec.get("description") or ""),
                choices=choices,
                default=spec.get("default"),
            )
        )
    return fields


def posted_response(schema: dict[str, Any] | None, form: FormData, *, max_depth: int) -> Any:
    """The response the person gave: the fields of a flat form as typed values, or the JSON text box
    (nested at most ``max_depth``, as an API body). None when nothing was given (the decision then
    checks whether the form needed an answer)."""
    fields = form_fields(schema)
    if fields is None:
        raw = form.get(RAW_FIELD)
        if not isinstance(raw, str) or not raw.strip():
            return None
        if json_depth(raw.encode()) > max_depth:
            raise Problem(422, f"the answer nests arrays or objects more than {max_depth} deep; flatten it")
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise Problem(422, f"the answer is not valid JSON: {exc}") from exc
    answer: dict[str, Any] = {}
    for field in fields:
        value = form.get(field.input_name)
        if field.kind == "checkbox":
            answer[field.name] = value is not None
            continue
        if not isinstance(value, str) or value == "":
            continue
        answer[field.name] = _typed(field, value)
    return answer


def _typed(field: FormField, value: str) -> Any:
    try:
        if field.kind == "integer":
            return int(value)
        if field.kind == "number":
            return float(value)
    except ValueError:
        raise Problem(422, f"{field.label} must be a {field.kind}, not {value!r}") from None
    return value
