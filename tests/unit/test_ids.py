"""Ids, and every other field checked by a pattern, match whole values only: msgspec searches with a
pattern, and in Python's ``re`` a ``$`` also matches before a final newline, so ``"q\\n"`` and
``"admin\\n"`` used to pass (issue 14, finding 7)."""

from __future__ import annotations

import inspect
import re
from typing import Annotated

import msgspec
import msgspec.inspect as types
import pytest
from hypothesis import given
from hypothesis import strategies as st

from application import bodies
from core.domain import commands, events
from core.domain.commands import Role
from core.domain.ids import Token, new_id, validate_token, whole
from gateway import queries

TOKENS = st.from_regex(r"\A[a-z0-9][a-z0-9_-]{0,62}\Z")
TRAILERS = st.sampled_from(["\n", "\r\n", "\n\n", "\r", " ", "\t", "\x00", "\u2028", "\x0b"])


def accepts(kind: object, value: str) -> bool:
    try:
        msgspec.convert(value, kind)
    except msgspec.ValidationError:
        return False
    return True


def valid_token(value: str) -> bool:
    try:
        validate_token(value, "id")
    except ValueError:
        return False
    return True


@given(TOKENS, TRAILERS)
def test_a_token_is_an_id_and_with_anything_before_or_after_it_is_not(token: str, trailer: str) -> None:
    assert valid_token(token) and accepts(Token, token)
    for changed in (token + trailer, trailer + token, token + trailer + token):
        assert not valid_token(changed), repr(changed)
        assert not accepts(Token, changed), repr(changed)


@given(st.integers(0, 2**48 - 1), st.binary(min_size=10, max_size=10))
def test_new_ids_are_tokens(ms: int, randomness: bytes) -> None:
    assert valid_token(new_id(ms, randomness))


@pytest.mark.parametrize("role", sorted(commands.ROLES))
def test_a_role_is_one_of_the_roles_exactly(role: str) -> None:
    assert accepts(Role, role)
    for changed in (role + "\n", role + "\r\n", "\n" + role, role.upper(), role + "s", f"{role}|{role}"):
        assert not accepts(Role, changed), repr(changed)


def _patterns(info: types.Type, seen: set[type]) -> set[str]:
    """Every string pattern reachable from a type."""
    match info:
        case types.StrType() if info.pattern:
            return {info.pattern}
        case types.Metadata():
            return _patterns(info.type, seen)
        case types.StructType() if info.cls not in seen:
            seen.add(info.cls)
            return set().union(*(_patterns(field.type, seen) for field in info.fields))
        case types.UnionType():
            return set().union(*(_patterns(t, seen) for t in info.types))
        case types.ListType() | types.VarTupleType() | types.SetType() | types.FrozenSetType():
            return _patterns(info.item_type, seen)
        case types.DictType():
            return _patterns(info.key_type, seen) | _patterns(info.value_type, seen)
        case types.TupleType():
            return set().union(*(_patterns(t, seen) for t in info.item_types))
    return set()


STRUCTS = [
    value
    for module in (commands, events, bodies, queries)
    for value in vars(module).values()
    if inspect.isclass(value) and issubclass(value, msgspec.Struct) and value.__module__ == module.__name__
]
PATTERNS = sorted(set().union(*(_patterns(types.type_info(struct), set()) for struct in STRUCTS)))


def test_the_patterned_fields_are_all_found() -> None:
    assert whole(r"[a-z0-9][a-z0-9_-]{0,62}") in PATTERNS  # ids
    assert len(PATTERNS) >= 6, PATTERNS  # roles, digests, hashes, module paths, operation kinds, statuses


@given(st.sampled_from(PATTERNS).flatmap(lambda p: st.tuples(st.just(p), st.from_regex(p))), TRAILERS)
def test_no_pattern_of_a_command_body_or_query_accepts_a_value_with_a_newline_after_it(
    pattern_and_value: tuple[str, str], trailer: str
) -> None:
    pattern, value = pattern_and_value
    kind = Annotated[str, msgspec.Meta(pattern=pattern)]
    assert accepts(kind, value)
    assert re.fullmatch(pattern, value), "whole values, as the pattern says"
    assert not accepts(kind, value + trailer), (pattern, value + trailer)
