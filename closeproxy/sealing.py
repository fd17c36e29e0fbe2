"""Sealing a stored grant with AES-GCM, for a shared store that others can read.

The key is 32 random bytes in standard base64 (`openssl rand -base64 32`), from
--token-store-key-file or CLOSEPROXY_TOKEN_STORE_SECRET. Each sealed value carries its
own random 96-bit nonce, and the associated data binds it to the Redis key and version
it was written under, so a value copied to another key or version does not open.
The `cryptography` package comes with the `closeproxy[redis]` extra.
"""

from __future__ import annotations

import base64
import binascii
import os

from .errors import ConfigError
from .grant import SealedGrant

KEY_BYTES = 32
NONCE_BYTES = 12
PREFIX = "aes-256-gcm:"
KEY_HELP = "32 random bytes in standard base64, as `openssl rand -base64 32` prints them"


def parse_key(text: str) -> bytes:
    """The raw key from its base64 form, or a ConfigError that never echoes it."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"the token store secret is not base64: expected {KEY_HELP}") from None
    if len(key) != KEY_BYTES:
        raise ConfigError(
            f"the token store secret is {len(key)} bytes, not {KEY_BYTES}: expected {KEY_HELP}"
        )
    return key


def is_sealed(value: str) -> bool:
    return value.startswith(PREFIX)


class Sealer:
    """Seals and opens values with one key."""

    def __init__(self, key: bytes) -> None:
        try:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        except ImportError:  # pragma: no cover - the extra brings it
            raise ConfigError(
                "a token store secret needs the cryptography package: "
                "pip install 'closeproxy[redis]'"
            ) from None
        self._aead = AESGCM(key)

    def seal(self, plain: bytes, context: str) -> str:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plain, context.encode())
        return PREFIX + base64.b64encode(nonce + sealed).decode("ascii")

    def open(self, value: str, context: str, where: str, setting: str) -> bytes:
        """The plain value; SealedGrant names `where` it is and the `setting` to fix."""
        from cryptography.exceptions import InvalidTag

        try:
            raw = base64.b64decode(value[len(PREFIX) :], validate=True)
            return self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.encode())
        except (binascii.Error, ValueError, InvalidTag):
            # SealedGrant: another process's grant, never overwritten nor wiped from here.
            raise SealedGrant(
                f"the tokens in {where} do not open with this token store secret: "
                f"set the same {setting} as the process that stored them"
            ) from None
