"""Request and response schemas of the API key endpoints. Input, storage and output never share a class."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from api.schemas import RequestBody
from storage.api_keys import KeySummary, check_key_scope
from storage.chats import iso


class KeyCreateIn(RequestBody):
    model_config = ConfigDict(extra="forbid")

    name: (
        Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
        | None
    ) = Field(default=None, description="A label to tell keys apart.")
    user_id: (
        Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^\S(.*\S)?$")]
        | None
    ) = Field(
        default=None,
        alias="userId",
        description="Bind the key to one user of the organization: it then sees and acts on that "
        "user's chats only. Your own id for the user; no spaces at either end.",
    )
    admin: bool = Field(
        default=False,
        strict=True,
        description="An organization admin key: sees every chat of the organization and manages "
        "its keys. A key with a `userId` is never an admin key.",
    )

    @model_validator(mode="after")
    def _user_keys_are_not_admin(self) -> KeyCreateIn:
        check_key_scope(user_id=self.user_id, is_admin=self.admin)
        return self


class KeyOut(BaseModel):
    """A key as lists show it: never its secret, nor the secret's hash."""

    id: str
    name: str | None
    userId: str | None = Field(  # noqa: N815 - wire names are camelCase
        description="The user the key acts for; null for a key of the whole organization."
    )
    admin: bool
    displayPrefix: str = Field(  # noqa: N815
        description="The first characters of the secret, to tell keys apart."
    )
    createdAt: str  # noqa: N815
    revokedAt: str | None = Field(  # noqa: N815
        description="When the key stopped working; null while it works."
    )

    @staticmethod
    def fields_of(key: KeySummary) -> dict[str, object]:
        return {
            "id": key.id,
            "name": key.name,
            "userId": key.user_id,
            "admin": key.is_admin,
            "displayPrefix": key.display_prefix,
            "createdAt": iso(key.created_at),
            "revokedAt": iso(key.revoked_at) if key.revoked_at else None,
        }


class KeyCreatedOut(KeyOut):
    """A new key, with its secret: this answer is the only time the secret is shown."""

    secret: str = Field(
        description="The key to send as `Authorization: Bearer <secret>`. Store it now: it is "
        "not stored by the service and never shown again."
    )


class KeyPageOut(BaseModel):
    items: list[KeyOut] = Field(description="Oldest first.")
    total: int = Field(description="How many keys match, over all pages.")
    limit: int
    offset: int
