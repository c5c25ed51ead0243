"""Issue 14, finding 4: a request without a valid credential costs the gateway little and cannot be
repeated fast. Refused credentials are throttled per client address before the next one is looked at;
an unknown key id costs one PostgreSQL lookup and is then remembered (in a bounded cache); a key id
that is not even well-formed costs none; and every cache or table keyed by what a client sends holds a
bounded number of entries."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from core.domain.ids import new_id
from gateway.auth import Authenticator, KeyRecord
from gateway.keyring import KeyRing
from gateway.problems import Problem
from gateway.services import RATE_LIMITER_BUCKETS, RateLimiter
from projections.read.keys import ApiKeyRow
from tests.gateway.conftest import Stack, own_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> AsyncIterator[Stack]:
    """A stack of this module's own: its tests change the per-address limits, and every client of a test
    stack comes from 127.0.0.1."""
    async with own_stack(tmp_path_factory.mktemp("edge-auth"), database_url) as served:
        yield served


@pytest.fixture
def lookups(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The key ids the gateway looks up in PostgreSQL during the test (the real lookup, counted)."""
    read_model = stack.services.read_model
    looked_up: list[str] = []
    real = read_model.find_api_key

    async def counted(key_id: str) -> ApiKeyRow | None:
        looked_up.append(key_id)
        return await real(key_id)

    monkeypatch.setattr(read_model, "find_api_key", counted)
    return looked_up


def client(stack: Stack, address: str = "127.0.0.1") -> httpx.AsyncClient:
    """A client whose requests come from ``address`` (any of 127.0.0.0/8 reaches the gateway)."""
    return httpx.AsyncClient(base_url=stack.url, transport=httpx.AsyncHTTPTransport(local_address=address), timeout=20)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def unknown_key() -> str:
    return f"cp_{new_id()}_no-such-secret"


async def test_refused_credentials_from_one_address_are_throttled_before_the_next_lookup(
    stack: Stack, lookups: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stack.services, "failed_auth", RateLimiter(rate=0.001, burst=3))
    refused = [unknown_key(), unknown_key()]
    async with client(stack, "127.0.0.3") as attacker, client(stack, "127.0.0.4") as neighbour:
        assert (await attacker.get("/v1/tasks")).status_code == 401  # no credential at all counts too
        for key in refused:
            assert (await attacker.get("/v1/tasks", headers=bearer(key))).status_code == 401
        assert len(lookups) == 2

        throttled = await attacker.get("/v1/tasks", headers=bearer(unknown_key()))
        assert throttled.status_code == 429, throttled.text
        assert throttled.headers["content-type"].startswith("application/problem+json")
        assert int(throttled.headers["retry-after"]) >= 1
        assert "address" in throttled.json()["detail"]
        assert len(lookups) == 2, "a throttled request must not reach PostgreSQL"
        # Throttled is the address, whatever it sends next, and only that address.
        admin = bearer(stack.keys["acme"]["admin"])
        assert (await attacker.get("/v1/tasks", headers=admin)).status_code == 429
        assert (await attacker.get("/v1/events", headers=bearer("cp_x_y"))).status_code == 429
        assert (await neighbour.get("/v1/tasks", headers=admin)).status_code == 200


async def test_an_unknown_key_id_costs_one_lookup_and_a_malformed_one_none(
    stack: Stack, lookups: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stack.services, "failed_auth", RateLimiter(rate=1000, burst=1000))
    key = unknown_key()
    malformed = [
        "cp_NOT-A-TOKEN_secret",  # upper case
        f"cp_{'a' * 64}_secret",  # too long for a token
        "cp_-dash-first_secret",
        "cp_a.b_secret",
        "cp_a\tb_secret",
        "cp_a*_secret",
    ]
    async with client(stack, "127.0.0.5") as c:
        for _ in range(5):
            r = await c.get("/v1/tasks", headers=bearer(key))
            assert r.status_code == 401, r.text
        assert lookups == [key.split("_")[1]], "an unknown key id is looked up once, then remembered"
        for odd in malformed:
            r = await c.get("/v1/tasks", headers=bearer(odd))
            assert r.status_code == 401, (odd, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
    assert len(lookups) == 1, f"malformed key ids reached PostgreSQL: {lookups[1:]}"


async def test_the_key_caches_hold_a_bounded_number_of_key_ids_and_forget_in_time() -> None:
    now = [0.0]
    looked_up: list[str] = []
    known = KeyRecord("acme", ("viewer",), "0" * 64, revoked=False)

    async def lookup(key_id: str) -> KeyRecord | None:
        looked_up.append(key_id)
        return known if key_id == "known" else None

    auth = Authenticator(lookup, cache_seconds=5.0, cache_size=8, unknown_cache_size=16, clock=lambda: now[0])
    assert await auth._record("known") == known
    for i in range(10_000):
        with pytest.raises(Problem) as refused:
            await auth.authenticate(f"Bearer cp_k{i}_secret")
        assert refused.value.status == 401
    assert len(auth._unknown) == 16
    assert len(looked_up) == 10_001
    # A flood of unknown ids does not push out a known key: the two caches are apart.
    assert await auth._record("known") == known
    assert looked_up.count("known") == 1
    # Remembered for cache_seconds, then looked up again.
    assert await auth._record("k9999") is None
    assert looked_up.count("k9999") == 1
    now[0] = 6.0
    assert await auth._record("k9999") is None
    assert looked_up.count("k9999") == 2


async def test_the_keyring_remembers_a_bounded_number_of_orgs_and_reads_a_forgotten_one_again(
    stack: Stack, lookups: list[str]
) -> None:
    created = []
    async with stack.client("globex", "admin") as admin:
        for i in range(6):
            r = await admin.post("/v1/api-keys", json={"name": f"bounded {i}", "roles": ["viewer"]})
            assert r.status_code == 201, r.text
            created.append(r.json()["id"])
    ring = KeyRing(stack.services.handler, stack.services.read_model, size=4)
    for key_id in created * 2:
        record = await ring.lookup(key_id)
        assert record is not None and record.org == "globex" and record.roles == ("viewer",)
    assert len(ring._org_of) == 4
    # Each pass read all six from PostgreSQL: four entries cannot hold six keys, the oldest went first.
    assert [key_id for key_id in lookups if key_id in created] == created * 2


def test_rate_limiter_buckets_are_bounded_and_the_recent_ones_kept() -> None:
    limiter = RateLimiter(rate=0.001, burst=1, size=8)
    assert limiter.retry_after("drained") == 0
    for i in range(1000):
        limiter.retry_after(f"198.51.100.{i}")
        assert limiter.blocked_for("drained") > 0  # asked about all along: never the one forgotten
    assert len(limiter._buckets) == 8


def test_every_limiter_of_the_gateway_is_bounded(stack: Stack) -> None:
    svc = stack.services
    for limiter in (svc.rate_limiter, svc.failed_auth):
        for i in range(RATE_LIMITER_BUCKETS + 100):
            limiter.blocked_for(f"203.0.{i // 256}.{i % 256}")
            limiter.retry_after(f"2001:db8::{i:x}")
        assert len(limiter._buckets) <= RATE_LIMITER_BUCKETS


async def test_made_up_console_cookies_are_throttled_per_address_before_the_session_lookup(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stack.services, "failed_auth", RateLimiter(rate=0.001, burst=2))
    sessions = stack.services.sessions
    looked_up: list[str | None] = []
    real = sessions.find

    async def counted(token: str | None) -> object:
        looked_up.append(token)
        return await real(token)

    monkeypatch.setattr(sessions, "find", counted)
    async with client(stack, "127.0.0.5") as attacker, client(stack, "127.0.0.6") as neighbour:
        for attempt in range(2):
            attacker.cookies.set("cp_session", f"made-up-{attempt}")
            page = await attacker.get("/console/tasks")
            assert page.status_code == 303, page.text  # to the sign-in page
        attacker.cookies.set("cp_session", "made-up-3")
        throttled = await attacker.get("/console/tasks")
        assert throttled.status_code == 429
        assert len(looked_up) == 2, "a throttled request must not look the cookie up"
        neighbour.cookies.set("cp_session", "made-up-4")
        assert (await neighbour.get("/console/tasks")).status_code == 303
