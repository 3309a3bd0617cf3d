"""Chats and messages as the api shows them, shared by the chat routers."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from api.schemas import ChatOut, ChatSummaryOut, UIMessageOut
from storage import chats
from storage.models import Chat, Message


async def chat_out(session: AsyncSession, chat: Chat) -> ChatOut:
    """The chat with the messages of its active branch and the turns waiting in its queue."""
    branch = (
        await chats.load_branch(session, chat.organization_id, chat.active_leaf_id)
        if chat.active_leaf_id
        else []
    )
    return ChatOut(
        **ChatSummaryOut.fields_of(chat),
        queuedTurnIds=await chats.queued_turn_ids(session, chat),
        messages=await ui_messages_out(session, chat, branch),
    )


async def ui_messages_out(
    session: AsyncSession, chat: Chat, messages: list[Message]
) -> list[UIMessageOut]:
    """Messages as UIMessages, each with its siblings' ids (itself included) for "2 of 3"."""
    siblings = await chats.children_by_parent(
        session, chat, {message.parent_id for message in messages}
    )
    return [
        UIMessageOut.model_validate(
            {
                **chats.as_ui_message(message),
                "siblingIds": siblings.get(message.parent_id, [message.id]),
            }
        )
        for message in messages
    ]
