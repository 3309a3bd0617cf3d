"""The model catalog: every usable model with its tier, prices, limits and capabilities. Never imports temporalio/fastapi/sqlalchemy/redis.

Curated entries ship in `providers/catalog.json` (prices dated there); an operator adds or overrides
entries with `DURACHAT_MODELS`. The registry builds one card per configured model; a model the
catalog does not know gets a card with no price (cost 0) and the input kinds its entry declares.
Prices are exact decimals in USD per million tokens, and a turn's cost is computed from them.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from enum import StrEnum
from importlib import resources
from typing import Any, Final

from core.settings import ModelOverride
from providers.base import InputKind, Usage


class Tier(StrEnum):
    EVERYDAY = "everyday"
    ADVANCED = "advanced"
    STRATEGIC = "strategic"


class Capability(StrEnum):
    VISION = "vision"
    DOCUMENTS = "documents"
    REASONING = "reasoning"
    TOOLS = "tools"


# What a model the catalog does not know is assumed to have: a window most current models exceed,
# so trimming to it never cuts a history a real model could have taken.
UNKNOWN_CONTEXT_WINDOW: Final = 128_000
UNKNOWN_MAX_OUTPUT_TOKENS: Final = 8_192
PER_MILLION: Final = Decimal(1_000_000)
# The answer length planned for (or the model's maximum, when lower): the room kept in the context
# window when a prompt is fitted, and what a budget reservation prices. Most answers are shorter.
PLANNED_ANSWER_TOKENS: Final = 4_096
ZERO: Final = Decimal(0)

# The capability a model needs to take each kind of input.
CAPABILITY_OF_INPUT: Final = {
    InputKind.IMAGE: Capability.VISION,
    InputKind.DOCUMENT: Capability.DOCUMENTS,
}


@dataclass(frozen=True)
class ModelCard:
    """One model as `GET /v1/models` shows it and as routing, cost and trimming read it."""

    provider: str  # the configured provider name, as in "provider/model"
    model: str  # the bare model name the provider knows
    name: str
    provider_name: str  # the provider's display name
    tier: Tier
    prompt_ppm: Decimal
    cached_prompt_ppm: Decimal
    cache_write_ppm: Decimal
    completion_ppm: Decimal
    context_window: int
    max_output_tokens: int
    capabilities: frozenset[Capability]
    deprecated: bool = False
    internal: bool = False
    priced: bool = (
        True  # False for a model the catalog does not know: its cost is unknown, shown as 0
    )

    @property
    def id(self) -> str:
        return f"{self.provider}/{self.model}"

    @property
    def answer_room(self) -> int:
        return min(self.max_output_tokens, PLANNED_ANSWER_TOKENS)

    @property
    def prompt_budget(self) -> int:
        """The prompt tokens that fit the context window beside the answer's room."""
        return self.context_window - self.answer_room

    @property
    def takes_images(self) -> bool:
        return Capability.VISION in self.capabilities

    @property
    def takes_documents(self) -> bool:
        return Capability.DOCUMENTS in self.capabilities

    def cost(self, usage: Usage) -> Decimal:
        """What `usage` costs at this model's prices, exactly; the provider's own charge when it
        reported one (it knows discounts and surcharges the catalog does not)."""
        if usage.reported_cost_usd is not None:
            return usage.reported_cost_usd
        uncached = max(0, usage.input_tokens - usage.cached_input_tokens - usage.cache_write_tokens)
        return (
            uncached * self.prompt_ppm
            + usage.cached_input_tokens * self.cached_prompt_ppm
            + usage.cache_write_tokens * self.cache_write_ppm
            + usage.output_tokens * self.completion_ppm
        ) / PER_MILLION

    def estimate(self, prompt_tokens: int, output_tokens: int) -> Decimal:
        """An upper-ish estimate of a call's cost, for budget reservations."""
        return (prompt_tokens * self.prompt_ppm + output_tokens * self.completion_ppm) / PER_MILLION


@dataclass(frozen=True)
class CuratedCatalog:
    prices_as_of: str
    provider_names: Mapping[str, str]  # catalog provider id -> display name
    models: Mapping[str, tuple[Mapping[str, Any], ...]]  # catalog provider id -> its entries


@functools.cache
def curated_catalog() -> CuratedCatalog:
    """The shipped catalog (`providers/catalog.json`), read once per process."""
    raw = json.loads(resources.files("providers").joinpath("catalog.json").read_text("utf-8"))
    by_provider: dict[str, list[Mapping[str, Any]]] = {}
    for entry in raw["models"]:
        by_provider.setdefault(entry["provider"], []).append(entry)
    return CuratedCatalog(
        prices_as_of=raw["pricesAsOf"],
        provider_names={key: value["name"] for key, value in raw["providers"].items()},
        models={key: tuple(entries) for key, entries in by_provider.items()},
    )


def curated_models(catalog_provider: str) -> list[str]:
    """The model names the shipped catalog has for a provider (deprecated ones included)."""
    return [entry["model"] for entry in curated_catalog().models.get(catalog_provider, ())]


def build_card(
    provider: str,
    model: str,
    *,
    catalog_provider: str | None,
    takes_images: bool | None = None,
    takes_documents: bool | None = None,
    override: ModelOverride | None = None,
) -> ModelCard:
    """The card of a configured model: the curated entry, what the provider entry declares, then
    the operator's override.

    `takes_images` / `takes_documents` are the provider entry's `image_models` / `document_models`
    for this model; None leaves it to the catalog (a model it does not know takes images, as an
    OpenAI-compatible endpoint's models usually do, and no documents).
    """
    curated = curated_catalog()
    entry = next(
        (item for item in curated.models.get(catalog_provider or "", ()) if item["model"] == model),
        None,
    )
    if entry is None:
        known: frozenset[Capability] = frozenset({Capability.VISION})
        card = ModelCard(
            provider=provider,
            model=model,
            name=model,
            provider_name=curated.provider_names.get(catalog_provider or "", provider),
            tier=Tier.EVERYDAY,
            prompt_ppm=ZERO,
            cached_prompt_ppm=ZERO,
            cache_write_ppm=ZERO,
            completion_ppm=ZERO,
            context_window=UNKNOWN_CONTEXT_WINDOW,
            max_output_tokens=UNKNOWN_MAX_OUTPUT_TOKENS,
            capabilities=known,
            # Ollama runs on the operator's own hardware: its models cost nothing per token.
            priced=catalog_provider == "ollama",
        )
    else:
        prompt = Decimal(entry["promptPpm"])
        card = ModelCard(
            provider=provider,
            model=model,
            name=entry["name"],
            provider_name=curated.provider_names[catalog_provider or ""],
            tier=Tier(entry["tier"]),
            prompt_ppm=prompt,
            cached_prompt_ppm=Decimal(entry.get("cachedPromptPpm", prompt)),
            cache_write_ppm=Decimal(entry.get("cacheWritePpm", prompt)),
            completion_ppm=Decimal(entry["completionPpm"]),
            context_window=entry["contextWindow"],
            max_output_tokens=entry["maxOutputTokens"],
            capabilities=frozenset(Capability(c) for c in entry["capabilities"]),
            deprecated=bool(entry.get("deprecated", False)),
            internal=bool(entry.get("internal", False)),
        )
    capabilities = set(card.capabilities)
    for capability, declared in (
        (Capability.VISION, takes_images),
        (Capability.DOCUMENTS, takes_documents),
    ):
        if declared is True:
            capabilities.add(capability)
        elif declared is False:
            capabilities.discard(capability)
    card = replace(card, capabilities=frozenset(capabilities))
    return _overridden(card, override) if override is not None else card


def _overridden(card: ModelCard, override: ModelOverride) -> ModelCard:
    changes: dict[str, Any] = {
        field: value
        for field, value in (
            ("name", override.name),
            ("tier", Tier(override.tier) if override.tier else None),
            ("prompt_ppm", override.prompt_ppm),
            ("cached_prompt_ppm", override.cached_prompt_ppm),
            ("cache_write_ppm", override.cache_write_ppm),
            ("completion_ppm", override.completion_ppm),
            ("context_window", override.context_window),
            ("max_output_tokens", override.max_output_tokens),
            ("deprecated", override.deprecated),
            ("internal", override.internal),
        )
        if value is not None
    }
    if override.capabilities is not None:
        changes["capabilities"] = frozenset(Capability(c) for c in override.capabilities)
    if override.prompt_ppm is not None:
        # Cache prices not given follow the new prompt price rather than a stale curated one.
        changes.setdefault("cached_prompt_ppm", override.prompt_ppm)
        changes.setdefault("cache_write_ppm", override.prompt_ppm)
    if any(key.endswith("_ppm") for key in changes):
        changes["priced"] = True
    return replace(card, **changes)


@dataclass(frozen=True)
class CatalogQuery:
    text: str | None = None  # matched against id and name, case-insensitively
    provider: str | None = None
    tier: Tier | None = None
    capabilities: frozenset[Capability] = frozenset()
    include_deprecated: bool = False
    include_internal: bool = False


class ModelCatalog:
    """The cards of every configured model, in configuration order."""

    def __init__(self, cards: Iterable[ModelCard]) -> None:
        self._cards = {card.id: card for card in cards}

    def card(self, model_ref: str) -> ModelCard:
        """The card of a configured "provider/model"; KeyError for any other reference."""
        return self._cards[model_ref]

    @property
    def cards(self) -> list[ModelCard]:
        return list(self._cards.values())

    def search(self, query: CatalogQuery) -> list[ModelCard]:
        text = (query.text or "").casefold()
        return [
            card
            for card in self._cards.values()
            if (query.include_deprecated or not card.deprecated)
            and (query.include_internal or not card.internal)
            and (query.provider is None or card.provider == query.provider)
            and (query.tier is None or card.tier is query.tier)
            and query.capabilities <= card.capabilities
            and (not text or text in card.id.casefold() or text in card.name.casefold())
        ]

    def selectable(self) -> list[ModelCard]:
        """Cards routing may pick: neither deprecated nor internal."""
        return [card for card in self._cards.values() if not card.deprecated and not card.internal]
