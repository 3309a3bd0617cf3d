"""The tools a turn offers its model, and running the ones the server runs. Never imports temporalio.

A turn's tool set (core.contracts.TurnTools) names what the send asked for: the built-in web
tools, the client's own tools, toolkits. This resolves it into the definitions the model is offered
(with who runs each call and whether it waits for approval) and runs a server-side call.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from activities.ui_message import OfferedTool
from agent_tools.base import StatusReporter, ToolFailed, ToolOutcome
from agent_tools.mcp import McpTool, McpToolkits, ToolkitConnection
from agent_tools.web import WEB_TOOL_NAMES, WebTools
from core.contracts import ToolRunner, TurnTools
from core.secrets import SecretBox
from providers.base import ToolDefinition
from storage import toolkits


class ToolSet:
    def __init__(
        self,
        session_factory: async_sessionmaker[AsyncSession],
        web: WebTools,
        mcp: McpToolkits,
        secrets: SecretBox,
        *,
        builtins_needing_approval: Iterable[str] = (),
    ) -> None:
        self._sessions = session_factory
        self._web = web
        self._mcp = mcp
        self._secrets = secrets
        self._builtins_needing_approval = frozenset(builtins_needing_approval)

    async def offered(self, organization_id: str, turn_tools: TurnTools) -> dict[str, OfferedTool]:
        """Every tool the turn's model may call, by name."""
        offered: dict[str, OfferedTool] = {}
        if turn_tools.web:
            for definition in self._web.definitions():
                offered[definition.name] = OfferedTool(
                    definition,
                    ToolRunner.SERVER,
                    needs_approval=definition.name in self._builtins_needing_approval,
                )
        _connections, toolkit_tools = await self._toolkit_tools(organization_id, turn_tools)
        for tool in toolkit_tools:
            offered[tool.definition.name] = OfferedTool(
                tool.definition, ToolRunner.SERVER, needs_approval=tool.needs_approval, dynamic=True
            )
        for client_tool in turn_tools.client_tools:
            offered[client_tool.name] = OfferedTool(
                ToolDefinition(client_tool.name, client_tool.description, client_tool.input_schema),
                ToolRunner.CLIENT,
            )
        return offered

    async def run(
        self,
        organization_id: str,
        turn_tools: TurnTools,
        name: str,
        tool_input: dict[str, Any],
        status: StatusReporter,
    ) -> ToolOutcome:
        """Run a server-side call; ToolFailed says why it gave no output."""
        if turn_tools.web and name in WEB_TOOL_NAMES:
            return await self._web.run(name, tool_input, status)
        connections, toolkit_tools = await self._toolkit_tools(organization_id, turn_tools)
        for tool in toolkit_tools:
            if tool.definition.name == name:
                return await self._mcp.call_tool(
                    connections[tool.toolkit_id], tool.tool_name, tool_input, status
                )
        raise ToolFailed(f"the tool {name!r} is not offered in this turn")

    async def _toolkit_tools(
        self, organization_id: str, turn_tools: TurnTools
    ) -> tuple[dict[str, ToolkitConnection], list[McpTool]]:
        """The turn's toolkits (live, enabled ones) and the tools they offer it, listed live."""
        if not turn_tools.toolkit_ids:
            return {}, []
        async with self._sessions() as session:
            connections = await toolkits.toolkit_connections(
                session, self._secrets, organization_id, turn_tools.toolkit_ids
            )
        tools = await self._mcp.tools_for(connections, turn_tools.functions)
        return {connection.id: connection for connection in connections}, tools
