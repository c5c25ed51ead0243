"""Policy bundles: an org's admin pushes a new version, which decides every later submission; a task
keeps the version it was submitted under. Versions are read from the log, never from a read model."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from application.bodies import PolicyBundleBody
from application.policy import SUBMIT_POLICY
from core.domain.commands import PushPolicyBundle
from core.domain.events import PolicyBundlePushed
from core.domain.policy_set import POLICY_AGGREGATE, POLICY_SET_ID, PolicySet, Unchanged
from gateway.http import body, handled, json, path_number, principal, services
from gateway.problems import Problem
from policies_wasm import Bundle, PolicyError, PolicyTimeout


def bundle_summary(pushed: PolicyBundlePushed) -> dict[str, Any]:
    return {
        "version": pushed.version,
        "digest": pushed.digest,
        "revision": pushed.revision,
        "entrypoints": list(pushed.entrypoints),
        "compiled": pushed.wasm is not None,
        "pushed_by": pushed.pushed_by,
        "pushed_at": pushed.at,
    }


def bundle_document(pushed: PolicyBundlePushed) -> dict[str, Any]:
    return {**bundle_summary(pushed), "modules": pushed.modules, "data": pushed.data, "wasm": pushed.wasm}


async def push(request: Request) -> Response:
    who = await principal(request, "admin")
    spec = await body(request, PolicyBundleBody)
    bundle = Bundle(modules=spec.modules, data=spec.data, wasm=spec.wasm, revision=spec.revision, origin="the request")
    if SUBMIT_POLICY not in bundle.entrypoints:
        raise Problem(
            422,
            f"the bundle declares no entrypoint {SUBMIT_POLICY}, which decides every submission; annotate that rule "
            f"with '# METADATA' and 'entrypoint: true' (declared: {', '.join(bundle.entrypoints) or 'none'})",
        )
    svc = services(request)
    gate = svc.submit_gate
    try:
        engine = await gate.evaluator.prepare(bundle)  # refused unless it compiles; then kept for use
    except PolicyError as exc:  # does not compile, or its data is no plain JSON document
        raise Problem(422, f"the bundle cannot be loaded: {exc}") from exc
    try:
        await gate.check_budget(bundle, who.org)
    except PolicyTimeout as exc:
        raise Problem(422, f"the bundle is refused: {exc}") from exc
    command = PushPolicyBundle(
        digest=bundle.digest,
        modules=dict(spec.modules),
        data=spec.data,
        wasm=spec.wasm,
        revision=spec.revision,
        entrypoints=bundle.entrypoints,
    )
    try:
        outcome = await handled(request, who, command, "policy-bundle", bundle.digest)
    except Unchanged as unchanged:
        return json({**bundle_summary(unchanged.current), "engine": engine, "unchanged": True})
    pushed = outcome.state.current
    assert isinstance(pushed, PolicyBundlePushed)
    return json({**bundle_summary(pushed), "engine": engine, "unchanged": False, "seq": outcome.seq}, 201)


async def list_bundles(request: Request) -> Response:
    who = await principal(request, "read")
    policy_set, seq = await _policy_set(request, who.org)
    current = policy_set.current
    return json(
        {
            "items": [bundle_summary(pushed) for pushed in reversed(policy_set.versions)],
            "current": None if current is None else current.version,
            "seq": seq,
        }
    )


async def get_bundle(request: Request) -> Response:
    who = await principal(request, "read")
    raw = request.path_params["version"]
    number = None if raw == "current" else path_number(request, "version", "policy bundle version")
    policy_set, _ = await _policy_set(request, who.org)
    pushed = policy_set.current if number is None else policy_set.version(number)
    if pushed is None:
        raise Problem(404, f"policy bundle version {raw!r} not found (this org has {len(policy_set.versions)})")
    return json(bundle_document(pushed))


async def _policy_set(request: Request, org: str) -> tuple[PolicySet, int]:
    state, seq = await services(request).handler.load(org, POLICY_AGGREGATE, POLICY_SET_ID)
    assert isinstance(state, PolicySet)
    return state, seq
