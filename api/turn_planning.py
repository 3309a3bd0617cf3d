"""What a send settles before its turn starts: the model (with the defaults below the request) and the budget reservation.

Both happen before any workflow starts, so an unknown model is a 400 and a spent budget a 403 that
leave nothing behind. The reservation is the turn's estimated cost, held against every budget that
applies until the turn's persist step settles what it really cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from api.model_choice import AUTO, Defaults, ModelChoice, ModelNeeds, choose_model, wants_reasoning
from api.problems import budget_exceeded_error
from api.schemas import NewTurn
from api.state import AppState
from core.contracts import ChatMode, TurnInput
from providers.base import InputKind, estimated_tokens
from providers.catalog import ModelCard
from storage import budgets, chats, preferences
from storage.api_keys import Principal
from storage.chats import Visibility
from storage.models import Chat


@dataclass
class ModelPlan:
    """The defaults and sizes a send's model choice reads; `choose` is called once the turn's
    files are known (their kinds are part of what `auto` needs)."""

    state: AppState
    request: NewTurn
    defaults: Defaults
    prompt_tokens: int
    choice: ModelChoice | None = None

    def choose(self, input_kinds: frozenset[InputKind]) -> str:
        self.choice = choose_model(
            self.state.providers,
            self.request.model,
            self.defaults,
            ModelNeeds(
                input_kinds=input_kinds,
                prompt_tokens=self.prompt_tokens,
                reasoning=wants_reasoning(self.request.provider_options),
            ),
            self.state.settings.tier_models,
        )
        return self.choice.model

    @property
    def chosen(self) -> ModelChoice:
        if self.choice is None:
            raise RuntimeError("the model is chosen once the turn's files are checked")
        return self.choice


async def plan_model(
    state: AppState,
    principal: Principal,
    request: NewTurn,
    mode: ChatMode,
    chat_id: str | None,
) -> ModelPlan:
    """Read what the model choice needs. A send naming its model reads nothing (the fast path);
    one naming none reads the chat's model and the user's and organization's defaults; `auto` also
    sizes the chat's history, to pick a model whose context window holds it."""
    defaults = Defaults(server=state.settings.default_model)
    history = 0
    routed = request.model.model == AUTO
    if routed or not request.model.model:
        async with state.sessions() as session:
            chat = await _existing_chat(session, principal, request, mode, chat_id)
            user, organization = await preferences.default_models(
                session, principal.organization_id, principal.user_id
            )
            defaults = Defaults(
                chat=chat.model if chat is not None else None,
                user=user,
                organization=organization,
                server=state.settings.default_model,
            )
            if routed and chat is not None:
                history = await chats.history_chars(session, principal.organization_id, chat.id)
    seeded = sum(
        len(str(part.get("text", ""))) for seed in request.history_seed for part in seed.parts
    )
    prompt_chars = history + seeded + len(request.text()) + len(request.system or "")
    return ModelPlan(state, request, defaults, estimated_tokens(prompt_chars))


async def reserve_budget(
    state: AppState, principal: Principal, turn: TurnInput, card: ModelCard, prompt_tokens: int
) -> bool:
    """Hold the turn's estimated cost against its budgets; BudgetExceededError (403) when one is
    spent. Returns whether this call made the reservation (a repeated send finds its own)."""
    # The prompt part counts the new message, a new chat's seed and, for `auto`, the chat's history;
    # the settlement replaces the estimate with the real cost.
    estimate = card.estimate(prompt_tokens, card.answer_room)
    try:
        async with state.sessions.begin() as session:
            return await budgets.reserve(
                session,
                organization_id=principal.organization_id,
                user_id=principal.user_id,
                chat_id=turn.chat_id,
                turn_id=turn.turn_id,
                model=turn.model,
                estimate_usd=estimate,
                now=datetime.now(UTC),
            )
    except budgets.BudgetExhausted as exhausted:
        raise budget_exceeded_error(exhausted) from None


async def release_budget(state: AppState, principal: Principal, turn_id: str) -> None:
    """Give back the reservation of a turn that did not start."""
    async with state.sessions.begin() as session:
        await budgets.release(session, principal.organization_id, turn_id)


async def _existing_chat(
    session: AsyncSession,
    principal: Principal,
    request: NewTurn,
    mode: ChatMode,
    chat_id: str | None,
) -> Chat | None:
    visibility = Visibility(principal.organization_id, principal.user_id)
    if mode is ChatMode.CHANNEL and request.external_channel is not None:
        channel = request.external_channel
        return await chats.get_live_chat_by_channel(session, visibility, channel.source, channel.id)
    if mode is not ChatMode.CREATE and chat_id is not None:
        return await chats.get_live_chat(session, visibility, chat_id)
    return None
