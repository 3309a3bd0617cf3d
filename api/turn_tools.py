"""What a send lets its model call, checked before the turn starts: the tool set and the step bound.

A tool set that cannot work is a 400 that starts nothing: `web: true` with no search backend,
tools for a model that cannot call them, a toolkit the organization does not have, a step bound
over the ceiling, or two tools of one name.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent_tools.web import WEB_TOOL_NAMES
from api.schemas import ToolOptionsIn
from api.state import AppState
from core.contracts import TurnTools
from core.errors import BadRequestError
from providers.catalog import Capability
from storage import toolkits
from storage.api_keys import Principal


@dataclass(frozen=True)
class ToolPlan:
    tools: TurnTools
    max_steps: int
    approval_timeout_seconds: float


async def plan_tools(
    state: AppState, principal: Principal, options: ToolOptionsIn | None, model: str
) -> ToolPlan:
    """The turn's tools, how many model steps it may take, and how long it waits for input."""
    settings = state.settings
    options = options or ToolOptionsIn()
    if options.max_steps is not None and options.max_steps > settings.max_steps_ceiling:
        raise BadRequestError(
            f"maxSteps may be at most {settings.max_steps_ceiling}",
            extra={"maxStepsCeiling": settings.max_steps_ceiling},
        )
    client_tools = [tool.as_contract() for tool in options.tools or []]
    tools = TurnTools(
        web=options.web,
        client_tools=client_tools,
        toolkit_ids=list(dict.fromkeys(options.toolkit_ids or [])),
        functions=options.functions,
    )
    asks_for_tools = bool(options.web or client_tools or tools.toolkit_ids)
    if options.functions and not tools.toolkit_ids:
        raise BadRequestError("`functions` picks tools of the toolkits in `toolkitIds`; name them")
    if options.web and not (
        settings.searxng_url or settings.brave_api_key or settings.tavily_api_key
    ):
        raise BadRequestError(
            "web search is not configured on this server (set DURACHAT_SEARXNG_URL, "
            "DURACHAT_BRAVE_API_KEY or DURACHAT_TAVILY_API_KEY); send without `web: true`"
        )
    if asks_for_tools and Capability.TOOLS not in state.providers.card(model).capabilities:
        raise BadRequestError(
            f"{model} cannot call tools; choose a model with the `tools` capability "
            "(GET /v1/models?capability=tools)"
        )
    clashing = sorted({tool.name for tool in client_tools} & WEB_TOOL_NAMES)
    if clashing and options.web:
        raise BadRequestError(f"`tools` may not reuse the built-in tool names {clashing}")
    if tools.toolkit_ids:
        missing = await missing_toolkits(state, principal, tools.toolkit_ids)
        if missing:
            raise BadRequestError(f"no such toolkits: {', '.join(missing)}")
    return ToolPlan(
        tools,
        options.max_steps or settings.default_max_steps,
        min(
            options.approval_timeout_seconds or settings.approval_timeout_seconds,
            settings.approval_timeout_seconds,
        ),
    )


async def missing_toolkits(
    state: AppState, principal: Principal, toolkit_ids: list[str]
) -> list[str]:
    """Which of `toolkit_ids` the caller's organization has no enabled toolkit for."""
    async with state.sessions() as session:
        found = await toolkits.enabled_toolkit_ids(session, principal.organization_id, toolkit_ids)
    return sorted(set(toolkit_ids) - found)
