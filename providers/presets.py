"""Which adapter, endpoint and catalog each configured provider entry gets. Never imports temporalio/fastapi/sqlalchemy/redis.

An entry named after a known provider needs only its key; any other name picks an adapter with
`type` and brings its own endpoint (and, for OpenAI-compatible servers, its model list).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from core.settings import ProviderEntry, ProviderType
from providers.base import ModelProvider
from providers.catalog import ModelCard, curated_models
from providers.endpoints import (
    ANTHROPIC_BASE_URL,
    GEMINI_BASE_URL,
    GROQ_BASE_URL,
    OLLAMA_BASE_URL,
    OPENAI_BASE_URL,
    OPENROUTER_BASE_URL,
)
from providers.openai_compatible import OpenAICompatibleProvider, OpenAIDialect


@dataclass(frozen=True)
class Preset:
    type: ProviderType
    # The catalog's provider id, whose curated models and prices apply; None: none do.
    catalog_provider: str | None
    base_url: str | None  # None: the entry must give one
    dialect: OpenAIDialect = OpenAIDialect.OPENAI


KNOWN_PROVIDERS: Final[dict[str, Preset]] = {
    "anthropic": Preset(ProviderType.ANTHROPIC, "anthropic", ANTHROPIC_BASE_URL),
    "google": Preset(ProviderType.GOOGLE, "google", GEMINI_BASE_URL),
    "ollama": Preset(ProviderType.OLLAMA, "ollama", OLLAMA_BASE_URL),
    "groq": Preset(ProviderType.OPENAI_COMPATIBLE, "groq", GROQ_BASE_URL, OpenAIDialect.GROQ),
    "openrouter": Preset(
        ProviderType.OPENAI_COMPATIBLE, "openrouter", OPENROUTER_BASE_URL, OpenAIDialect.OPENROUTER
    ),
    "openai": Preset(ProviderType.OPENAI_COMPATIBLE, "openai", OPENAI_BASE_URL),
}

# Other names callers use for a known provider in a send's `provider` or `model`.
PROVIDER_ALIASES: Final[dict[str, str]] = {"claude": "anthropic", "gemini": "google"}

# An entry of any other name: the adapter's endpoint where one is standard.
_BY_TYPE: Final[dict[ProviderType, Preset]] = {
    ProviderType.ANTHROPIC: KNOWN_PROVIDERS["anthropic"],
    ProviderType.GOOGLE: KNOWN_PROVIDERS["google"],
    ProviderType.OLLAMA: KNOWN_PROVIDERS["ollama"],
    ProviderType.OPENAI_COMPATIBLE: Preset(ProviderType.OPENAI_COMPATIBLE, None, None),
}


def preset_for(name: str, entry: ProviderEntry) -> Preset:
    """The preset of entry `name`; ValueError when its `type` contradicts a known name."""
    known = KNOWN_PROVIDERS.get(name)
    if known is not None:
        if entry.type is not None and entry.type is not known.type:
            raise ValueError(
                f"provider {name!r} uses the {known.type} adapter; `type` {entry.type} "
                "needs another name"
            )
        return known
    return _BY_TYPE[entry.type or ProviderType.OPENAI_COMPATIBLE]


def configured_models(name: str, entry: ProviderEntry, preset: Preset) -> list[str]:
    """The entry's models, or its catalog's when it names none; ValueError when neither has any."""
    if entry.models is not None:
        return list(entry.models)
    models = curated_models(preset.catalog_provider) if preset.catalog_provider else []
    if not models:
        raise ValueError(f"provider {name!r} needs `models`: the catalog has none for it")
    return models


class AdapterClass(Protocol):
    """The constructor every adapter shares (the OpenAI-compatible one adds `dialect`)."""

    def __call__(
        self,
        name: str,
        *,
        base_url: str,
        api_key: str,
        models: Sequence[str],
        timeout_seconds: float,
        image_models: Sequence[str] | None = None,
        document_models: Sequence[str] = (),
    ) -> ModelProvider: ...


# Imported when first configured: each SDK takes up to seconds to import, which every process
# start (a worker replacing a dead one, above all) would otherwise pay for providers it never uses.
_NATIVE_ADAPTERS: Final[dict[ProviderType, tuple[str, str]]] = {
    ProviderType.ANTHROPIC: ("providers.anthropic", "AnthropicProvider"),
    ProviderType.GOOGLE: ("providers.gemini", "GeminiProvider"),
    ProviderType.OLLAMA: ("providers.ollama", "OllamaProvider"),
}


def _adapter_class(preset: Preset) -> AdapterClass:
    native = _NATIVE_ADAPTERS.get(preset.type)
    if native is None:
        return functools.partial(OpenAICompatibleProvider, dialect=preset.dialect)
    module, name = native
    adapter: AdapterClass = getattr(importlib.import_module(module), name)
    return adapter


def build_provider(
    name: str, entry: ProviderEntry, preset: Preset, cards: list[ModelCard]
) -> ModelProvider:
    """The adapter of one entry, serving `cards` (their capabilities decide the input kinds)."""
    base_url = entry.base_url or preset.base_url
    if base_url is None:
        raise ValueError(f"provider {name!r} needs `base_url`")
    return _adapter_class(preset)(
        name,
        base_url=base_url,
        api_key=entry.api_key.get_secret_value(),
        models=[card.model for card in cards],
        timeout_seconds=entry.timeout_seconds,
        image_models=[card.model for card in cards if card.takes_images],
        document_models=[card.model for card in cards if card.takes_documents],
    )
