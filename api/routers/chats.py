"""Chat endpoints: send a message (start or continue a chat), read a chat, resume its stream."""

from __future__ import annotations

import contextlib
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from temporalio.client import WorkflowFailureError

from api.chat_views import FileLinksDep, chat_out, refuse_if_busy, ui_messages_out
from api.deps import CurrentPrincipal, SessionDep, StateDep, visibility_of
from api.file_links import FileLinks
from api.idempotency import IdempotencyDep, IdempotentRequest
from api.limits import LIMIT_RESPONSES, SEND_LIMITS, STREAM_OPEN_LIMITS
from api.relay import (
    FROM_START,
    StoredAnswer,
    check_cursor,
    parse_cursor,
    relay_turn,
    ui_message_stream_response,
)
from api.schemas import (
    BranchRequest,
    ChatId,
    ChatOut,
    EditRequest,
    MessageId,
    NewTurn,
    RegenerateRequest,
    SendMessageRequest,
    StopOut,
    StopRequest,
    TurnOut,
    UIMessageOut,
    UsageOut,
)
from api.sending import start_send
from api.state import AppState
from api.tool_answers import continue_answer
from api.turns import stop_turn
from core.contracts import (
    ChatMode,
    TurnStatus,
    turn_workflow_id,
)
from core.errors import (
    BadRequestError,
    NotFoundError,
    UpstreamError,
)
from core.ui_chunks import stored_message_chunks, unrun_turn_chunks
from storage import chats
from storage.api_keys import Principal
from storage.ids import new_id
from storage.models import Chat
from workflows.chat_turn import ChatTurnWorkflow

router = APIRouter(prefix="/v1/chats", tags=["chats"])


def _wants_stream(
    request: Request,
    stream: Annotated[bool, Query(description="false: wait and answer JSON")] = True,
) -> bool:
    """Whether a send answers with the stream: unless `?stream=false`, or it accepts only JSON."""
    if not stream:
        return False
    accept = request.headers.get("accept", "")
    return not ("application/json" in accept and "text/event-stream" not in accept)


WantsStream = Annotated[bool, Depends(_wants_stream)]

PROBLEM: dict[str, Any] = {"content": {"application/problem+json": {}}}
SSE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The AI SDK UI message stream (v1) of the turn, as Server-Sent Events; "
        "or, with `?stream=false` or `Accept: application/json`, the finished turn as JSON.",
        "model": TurnOut,
        "content": {"text/event-stream": {}},
        "headers": {
            "X-Chat-Id": {"description": "The chat's id", "schema": {"type": "string"}},
            "X-Turn-Id": {"description": "The turn's id", "schema": {"type": "string"}},
            "X-Queue-Position": {
                "description": "Only when the turn was queued (`ifBusy: queue` or `interrupt` on a "
                "busy chat): its place in line, 1 runs next. The stream starts when it runs.",
                "schema": {"type": "integer"},
            },
        },
    },
    400: {"description": "Unknown model or malformed message", **PROBLEM},
    401: {"description": "Missing or invalid API key", **PROBLEM},
    404: {"description": "No such chat for this caller", **PROBLEM},
    409: {"description": "The chat has an active turn (and `ifBusy` is `reject`)", **PROBLEM},
    415: {"description": "A file (`image`, a `file` part) of a type not accepted", **PROBLEM},
    422: {"description": "Invalid body", **PROBLEM},
    502: {"description": "The provider failed the turn (`?stream=false` only)", **PROBLEM},
    **LIMIT_RESPONSES,
}


@router.post(
    "",
    summary="Send a message to a new chat (or to the chat named by `id` / `externalChannelId`)",
    responses=SSE_RESPONSE,
    dependencies=[SEND_LIMITS],
)
async def send_to_new_chat(
    body: SendMessageRequest,
    principal: CurrentPrincipal,
    state: StateDep,
    wants_stream: WantsStream,
    idempotent: IdempotencyDep,
    links: FileLinksDep,
) -> Response:
    if body.continues_answer:
        if body.id is None:
            raise BadRequestError("continuing an answer needs the chat `id`")
        return await continue_answer(state, principal, body, body.id)
    if body.trigger == "regenerate-message":
        # Regenerating needs the chat it happens in: the AI SDK always sends its id.
        if body.id is None:
            raise BadRequestError("`trigger: regenerate-message` needs the chat `id`")
        mode, chat_id = ChatMode.CONTINUE, body.id
    elif body.external_channel_id is not None:
        mode, chat_id = ChatMode.CHANNEL, None
    elif body.id is not None:
        mode, chat_id = ChatMode.CREATE_OR_CONTINUE, body.id
    else:
        mode, chat_id = ChatMode.CREATE, new_id()
    return await _send(
        state,
        principal,
        body.as_new_turn(),
        mode,
        chat_id,
        wants_stream=wants_stream,
        idempotent=idempotent,
        links=links,
    )


@router.post(
    "/{chat_id}",
    summary="Send a message to an existing chat",
    responses=SSE_RESPONSE,
    dependencies=[SEND_LIMITS],
)
async def send_to_chat(
    chat_id: ChatId,
    body: SendMessageRequest,
    principal: CurrentPrincipal,
    state: StateDep,
    wants_stream: WantsStream,
    idempotent: IdempotencyDep,
    links: FileLinksDep,
) -> Response:
    if body.id is not None and body.id != chat_id:
        raise BadRequestError("body `id` differs from the chat id in the path")
    if body.external_channel_id is not None:
        raise BadRequestError("`externalChannelId` binds a new chat; send it to POST /v1/chats")
    if body.continues_answer:
        return await continue_answer(state, principal, body, chat_id)
    return await _send(
        state,
        principal,
        body.as_new_turn(),
        ChatMode.CONTINUE,
        chat_id,
        wants_stream=wants_stream,
        idempotent=idempotent,
        links=links,
    )


@router.post(
    "/{chat_id}/messages/{message_id}/regenerate",
    summary="Answer again: a new assistant message beside the given one (or answering the given user message)",
    responses=SSE_RESPONSE,
    dependencies=[SEND_LIMITS],
)
async def regenerate_message(
    chat_id: ChatId,
    message_id: MessageId,
    principal: CurrentPrincipal,
    state: StateDep,
    wants_stream: WantsStream,
    idempotent: IdempotencyDep,
    links: FileLinksDep,
    body: RegenerateRequest | None = None,
) -> Response:
    new_turn = (body or RegenerateRequest()).as_new_turn(message_id)
    return await _send(
        state,
        principal,
        new_turn,
        ChatMode.CONTINUE,
        chat_id,
        wants_stream=wants_stream,
        idempotent=idempotent,
        links=links,
    )


@router.post(
    "/{chat_id}/messages/{message_id}/edit",
    summary="Edit a user message: a new sibling user message (the old one stays), and its answer",
    responses=SSE_RESPONSE,
    dependencies=[SEND_LIMITS],
)
async def edit_message(
    chat_id: ChatId,
    message_id: MessageId,
    body: EditRequest,
    principal: CurrentPrincipal,
    state: StateDep,
    wants_stream: WantsStream,
    idempotent: IdempotencyDep,
    links: FileLinksDep,
) -> Response:
    return await _send(
        state,
        principal,
        body.as_new_turn(message_id),
        ChatMode.CONTINUE,
        chat_id,
        wants_stream=wants_stream,
        idempotent=idempotent,
        links=links,
    )


@router.post(
    "/{chat_id}/branch",
    summary="Show another branch: the one through the given message, down to its latest leaf",
    responses={
        401: {"description": "Missing or invalid API key", **PROBLEM},
        404: {"description": "No such chat or message", **PROBLEM},
        409: {"description": "The chat has an active turn", **PROBLEM},
    },
)
async def switch_branch(
    chat_id: ChatId,
    body: BranchRequest,
    principal: CurrentPrincipal,
    session: SessionDep,
    state: StateDep,
    links: FileLinksDep,
) -> ChatOut:
    chat = await chats.get_live_chat(session, visibility_of(principal), chat_id, for_update=True)
    if chat is None:
        raise NotFoundError("chat not found")
    await refuse_if_busy(session, chat, state.lost_turns)
    leaf = await chats.latest_leaf_under(session, chat, body.message_id)
    if leaf is None:
        raise NotFoundError("no such message in this chat")
    chat.active_leaf_id = leaf
    await session.commit()
    return await chat_out(session, chat, links)


@router.get(
    "/{chat_id}",
    summary="A chat and the messages of its active branch, as UIMessages",
    responses={
        401: {"description": "Missing or invalid API key", **PROBLEM},
        404: {"description": "No such chat", **PROBLEM},
    },
)
async def get_chat(
    chat_id: ChatId, principal: CurrentPrincipal, session: SessionDep, links: FileLinksDep
) -> ChatOut:
    chat = await chats.get_live_chat(session, visibility_of(principal), chat_id)
    if chat is None:
        raise NotFoundError("chat not found")
    return await chat_out(session, chat, links)


@router.get(
    "/{chat_id}/stream",
    summary="Resume the active turn's stream (204 when none), or continue after `Last-Event-ID`",
    status_code=200,
    responses={
        200: {
            "description": "The UI message stream, replayed from `start` or after the cursor",
            "content": {"text/event-stream": {}},
        },
        204: {
            "description": "No turn is active, or (without `Last-Event-ID`) no chat of the caller "
            "has that id yet"
        },
        400: {
            "description": "Malformed Last-Event-ID, or one past the end of the turn's stream",
            **PROBLEM,
        },
        401: {"description": "Missing or invalid API key", **PROBLEM},
        404: {"description": "No such chat (or cursor) for this caller", **PROBLEM},
        **LIMIT_RESPONSES,
    },
    dependencies=[STREAM_OPEN_LIMITS],
)
async def resume_stream(
    chat_id: ChatId,
    principal: CurrentPrincipal,
    state: StateDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=200)] = None,
) -> Response:
    async with state.sessions() as session:
        chat = await chats.get_live_chat(session, visibility_of(principal), chat_id)
    if chat is None:
        if not last_event_id:
            # `useChat({resume: true})` asks on the first load of every chat, before the chat
            # exists: nothing to resume. Another tenant's chat answers the same, so nothing leaks.
            return Response(status_code=204)
        raise NotFoundError("chat not found")
    return await stream_of_chat(state, principal, chat, last_event_id)


async def stream_of_chat(
    state: AppState, principal: Principal, chat: Chat, last_event_id: str | None
) -> Response:
    """The chat's active turn's stream from its start, or after `last_event_id`; 204 when no turn
    is active and no cursor was given."""
    async with state.sessions() as session:
        if last_event_id:
            turn_id, after = parse_cursor(last_event_id)
            # The cursor's turn must be one of this chat's: a cursor never reaches another tenant's stream.
            if await chats.get_turn(session, principal.organization_id, chat.id, turn_id) is None:
                raise NotFoundError("no such stream for this chat")
        elif chat.active_turn_id is None:
            return Response(status_code=204)
        else:
            turn_id, after = chat.active_turn_id, FROM_START
    await check_cursor(state.streams, principal.organization_id, turn_id, after)
    return ui_message_stream_response(
        relay_turn(
            state.stream_reader,
            principal.organization_id,
            turn_id,
            after,
            stored_answer=_stored_answer(state, principal.organization_id, chat.id, turn_id),
        ),
        chat_id=chat.id,
        ping_seconds=state.settings.stream_ping_seconds,
    )


@router.post(
    "/{chat_id}/stop",
    summary="Stop the chat's active turn, keeping the partial answer",
    responses={
        401: {"description": "Missing or invalid API key", **PROBLEM},
        404: {"description": "No such chat", **PROBLEM},
    },
)
async def stop_chat_turn(
    chat_id: ChatId,
    principal: CurrentPrincipal,
    state: StateDep,
    body: StopRequest | None = None,
) -> StopOut:
    requested = body.turn_id if body is not None else None
    async with state.sessions() as session:
        chat = await chats.get_live_chat(session, visibility_of(principal), chat_id)
        if chat is None:
            raise NotFoundError("chat not found")
        turn_id = chat.active_turn_id
        if requested is not None and requested != turn_id:
            # A queued turn of this chat can be stopped before it runs.
            queued = await chats.queued_turn_ids(session, chat)
            turn_id = requested if requested in queued else None
    if turn_id is None:
        return StopOut(stopped=False, turnId=None)
    stopped = await stop_turn(state, principal.organization_id, turn_id)
    return StopOut(stopped=stopped, turnId=turn_id if stopped else None)


async def _send(
    state: AppState,
    principal: Principal,
    request: NewTurn,
    mode: ChatMode,
    chat_id: str | None,
    *,
    wants_stream: bool,
    idempotent: IdempotentRequest | None,
    links: FileLinks,
) -> Response:
    accepted = await start_send(state, principal, request, mode, chat_id, idempotent=idempotent)
    headers = {"X-Turn-Id": accepted.turn_id}
    if accepted.queue_position is not None:
        headers["X-Queue-Position"] = str(accepted.queue_position)
    if wants_stream:
        return ui_message_stream_response(
            relay_turn(
                state.stream_reader,
                principal.organization_id,
                accepted.turn_id,
                stored_answer=_stored_answer(
                    state, principal.organization_id, accepted.chat_id, accepted.turn_id
                ),
            ),
            chat_id=accepted.chat_id,
            ping_seconds=state.settings.stream_ping_seconds,
            extra=headers,
        )
    return await _finished_turn_json(
        state,
        principal,
        accepted.turn_id,
        accepted.chat_id,
        accepted.assistant_message_id,
        headers,
        links,
    )


def _stored_answer(
    state: AppState, organization_id: str, chat_id: str, turn_id: str
) -> StoredAnswer:
    async def load(resuming: bool) -> list[dict[str, Any]] | None:
        async with state.sessions() as session:
            turn = await chats.get_turn(session, organization_id, chat_id, turn_id)
            if turn is None or turn.status in (TurnStatus.QUEUED, TurnStatus.RUNNING):
                return None
            message = await chats.get_message(session, organization_id, turn.assistant_message_id)
        if message is None:  # a queued turn that ended before it ran
            return unrun_turn_chunks(
                turn.status == TurnStatus.ABORTED, turn.error or "the turn ended before it ran"
            )
        return stored_message_chunks(
            message.id, message.parts, message.message_metadata, message.status, resuming=resuming
        )

    return load


async def _finished_turn_json(
    state: AppState,
    principal: Principal,
    turn_id: str,
    chat_id: str,
    assistant_message_id: str,
    headers: dict[str, str],
    links: FileLinks,
) -> JSONResponse:
    """Wait for the turn to end and answer its stored outcome; every answer, an error's too,
    carries the chat's and the turn's ids."""
    headers = {**headers, "X-Chat-Id": chat_id}
    handle = state.temporal.get_workflow_handle_for(ChatTurnWorkflow.run, turn_workflow_id(turn_id))
    # A failed turn fails its workflow; its outcome is read back below like any other.
    with contextlib.suppress(WorkflowFailureError):
        await handle.result()
    ids: dict[str, object] = {"chatId": chat_id, "turnId": turn_id}
    async with state.sessions() as session:
        message = await chats.get_message(session, principal.organization_id, assistant_message_id)
        turn = await chats.get_turn(session, principal.organization_id, chat_id, turn_id)
        chat = await chats.get_live_chat(session, visibility_of(principal), chat_id)
        message_out = (
            (await ui_messages_out(session, chat, [message], links))[0]
            if message is not None and chat is not None
            else None
        )
    status = turn.status if turn is not None else TurnStatus.REJECTED
    if message is None:
        # A queued turn that ended before it ran.
        if status == TurnStatus.REJECTED:
            # Its chat was deleted, or the message it was to regenerate or edit is gone.
            raise NotFoundError(
                turn.error if turn and turn.error else "the queued turn could not run",
                extra=ids,
                headers=headers,
            )
        payload = TurnOut(
            chatId=chat_id, turnId=turn_id, status=status, message=None, usage=UsageOut()
        )
        return JSONResponse(payload.model_dump(), headers=headers)
    if message.status == "failed":
        raise UpstreamError(
            message.message_metadata.get("error", "generation failed"), extra=ids, headers=headers
        )
    payload = TurnOut(
        chatId=chat_id,
        turnId=turn_id,
        status=status,
        message=message_out or UIMessageOut.model_validate(chats.as_ui_message(message)),
        usage=message.message_metadata.get("usage", {}),
    )
    return JSONResponse(payload.model_dump(), headers=headers)
