"""Chat management: list, find by channel, change settings, delete, truncate, page messages and turns.

Registered before the turn endpoints of api/routers/chats.py, so `/v1/chats/by-external` is not
taken for a chat id.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import structlog
from fastapi import APIRouter, Header, Query, Response
from sqlalchemy import func
from sqlalchemy.ext.asyncio import AsyncSession

from api.chat_views import FileLinksDep, chat_out, refuse_if_busy, ui_messages_out
from api.deps import CurrentPrincipal, SessionDep, StateDep, visibility_of
from api.limits import STREAM_OPEN_LIMITS
from api.routers.chats import stream_of_chat
from api.schemas import (
    ChatId,
    ChatOut,
    ChatPageOut,
    ChatSummaryOut,
    ChatUpdateIn,
    MessagePageOut,
    TruncateIn,
    TruncateOut,
    TurnPageOut,
    TurnRecordOut,
    UsageOut,
)
from api.turn_tools import missing_toolkits
from api.turns import stop_turn
from core.errors import BadRequestError, NotFoundError
from providers.base import UnknownModelError
from storage import attachments, chats
from storage.models import Chat, Turn
from storage.objects import ObjectStoreUnavailable
from storage.purge import Purger
from storage.turn_usage import usd_text

log = structlog.get_logger(__name__)

router = APIRouter(prefix="/v1/chats", tags=["chats"])

PROBLEM: dict[str, Any] = {"content": {"application/problem+json": {}}}
Responses = dict[int | str, dict[str, Any]]
UNAUTHORIZED: Responses = {401: {"description": "Missing or invalid API key", **PROBLEM}}
NOT_FOUND: Responses = {404: {"description": "No such chat for this caller", **PROBLEM}}
INVALID: Responses = {422: {"description": "Invalid parameters or body", **PROBLEM}}
BUSY: Responses = {409: {"description": "The chat has an active or queued turn", **PROBLEM}}

Limit = Annotated[int, Query(ge=1, le=100, description="Page size, 1 to 100")]
Offset = Annotated[int, Query(ge=0, le=1_000_000, description="Items to skip")]


@router.get(
    "",
    summary="The caller's live chats: pinned first, then the most recently updated",
    responses={**UNAUTHORIZED, **INVALID},
)
async def list_chats(
    principal: CurrentPrincipal,
    session: SessionDep,
    limit: Limit = 20,
    offset: Offset = 0,
    source: Annotated[
        Literal["discord", "slack", "dashboard", "api"] | None,
        Query(description="Only chats bound to a channel of this source"),
    ] = None,
    folder: Annotated[
        str | None,
        Query(min_length=1, max_length=100, description="Only chats in this folder (exact name)"),
    ] = None,
    q: Annotated[
        str | None, Query(min_length=1, max_length=200, description="Title contains (any case)")
    ] = None,
) -> ChatPageOut:
    page = await chats.list_live_chats(
        session,
        visibility_of(principal),
        limit=limit,
        offset=offset,
        source=source,
        folder=folder,
        title_contains=q,
    )
    return ChatPageOut(
        items=[ChatSummaryOut(**ChatSummaryOut.fields_of(chat)) for chat in page.chats],
        total=page.total,
        limit=limit,
        offset=offset,
    )


@router.get(
    "/by-external",
    summary="The live chat bound to an external channel",
    responses={**UNAUTHORIZED, **NOT_FOUND, **INVALID},
)
async def get_chat_by_external_channel(
    principal: CurrentPrincipal,
    session: SessionDep,
    source: Annotated[Literal["discord", "slack", "dashboard", "api"], Query()],
    id: Annotated[str, Query(min_length=1, max_length=200)],
    links: FileLinksDep,
) -> ChatOut:
    chat = await chats.get_live_chat_by_channel(session, visibility_of(principal), source, id)
    if chat is None:
        raise NotFoundError("no live chat is bound to that channel")
    return await chat_out(session, chat, links)


@router.get(
    "/by-external/stream",
    summary="Resume the active stream of the chat bound to an external channel (204 when none)",
    status_code=200,
    responses={
        200: {"description": "The UI message stream", "content": {"text/event-stream": {}}},
        204: {"description": "No turn is active, or no live chat is bound to the channel"},
        **UNAUTHORIZED,
        **INVALID,
    },
    dependencies=[STREAM_OPEN_LIMITS],
)
async def resume_stream_by_external_channel(
    principal: CurrentPrincipal,
    state: StateDep,
    source: Annotated[Literal["discord", "slack", "dashboard", "api"], Query()],
    id: Annotated[str, Query(min_length=1, max_length=200)],
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=200)] = None,
) -> Response:
    """A bot that restarts picks up where it left off by the channel it knows, not a chat id."""
    async with state.sessions() as session:
        chat = await chats.get_live_chat_by_channel(session, visibility_of(principal), source, id)
    if chat is None:
        # Another tenant's channel answers the same: nothing leaks.
        return Response(status_code=204)
    return await stream_of_chat(state, principal, chat, last_event_id)


@router.patch(
    "/{chat_id}",
    summary="Change a chat's title, pinned, instructions, default model, mood, folder or tools",
    responses={
        **UNAUTHORIZED,
        400: {"description": "Unknown model", **PROBLEM},
        **NOT_FOUND,
        **INVALID,
    },
)
async def update_chat(
    chat_id: ChatId,
    body: ChatUpdateIn,
    principal: CurrentPrincipal,
    session: SessionDep,
    state: StateDep,
) -> ChatSummaryOut:
    changes = body.model_dump(include=body.model_fields_set)
    if changes.get("model") is not None:
        try:
            state.providers.resolve(changes["model"])
        except UnknownModelError as exc:
            raise BadRequestError(
                str(exc), extra={"availableModels": state.providers.available_models()}
            ) from exc
    if changes.get("mood") == "normal":
        changes["mood"] = None  # normal is the absence of a mood line
    if changes.get("toolkit_ids"):
        changes["toolkit_ids"] = list(dict.fromkeys(changes["toolkit_ids"]))
        missing = await missing_toolkits(state, principal, changes["toolkit_ids"])
        if missing:
            raise BadRequestError(f"no such toolkits: {', '.join(missing)}")
    chat = await _live_chat(session, principal, chat_id, for_update=True)
    for name, value in changes.items():
        setattr(chat, name, value)
    if changes:
        chat.updated_at = func.now()
    await session.commit()
    await session.refresh(chat)
    return ChatSummaryOut(**ChatSummaryOut.fields_of(chat))


@router.delete(
    "/{chat_id}",
    status_code=204,
    summary="Delete a chat: stops its turns; later reads are 404 and its channel is free at once",
    responses={**UNAUTHORIZED, **NOT_FOUND, **INVALID},
)
async def delete_chat(
    chat_id: ChatId, principal: CurrentPrincipal, session: SessionDep, state: StateDep
) -> Response:
    chat = await _live_chat(session, principal, chat_id, for_update=True)
    to_stop = await chats.soft_delete_chat(session, chat)
    await session.commit()
    # After the commit: no new turn can claim the chat any more, so these are all there are.
    for turn_id in to_stop:
        await stop_turn(state, principal.organization_id, turn_id)
    return Response(status_code=204)


@router.post(
    "/{chat_id}/truncate",
    summary="Keep the N newest messages of the active branch, delete the older ones",
    responses={**UNAUTHORIZED, **NOT_FOUND, **BUSY, **INVALID},
)
async def truncate_chat(
    chat_id: ChatId,
    body: TruncateIn,
    principal: CurrentPrincipal,
    session: SessionDep,
    state: StateDep,
) -> TruncateOut:
    chat = await _live_chat(session, principal, chat_id, for_update=True)
    await refuse_if_busy(session, chat, state.lost_turns)
    truncation = await chats.truncate_active_branch(session, chat, body.keep)
    orphaned = await attachments.unreferenced_in_chat(session, chat)
    await session.commit()
    # The files only deleted messages carried go too: objects, then rows. Should the store be
    # away, the rows stay (no read shows them: no message refers to them) and the chat's purge
    # deletes them with it.
    try:
        await Purger(state.sessions, state.objects).delete_attachments(orphaned)
    except ObjectStoreUnavailable:
        log.warning("truncate.files_kept", chat_id=chat.id, files=len(orphaned), exc_info=True)
    return TruncateOut(kept=truncation.kept, deleted=truncation.deleted)


@router.get(
    "/{chat_id}/messages",
    summary="Page through the active branch, oldest to newest",
    responses={**UNAUTHORIZED, **NOT_FOUND, **INVALID},
)
async def list_messages(
    chat_id: ChatId,
    principal: CurrentPrincipal,
    session: SessionDep,
    links: FileLinksDep,
    limit: Limit = 50,
    before: Annotated[
        str | None,
        Query(max_length=64, description="A message id: the page ends just before it"),
    ] = None,
) -> MessagePageOut:
    chat = await _live_chat(session, principal, chat_id)
    branch = await chats.load_active_branch(session, chat)
    end = len(branch)
    if before is not None:
        ids = [message.id for message in branch]
        if before not in ids:
            raise NotFoundError("no such message in the chat's active branch")
        end = ids.index(before)
    start = max(0, end - limit)
    return MessagePageOut(
        messages=await ui_messages_out(session, chat, branch[start:end], links), hasMore=start > 0
    )


@router.get(
    "/{chat_id}/turns",
    summary="The chat's turns, newest first: status, model, attempts, usage, timings, workflow ids",
    responses={**UNAUTHORIZED, **NOT_FOUND, **INVALID},
)
async def list_turns(
    chat_id: ChatId,
    principal: CurrentPrincipal,
    session: SessionDep,
    limit: Limit = 20,
    offset: Offset = 0,
) -> TurnPageOut:
    chat = await _live_chat(session, principal, chat_id)
    turns, total = await chats.list_turns(session, chat, limit=limit, offset=offset)
    return TurnPageOut(
        items=[_turn_out(turn) for turn in turns], total=total, limit=limit, offset=offset
    )


async def _live_chat(
    session: AsyncSession,
    principal: CurrentPrincipal,
    chat_id: str,
    *,
    for_update: bool = False,
) -> Chat:
    chat = await chats.get_live_chat(
        session, visibility_of(principal), chat_id, for_update=for_update
    )
    if chat is None:
        raise NotFoundError("chat not found")
    return chat


def _turn_out(turn: Turn) -> TurnRecordOut:
    total = (
        turn.input_tokens + turn.output_tokens
        if turn.input_tokens is not None and turn.output_tokens is not None
        else None
    )
    return TurnRecordOut(
        id=turn.id,
        status=turn.status,
        model=turn.model,
        attempts=turn.attempts,
        userMessageId=turn.user_message_id,
        assistantMessageId=turn.assistant_message_id,
        usage=UsageOut(
            inputTokens=turn.input_tokens,
            outputTokens=turn.output_tokens,
            totalTokens=total,
            cachedInputTokens=turn.cached_input_tokens,
            cacheWriteTokens=turn.cache_write_tokens,
            reasoningTokens=turn.reasoning_tokens,
            estimated=turn.usage_estimated,
        ),
        costUsd=usd_text(turn.cost_usd) if turn.cost_usd is not None else None,
        modelChoice=turn.model_choice,
        attemptLog=turn.attempt_log or [],
        messagesLeftOut=turn.messages_left_out or 0,
        ttftMs=turn.ttft_ms,
        durationMs=turn.duration_ms,
        finishReason=turn.finish_reason,
        error=turn.error,
        workflowId=turn.workflow_id,
        runId=turn.run_id,
        createdAt=chats.iso(turn.created_at),
        completedAt=chats.iso(turn.completed_at) if turn.completed_at else None,
    )
