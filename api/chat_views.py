"""Chats and messages as the api shows them, shared by the chat routers."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from api.deps import StateDep
from api.file_links import FileLinks
from api.schemas import AttachmentOut, ChatOut, ChatSummaryOut, ChatUsageOut, UIMessageOut
from core.errors import ConflictError
from storage import attachments, budgets, chats
from storage.lost_turns import LostTurns
from storage.models import Attachment, Chat, Message, Turn
from storage.turn_usage import usd_text


def get_file_links(request: Request, state: StateDep) -> FileLinks:
    settings = state.settings
    return FileLinks(
        secret=settings.file_url_signing_key,
        expiry_seconds=settings.file_url_expiry_seconds,
        base_url=(settings.public_base_url or str(request.base_url)).rstrip("/"),
    )


FileLinksDep = Annotated[FileLinks, Depends(get_file_links)]


async def chat_out(session: AsyncSession, chat: Chat, links: FileLinks) -> ChatOut:
    """The chat with the messages of its active branch and the turns waiting in its queue.

    The user messages of queued turns follow the branch, marked `queued`: they are stored in the
    tree only when their turn runs, but a client that reloads must still see what it sent.
    """
    branch = await chats.load_active_branch(session, chat)
    queued = await chats.queued_turns(session, chat)
    files = {
        attachment.id: attachment for attachment in await attachments.list_for_chat(session, chat)
    }
    totals = await budgets.chat_usage(session, chat.organization_id, chat.id)
    return ChatOut(
        **ChatSummaryOut.fields_of(chat),
        usage=ChatUsageOut(
            turns=totals.turns,
            inputTokens=totals.tokens.input_tokens,
            outputTokens=totals.tokens.output_tokens,
            totalTokens=totals.tokens.input_tokens + totals.tokens.output_tokens,
            cachedInputTokens=totals.tokens.cached_input_tokens,
            cacheWriteTokens=totals.tokens.cache_write_tokens,
            reasoningTokens=totals.tokens.reasoning_tokens,
            costUsd=usd_text(totals.cost_usd),
        ),
        queuedTurnIds=[turn.id for turn in queued],
        messages=[
            *await ui_messages_out(session, chat, branch, links, files),
            *(
                _queued_user_message(
                    turn, position, _linked(chat, turn.queued_user_parts, links, files)
                )
                for position, turn in enumerate(queued, start=1)
                if turn.queued_user_parts
            ),
        ],
        attachments=[AttachmentOut.of(attachment) for attachment in files.values()],
    )


def _linked(
    chat: Chat,
    parts: list[dict[str, Any]],
    links: FileLinks,
    files: dict[str, Attachment],
) -> list[dict[str, Any]]:
    """Stored parts as a client sees them: each file part with a signed link to its file."""
    return [
        links.file_part(
            chat.organization_id, chat.id, part, files.get(part.get("attachmentId", ""))
        )
        if part.get("type") == "file"
        else part
        for part in parts
    ]


def _queued_user_message(turn: Turn, position: int, parts: list[dict[str, Any]]) -> UIMessageOut:
    return UIMessageOut(
        id=turn.user_message_id,
        role="user",
        siblingIds=[turn.user_message_id],
        parts=parts,
        metadata={"turnId": turn.id, "queuePosition": position},
        status="queued",
        createdAt=chats.iso(turn.created_at),
    )


async def ui_messages_out(
    session: AsyncSession,
    chat: Chat,
    messages: list[Message],
    links: FileLinks,
    files: dict[str, Attachment] | None = None,
) -> list[UIMessageOut]:
    """Messages as UIMessages, each with its siblings' ids (itself included) for "2 of 3", and file
    parts carrying signed links (`files`: the chat's attachments, when the caller has them)."""
    siblings = await chats.children_by_parent(
        session, chat, {message.parent_id for message in messages}
    )
    if files is None:
        wanted = [i for message in messages for i in attachments.attachment_ids_in(message.parts)]
        files = await attachments.get_many(session, chat.organization_id, wanted)
    return [
        UIMessageOut.model_validate(
            {
                **chats.as_ui_message(message),
                "parts": _linked(chat, message.parts, links, files),
                "siblingIds": siblings.get(message.parent_id, [message.id]),
            }
        )
        for message in messages
    ]


async def refuse_if_busy(session: AsyncSession, chat: Chat, lost_turns: LostTurns) -> None:
    """409 while a turn holds the chat or waits in its queue (a holder whose workflow ended without
    finishing it is released instead)."""
    if chat.active_turn_id is not None and await lost_turns.release_if_lost(
        session, chat.organization_id, chat.active_turn_id
    ):
        await session.refresh(chat)
    queued = await chats.queued_turn_ids(session, chat)
    if chat.active_turn_id is not None or queued:
        raise ConflictError(
            "the chat has an active turn; stop it or wait for it to finish",
            extra={"turnId": chat.active_turn_id or queued[0], "chatId": chat.id},
        )
