"""Chat, message and turn persistence: session claims, the message tree and turn bookkeeping. SQL lives here only."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Text, cast, func, literal, or_, select, text, update
from sqlalchemy import delete as sa_delete
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from core.contracts import (
    ChatMode,
    ClaimSessionResult,
    IfBusy,
    MessageStatus,
    PersistAssistantMessageInput,
    StoreUserMessageInput,
    TurnInput,
    TurnKind,
    TurnStatus,
    turn_status_for,
)
from core.ui_chunks import start_metadata
from storage import attachments
from storage.ids import new_id
from storage.models import Chat, Message, Turn
from storage.turn_usage import TurnTotals


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


@dataclass(frozen=True)
class TurnRun:
    """The workflow run a turn belongs to, recorded on its turn row."""

    workflow_id: str
    run_id: str


async def claim_session(session: AsyncSession, turn: TurnInput, run: TurnRun) -> ClaimSessionResult:
    """Find or create the turn's chat and take its session lease, in one transaction the caller commits.

    A chat is busy while another turn holds the lease, or while turns wait in its queue (a turn that
    arrives then must not overtake them). A busy chat refuses the turn (ChatBusy) or queues it, as the
    turn's `if_busy` says; a queued turn claims the chat once it is free and the turn is first in line.
    """
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

    # The row lock serializes every claim of this chat: lease, queue order and tree placement.
    chat: Chat | None = (await session.execute(chat_query.with_for_update())).scalar_one_or_none()
    if chat is None:
        raise ChatNotFound(turn.chat_id or "")
    holder = await _running_lease_holder(session, chat, turn.turn_id)
    queue = await queued_turn_ids(session, chat)
    if holder is not None or (queue and queue[0] != turn.turn_id):
        if turn.turn_id in queue:
            return _queued(chat, created, queue.index(turn.turn_id) + 1, holder=holder)
        if turn.if_busy is IfBusy.REJECT:
            raise ChatBusy(chat.id, holder or queue[0])
        # Refuse now what could never run (a message to regenerate or edit that is not there).
        await _place_in_tree(session, chat, turn)
        # An interrupt runs next: ahead of the queue, once the holder it stops lets go. Without a
        # holder the chat is being handed to the queue's first turn, which it then waits behind.
        interrupts = turn.if_busy is IfBusy.INTERRUPT and holder is not None
        await _enqueue(session, chat, turn, run, front=interrupts)
        return _queued(
            chat,
            created,
            1 if interrupts else len(queue) + 1,
            holder=holder,
            interrupted_turn_id=holder if interrupts else None,
        )
    parent_id, answered_id = await _place_in_tree(session, chat, turn)
    chat.active_turn_id = turn.turn_id
    # The turn row exists from the moment it holds the lease, so a concurrent claim always finds
    # the holder running (the rest of the row is filled in when the user message is stored).
    await _upsert_turn_row(
        session,
        turn,
        run,
        chat.id,
        user_message_id=answered_id or turn.user_message_id,
        status=TurnStatus.RUNNING,
    )
    return ClaimSessionResult(
        chat_id=chat.id,
        created=created,
        parent_message_id=parent_id,
        answered_message_id=answered_id,
    )


def _queued(
    chat: Chat,
    created: bool,
    position: int,
    *,
    holder: str | None,
    interrupted_turn_id: str | None = None,
) -> ClaimSessionResult:
    return ClaimSessionResult(
        chat_id=chat.id,
        created=created,
        parent_message_id=None,
        queue_position=position,
        interrupted_turn_id=interrupted_turn_id,
        holder_turn_id=holder,
    )


async def _running_lease_holder(session: AsyncSession, chat: Chat, turn_id: str) -> str | None:
    """The other turn that holds the chat's lease and still runs; a lease whose turn ended is stale."""
    if chat.active_turn_id in (None, turn_id):
        return None
    holder_status = (
        await session.execute(select(Turn.status).where(Turn.id == chat.active_turn_id))
    ).scalar_one_or_none()
    return chat.active_turn_id if holder_status == TurnStatus.RUNNING else None


def _queued_turns_query(chat: Chat, selected: Any) -> Any:
    return (
        select(selected)
        .where(
            Turn.organization_id == chat.organization_id,
            Turn.chat_id == chat.id,
            Turn.status == TurnStatus.QUEUED,
        )
        .order_by(Turn.queue_position)
    )


async def queued_turn_ids(session: AsyncSession, chat: Chat) -> list[str]:
    """The chat's queued turns' ids, first in line first."""
    return list((await session.execute(_queued_turns_query(chat, Turn.id))).scalars())


async def queued_turns(session: AsyncSession, chat: Chat) -> list[Turn]:
    """The chat's queued turns, first in line first."""
    return list((await session.execute(_queued_turns_query(chat, Turn))).scalars())


async def _enqueue(
    session: AsyncSession, chat: Chat, turn: TurnInput, run: TurnRun, *, front: bool
) -> None:
    """Store the turn as queued at the back of the chat's queue, or at its front."""
    bounds = (
        await session.execute(
            select(func.min(Turn.queue_position), func.max(Turn.queue_position)).where(
                Turn.organization_id == chat.organization_id,
                Turn.chat_id == chat.id,
                Turn.status == TurnStatus.QUEUED,
            )
        )
    ).one()
    first, last = bounds
    position = (first - 1 if first is not None else 0) if front else (last or 0) + 1
    await _upsert_turn_row(
        session,
        turn,
        run,
        chat.id,
        user_message_id=turn.user_message_id,
        status=TurnStatus.QUEUED,
        queue_position=position,
    )


async def _upsert_turn_row(
    session: AsyncSession,
    turn: TurnInput,
    run: TurnRun,
    chat_id: str,
    *,
    user_message_id: str,
    status: TurnStatus,
    queue_position: int | None = None,
) -> None:
    values = {
        "user_message_id": user_message_id,
        "status": status,
        "queue_position": queue_position,
        "workflow_id": run.workflow_id,
        "run_id": run.run_id,
        "request_fingerprint": turn.request_fingerprint,
        # Until it runs, a queued turn's user message lives only here (and in its workflow input).
        "queued_user_parts": (
            turn.user_parts if status is TurnStatus.QUEUED and turn.user_parts else None
        ),
    }
    await session.execute(
        insert(Turn)
        .values(
            id=turn.turn_id,
            organization_id=turn.organization_id,
            chat_id=chat_id,
            assistant_message_id=turn.assistant_message_id,
            model=turn.model,
            model_choice=turn.model_choice,
            tools=asdict(turn.tools) if turn.tools is not None else None,
            **values,
        )
        .on_conflict_do_update(index_elements=[Turn.id], set_=values)
    )


async def next_queued_turn(session: AsyncSession, organization_id: str, chat_id: str) -> str | None:
    """The queued turn to wake when the chat is free: the first in line, if any, and only then."""
    chat = (
        await session.execute(
            select(Chat).where(Chat.organization_id == organization_id, Chat.id == chat_id)
        )
    ).scalar_one_or_none()
    if chat is None or chat.active_turn_id is not None:
        return None
    queue = await queued_turn_ids(session, chat)
    return queue[0] if queue else None


async def drop_queued_turn(
    session: AsyncSession, organization_id: str, turn_id: str, status: TurnStatus, reason: str
) -> None:
    """End a queued turn that will not run; a turn that is no longer queued is left as it is."""
    await session.execute(
        update(Turn)
        .where(
            Turn.id == turn_id,
            Turn.organization_id == organization_id,
            Turn.status == TurnStatus.QUEUED,
        )
        .values(status=status, error=reason, queue_position=None, completed_at=func.now())
    )


async def _place_in_tree(
    session: AsyncSession, chat: Chat, turn: TurnInput
) -> tuple[str | None, str | None]:
    """(parent of the turn's new message, stored user message it answers) for the turn's kind."""
    if turn.kind is TurnKind.SEND:
        return chat.active_leaf_id, None
    target_id = turn.target_message_id
    if target_id is None and turn.kind is TurnKind.REGENERATE:
        # The AI SDK's `regenerate()` names no message: answer the latest exchange again (the
        # newest answer, or the newest user message when its turn left none).
        target_id = chat.active_leaf_id
    target = (
        await session.execute(
            select(Message).where(
                Message.id == target_id,
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
    raise MessageNotFound(target_id or "")


async def store_turn_start(session: AsyncSession, request: StoreUserMessageInput) -> bool:
    """Store the user message, the streaming assistant placeholder and the turn row; False if already stored."""
    turn = request.turn
    already = (
        await session.execute(select(Message.id).where(Message.id == turn.assistant_message_id))
    ).scalar_one_or_none()
    if already is not None:
        return False

    parent_id = request.parent_message_id
    # The stored messages that carry files, which then belong to the chat.
    carried_files: list[tuple[str, list[dict[str, Any]]]] = []
    for seed in turn.history_seed if request.chat_created else []:
        seed_id = new_id()
        carried_files.append((seed_id, seed.parts))
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
        carried_files.append((turn.user_message_id, turn.user_parts))
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
            message_metadata=start_metadata(
                request.chat_id, turn.turn_id, turn.model, turn.model_choice
            ),
        )
    )
    await _upsert_turn_row(
        session,
        turn,
        TurnRun(request.workflow_id, request.run_id),
        request.chat_id,
        user_message_id=user_message_id,
        status=TurnStatus.RUNNING,
    )
    # Flush the messages before pointing the chat at them: the ORM does not order these by dependency.
    await session.flush()
    for message_id, parts in carried_files:
        await attachments.attach_to_message(
            session,
            turn.organization_id,
            request.chat_id,
            message_id,
            attachments.attachment_ids_in(parts),
        )
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


async def load_active_branch(session: AsyncSession, chat: Chat) -> list[Message]:
    """The messages the chat shows: its active branch, oldest first."""
    if chat.active_leaf_id is None:
        return []
    return await load_branch(session, chat.organization_id, chat.active_leaf_id)


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
    session: AsyncSession,
    organization_id: str,
    message_id: str,
    parts: list[dict[str, Any]],
    *,
    turn_id: str,
    attempt: int,
    usage: dict[str, Any] | None = None,
) -> bool:
    """Store the answer's parts, and its `usage` in the metadata when given; False when they were
    not stored.

    Only the turn's latest attempt stores, and only while the answer is streaming: an attempt whose
    heartbeat timed out can run on in its worker until it learns it was cancelled, and its partial
    answer must not replace the retry's, nor the answer the turn already finished with.
    """
    values: dict[str, Any] = {"parts": parts, "updated_at": func.now()}
    if usage is not None:
        values["message_metadata"] = Message.message_metadata.op("||")(
            func.jsonb_build_object("usage", cast(usage, JSONB))
        )
    latest_attempt = (
        select(Turn.attempts)
        .where(Turn.id == turn_id, Turn.organization_id == organization_id)
        .scalar_subquery()
    )
    stored = await session.execute(
        update(Message)
        .where(
            Message.id == message_id,
            Message.organization_id == organization_id,
            Message.status == MessageStatus.STREAMING,
            func.coalesce(latest_attempt, 0) <= attempt,
        )
        .values(**values)
        .returning(Message.id)
    )
    return stored.first() is not None


async def finish_turn(
    session: AsyncSession,
    outcome: PersistAssistantMessageInput,
    metadata: dict[str, Any],
    totals: TurnTotals | None = None,
) -> str | None:
    """Record the assistant message's final state and the turn's figures, and release the chat's lease.

    Returns the queued turn that may run now, if any.
    """
    turn_status = turn_status_for(outcome.status)
    # The chat's lease first: rows are locked chat, message, turn (see end_lost_turn).
    next_turn_id = await _release_lease(
        session, outcome.organization_id, outcome.chat_id, outcome.turn_id
    )
    # The message's usage is the one record of it: the outcome's, or what generation stored with a
    # cancelled attempt's answer.
    usage = metadata.get("usage") or {}
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
            model=outcome.model,
            input_tokens=usage.get("inputTokens"),
            output_tokens=usage.get("outputTokens"),
            cached_input_tokens=usage.get("cachedInputTokens", 0 if usage else None),
            cache_write_tokens=usage.get("cacheWriteTokens", 0 if usage else None),
            reasoning_tokens=usage.get("reasoningTokens", 0 if usage else None),
            usage_estimated=bool(usage.get("estimated", False)),
            cost_usd=totals.cost_usd if totals is not None else None,
            messages_left_out=outcome.messages_left_out,
            ttft_ms=outcome.ttft_ms,
            duration_ms=outcome.duration_ms,
            finish_reason=outcome.finish_reason,
            error=outcome.error,
            completed_at=func.coalesce(Turn.completed_at, func.now()),
        )
    )
    return next_turn_id


async def end_lost_turn(
    session: AsyncSession,
    organization_id: str,
    turn_id: str,
    error: str,
    streamed_parts: list[dict[str, Any]],
) -> str | None:
    """End a turn still marked running whose workflow will never finish it (terminated from outside,
    timed out, or gone): the turn and its answer fail with `error`, and the chat's lease is released.
    The answer keeps what its stream delivered (`streamed_parts`), or what was saved of it when the
    stream holds no text. Does nothing to a turn that is no longer running.

    Returns the chat's queued turn that may run now, if any.
    """
    # Rows are locked chat, message, turn. Chat first, as every claim and the lost-turn sweep lock it:
    # a stop and a sweep releasing the same turn then queue up instead of deadlocking. Message
    # before turn, as an attempt saving its answer and the persist step lock them: the terminated
    # turn's attempt may still be running on its worker and save its partial answer right now.
    found = (
        await session.execute(
            select(Turn.chat_id, Turn.assistant_message_id).where(
                Turn.id == turn_id, Turn.organization_id == organization_id
            )
        )
    ).one_or_none()
    if found is None:
        return None
    await session.execute(
        select(Chat.id)
        .where(Chat.id == found.chat_id, Chat.organization_id == organization_id)
        .with_for_update()
    )
    message = (
        await session.execute(
            select(Message)
            .where(
                Message.id == found.assistant_message_id,
                Message.organization_id == organization_id,
            )
            .with_for_update()
        )
    ).scalar_one_or_none()
    chat_id = (
        await session.execute(
            update(Turn)
            .where(
                Turn.id == turn_id,
                Turn.organization_id == organization_id,
                Turn.status == TurnStatus.RUNNING,
            )
            .values(status=TurnStatus.FAILED, error=error, completed_at=func.now())
            .returning(Turn.chat_id)
        )
    ).scalar_one_or_none()
    if chat_id is None:
        return None
    if message is not None and message.status == MessageStatus.STREAMING:
        message.status = MessageStatus.FAILED
        message.message_metadata = {**message.message_metadata, "error": error}
        if len(streamed_parts) > 1:  # more than the step's opening
            message.parts = streamed_parts
    return await _release_lease(session, organization_id, chat_id, turn_id)


async def _release_lease(
    session: AsyncSession, organization_id: str, chat_id: str, turn_id: str
) -> str | None:
    """Let go of the chat if `turn_id` holds it; returns the queued turn that may run now, if any."""
    await session.execute(
        update(Chat)
        .where(
            Chat.organization_id == organization_id,
            Chat.id == chat_id,
            Chat.active_turn_id == turn_id,
        )
        .values(active_turn_id=None, updated_at=func.now())
    )
    return await next_queued_turn(session, organization_id, chat_id)


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


# --- chat management: listing, settings, deletion, truncation -------------------------------------


@dataclass(frozen=True)
class ChatPage:
    chats: list[Chat]
    total: int


async def list_live_chats(
    session: AsyncSession,
    visibility: Visibility,
    *,
    limit: int,
    offset: int,
    source: str | None = None,
    folder: str | None = None,
    title_contains: str | None = None,
) -> ChatPage:
    """A page of the caller's live chats: pinned first, then the most recently updated."""
    query = _live_chat_query(visibility)
    if source is not None:
        query = query.where(Chat.external_source == source)
    if folder is not None:
        query = query.where(Chat.folder == folder)
    if title_contains:
        escaped = title_contains.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(Chat.title.ilike(f"%{escaped}%", escape="\\"))
    total = (await session.execute(select(func.count()).select_from(query.subquery()))).scalar_one()
    rows = await session.execute(
        query.order_by(Chat.pinned.desc(), Chat.updated_at.desc(), Chat.id)
        .limit(limit)
        .offset(offset)
    )
    return ChatPage(list(rows.scalars()), total)


async def soft_delete_chat(session: AsyncSession, chat: Chat) -> list[str]:
    """Mark the chat deleted (its channel is free again at once); the turns to stop: the running
    one and the queued ones."""
    to_stop = [chat.active_turn_id] if chat.active_turn_id else []
    to_stop += await queued_turn_ids(session, chat)
    chat.deleted_at = func.now()
    chat.updated_at = func.now()
    return to_stop


async def purge_deleted_chats(
    session: AsyncSession,
    deleted_before: datetime | None,
    *,
    organization_id: str | None = None,
) -> int:
    """Delete chats soft-deleted before `deleted_before` (None: all), their messages and turns included."""
    query = sa_delete(Chat).where(Chat.deleted_at.is_not(None))
    if deleted_before is not None:
        query = query.where(Chat.deleted_at < deleted_before)
    if organization_id is not None:
        query = query.where(Chat.organization_id == organization_id)
    # Messages and turns go with their chat (ON DELETE CASCADE).
    result = await session.execute(query.returning(Chat.id))
    return len(result.all())


@dataclass(frozen=True)
class Truncation:
    kept: int
    deleted: int


async def truncate_active_branch(session: AsyncSession, chat: Chat, keep: int) -> Truncation:
    """Keep the `keep` newest messages of the active branch and delete the older ones.

    Everything hanging under a deleted message goes too (other branches from that point on); the
    oldest kept message becomes a root. `keep=0` empties the chat.
    """
    branch = await load_active_branch(session, chat)
    before = await _message_count(session, chat)
    if keep == 0:
        await session.execute(
            sa_delete(Message).where(
                Message.organization_id == chat.organization_id, Message.chat_id == chat.id
            )
        )
        chat.active_leaf_id = None
    elif keep < len(branch):
        first_kept = branch[len(branch) - keep]
        # Detach first: deleting its parent would otherwise cascade down to it.
        first_kept.parent_id = None
        await session.flush()
        await session.execute(
            sa_delete(Message).where(Message.id.in_([m.id for m in branch[: len(branch) - keep]]))
        )
    chat.updated_at = func.now()
    await session.flush()
    after = await _message_count(session, chat)
    return Truncation(kept=min(keep, len(branch)), deleted=before - after)


async def _message_count(session: AsyncSession, chat: Chat) -> int:
    count: int = (
        await session.execute(
            select(func.count())
            .select_from(Message)
            .where(Message.organization_id == chat.organization_id, Message.chat_id == chat.id)
        )
    ).scalar_one()
    return count


async def list_turns(
    session: AsyncSession, chat: Chat, *, limit: int, offset: int
) -> tuple[list[Turn], int]:
    """The chat's turns, newest first, and how many there are."""
    where = (Turn.organization_id == chat.organization_id, Turn.chat_id == chat.id)
    total = (
        await session.execute(select(func.count()).select_from(Turn).where(*where))
    ).scalar_one()
    rows = await session.execute(
        select(Turn)
        .where(*where)
        .order_by(Turn.created_at.desc(), Turn.id)
        .limit(limit)
        .offset(offset)
    )
    return list(rows.scalars()), total


async def set_title_if_unset(
    session: AsyncSession, organization_id: str, chat_id: str, title: str
) -> bool:
    """Give the chat a title unless it has one (a user's title always wins); True if set."""
    result = await session.execute(
        update(Chat)
        .where(Chat.organization_id == organization_id, Chat.id == chat_id, Chat.title.is_(None))
        .values(title=title)
        .returning(Chat.id)
    )
    return result.scalar_one_or_none() is not None


async def first_user_text(session: AsyncSession, organization_id: str, chat_id: str) -> str:
    """The text of the chat's oldest user message."""
    message = (
        await session.execute(
            select(Message)
            .where(
                Message.organization_id == organization_id,
                Message.chat_id == chat_id,
                Message.role == "user",
            )
            .order_by(Message.created_at, Message.id)
            .limit(1)
        )
    ).scalar_one_or_none()
    if message is None:
        return ""
    return "".join(str(p.get("text", "")) for p in message.parts if p.get("type") == "text")


async def history_chars(session: AsyncSession, organization_id: str, chat_id: str) -> int:
    """About how many characters of text a chat's messages hold (their stored parts, as JSON):
    enough to tell whether its history fits a model's context window before anything loads it."""
    total = await session.scalar(
        select(func.coalesce(func.sum(func.length(cast(Message.parts, Text))), 0)).where(
            Message.organization_id == organization_id, Message.chat_id == chat_id
        )
    )
    return int(total or 0)


async def unbind_channel(
    session: AsyncSession, organization_id: str, source: str, external_id: str
) -> str | None:
    """Unbind the live chat bound to a channel, so the channel's next turn starts a new chat; the
    chat keeps its messages and stays readable by id. Returns its id, None when no chat is bound.

    Raises ChatBusy while a turn of the chat runs or waits in its queue: a queued turn finds its
    chat by the channel when it claims it, and would land in a new chat.
    """
    chat: Chat | None = (
        await session.execute(
            _live_chat_query(Visibility(organization_id))
            .where(Chat.external_source == source, Chat.external_id == external_id)
            .with_for_update()
        )
    ).scalar_one_or_none()
    if chat is None:
        return None
    queue = await queued_turn_ids(session, chat)
    if chat.active_turn_id is not None or queue:
        raise ChatBusy(chat.id, chat.active_turn_id or queue[0])
    # The source stays, so the chat is still listed among the platform's chats.
    chat.external_id = None
    chat.updated_at = func.now()
    return chat.id
