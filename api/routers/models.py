"""The model catalog (`GET /v1/models`) and default models: the organization's and each user's."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from api.deps import AdminPrincipal, CurrentPrincipal, SessionDep, StateDep
from api.model_choice import available_model
from api.schemas import RequestBody
from core.errors import ForbiddenError
from providers.catalog import Capability, CatalogQuery, ModelCard, Tier, curated_catalog
from storage import preferences
from storage.api_keys import Principal
from storage.turn_usage import usd_text

router = APIRouter(prefix="/v1", tags=["models"])

PROBLEM: dict[str, Any] = {"content": {"application/problem+json": {}}}
Responses = dict[int | str, dict[str, Any]]
UNAUTHORIZED: Responses = {401: {"description": "Missing or invalid API key", **PROBLEM}}
FORBIDDEN: Responses = {403: {"description": "The key may not do this", **PROBLEM}}
INVALID: Responses = {
    400: {"description": "An unknown or unavailable model", **PROBLEM},
    422: {"description": "Invalid parameters or body", **PROBLEM},
}

Limit = Annotated[int, Query(ge=1, le=200, description="Page size, 1 to 200")]
Offset = Annotated[int, Query(ge=0, le=100_000, description="Items to skip")]
UserId = Annotated[
    str, Path(min_length=1, max_length=200, description="A user id, or `me` for the caller's own")
]
ME = "me"


class ProviderOut(BaseModel):
    id: str
    name: str


class ModelOut(BaseModel):
    id: str = Field(description="`provider/model`, as a send names it.")
    name: str
    provider: ProviderOut
    tier: Tier
    promptPpm: str = Field(description="USD per million prompt tokens, exact.")  # noqa: N815
    cachedPromptPpm: str = Field(  # noqa: N815
        description="USD per million prompt tokens read from the provider's cache."
    )
    cacheWritePpm: str = Field(  # noqa: N815
        description="USD per million prompt tokens written to the provider's cache."
    )
    completionPpm: str = Field(description="USD per million completion tokens.")  # noqa: N815
    priced: bool = Field(
        description="False for a model the catalog has no prices for: its turns cost 0 here."
    )
    contextWindow: int  # noqa: N815
    maxOutputTokens: int  # noqa: N815
    capabilities: list[Capability]
    deprecated: bool

    @classmethod
    def of(cls, card: ModelCard) -> ModelOut:
        return cls(
            id=card.id,
            name=card.name,
            provider=ProviderOut(id=card.provider, name=card.provider_name),
            tier=card.tier,
            promptPpm=usd_text(card.prompt_ppm),
            cachedPromptPpm=usd_text(card.cached_prompt_ppm),
            cacheWritePpm=usd_text(card.cache_write_ppm),
            completionPpm=usd_text(card.completion_ppm),
            priced=card.priced,
            contextWindow=card.context_window,
            maxOutputTokens=card.max_output_tokens,
            capabilities=sorted(card.capabilities),
            deprecated=card.deprecated,
        )


class ModelPageOut(BaseModel):
    items: list[ModelOut]
    total: int = Field(description="How many models match, over all pages.")
    limit: int
    offset: int
    pricesAsOf: str = Field(description="The date the shipped catalog's prices were read.")  # noqa: N815


class DefaultModelIn(RequestBody):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        max_length=200, description="`provider/model`; null clears the default."
    )


class DefaultModelOut(BaseModel):
    model: str | None


@router.get(
    "/models",
    summary="The models this service can use, with tier, prices, limits and capabilities",
    responses={**UNAUTHORIZED, **INVALID},
)
async def list_models(
    principal: CurrentPrincipal,
    state: StateDep,
    limit: Limit = 50,
    offset: Offset = 0,
    q: Annotated[
        str | None, Query(max_length=200, description="Matches the id or the name, any case")
    ] = None,
    provider: Annotated[str | None, Query(max_length=100)] = None,
    tier: Tier | None = None,
    capability: Annotated[
        list[Capability] | None, Query(description="Models having all of these")
    ] = None,
    include_deprecated: Annotated[bool, Query(alias="includeDeprecated")] = False,
    include_internal: Annotated[bool, Query(alias="includeInternal")] = False,
) -> ModelPageOut:
    providers = state.providers
    matching = providers.catalog.search(
        CatalogQuery(
            text=q,
            provider=providers.provider_name(provider) or provider if provider else None,
            tier=tier,
            capabilities=frozenset(capability or ()),
            include_deprecated=include_deprecated,
            include_internal=include_internal,
        )
    )
    return ModelPageOut(
        items=[ModelOut.of(card) for card in matching[offset : offset + limit]],
        total=len(matching),
        limit=limit,
        offset=offset,
        pricesAsOf=curated_catalog().prices_as_of,
    )


@router.get(
    "/defaults/organization",
    summary="The organization's default model",
    responses={**UNAUTHORIZED},
)
async def get_organization_default(
    principal: CurrentPrincipal, session: SessionDep
) -> DefaultModelOut:
    return DefaultModelOut(
        model=await preferences.organization_default_model(session, principal.organization_id)
    )


@router.put(
    "/defaults/organization",
    summary="Set the organization's default model (admin keys)",
    responses={**UNAUTHORIZED, **FORBIDDEN, **INVALID},
)
async def set_organization_default(
    body: DefaultModelIn, principal: AdminPrincipal, session: SessionDep, state: StateDep
) -> DefaultModelOut:
    model = available_model(state.providers, body.model) if body.model else None
    await preferences.set_organization_default_model(session, principal.organization_id, model)
    await session.commit()
    return DefaultModelOut(model=model)


@router.get(
    "/defaults/users/{user_id}",
    summary="A user's default model (admin keys: any user; a user's key: its own, or `me`)",
    responses={**UNAUTHORIZED, **FORBIDDEN},
)
async def get_user_default(
    user_id: UserId, principal: CurrentPrincipal, session: SessionDep
) -> DefaultModelOut:
    user = _user_it_may_set(principal, user_id)
    stored = await preferences.user_default_model(session, principal.organization_id, user)
    return DefaultModelOut(model=stored)


@router.put(
    "/defaults/users/{user_id}",
    summary="Set a user's default model (admin keys: any user; a user's key: its own, or `me`)",
    responses={**UNAUTHORIZED, **FORBIDDEN, **INVALID},
)
async def set_user_default(
    user_id: UserId,
    body: DefaultModelIn,
    principal: CurrentPrincipal,
    session: SessionDep,
    state: StateDep,
) -> DefaultModelOut:
    user = _user_it_may_set(principal, user_id)
    model = available_model(state.providers, body.model) if body.model else None
    await preferences.set_user_default_model(session, principal.organization_id, user, model)
    await session.commit()
    return DefaultModelOut(model=model)


def _user_it_may_set(principal: Principal, user_id: str) -> str:
    """The user a key may read and set the default of: any for admin keys, else its own."""
    if user_id == ME:
        if principal.user_id is None:
            raise ForbiddenError("this key is bound to no user: name the user (admin keys only)")
        return principal.user_id
    if principal.is_admin or principal.user_id == user_id:
        return user_id
    raise ForbiddenError("a user's key reads and sets only its own default model")
