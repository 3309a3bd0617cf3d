"""Resolves "provider/model" references. Never imports temporalio, fastapi, sqlalchemy or redis."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from core.settings import ModelOverride, ProviderEntry, ProviderType, Settings
from providers.base import InputKind, ModelProvider, UnknownModelError
from providers.catalog import ModelCard, ModelCatalog, build_card
from providers.local import LOCAL_PROVIDER_NAME, LocalProvider
from providers.presets import (
    PROVIDER_ALIASES,
    Preset,
    build_provider,
    configured_models,
    preset_for,
)


class ProviderRegistry:
    """Every provider a process can call, built once at startup and closed at shutdown."""

    def __init__(
        self, providers: Iterable[ModelProvider], catalog: ModelCatalog | None = None
    ) -> None:
        self._providers: dict[str, ModelProvider] = {}
        for provider in providers:
            if not provider.name or "/" in provider.name:
                raise ValueError(f"provider name {provider.name!r} must be non-empty without '/'")
            if provider.name in self._providers:
                raise ValueError(f"provider name {provider.name!r} is used twice")
            self._providers[provider.name] = provider
        # Providers built without a catalog (tests of one adapter) get the default cards.
        self.catalog = catalog or ModelCatalog(
            build_card(
                provider.name,
                model,
                catalog_provider=provider.name,
                takes_images=InputKind.IMAGE in provider.input_kinds(model),
                takes_documents=InputKind.DOCUMENT in provider.input_kinds(model),
            )
            for provider in self._providers.values()
            for model in provider.models()
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> ProviderRegistry:
        """The built-in `local` provider plus one adapter per configured entry, and the catalog
        card of every model they serve (curated, as the entry declares, then the operator's)."""
        if LOCAL_PROVIDER_NAME in settings.providers:
            raise ValueError(f"provider name {LOCAL_PROVIDER_NAME!r} is reserved for the built-in")
        overrides = _overrides_by_provider(settings.models)
        unknown = set(overrides) - {LOCAL_PROVIDER_NAME, *settings.providers}
        if unknown:
            raise ValueError(
                f"DURACHAT_MODELS names unconfigured providers: {', '.join(sorted(unknown))}"
            )
        local = LocalProvider()
        cards = [
            build_card(
                LOCAL_PROVIDER_NAME,
                model,
                catalog_provider=LOCAL_PROVIDER_NAME,
                override=overrides.get(LOCAL_PROVIDER_NAME, {}).get(model),
            )
            for model in local.models()
        ]
        providers: list[ModelProvider] = [local]
        for name, entry in settings.providers.items():
            preset = preset_for(name, entry)
            provider_overrides = overrides.get(name, {})
            models = configured_models(name, entry, preset)
            models += [model for model in provider_overrides if model not in models]
            provider_cards = [
                build_card(
                    name,
                    model,
                    catalog_provider=preset.catalog_provider,
                    takes_images=None
                    if entry.image_models is None
                    else model in entry.image_models,
                    takes_documents=_takes_documents(preset, entry, model),
                    override=provider_overrides.get(model),
                )
                for model in models
            ]
            providers.append(build_provider(name, entry, preset, provider_cards))
            cards += provider_cards
        return cls(providers, ModelCatalog(cards))

    @property
    def providers(self) -> list[ModelProvider]:
        return list(self._providers.values())

    def canonical(self, model_ref: str) -> str:
        """`model_ref` with a provider alias (`claude/...`) replaced by the configured name."""
        provider_name, slash, model = model_ref.partition("/")
        if slash and provider_name not in self._providers:
            aliased = PROVIDER_ALIASES.get(provider_name)
            if aliased in self._providers:
                return f"{aliased}/{model}"
        return model_ref

    def provider_name(self, name: str) -> str | None:
        """The configured provider a caller's name (or alias) means; None if none."""
        if name in self._providers:
            return name
        aliased = PROVIDER_ALIASES.get(name)
        return aliased if aliased in self._providers else None

    def card(self, model_ref: str) -> ModelCard:
        """The catalog card of a configured model; UnknownModelError as resolve."""
        provider, model = self.resolve(model_ref)
        return self.catalog.card(f"{provider.name}/{model}")

    def resolve(self, model_ref: str) -> tuple[ModelProvider, str]:
        """The provider and bare model name of "provider/model"; the model may itself contain '/'."""
        provider_name, slash, model = self.canonical(model_ref).partition("/")
        if not slash or not provider_name or not model:
            raise UnknownModelError(
                f"model {_shorten(model_ref)} must look like 'provider/model'",
                model_ref=model_ref,
            )
        provider = self._providers.get(provider_name)
        if provider is None:
            raise UnknownModelError(
                f"unknown provider {_shorten(provider_name)}; "
                f"configured providers: {', '.join(self._providers)}",
                model_ref=model_ref,
            )
        models = provider.models()
        if model not in models:
            raise UnknownModelError(
                f"provider {provider_name!r} has no model {_shorten(model)}; "
                f"its models: {', '.join(models) or '(none)'}",
                model_ref=model_ref,
            )
        return provider, model

    def available_models(self) -> list[str]:
        return [
            f"{provider.name}/{model}"
            for provider in self._providers.values()
            for model in provider.models()
        ]

    def input_kinds(self, model_ref: str) -> frozenset[InputKind]:
        """The non-text inputs the model of "provider/model" takes; UnknownModelError as resolve."""
        provider, model = self.resolve(model_ref)
        return provider.input_kinds(model)

    def models_accepting(self, kind: InputKind) -> list[str]:
        """Every "provider/model" taking `kind`, in available_models order: what to suggest when
        a request's model does not."""
        return [
            f"{provider.name}/{model}"
            for provider in self._providers.values()
            for model in provider.models()
            if kind in provider.input_kinds(model)
        ]

    async def aclose(self) -> None:
        # gather, not a loop, so one failing close still lets the others release their pools.
        results = await asyncio.gather(
            *(provider.aclose() for provider in self._providers.values()), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result


def _shorten(text: str, limit: int = 80) -> str:
    # References come from API callers; keep an absurdly long one from flooding errors and logs.
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _overrides_by_provider(
    overrides: Iterable[ModelOverride],
) -> dict[str, dict[str, ModelOverride]]:
    by_provider: dict[str, dict[str, ModelOverride]] = {}
    for override in overrides:
        provider, slash, model = override.id.partition("/")
        if not slash or not provider or not model:
            raise ValueError(f"DURACHAT_MODELS id {override.id!r} must look like 'provider/model'")
        by_provider.setdefault(provider, {})[model] = override
    return by_provider


def _takes_documents(preset: Preset, entry: ProviderEntry, model: str) -> bool | None:
    # Ollama takes no PDFs natively (its adapter refuses document models); the others follow the
    # entry, or the catalog when the entry does not say.
    if preset.type is ProviderType.OLLAMA:
        return False
    return None if entry.document_models is None else model in entry.document_models
