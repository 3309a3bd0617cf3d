"""Secrets at rest: JSON sealed with Fernet under `DURACHAT_SECRETS_KEY`. Never imports fastapi, temporalio,
sqlalchemy or redis.

A sealed value is a Fernet token (AES-128-CBC with an HMAC-SHA256 over it), so it is both secret and
tamper-evident: `open` refuses anything not sealed under the same key. Outside production a missing
key means a fixed development key (production refuses to start without one, core/settings.py), so
development data opens after a restart; it protects nothing and is never meant to.
"""

from __future__ import annotations

import json
from typing import Any, Final

from cryptography.fernet import Fernet, InvalidToken

from core.settings import Settings

# Fernet key of development and test stacks only: 32 bytes of "durachat-development-secrets-key"
# in url-safe base64.
DEV_SECRETS_KEY: Final = "ZHVyYWNoYXQtZGV2ZWxvcG1lbnQtc2VjcmV0cy1rZXk="


class SecretsUnreadable(Exception):
    """A sealed value that does not open under this key: tampered with, or sealed under another."""


class SecretBox:
    """Seals JSON objects for storage and opens them again."""

    def __init__(self, key: str | bytes) -> None:
        try:
            self._fernet = Fernet(key)
        except ValueError as exc:
            # The key itself is never part of the message.
            raise ValueError(
                "the secrets key is not a Fernet key (32 url-safe base64 bytes)"
            ) from exc

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretBox:
        key = settings.secrets_key.get_secret_value() if settings.secrets_key else None
        return cls(key or DEV_SECRETS_KEY)

    @staticmethod
    def generate_key() -> str:
        """A new random key, for `DURACHAT_SECRETS_KEY`."""
        return Fernet.generate_key().decode("ascii")

    def seal(self, value: dict[str, Any]) -> str:
        return self._fernet.encrypt(json.dumps(value, separators=(",", ":")).encode()).decode(
            "ascii"
        )

    def open(self, sealed: str) -> dict[str, Any]:
        try:
            opened = json.loads(self._fernet.decrypt(sealed.encode("ascii")))
        except (InvalidToken, UnicodeEncodeError) as exc:
            raise SecretsUnreadable("stored secrets do not open under the configured key") from exc
        if not isinstance(opened, dict):
            raise SecretsUnreadable("stored secrets are not a JSON object")
        return opened
