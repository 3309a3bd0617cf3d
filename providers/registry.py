"""Resolves "provider/model" references. Never imports temporalio, fastapi, sqlalchemy or redis."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from core.settings import Settings
from providers.base import InputKind, ModelProvider, UnknownModelError
from providers.local import LOCAL_PROVIDER_NAME, LocalProvider
from providers.openai_compatible import OpenAICompatibleProvider


class ProviderRegistry:
    """Every provider a process can call, built once at startup and closed at shutdown."""

    def __init__(self, providers: Iterable[ModelProvider]) -> None:
        self._providers: dict[str, ModelProvider] = {}
        for provider in providers:
            if not provider.name or "/" in provider.name:
                raise ValueError(f"provider name {provider.name!r} must be non-empty without '/'")
            if provider.name in self._providers:
                raise ValueError(f"provider name {provider.name!r} is used twice")
            self._providers[provider.name] = provider

    @classmethod
    def from_settings(cls, settings: Settings) -> ProviderRegistry:
        """The built-in `local` provider plus one OpenAI-compatible provider per configured entry."""
        if LOCAL_PROVIDER_NAME in settings.providers:
            raise ValueError(f"provider name {LOCAL_PROVIDER_NAME!r} is reserved for the built-in")
        providers: list[ModelProvider] = [LocalProvider()]
        providers.extend(
            OpenAICompatibleProvider(
                name,
                base_url=entry.base_url,
                api_key=entry.api_key.get_secret_value(),
                models=entry.models,
                timeout_seconds=entry.timeout_seconds,
                image_models=entry.image_models,
                document_models=entry.document_models,
            )
            for name, entry in settings.providers.items()
        )
        return cls(providers)

    @property
    def providers(self) -> list[ModelProvider]:
        return list(self._providers.values())

    def resolve(self, model_ref: str) -> tuple[ModelProvider, str]:
        """The provider and bare model name of "provider/model"; the model may itself contain '/'."""
        provider_name, slash, model = model_ref.partition("/")
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
