"""Finding 12: a JWT was accepted for any audience and issuer when those were not configured, and
signing keys could not rotate. JWT authentication now refuses to start without both, every token must
name them, and keys can come from the issuer's JWKS URL, picked up without a restart."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from controlplane.embedded import free_port
from gateway.auth import Authenticator, JwtSettings
from gateway.factory import GatewaySettings
from gateway.problems import Problem

AUDIENCE, ISSUER = "controlplane", "https://idp.example"
SECRET = "a-shared-secret-long-enough-for-hs256!"


async def _no_keys(key_id: str) -> None:
    return None


def _claims(**overrides: Any) -> dict[str, Any]:
    claims = {"sub": "alice", "org": "acme", "roles": ["viewer"], "exp": int(time.time()) + 60}
    claims.update(aud=AUDIENCE, iss=ISSUER)
    claims.update(overrides)
    return {name: value for name, value in claims.items() if value is not None}


async def _status(auth: Authenticator, token: str) -> int:
    try:
        await auth.authenticate(f"Bearer {token}")
    except Problem as problem:
        return problem.status
    return 200


@pytest.mark.parametrize("missing", ["audience", "issuer"])
def test_jwt_refuses_to_start_without_audience_and_issuer(missing: str) -> None:
    given = {"audience": AUDIENCE, "issuer": ISSUER}
    del given[missing]
    with pytest.raises(ValueError, match=r"CP_JWT_AUDIENCE.*CP_JWT_ISSUER"):
        JwtSettings(hs256_secret=SECRET, **given)


def test_the_gateway_settings_refuse_them_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CP_JWT_HS256_SECRET", SECRET)
    monkeypatch.delenv("CP_JWT_AUDIENCE", raising=False)
    with pytest.raises(ValueError, match="audience or the issuer"):
        GatewaySettings.from_env("nats://127.0.0.1:1", "postgresql://x/y")


def test_without_jwt_nothing_is_required() -> None:
    assert not JwtSettings().enabled


@pytest.mark.parametrize(
    ("overrides", "status"),
    [
        ({}, 200),
        ({"aud": None}, 401),
        ({"iss": None}, 401),
        ({"aud": "another-service"}, 401),
        ({"iss": "https://evil.example"}, 401),
    ],
)
async def test_tokens_must_name_this_audience_and_issuer(overrides: dict[str, Any], status: int) -> None:
    auth = Authenticator(_no_keys, JwtSettings(hs256_secret=SECRET, audience=AUDIENCE, issuer=ISSUER))
    assert await _status(auth, jwt.encode(_claims(**overrides), SECRET, algorithm="HS256")) == status


class _Issuer:
    """An identity provider's JWKS endpoint whose key set the test changes (a rotation)."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {}
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = json.dumps(
                    {
                        "keys": [
                            {
                                **json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key())),
                                "kid": kid,
                                "alg": alg,
                                "use": "sig",
                            }
                            for kid, (alg, key) in issuer.keys.items()
                        ]
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/.well-known/jwks.json"

    def sign(self, kid: str, **overrides: Any) -> str:
        alg, key = self.keys[kid]
        return jwt.encode(_claims(**overrides), key, algorithm=alg, headers={"kid": kid})


@pytest.fixture
def issuer() -> Iterator[_Issuer]:
    running = _Issuer()
    thread = threading.Thread(target=running.server.serve_forever, daemon=True)
    thread.start()
    yield running
    running.server.shutdown()
    running.server.server_close()


async def test_keys_from_a_jwks_url_rotate_without_a_restart(issuer: _Issuer) -> None:
    issuer.keys["2026-1"] = ("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    settings = JwtSettings(jwks_url=issuer.url, audience=AUDIENCE, issuer=ISSUER, jwks_refetch_seconds=0)
    auth = Authenticator(_no_keys, settings)
    first = issuer.sign("2026-1")
    assert await _status(auth, first) == 200

    issuer.keys["2026-2"] = ("ES256", ec.generate_private_key(ec.SECP256R1()))
    assert await _status(auth, issuer.sign("2026-2")) == 200  # a new key id fetches the set again
    assert await _status(auth, issuer.sign("2026-2", aud="another-service")) == 401

    forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(_claims(), forger, algorithm="RS256", headers={"kid": "2026-1"})
    assert await _status(auth, forged) == 401
    unknown = jwt.encode(_claims(), forger, algorithm="RS256", headers={"kid": "nobody"})
    assert await _status(auth, unknown) == 401


async def test_an_unreachable_jwks_url_is_a_503_not_a_401() -> None:
    url = f"http://127.0.0.1:{free_port()}/jwks.json"
    auth = Authenticator(_no_keys, JwtSettings(jwks_url=url, audience=AUDIENCE, issuer=ISSUER))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(_claims(), key, algorithm="RS256", headers={"kid": "k"})
    assert await _status(auth, token) == 503
