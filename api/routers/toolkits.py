"""Toolkit endpoints: organization admins register MCP servers (create, list, read, update, delete) and
list a server's tools live. Secrets (headers, token) are write-only: no answer or log line holds one.
"""

from __future__ import annotations

from typing import Annotated, Any

import httpx
import structlog
from fastapi import APIRouter, Path, Response
from fastapi.exceptions import RequestValidationError

from agent_tools.base import ToolFailed
from agent_tools.mcp import McpToolkits
from api.deps import AdminPrincipal, SessionDep, StateDep
from api.schemas import (
    ToolkitCreate,
    ToolkitListOut,
    ToolkitPublic,
    ToolkitToolOut,
    ToolkitToolsOut,
    ToolkitUpdate,
)
from core.errors import ConflictError, NotFoundError, UpstreamError
from core.secrets import SecretBox
from outbound.guard import OutboundPolicy, OutboundRefused, check_outbound_url
from storage import toolkits
from storage.toolkits import (
    KEEP,
    ToolkitChanges,
    ToolkitNameTaken,
    ToolkitRecord,
    ToolkitSecrets,
)

router = APIRouter(prefix="/v1/toolkits", tags=["toolkits"])
log = structlog.get_logger(__name__)

PROBLEM: dict[str, Any] = {"content": {"application/problem+json": {}}}
Responses = dict[int | str, dict[str, Any]]
UNAUTHORIZED: Responses = {401: {"description": "Missing or invalid API key", **PROBLEM}}
FORBIDDEN: Responses = {403: {"description": "The API key is not an admin key", **PROBLEM}}
NOT_FOUND: Responses = {404: {"description": "No such toolkit in this organization", **PROBLEM}}
CONFLICT: Responses = {
    409: {"description": "The organization has a toolkit of that name", **PROBLEM}
}
INVALID: Responses = {
    422: {
        "description": "Invalid parameters or body, or a URL the outbound guard refuses",
        **PROBLEM,
    }
}
UPSTREAM: Responses = {
    502: {"description": "The MCP server could not be reached or listed its tools", **PROBLEM}
}

ToolkitId = Annotated[str, Path(max_length=64, description="The toolkit's id (`tk_...`)")]


def _box(state: StateDep) -> SecretBox:
    return SecretBox.from_settings(state.settings)


async def _check_reachable(state: StateDep, url: str) -> None:
    """Refuse, as a 422 on `url`, a server the outbound guard would never connect to: better told
    now than at a turn's first tool call."""
    try:
        await check_outbound_url(OutboundPolicy.from_settings(state.settings), url)
    except OutboundRefused as exc:
        raise _invalid_url(url, str(exc)) from None
    except httpx.ConnectError as exc:
        raise _invalid_url(url, str(exc)) from None


def _check_secrets_change(body: ToolkitUpdate, current: ToolkitRecord) -> None:
    """A token and an Authorization header never go together, counting what the update keeps."""
    given = body.model_fields_set
    if not given & {"headers", "token"}:
        return
    has_token = body.token is not None if "token" in given else current.has_token
    header_names = list(body.headers or {}) if "headers" in given else current.header_names
    if has_token and "authorization" in (name.lower() for name in header_names):
        raise RequestValidationError(
            [
                {
                    "type": "value_error",
                    "loc": ("body",),
                    "msg": "give either `token` or an Authorization header, not both",
                    "input": None,
                }
            ]
        )


def _invalid_url(url: str, message: str) -> RequestValidationError:
    return RequestValidationError(
        [{"type": "value_error", "loc": ("body", "url"), "msg": message, "input": url}]
    )


@router.post(
    "",
    status_code=201,
    summary="Register an MCP server as a toolkit of the organization",
    responses={**UNAUTHORIZED, **FORBIDDEN, **CONFLICT, **INVALID},
)
async def create_toolkit(
    body: ToolkitCreate, principal: AdminPrincipal, session: SessionDep, state: StateDep
) -> ToolkitPublic:
    await _check_reachable(state, body.url)
    try:
        record = await toolkits.create_toolkit(
            session,
            _box(state),
            principal.organization_id,
            name=body.name,
            description=body.description,
            url=body.url,
            secrets=ToolkitSecrets(headers=body.headers, token=body.token),
            allowed_tools=body.allowed_tools,
            approval_tools=body.approval_tools,
            enabled=body.enabled,
        )
    except ToolkitNameTaken as exc:
        raise ConflictError(str(exc)) from None
    await session.commit()
    log.info(
        "toolkits.created",
        organization_id=principal.organization_id,
        toolkit_id=record.id,
        name=record.name,
        by_key_id=principal.api_key_id,
    )
    return ToolkitPublic.of(record)


@router.get(
    "",
    summary="The organization's toolkits, by name (never their secrets)",
    responses={**UNAUTHORIZED, **FORBIDDEN, **INVALID},
)
async def list_toolkits(
    principal: AdminPrincipal, session: SessionDep, state: StateDep
) -> ToolkitListOut:
    records = await toolkits.list_toolkits(session, _box(state), principal.organization_id)
    return ToolkitListOut(items=[ToolkitPublic.of(record) for record in records])


@router.get(
    "/{toolkit_id}",
    summary="One of the organization's toolkits (never its secrets)",
    responses={**UNAUTHORIZED, **FORBIDDEN, **NOT_FOUND, **INVALID},
)
async def get_toolkit(
    toolkit_id: ToolkitId, principal: AdminPrincipal, session: SessionDep, state: StateDep
) -> ToolkitPublic:
    record = await toolkits.get_toolkit(session, _box(state), principal.organization_id, toolkit_id)
    if record is None:
        raise NotFoundError("toolkit not found")
    return ToolkitPublic.of(record)


@router.patch(
    "/{toolkit_id}",
    summary="Change a toolkit: fields left out stay as they are",
    responses={**UNAUTHORIZED, **FORBIDDEN, **NOT_FOUND, **CONFLICT, **INVALID},
)
async def update_toolkit(
    toolkit_id: ToolkitId,
    body: ToolkitUpdate,
    principal: AdminPrincipal,
    session: SessionDep,
    state: StateDep,
) -> ToolkitPublic:
    box = _box(state)
    organization_id = principal.organization_id
    current = await toolkits.get_toolkit(session, box, organization_id, toolkit_id)
    if current is None:
        raise NotFoundError("toolkit not found")
    given = body.model_fields_set
    _check_secrets_change(body, current)
    if body.url is not None and body.url != current.url:
        await _check_reachable(state, body.url)
    changes = ToolkitChanges(
        name=body.name if body.name is not None else KEEP,
        description=body.description if body.description is not None else KEEP,
        url=body.url if body.url is not None else KEEP,
        headers=(body.headers or {}) if "headers" in given else KEEP,
        token=body.token if "token" in given else KEEP,
        allowed_tools=body.allowed_tools if "allowed_tools" in given else KEEP,
        approval_tools=body.approval_tools if body.approval_tools is not None else KEEP,
        enabled=body.enabled if body.enabled is not None else KEEP,
    )
    try:
        record = await toolkits.update_toolkit(session, box, organization_id, toolkit_id, changes)
    except ToolkitNameTaken as exc:
        raise ConflictError(str(exc)) from None
    if record is None:
        raise NotFoundError("toolkit not found")
    await session.commit()
    log.info(
        "toolkits.updated",
        organization_id=organization_id,
        toolkit_id=toolkit_id,
        # Field names only: values may be secrets.
        fields=sorted(given),
        by_key_id=principal.api_key_id,
    )
    return ToolkitPublic.of(record)


@router.delete(
    "/{toolkit_id}",
    status_code=204,
    summary="Delete a toolkit and its secrets; turns stop offering its tools",
    responses={
        204: {"description": "The toolkit is deleted"},
        **UNAUTHORIZED,
        **FORBIDDEN,
        **NOT_FOUND,
        **INVALID,
    },
)
async def delete_toolkit(
    toolkit_id: ToolkitId, principal: AdminPrincipal, session: SessionDep
) -> Response:
    if not await toolkits.delete_toolkit(session, principal.organization_id, toolkit_id):
        raise NotFoundError("toolkit not found")
    await session.commit()
    log.info(
        "toolkits.deleted",
        organization_id=principal.organization_id,
        toolkit_id=toolkit_id,
        by_key_id=principal.api_key_id,
    )
    return Response(status_code=204)


@router.get(
    "/{toolkit_id}/tools",
    summary="The tools the toolkit's server offers now, allow list applied, as turns offer them",
    description="Asks the server live (within `DURACHAT_MCP_LIST_TIMEOUT_SECONDS`), whether or not "
    "the toolkit is enabled, so an admin can check a toolkit before turning it on.",
    responses={**UNAUTHORIZED, **FORBIDDEN, **NOT_FOUND, **INVALID, **UPSTREAM},
)
async def list_toolkit_tools(
    toolkit_id: ToolkitId, principal: AdminPrincipal, session: SessionDep, state: StateDep
) -> ToolkitToolsOut:
    connections = await toolkits.toolkit_connections(
        session, _box(state), principal.organization_id, [toolkit_id], enabled_only=False
    )
    # The server may take seconds to answer: no database connection is held meanwhile.
    await session.close()
    if not connections:
        raise NotFoundError("toolkit not found")
    try:
        tools = await McpToolkits.from_settings(state.settings).list_tools(connections[0])
    except ToolFailed as exc:
        raise UpstreamError(
            exc.message, extra={"toolkitId": toolkit_id, "retryable": exc.retryable}
        ) from None
    return ToolkitToolsOut(
        toolkitId=toolkit_id,
        tools=[
            ToolkitToolOut(
                name=tool.name,
                toolName=tool.tool_name,
                description=tool.definition.description,
                inputSchema=tool.definition.input_schema,
                needsApproval=tool.needs_approval,
            )
            for tool in tools
        ],
    )
