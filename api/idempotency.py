"""Repeated sends: the turn id a repeat shares with its first try, and the request fingerprint that
tells a true repeat of an `Idempotency-Key` from the key reused for another request."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

from core.contracts import ChatMode, ExternalChannel, TurnKind
from storage.api_keys import Principal

# Turn ids of repeated sends are derived from (organization, user, key) under this namespace.
IDEMPOTENT_TURN_NAMESPACE = uuid.UUID("5b0f7c1e-6a51-4f0e-9a3e-0d2c8f4a7b10")


@dataclass(frozen=True)
class IdempotentRequest:
    """A send carrying an `Idempotency-Key`, and the fingerprint of the request it came with."""

    key: str
    fingerprint: str


async def _idempotent_request(
    request: Request,
    key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=200,
            description="A repeated send with the same key attaches to the first one's turn and "
            "stream. The same key with another chat, path or body is a 422 "
            "(`/problems/idempotency-key-reused`).",
        ),
    ] = None,
) -> IdempotentRequest | None:
    if key is None:
        return None
    return IdempotentRequest(
        key=key, fingerprint=request_fingerprint(request, await request.body())
    )


IdempotencyDep = Annotated[IdempotentRequest | None, Depends(_idempotent_request)]


def request_fingerprint(request: Request, body: bytes) -> str:
    """A digest of what the request asks: method, path and body. A JSON body counts by its value,
    so a client that re-serializes it (another key order, other white space) repeats the same request."""
    try:
        canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    except ValueError:
        canonical = body
    digest = hashlib.sha256(f"{request.method} {request.url.path}\n".encode())
    digest.update(canonical)
    return digest.hexdigest()


def repeatable_turn_id(
    principal: Principal,
    *,
    kind: TurnKind,
    mode: ChatMode,
    chat_id: str | None,
    channel: ExternalChannel | None,
    client_message_id: str | None,
    idempotent: IdempotentRequest | None,
) -> str | None:
    """The turn id every repeat of this send shares with its first try, or None for a send that
    cannot be recognised as a repeat.

    A send is repeated when it carries the same `Idempotency-Key`, or, from AI SDK clients, the same
    id for the new user message in the same chat (useChat keeps a message's id when it retries).
    """
    if idempotent is not None:
        scope = f"key:{idempotent.key}"
    elif client_message_id and kind is TurnKind.SEND and mode is not ChatMode.CREATE:
        where = f"{channel.source}/{channel.id}" if channel else chat_id
        scope = f"message:{where}:{client_message_id}"
    else:
        return None
    return str(
        uuid.uuid5(
            IDEMPOTENT_TURN_NAMESPACE, f"{principal.organization_id}\n{principal.user_id}\n{scope}"
        )
    )
