"""Chats and messages as the api shows them, shared by the chat routers."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from api.schemas import ChatOut, ChatSummaryOut, UIMessageOut
from core.errors import ConflictError
from storage import chats
from storage.lost_turns import LostTurns
from storage.models import Chat, Message, Turn


async def chat_out(session: AsyncSession, chat: Chat) -> ChatOut:
    """The chat with the messages of its active branch and the turns waiting in its queue.

    The user messages of queued turns follow the branch, marked `queued`: they are stored in the
    tree only when their turn runs, but a client that reloads must still see what it sent.
    """
    branch = await chats.load_active_branch(session, chat)
    queued = await chats.queued_turns(session, chat)
    return ChatOut(
        **ChatSummaryOut.fields_of(chat),
        queuedTurnIds=[turn.id for turn in queued],
        messages=[
            *await ui_messages_out(session, chat, branch),
            *(
                _queued_user_message(turn, position)
                for position, turn in enumerate(queued, start=1)
                if turn.queued_user_parts
            ),
        ],
    )


def _queued_user_message(turn: Turn, position: int) -> UIMessageOut:
    return UIMessageOut(
        id=turn.user_message_id,
        role="user",
        siblingIds=[turn.user_message_id],
        parts=turn.queued_user_parts or [],
        metadata={"turnId": turn.id, "queuePosition": position},
        status="queued",
        createdAt=chats.iso(turn.created_at),
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
