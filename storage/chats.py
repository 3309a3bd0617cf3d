"""Chat, message and turn persistence: session claims, the message tree and turn bookkeeping. SQL lives here only."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, literal, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from core.contracts import (
    ChatMode,
    ClaimSessionResult,
    MessageStatus,
    PersistAssistantMessageInput,
    StoreUserMessageInput,
    TurnInput,
    TurnKind,
    TurnStatus,
    turn_status_for,
)
from core.ui_chunks import start_metadata
from storage.ids import new_id
from storage.models import Chat, Message, Turn


class ChatNotFound(Exception):
    """No live chat of the caller has that id (or is bound to that channel)."""


class MessageNotFound(Exception):
    """The chat has no message with that id that the turn can act on."""


class ChatBusy(Exception):
    def __init__(self, chat_id: str, active_turn_id: str) -> None:
        super().__init__(f"chat {chat_id} has an active turn {active_turn_id}")
        self.chat_id = chat_id
        self.active_turn_id = active_turn_id


@dataclass(frozen=True)
class Visibility:
    """Whose chats a caller may see: the organization's, narrowed to one user for user-bound keys."""

    organization_id: str
    user_id: str | None = None


def _live_chat_query(visibility: Visibility) -> Any:
    query = select(Chat).where(
        Chat.organization_id == visibility.organization_id, Chat.deleted_at.is_(None)
    )
    if visibility.user_id is not None:
        query = query.where(Chat.user_id == visibility.user_id)
    return query


async def get_live_chat(
    session: AsyncSession, visibility: Visibility, chat_id: str, *, for_update: bool = False
) -> Chat | None:
    query = _live_chat_query(visibility).where(Chat.id == chat_id)
    result = await session.execute(query.with_for_update() if for_update else query)
    chat: Chat | None = result.scalar_one_or_none()
    return chat


async def get_live_chat_by_channel(
    session: AsyncSession, visibility: Visibility, source: str, external_id: str
) -> Chat | None:
    result = await session.execute(
        _live_chat_query(visibility).where(
            Chat.external_source == source, Chat.external_id == external_id
        )
    )
    chat: Chat | None = result.scalar_one_or_none()
    return chat


async def claim_session(session: AsyncSession, turn: TurnInput) -> ClaimSessionResult:
    """Find or create the turn's chat and take its session lease, in one transaction the caller commits."""
    visibility = Visibility(turn.organization_id, turn.user_id)
    created = False
    if turn.chat_mode in (ChatMode.CREATE, ChatMode.CREATE_OR_CONTINUE):
        assert turn.chat_id is not None
        inserted = await session.execute(
            insert(Chat)
            .values(
                organization_id=turn.organization_id,
                id=turn.chat_id,
                user_id=turn.user_id,
                model=turn.model,
            )
            .on_conflict_do_nothing(index_elements=[Chat.organization_id, Chat.id])
            .returning(Chat.id)
        )
        created = inserted.scalar_one_or_none() is not None
        chat_query = _live_chat_query(visibility).where(Chat.id == turn.chat_id)
    elif turn.chat_mode is ChatMode.CHANNEL:
        channel = turn.external_channel
        assert channel is not None
        # Concurrent first messages on one channel race here; the partial unique index lets exactly
        # one insert win and every other claim then selects the winner.
        inserted = await session.execute(
            insert(Chat)
            .values(
                organization_id=turn.organization_id,
                id=turn.chat_id or new_id(),
                user_id=turn.user_id,
                model=turn.model,
                external_source=channel.source,
                external_id=channel.id,
            )
            .on_conflict_do_nothing(
                index_elements=[Chat.organization_id, Chat.external_source, Chat.external_id],
                index_where=text("deleted_at IS NULL AND external_id IS NOT NULL"),
            )
            .returning(Chat.id)
        )
        created = inserted.scalar_one_or_none() is not None
        chat_query = _live_chat_query(visibility).where(
            Chat.external_source == channel.source, Chat.external_id == channel.id
        )
    else:
        assert turn.chat_id is not None
        chat_query = _live_chat_query(visibility).where(Chat.id == turn.chat_id)

    chat: Chat | None = (await session.execute(chat_query.with_for_update())).scalar_one_or_none()
    if chat is None:
        raise ChatNotFound(turn.chat_id or "")
    if chat.active_turn_id not in (None, turn.turn_id):
        holder_status = (
            await session.execute(select(Turn.status).where(Turn.id == chat.active_turn_id))
        ).scalar_one_or_none()
        # A lease whose turn has ended (or never got stored) is stale, not busy.
        if holder_status == TurnStatus.RUNNING:
            raise ChatBusy(chat.id, chat.active_turn_id or "")
    parent_id, answered_id = await _place_in_tree(session, chat, turn)
    chat.active_turn_id = turn.turn_id
    return ClaimSessionResult(
        chat_id=chat.id,
        created=created,
        parent_message_id=parent_id,
        answered_message_id=answered_id,
    )


async def _place_in_tree(
    session: AsyncSession, chat: Chat, turn: TurnInput
) -> tuple[str | None, str | None]:
    """(parent of the turn's new message, stored user message it answers) for the turn's kind."""
    if turn.kind is TurnKind.SEND:
        return chat.active_leaf_id, None
    target = (
        await session.execute(
            select(Message).where(
                Message.id == turn.target_message_id,
                Message.organization_id == chat.organization_id,
                Message.chat_id == chat.id,
            )
        )
    ).scalar_one_or_none()
    if turn.kind is TurnKind.REGENERATE:
        if target is not None and target.role == "assistant" and target.parent_id is not None:
            return target.parent_id, target.parent_id
        if target is not None and target.role == "user":
            return target.id, target.id
    elif target is not None and target.role == "user":
        return target.parent_id, None
    raise MessageNotFound(turn.target_message_id or "")


async def store_turn_start(session: AsyncSession, request: StoreUserMessageInput) -> bool:
    """Store the user message, the streaming assistant placeholder and the turn row; False if already stored."""
    turn = request.turn
    already = (
        await session.execute(select(Message.id).where(Message.id == turn.assistant_message_id))
    ).scalar_one_or_none()
    if already is not None:
        return False

    parent_id = request.parent_message_id
    for seed in turn.history_seed if request.chat_created else []:
        seed_id = new_id()
        session.add(
            Message(
                id=seed_id,
                organization_id=turn.organization_id,
                chat_id=request.chat_id,
                parent_id=parent_id,
                role=seed.role,
                parts=seed.parts,
                status=MessageStatus.COMPLETE,
            )
        )
        parent_id = seed_id
    # A regeneration answers a stored user message again; every other turn stores a new one.
    user_message_id = request.answered_message_id or turn.user_message_id
    if request.answered_message_id is None:
        session.add(
            Message(
                id=turn.user_message_id,
                organization_id=turn.organization_id,
                chat_id=request.chat_id,
                parent_id=parent_id,
                role="user",
                parts=turn.user_parts,
                status=MessageStatus.COMPLETE,
                turn_id=turn.turn_id,
                client_message_id=turn.client_message_id,
            )
        )
    session.add(
        Message(
            id=turn.assistant_message_id,
            organization_id=turn.organization_id,
            chat_id=request.chat_id,
            parent_id=user_message_id,
            role="assistant",
            parts=[],
            status=MessageStatus.STREAMING,
            turn_id=turn.turn_id,
            message_metadata=start_metadata(request.chat_id, turn.turn_id, turn.model),
        )
    )
    session.add(
        Turn(
            id=turn.turn_id,
            organization_id=turn.organization_id,
            chat_id=request.chat_id,
            user_message_id=user_message_id,
            assistant_message_id=turn.assistant_message_id,
            workflow_id=request.workflow_id,
            run_id=request.run_id,
            model=turn.model,
            status=TurnStatus.RUNNING,
        )
    )
    # Flush the messages before pointing the chat at them: the ORM does not order these by dependency.
    await session.flush()
    await session.execute(
        update(Chat)
        .where(Chat.organization_id == turn.organization_id, Chat.id == request.chat_id)
        .values(active_leaf_id=turn.assistant_message_id, updated_at=func.now())
    )
    return True


async def load_branch(session: AsyncSession, organization_id: str, leaf_id: str) -> list[Message]:
    """The messages from the root of the tree down to `leaf_id`, oldest first."""
    base = (
        select(Message.id, Message.parent_id, literal(0).label("depth"))
        .where(Message.id == leaf_id, Message.organization_id == organization_id)
        .cte("branch", recursive=True)
    )
    parent = aliased(Message)
    branch = base.union_all(
        select(parent.id, parent.parent_id, base.c.depth + 1).join(
            base, parent.id == base.c.parent_id
        )
    )
    result = await session.execute(
        select(Message).join(branch, Message.id == branch.c.id).order_by(branch.c.depth.desc())
    )
    return list(result.scalars())


async def children_by_parent(
    session: AsyncSession, chat: Chat, parent_ids: set[str | None]
) -> dict[str | None, list[str]]:
    """For each parent (None: the chat's roots), its children's ids, oldest first: a message's siblings."""
    conditions = [Message.parent_id.in_([p for p in parent_ids if p is not None])]
    if None in parent_ids:
        conditions.append(Message.parent_id.is_(None))
    rows = await session.execute(
        select(Message.parent_id, Message.id)
        .where(
            Message.organization_id == chat.organization_id,
            Message.chat_id == chat.id,
            or_(*conditions),
        )
        .order_by(Message.created_at, Message.id)
    )
    children: dict[str | None, list[str]] = {}
    for parent_id, message_id in rows:
        children.setdefault(parent_id, []).append(message_id)
    return children


async def latest_leaf_under(session: AsyncSession, chat: Chat, message_id: str) -> str | None:
    """The leaf reached from `message_id` by always taking the newest child; None if not in the chat."""
    result = await session.execute(
        text(
            """
            WITH RECURSIVE path(id, depth) AS (
                SELECT id, 0 FROM message
                WHERE id = :start AND organization_id = :organization_id AND chat_id = :chat_id
                UNION ALL
                SELECT (
                    SELECT child.id FROM message child
                    WHERE child.parent_id = path.id
                    ORDER BY child.created_at DESC, child.id DESC
                    LIMIT 1
                ), path.depth + 1
                FROM path WHERE path.id IS NOT NULL
            )
            SELECT id FROM path WHERE id IS NOT NULL ORDER BY depth DESC LIMIT 1
            """
        ),
        {"start": message_id, "organization_id": chat.organization_id, "chat_id": chat.id},
    )
    leaf: str | None = result.scalar_one_or_none()
    return leaf


async def save_assistant_parts(
    session: AsyncSession, organization_id: str, message_id: str, parts: list[dict[str, Any]]
) -> None:
    await session.execute(
        update(Message)
        .where(Message.id == message_id, Message.organization_id == organization_id)
        .values(parts=parts, updated_at=func.now())
    )


async def finish_turn(
    session: AsyncSession, outcome: PersistAssistantMessageInput, metadata: dict[str, Any]
) -> None:
    """Record the assistant message's final state and the turn's figures, and release the chat's lease."""
    turn_status = turn_status_for(outcome.status)
    await session.execute(
        update(Message)
        .where(
            Message.id == outcome.assistant_message_id,
            Message.organization_id == outcome.organization_id,
        )
        .values(status=outcome.status, message_metadata=metadata, updated_at=func.now())
    )
    await session.execute(
        update(Turn)
        .where(Turn.id == outcome.turn_id, Turn.organization_id == outcome.organization_id)
        .values(
            status=turn_status,
            attempts=func.greatest(Turn.attempts, outcome.attempts),
            input_tokens=outcome.input_tokens,
            output_tokens=outcome.output_tokens,
            ttft_ms=outcome.ttft_ms,
            duration_ms=outcome.duration_ms,
            finish_reason=outcome.finish_reason,
            error=outcome.error,
            completed_at=func.coalesce(Turn.completed_at, func.now()),
        )
    )
    await session.execute(
        update(Chat)
        .where(
            Chat.organization_id == outcome.organization_id,
            Chat.id == outcome.chat_id,
            Chat.active_turn_id == outcome.turn_id,
        )
        .values(active_turn_id=None, updated_at=func.now())
    )


async def record_attempt(
    session: AsyncSession, organization_id: str, turn_id: str, attempt: int
) -> None:
    await session.execute(
        update(Turn)
        .where(Turn.id == turn_id, Turn.organization_id == organization_id)
        .values(attempts=func.greatest(Turn.attempts, attempt))
    )


async def get_turn(
    session: AsyncSession, organization_id: str, chat_id: str, turn_id: str
) -> Turn | None:
    result = await session.execute(
        select(Turn).where(
            Turn.id == turn_id, Turn.organization_id == organization_id, Turn.chat_id == chat_id
        )
    )
    turn: Turn | None = result.scalar_one_or_none()
    return turn


async def get_turn_by_id(session: AsyncSession, organization_id: str, turn_id: str) -> Turn | None:
    result = await session.execute(
        select(Turn).where(Turn.id == turn_id, Turn.organization_id == organization_id)
    )
    turn: Turn | None = result.scalar_one_or_none()
    return turn


async def get_message(
    session: AsyncSession, organization_id: str, message_id: str
) -> Message | None:
    result = await session.execute(
        select(Message).where(Message.id == message_id, Message.organization_id == organization_id)
    )
    message: Message | None = result.scalar_one_or_none()
    return message


def as_ui_message(message: Message) -> dict[str, Any]:
    """A stored message in the AI SDK UIMessage shape, with the service's own fields beside it."""
    return {
        "id": message.id,
        "role": message.role,
        "parts": message.parts,
        "metadata": message.message_metadata,
        "status": message.status,
        "createdAt": iso(message.created_at),
    }


def iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")
