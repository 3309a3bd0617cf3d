"""API key endpoints: an organization admin creates, lists, reads and revokes the organization's keys."""

from __future__ import annotations

from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Path, Query, Response

from api.deps import AdminPrincipal, SessionDep
from api.key_schemas import KeyCreatedOut, KeyCreateIn, KeyOut, KeyPageOut
from core.errors import NotFoundError
from storage import api_keys

router = APIRouter(prefix="/v1/keys", tags=["keys"])
log = structlog.get_logger(__name__)

PROBLEM: dict[str, Any] = {"content": {"application/problem+json": {}}}
Responses = dict[int | str, dict[str, Any]]
UNAUTHORIZED: Responses = {401: {"description": "Missing or invalid API key", **PROBLEM}}
FORBIDDEN: Responses = {403: {"description": "The API key is not an admin key", **PROBLEM}}
NOT_FOUND: Responses = {404: {"description": "No such key in this organization", **PROBLEM}}
INVALID: Responses = {422: {"description": "Invalid parameters or body", **PROBLEM}}

KeyId = Annotated[str, Path(max_length=64, description="The key's id")]
Limit = Annotated[int, Query(ge=1, le=100, description="Page size, 1 to 100")]
Offset = Annotated[int, Query(ge=0, le=1_000_000, description="Items to skip")]


@router.post(
    "",
    status_code=201,
    summary="Create a key for the organization, or for one of its users; the secret is shown once",
    responses={
        201: {
            "description": "The new key and its secret",
            "headers": {"Location": {"description": "The key's URL", "schema": {"type": "string"}}},
        },
        **UNAUTHORIZED,
        **FORBIDDEN,
        422: {"description": "Invalid body, or `userId` with `admin: true`", **PROBLEM},
    },
)
async def create_key(
    principal: AdminPrincipal,
    session: SessionDep,
    response: Response,
    body: KeyCreateIn | None = None,
) -> KeyCreatedOut:
    body = body or KeyCreateIn()
    created = await api_keys.create_key(
        session,
        principal.organization_id,
        user_id=body.user_id,
        is_admin=body.admin,
        name=body.name,
    )
    await session.commit()
    log.info(
        "keys.created",
        organization_id=principal.organization_id,
        key_id=created.id,
        user_id=created.user_id,
        admin=created.is_admin,
        by_key_id=principal.api_key_id,
    )
    response.headers["Location"] = f"{router.prefix}/{created.id}"
    return KeyCreatedOut.model_validate({**KeyOut.fields_of(created), "secret": created.secret})


@router.get(
    "",
    summary="The organization's keys, oldest first (never their secrets)",
    responses={**UNAUTHORIZED, **FORBIDDEN, **INVALID},
)
async def list_keys(
    principal: AdminPrincipal,
    session: SessionDep,
    limit: Limit = 20,
    offset: Offset = 0,
    include_revoked: Annotated[
        bool, Query(alias="includeRevoked", description="Also list revoked keys")
    ] = False,
) -> KeyPageOut:
    organization_id = principal.organization_id
    keys = await api_keys.list_keys(
        session, organization_id, include_revoked=include_revoked, limit=limit, offset=offset
    )
    total = await api_keys.count_keys(session, organization_id, include_revoked=include_revoked)
    return KeyPageOut(
        items=[KeyOut.model_validate(KeyOut.fields_of(key)) for key in keys],
        total=total,
        limit=limit,
        offset=offset,
    )


@router.get(
    "/{key_id}",
    summary="One of the organization's keys, revoked or not (never its secret)",
    responses={**UNAUTHORIZED, **FORBIDDEN, **NOT_FOUND, **INVALID},
)
async def get_key(key_id: KeyId, principal: AdminPrincipal, session: SessionDep) -> KeyOut:
    key = await api_keys.get_key(session, principal.organization_id, key_id)
    if key is None:
        raise NotFoundError("key not found")
    return KeyOut.model_validate(KeyOut.fields_of(key))


@router.delete(
    "/{key_id}",
    status_code=204,
    summary="Revoke a key: its next request is refused. Revoking a revoked key, or your own, is fine",
    responses={
        204: {"description": "The key is revoked"},
        **UNAUTHORIZED,
        **FORBIDDEN,
        **NOT_FOUND,
        **INVALID,
    },
)
async def revoke_key(key_id: KeyId, principal: AdminPrincipal, session: SessionDep) -> Response:
    if await api_keys.get_key(session, principal.organization_id, key_id) is None:
        raise NotFoundError("key not found")
    if await api_keys.revoke_key(session, key_id, organization_id=principal.organization_id):
        await session.commit()
        log.info(
            "keys.revoked",
            organization_id=principal.organization_id,
            key_id=key_id,
            by_key_id=principal.api_key_id,
        )
    return Response(status_code=204)
