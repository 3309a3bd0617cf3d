"""Choosing a turn's model: the request, the chat's model, the user's and the organization's defaults, the server's; tiers and `auto`.

Runs in the api before any workflow starts, so an unknown or unavailable model is a 400 naming what
is available. The choice, its reason and the models to fall back to travel in the turn's input
(history holds model names only) and end in the `start` chunk's metadata and the turn record.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from api.schemas import ModelRequest
from core.errors import BadRequestError
from providers.base import InputKind, UnknownModelError
from providers.catalog import CAPABILITY_OF_INPUT, Capability, ModelCard, Tier
from providers.registry import ProviderRegistry

AUTO: Final = "auto"
DEFAULT_PROVIDER: Final = "default"
# Prompts past this size are worth naming in an `auto` choice's reason.
LARGE_PROMPT_TOKENS: Final = 28_000
# At most this many other models of the tier are tried when the chosen one keeps failing.
MAX_FALLBACKS: Final = 2
# providerOptions keys that ask a model to reason, whichever provider they are spelled for.
_REASONING_OPTIONS: Final = frozenset(
    {
        "thinking",
        "thinkingConfig",
        "thinking_config",
        "think",
        "reasoning",
        "reasoningEffort",
        "reasoning_effort",
    }
)
_TIER_ORDER: Final = (Tier.EVERYDAY, Tier.ADVANCED, Tier.STRATEGIC)


@dataclass(frozen=True)
class ModelNeeds:
    """What the turn asks of a model, for `auto`."""

    input_kinds: frozenset[InputKind] = frozenset()
    prompt_tokens: int = 0  # an estimate of the whole prompt
    reasoning: bool = False

    def capabilities(self) -> frozenset[Capability]:
        needed = {CAPABILITY_OF_INPUT[kind] for kind in self.input_kinds}
        if self.reasoning:
            needed.add(Capability.REASONING)
        return frozenset(needed)

    def met_by(self, card: ModelCard) -> bool:
        return self.capabilities() <= card.capabilities and self.prompt_tokens <= card.prompt_budget

    def describe(self) -> str:
        wants = [
            *(f"takes {kind} inputs" for kind in sorted(self.input_kinds)),
            *(["reasons"] if self.reasoning else []),
            *(
                [f"fits about {self.prompt_tokens:,} prompt tokens"]
                if self.prompt_tokens > LARGE_PROMPT_TOKENS
                else []
            ),
        ]
        return " and ".join(wants)


@dataclass(frozen=True)
class Defaults:
    """The stored defaults below the request, in precedence order."""

    chat: str | None = None
    user: str | None = None
    organization: str | None = None
    server: str | None = None

    def chain(self, *, with_chat: bool = True) -> list[tuple[str, str | None]]:
        """(why, model) in precedence order; `provider: "default"` passes over the chat's model."""
        return [
            *([("the chat's model", self.chat)] if with_chat else []),
            ("the user's default", self.user),
            ("the organization's default", self.organization),
            ("the server's default", self.server),
        ]


@dataclass(frozen=True)
class ModelChoice:
    model: str  # "provider/model", as configured (aliases resolved)
    reason: str
    requested: str | None = None
    fallbacks: tuple[str, ...] = field(default=())

    def as_record(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "model": self.model,
            "reason": self.reason,
            "fallbacks": list(self.fallbacks),
        }


def wants_reasoning(provider_options: Mapping[str, Mapping[str, Any]]) -> bool:
    return any(
        key in _REASONING_OPTIONS and value not in (None, False)
        for options in provider_options.values()
        if isinstance(options, Mapping)
        for key, value in options.items()
    )


def choose_model(
    providers: ProviderRegistry,
    request: ModelRequest,
    defaults: Defaults,
    needs: ModelNeeds,
    tier_models: Mapping[str, str],
) -> ModelChoice:
    """The turn's model; BadRequestError naming what is available when none can be had."""
    requested = request.describe()
    if request.model == AUTO:
        return _auto(providers, needs, tier_models, requested)
    if request.model:
        return ModelChoice(available_model(providers, request.model), "requested", requested)
    if request.tier is not None:
        return _from_tier(providers, request.tier, needs, tier_models, requested)
    if request.provider and request.provider != DEFAULT_PROVIDER:
        return _from_provider(providers, request.provider, defaults, tier_models, requested)
    # `provider: "default"` asks for the caller's default, passing over the chat's model.
    for reason, model in defaults.chain(with_chat=request.provider is None):
        # A stored default whose provider has since been removed from configuration is passed
        # over rather than failing every send that names no model.
        if model and _resolves(providers, model):
            return ModelChoice(providers.canonical(model), reason, requested)
    raise _unavailable(providers, "no default model is available")


def _auto(
    providers: ProviderRegistry,
    needs: ModelNeeds,
    tier_models: Mapping[str, str],
    requested: str | None,
) -> ModelChoice:
    """The first tier, cheapest first, whose model meets the needs; `tier_models` go first."""
    wanted = needs.describe()
    for tier in _TIER_ORDER:
        ranked = _ranked(providers, tier, tier_models)
        card = next((card for card in ranked if needs.met_by(card)), None)
        if card is not None:
            which = _which(providers, card, tier, tier_models)
            reason = f"auto: the {tier} tier's {which} model" + (
                f" that {wanted}" if wanted else ""
            )
            return ModelChoice(card.id, reason, requested, _fallbacks(ranked, card, needs))
    raise _unavailable(providers, f"no available model {wanted or 'is available'}")


def _from_tier(
    providers: ProviderRegistry,
    tier: Tier,
    needs: ModelNeeds,
    tier_models: Mapping[str, str],
    requested: str | None,
) -> ModelChoice:
    ranked = _ranked(providers, tier, tier_models)
    # A tier request honours input needs (an image needs a model that sees), not size or reasoning.
    fitting = ModelNeeds(input_kinds=needs.input_kinds)
    card = next((card for card in ranked if fitting.met_by(card)), None)
    if card is not None:
        reason = f"the {tier} tier's {_which(providers, card, tier, tier_models)} model"
        return ModelChoice(card.id, reason, requested, _fallbacks(ranked, card, fitting))
    raise _unavailable(providers, f"no available model of the {tier} tier fits this message")


def _from_provider(
    providers: ProviderRegistry,
    name: str,
    defaults: Defaults,
    tier_models: Mapping[str, str],
    requested: str | None,
) -> ModelChoice:
    provider = providers.provider_name(name)
    if provider is None:
        raise BadRequestError(
            f"unknown provider {name[:80]!r}; configured providers: "
            + ", ".join(_provider_names(providers)),
            extra={"availableModels": providers.available_models()},
        )
    for reason, model in defaults.chain():
        if model and _resolves(providers, model):
            canonical = providers.canonical(model)
            if canonical.partition("/")[0] == provider:
                return ModelChoice(canonical, f"{reason}, of the provider asked for", requested)
    cards = [card for card in providers.catalog.selectable() if card.provider == provider]
    configured = set(tier_models.values())
    for card in sorted(cards, key=lambda c: (c.id not in configured, _TIER_ORDER.index(c.tier))):
        return ModelChoice(card.id, f"{provider}'s {card.tier} model", requested)
    raise _unavailable(providers, f"provider {provider} has no model available")


def _ranked(
    providers: ProviderRegistry, tier: Tier, tier_models: Mapping[str, str]
) -> list[ModelCard]:
    """The tier's selectable models: its configured model first, then by price, cheapest first."""
    configured = _tier_model(providers, tier, tier_models)
    cards = [card for card in providers.catalog.selectable() if card.tier is tier]
    return sorted(
        cards,
        key=lambda card: (
            card.id != configured,
            card.completion_ppm + card.prompt_ppm,
        ),
    )


def _which(
    providers: ProviderRegistry, card: ModelCard, tier: Tier, tier_models: Mapping[str, str]
) -> str:
    """How a tier's model was picked, for the choice's reason."""
    return "configured" if card.id == _tier_model(providers, tier, tier_models) else "cheapest"


def _tier_model(
    providers: ProviderRegistry, tier: Tier, tier_models: Mapping[str, str]
) -> str | None:
    model = tier_models.get(tier)
    return providers.canonical(model) if model else None


def _fallbacks(ranked: list[ModelCard], chosen: ModelCard, needs: ModelNeeds) -> tuple[str, ...]:
    """Other models of the chosen one's tier meeting the same needs, preferably elsewhere: a
    provider that keeps failing usually fails for all of its models."""
    others = [card for card in ranked if card.id != chosen.id and needs.met_by(card)]
    others.sort(key=lambda card: card.provider == chosen.provider)
    return tuple(card.id for card in others[:MAX_FALLBACKS])


def available_model(providers: ProviderRegistry, model: str) -> str:
    """`model` as configured (aliases resolved); a 400 naming what is available otherwise."""
    try:
        provider, bare = providers.resolve(model)
    except UnknownModelError as exc:
        raise BadRequestError(
            str(exc), extra={"availableModels": providers.available_models()}
        ) from exc
    return f"{provider.name}/{bare}"


def _resolves(providers: ProviderRegistry, model: str) -> bool:
    try:
        providers.resolve(model)
    except UnknownModelError:
        return False
    return True


def _provider_names(providers: ProviderRegistry) -> Iterable[str]:
    return [provider.name for provider in providers.providers]


def _unavailable(providers: ProviderRegistry, message: str) -> BadRequestError:
    return BadRequestError(message, extra={"availableModels": providers.available_models()})
