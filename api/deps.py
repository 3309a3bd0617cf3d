"""FastAPI dependencies, as Annotated aliases so handler signatures read like types."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from api.state import AppState
from core.errors import ForbiddenError, UnauthorizedError
from storage import api_keys
from storage.api_keys import Principal
from storage.chats import Visibility


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.durachat
    return state


StateDep = Annotated[AppState, Depends(get_state)]


async def get_session(state: StateDep) -> AsyncIterator[AsyncSession]:
    async with state.sessions() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer dck_...`")


# The API key as sent, if one was: routes that also take another credential (signed file links)
# resolve it with `get_principal` themselves.
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


async def get_principal(state: StateDep, credentials: BearerCredentials) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise UnauthorizedError("missing API key: send `Authorization: Bearer <key>`")
    # A short session of its own: streaming handlers must not hold a pooled connection for the
    # lifetime of the stream just because authentication used one.
    async with state.sessions() as session:
        principal = await api_keys.authenticate(session, credentials.credentials)
    if principal is None:
        raise UnauthorizedError("invalid or revoked API key")
    return principal


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


async def get_admin_principal(principal: CurrentPrincipal) -> Principal:
    if not principal.is_admin:
        raise ForbiddenError("this needs an organization admin key")
    return principal


AdminPrincipal = Annotated[Principal, Depends(get_admin_principal)]


def visibility_of(principal: Principal) -> Visibility:
    return Visibility(principal.organization_id, principal.user_id)


def require_storable_parameters(request: Request) -> None:
    """Path and query values reach SQL, and Postgres text holds no NUL character: refuse one as a
    validation error rather than fail in the database. (`RequestBody` checks a body's text.)"""
    locations = (
        ("path", request.path_params.items()),
        ("query", request.query_params.multi_items()),
    )
    for location, values in locations:
        for name, value in values:
            if isinstance(value, str) and "\x00" in value:
                raise RequestValidationError(
                    [
                        {
                            "type": "string_nul",
                            "loc": (location, name),
                            "msg": "may not contain a NUL character",
                            "input": value,
                        }
                    ]
                )


StorableParameters = Depends(require_storable_parameters)


def refuse_unknown_query_parameters(request: Request) -> None:
    """A query parameter the operation does not declare is a 422, as an unknown body field is:
    a misspelt filter must not be silently ignored."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    declared = _declared_query_parameters(route)
    unknown = [name for name in request.query_params if name not in declared]
    if unknown:
        raise RequestValidationError(
            [
                {
                    "type": "extra_forbidden",
                    "loc": ("query", name),
                    "msg": "Extra inputs are not permitted",
                    "input": request.query_params[name],
                }
                for name in unknown
            ]
        )


def _declared_query_parameters(route: APIRoute) -> frozenset[str]:
    """The query parameters of the route and of every dependency it has (a walk over a few dozen
    dependency nodes at most)."""
    names: set[str] = set()
    pending: list[Dependant] = [route.dependant]
    while pending:
        dependant = pending.pop()
        names.update(field.alias for field in dependant.query_params)
        pending.extend(dependant.dependencies)
    return frozenset(names)


KnownQueryParameters = Depends(refuse_unknown_query_parameters)
