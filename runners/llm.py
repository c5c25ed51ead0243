"""Model calls through LiteLLM, as a workflow's ``ctx.llm`` makes them (``runners.context``): LiteLLM
imported on first use, and what a call is recorded as (the request without credentials, the answer,
the provider, token usage and cost)."""

from __future__ import annotations

import asyncio
import importlib
import os
from types import ModuleType
from typing import Any

import msgspec

from controlplane import logs
from core.domain.events import LlmCall, LlmUsage

_SECRET_OPTION_WORDS = ("key", "token", "secret", "password", "authorization", "header")


async def load_litellm() -> ModuleType:
    """LiteLLM takes seconds to import: it is imported when a workflow first calls a model, in a
    thread, so neither a runner's start nor its event loop (and the heartbeats that keep its leases)
    waits for it."""
    # Otherwise LiteLLM downloads its model price map at import; the bundled copy keeps a runner off the network.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    module = await asyncio.to_thread(importlib.import_module, "litellm")
    logs.adopt()  # its lines in the runner's log format, not in a second one of LiteLLM's
    return module


def _recordable(options: dict[str, Any]) -> dict[str, Any]:
    """The options worth keeping in the log: JSON values, never credentials."""
    kept = {}
    for option, value in options.items():
        if any(word in option.lower() for word in _SECRET_OPTION_WORDS):
            continue
        try:
            msgspec.json.encode(value)
        except (TypeError, msgspec.EncodeError):
            continue
        kept[option] = value
    return kept


def _usage(reported: dict[str, Any]) -> LlmUsage:
    counts = {field: reported.get(field) or 0 for field in LlmUsage.__struct_fields__}
    return LlmUsage(**counts)


def _provider(litellm: ModuleType, model: str) -> str | None:
    try:
        return litellm.get_llm_provider(model)[1]
    except Exception:  # LiteLLM cannot tell for a private or unknown model: record none
        return None


async def recorded_completion(
    model: str, messages: list[dict[str, Any]], options: dict[str, Any], *, workflow_model: str
) -> dict[str, Any]:
    """A LiteLLM completion of ``model``, as the journal records it (an ``LlmCall``); ``workflow_model``
    is the model the workflow asked for, kept in the request when the org's settings replaced it."""
    litellm = await load_litellm()
    response = await litellm.acompletion(model=model, messages=messages, **options)
    usage = getattr(response, "usage", None)
    try:
        cost = litellm.completion_cost(completion_response=response)
    except Exception:  # unknown pricing (a mock, a private model) is not an error
        cost = None
    answered_by = getattr(response, "model", None) or model
    request = {"model": model, "messages": messages, "options": _recordable(options)}
    recorded = LlmCall(
        request=request if model == workflow_model else {**request, "workflow_model": workflow_model},
        model=answered_by,
        provider=_provider(litellm, answered_by),
        content=response.choices[0].message.content,
        usage=None if usage is None else _usage(usage.model_dump()),
        cost_usd=cost,
    )
    return msgspec.to_builtins(recorded)  # type: ignore[no-any-return]
