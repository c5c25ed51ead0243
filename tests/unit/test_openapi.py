"""The OpenAPI document the gateway serves is valid OpenAPI 3.1, by an outside validator."""

from __future__ import annotations

import json

import msgspec
from openapi_spec_validator import OpenAPIV31SpecValidator

from gateway.system import openapi_document


def test_the_served_openapi_document_passes_an_outside_validator() -> None:
    served = json.loads(msgspec.json.encode(openapi_document()))  # as /openapi.json sends it
    assert served["openapi"].startswith("3.1")
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in OpenAPIV31SpecValidator(served).iter_errors()]
    assert errors == []
