"""Starting a send's turn: checks, model and tool planning, files, budget, then the workflow.

Every way a message arrives (the chat endpoints, and the bot integrations on behalf of a channel)
starts its turn here, so each is checked, planned and accounted for the same way.
"""

from __future__ import annotations

from api.file_intake import FileIntake, GivenFile, split_files
from api.idempotency import IdempotentRequest, repeatable_turn_id
from api.limits import limit_active_turns
from api.schemas import NewTurn
from api.state import AppState
from api.turn_planning import plan_model, release_budget, reserve_budget
from api.turn_tools import plan_tools
from api.turns import start_turn
from core.contracts import (
    ChatMode,
    ExternalChannel,
    SeedMessage,
    TurnAccepted,
    TurnInput,
    TurnKind,
)
from core.errors import BadRequestError, ConflictError, IdempotencyKeyReusedError
from storage import attachments, chats
from storage.api_keys import Principal
from storage.ids import new_id


async def start_send(
    state: AppState,
    principal: Principal,
    request: NewTurn,
    mode: ChatMode,
    chat_id: str | None,
    *,
    idempotent: IdempotentRequest | None,
) -> TurnAccepted:
    """Start the turn a request asks for and return once it is accepted (the user message stored,
    or the turn queued); a repeat of an idempotent send answers with the first one's turn."""
    text = request.text()
    gives_files = bool(request.extra_files) or any(
        part.get("type") == "file" for part in request.user_parts
    )
    if request.kind is not TurnKind.REGENERATE and not text.strip() and not gives_files:
        raise BadRequestError("the new user message has no text")
    if len(text) > state.settings.max_message_chars:
        raise BadRequestError(
            f"the message is longer than {state.settings.max_message_chars} characters"
        )
    plan = await plan_model(state, principal, request, mode, chat_id)

    channel = (
        ExternalChannel(source=request.external_channel.source, id=request.external_channel.id)
        if request.external_channel
        else None
    )
    turn_id = repeatable_turn_id(
        principal,
        kind=request.kind,
        mode=mode,
        chat_id=chat_id,
        channel=channel,
        client_message_id=request.client_message_id,
        idempotent=idempotent,
    )
    turn_id = turn_id or new_id()
    # Earlier messages seed only a chat's first turn; a live chat's history is the server's.
    seeds = request.history_seed if mode is not ChatMode.CONTINUE else []
    if request.keeps_edited_files and request.target_message_id is not None:
        request.extra_files = await files_of_message(
            state, principal, chat_id, request.target_message_id
        )
    intake = FileIntake(state, principal)
    # Files are checked and stored before the turn starts; a send they refuse starts nothing.
    stored_parts, stored_files = await intake.store_message_files(
        [
            *(split_files(seed.parts) for seed in seeds),
            split_files(request.user_parts, request.extra_files),
        ],
        turn_id=turn_id,
        chat_id=chat_id,
        choose_model=plan.choose,
    )
    choice = plan.chosen
    tool_plan = await plan_tools(state, principal, request.tool_options, choice.model)
    turn = TurnInput(
        organization_id=principal.organization_id,
        user_id=principal.user_id,
        turn_id=turn_id,
        chat_mode=mode,
        chat_id=chat_id,
        user_message_id=new_id(),
        assistant_message_id=new_id(),
        user_parts=stored_parts[-1],
        model=choice.model,
        provider=choice.model.partition("/")[0],
        system=request.system,
        provider_options=request.provider_options,
        external_channel=channel,
        history_seed=[
            SeedMessage(role=seed.role, parts=parts)
            for seed, parts in zip(seeds, stored_parts[:-1], strict=True)
        ],
        client_message_id=request.client_message_id,
        kind=request.kind,
        target_message_id=request.target_message_id,
        if_busy=request.if_busy,
        request_fingerprint=idempotent.fingerprint if idempotent else None,
        model_choice=choice.as_record(),
        fallback_models=list(choice.fallbacks),
        tools=tool_plan.tools,
        max_steps=tool_plan.max_steps,
        approval_timeout_seconds=tool_plan.approval_timeout_seconds,
        webhook_url=request.webhook_url,
    )
    reserved = False
    try:
        reserved = await reserve_budget(
            state, principal, turn, state.providers.card(turn.model), plan.prompt_tokens
        )
        await limit_active_turns(state, principal, turn)
        accepted = await start_turn(state, turn) or await earlier_turn(state, principal, turn)
    except BaseException:
        # Files of a send that started no turn stay unattached; remove them now, not at the sweep.
        await intake.discard(stored_files)
        if reserved:
            await release_budget(state, principal, turn.turn_id)
        raise
    if accepted.interrupted_turn_id is not None:
        # The turn's workflow stops the one it interrupts durably; the Redis flag is the fast path.
        await state.streams.request_stop(principal.organization_id, accepted.interrupted_turn_id)
    return accepted


async def files_of_message(
    state: AppState, principal: Principal, chat_id: str | None, message_id: str
) -> list[GivenFile]:
    """The files of the message an edit replaces, which the edited message keeps."""
    async with state.sessions() as session:
        message = await chats.get_message(session, principal.organization_id, message_id)
    if message is None or message.chat_id != chat_id:
        return []  # the turn's claim answers the missing message
    return [
        GivenFile(attachment_id=attachment_id)
        for attachment_id in attachments.attachment_ids_in(message.parts)
    ]


async def earlier_turn(state: AppState, principal: Principal, repeat: TurnInput) -> TurnAccepted:
    """The turn a repeated send names, when it has already finished."""
    async with state.sessions() as session:
        turn = await chats.get_turn_by_id(session, principal.organization_id, repeat.turn_id)
    if turn is None:
        raise ConflictError(
            "this idempotency key belongs to a send that was refused; retry with a new key",
            extra={"turnId": repeat.turn_id},
        )
    # Turns recorded before requests had fingerprints have none to compare.
    if (
        turn.request_fingerprint is not None
        and turn.request_fingerprint != repeat.request_fingerprint
    ):
        raise IdempotencyKeyReusedError(chat_id=turn.chat_id, turn_id=turn.id)
    return TurnAccepted(
        chat_id=turn.chat_id,
        turn_id=turn.id,
        user_message_id=turn.user_message_id,
        assistant_message_id=turn.assistant_message_id,
    )
