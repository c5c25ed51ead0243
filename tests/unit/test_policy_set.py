"""Property-based tests of an org's policy bundle versions: numbered 1, 2, … without gaps, never
edited, the current one is the last pushed, and pushing the current content again records nothing."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.domain.commands import SYSTEM, PushPolicyBundle
from core.domain.decider import DecisionContext
from core.domain.events import decode_event, encode_event
from core.domain.policy_set import POLICY_SET, PolicySet, Unchanged

CONTEXT = DecisionContext(org="acme", now=datetime(2026, 1, 1, tzinfo=UTC), actor=SYSTEM)
DIGESTS = [f"sha256:{str(n) * 64}" for n in range(4)]


def push(digest: str) -> PushPolicyBundle:
    return PushPolicyBundle(
        digest=digest,
        modules={"p.rego": f"package p\n\nx := {digest!r}\n"},
        data={"d": digest},
        entrypoints=("controlplane/submit",),
    )


@given(st.lists(st.sampled_from(DIGESTS), max_size=20))
def test_versions_count_up_and_only_a_change_of_content_is_recorded(digests: list[str]) -> None:
    state = POLICY_SET.initial
    recorded = []
    for digest in digests:
        current = state.current
        if current is not None and current.digest == digest:
            with pytest.raises(Unchanged, match=f"already the current version {current.version}"):
                POLICY_SET.decide(state, push(digest), CONTEXT)
            continue
        [event] = POLICY_SET.decide(state, push(digest), CONTEXT)
        assert decode_event(encode_event(event)) == event
        state = POLICY_SET.evolve(state, event)
        recorded.append(event)
    assert [pushed.version for pushed in state.versions] == list(range(1, len(recorded) + 1))
    assert state.versions == tuple(recorded), "every version is kept as it was pushed"
    assert POLICY_SET.fold(recorded) == state, "the fold of the recorded events is the state"
    for earlier, later in zip(state.versions, state.versions[1:], strict=False):
        assert earlier.digest != later.digest
    assert state.current == (recorded[-1] if recorded else None)
    assert state.version(0) is None and state.version(len(recorded) + 1) is None


def test_an_event_out_of_order_changes_nothing() -> None:
    [first] = POLICY_SET.decide(PolicySet(), push(DIGESTS[0]), CONTEXT)
    state = POLICY_SET.evolve(PolicySet(), first)
    assert POLICY_SET.evolve(state, first) == state, "a second version 1 is not a version 2"
