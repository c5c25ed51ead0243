"""Envelope encryption of secret values, with ``cryptography``'s AES-GCM.

Each version of a secret gets a fresh 256-bit data key that encrypts its value (AES-256-GCM); the data
key is itself encrypted ("wrapped") by the master key from ``CP_SECRETS_KEY`` (base64 of 32 bytes). The
log holds only the wrapped key, the nonce, the ciphertext and the master key's id. Both encryptions
take as associated data the org, the secret's name, its version and its environment: a ciphertext
copied onto another secret, version, environment or org does not decrypt. The master key never leaves
the gateway's memory.

Rotating the master key: the new key goes in ``CP_SECRETS_KEY`` and seals everything from then on;
the keys it replaces go in ``CP_SECRETS_PREVIOUS_KEYS`` (comma-separated), which open what they sealed
and seal nothing. Every sealed value names its key's id, so the box picks the key that opens it, and
a value sealed by a key the box does not hold is refused saying which key it needs. :meth:`rewrap`
wraps a sealed value's data key with the sealing key, leaving its ciphertext as it is
(``POST /v1/secrets/rewrap`` does so for everything an org has sealed): once nothing is left under a
previous key, that key can be dropped."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from core.domain.events import SealedText

MASTER_KEY_ENV = "CP_SECRETS_KEY"
PREVIOUS_KEYS_ENV = "CP_SECRETS_PREVIOUS_KEYS"
KEY_BYTES = 32
NONCE_BYTES = 12
HOW_TO_SET = (
    f"set {MASTER_KEY_ENV} in the gateway's environment to the base64 of 32 random bytes "
    f'(e.g. `python -c "import base64, os; print(base64.b64encode(os.urandom(32)).decode())"`) and keep it in a '
    "secret store; `controlplane dev` makes one in its data dir"
)


class SecretsKeyInvalid(ValueError):
    """``CP_SECRETS_KEY`` is set to something that is not a 32-byte key in base64."""


class SecretUnreadable(Exception):
    """A sealed version cannot be opened here: sealed by another master key, or altered."""


class Sealed(NamedTuple):
    key_id: str
    wrapped_key: bytes
    nonce: bytes
    ciphertext: bytes


def generate_key_text() -> str:
    """A new master key, as ``CP_SECRETS_KEY`` holds it."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()


def _decoded(text: str, source: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SecretsKeyInvalid(f"{source} is not valid base64; {HOW_TO_SET}") from None


def _associated_data(org: str, name: str, version: int, environment: str | None) -> bytes:
    # None of these can hold the separator: org and environment are tokens, names a narrower pattern.
    return "\x1f".join(("cp-secret-v1", org, name, str(version), environment or "")).encode()


def key_id_of(master_key: bytes) -> str:
    """Names a master key (a digest of it, which reveals nothing of it) in every value it seals."""
    return hashlib.sha256(b"cp-secrets-key-id\x00" + master_key).hexdigest()[:16]


class SecretBox:
    def __init__(self, master_key: bytes, previous: Sequence[bytes] = ()) -> None:
        """Seal with ``master_key``; open with it or with any of ``previous`` (the keys it replaced)."""
        for key, source in ((master_key, MASTER_KEY_ENV), *((old, PREVIOUS_KEYS_ENV) for old in previous)):
            if len(key) != KEY_BYTES:
                raise SecretsKeyInvalid(f"{source} must hold {KEY_BYTES}-byte keys, not {len(key)}; {HOW_TO_SET}")
        self._master = AESGCM(master_key)
        self.key_id = key_id_of(master_key)
        """The id of the key that seals."""
        self._openers = {key_id_of(old): AESGCM(old) for old in previous} | {self.key_id: self._master}
        self._fingerprint_key = hmac.digest(master_key, b"cp-secrets-fingerprint", "sha256")

    @property
    def key_ids(self) -> frozenset[str]:
        """The ids of every key this box opens values with."""
        return frozenset(self._openers)

    @classmethod
    def from_text(cls, text: str, previous: str | None = None) -> SecretBox:
        """``text`` as ``CP_SECRETS_KEY`` holds it; ``previous`` as ``CP_SECRETS_PREVIOUS_KEYS`` does."""
        master = _decoded(text, MASTER_KEY_ENV)
        olds = [_decoded(old, PREVIOUS_KEYS_ENV) for old in (previous or "").split(",") if old.strip()]
        return cls(master, olds)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> SecretBox | None:
        """The box of ``CP_SECRETS_KEY`` and ``CP_SECRETS_PREVIOUS_KEYS``, or None when the first is
        unset (the secrets endpoints then say how)."""
        text = env.get(MASTER_KEY_ENV)
        return cls.from_text(text, env.get(PREVIOUS_KEYS_ENV)) if text else None

    def seal(self, org: str, name: str, version: int, environment: str | None, value: str) -> Sealed:
        aad = _associated_data(org, name, version, environment)
        data_key = AESGCM.generate_key(bit_length=256)
        nonce = os.urandom(NONCE_BYTES)
        ciphertext = AESGCM(data_key).encrypt(nonce, value.encode(), aad)
        return Sealed(self.key_id, self._wrapped(data_key, aad), nonce, ciphertext)

    def open(self, org: str, name: str, version: int, environment: str | None, sealed: Sealed) -> str:
        return self._opened(org, name, version, environment, sealed)[1]

    def rewrap(self, org: str, name: str, version: int, environment: str | None, sealed: Sealed) -> Sealed:
        """``sealed`` with its data key wrapped by the sealing key instead of the one that sealed it (a
        key this box holds): the same nonce and ciphertext, which the sealing key alone opens from then
        on. Refuses, as ``open`` does, a value that is not this one's or was altered."""
        data_key, _ = self._opened(org, name, version, environment, sealed)
        aad = _associated_data(org, name, version, environment)
        return Sealed(self.key_id, self._wrapped(data_key, aad), sealed.nonce, sealed.ciphertext)

    def _wrapped(self, data_key: bytes, aad: bytes) -> bytes:
        wrap_nonce = os.urandom(NONCE_BYTES)
        return wrap_nonce + self._master.encrypt(wrap_nonce, data_key, aad)

    def _opened(self, org: str, name: str, version: int, environment: str | None, sealed: Sealed) -> tuple[bytes, str]:
        """The data key and the value."""
        opener = self._openers.get(sealed.key_id)
        if opener is None:
            raise SecretUnreadable(
                f"version {version} of secret {name} was sealed with master key {sealed.key_id}, and this gateway "
                f"holds {', '.join(sorted(self._openers))}: give it that key in {MASTER_KEY_ENV}, or in "
                f"{PREVIOUS_KEYS_ENV} if another key now seals"
            )
        aad = _associated_data(org, name, version, environment)
        try:
            wrap_nonce, wrapped = sealed.wrapped_key[:NONCE_BYTES], sealed.wrapped_key[NONCE_BYTES:]
            data_key = opener.decrypt(wrap_nonce, wrapped, aad)
            return data_key, AESGCM(data_key).decrypt(sealed.nonce, sealed.ciphertext, aad).decode()
        except (InvalidTag, ValueError) as exc:
            raise SecretUnreadable(
                f"version {version} of secret {name} does not decrypt: its ciphertext was altered or moved"
            ) from exc

    def seal_text(self, org: str, purpose: str, value: str) -> SealedText:
        """``value`` sealed for one use (``purpose``, e.g. a notification channel's URL): it opens only for
        that org and purpose."""
        key_id, wrapped_key, nonce, ciphertext = self.seal(org, purpose, 1, None, value)
        return SealedText(key_id=key_id, wrapped_key=wrapped_key, nonce=nonce, ciphertext=ciphertext)

    def rewrap_text(self, org: str, purpose: str, sealed: SealedText) -> SealedText:
        """``sealed`` (of :meth:`seal_text`) wrapped by the sealing key, as :meth:`rewrap` does."""
        moved = self.rewrap(
            org, purpose, 1, None, Sealed(sealed.key_id, sealed.wrapped_key, sealed.nonce, sealed.ciphertext)
        )
        return SealedText(*moved)

    def open_text(self, org: str, purpose: str, sealed: SealedText) -> str:
        return self.open(
            org, purpose, 1, None, Sealed(sealed.key_id, sealed.wrapped_key, sealed.nonce, sealed.ciphertext)
        )

    def fingerprint(self, *parts: str) -> str:
        """A keyed digest of ``parts`` (a value among them) for idempotency: it tells whether a retry sent
        the same value, and reveals nothing of it to whoever reads the command ids in the log."""
        return hmac.new(self._fingerprint_key, "\x1f".join(parts).encode(), "sha256").hexdigest()
