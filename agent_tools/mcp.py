"""MCP toolkits: listing and calling the tools of the MCP servers organizations registered, through the
official MCP SDK's streamable HTTP client. Never imports temporalio/fastapi/sqlalchemy/redis.

An MCP server's URL is one an organization's admin named, so every connection goes through the
outbound guard (`guarded_httpx2_client`: each connection's address checked and pinned, no redirect
followed except the SDK's own within the endpoint's origin, and those through the same check). Each
list or call opens its own MCP session and closes it again: nothing is held between calls, so a
retried call on another worker behaves the same.

Tools are offered to models as `<toolkit name>__<tool name>` (`^[a-zA-Z0-9_-]{1,64}$`); a tool
whose name does not fit as it is gets a short hash of its real name instead of the part that did
not fit, so exposed names stay distinct and never depend on the order a server lists its tools in.
Every failure is a ToolFailed whose message is safe to show (never a header or token), retryable
for what may pass (timeouts, connection errors, 408, 429, 5xx) and final otherwise (an `isError`
result, 4xx, a refused address, a protocol error the server answered).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import httpx
import httpx2
import mcp_types
import structlog
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types.jsonrpc import CONNECTION_CLOSED, REQUEST_TIMEOUT
from pydantic import ValidationError

from agent_tools.base import StatusReporter, ToolFailed, ToolOutcome
from core.settings import Settings
from outbound.guard import (
    OutboundPolicy,
    OutboundRefused,
    check_outbound_url,
    guarded_httpx2_client,
)
from providers.base import ToolDefinition

log = structlog.get_logger(__name__)

# A toolkit's name: it prefixes its tools' exposed names, so it is short and plain.
TOOLKIT_NAME_PATTERN: Final = r"^[a-z][a-z0-9_]{0,30}$"
EXPOSED_NAME_PATTERN: Final = r"^[a-zA-Z0-9_-]{1,64}$"
TOOL_NAME_SEPARATOR: Final = "__"
# `approval_tools` naming every tool of a toolkit.
ALL_TOOLS: Final = "*"
# Pages of tools/list read from one server at most; a server that pages on forever stops here.
MAX_TOOL_PAGES: Final = 20
# The text of a failed call kept as its message.
MAX_ERROR_CHARS: Final = 2_000

# How long a turn's listing of a toolkit's tools is reused (the admin `/tools` endpoint lists live).
TOOL_LIST_TTL_SECONDS: Final = 30.0
_EXPOSED = re.compile(EXPOSED_NAME_PATTERN)
_NOT_EXPOSABLE = re.compile(r"[^a-zA-Z0-9_-]")
_HASH_CHARS: Final = 8
_CLIENT_INFO: Final = mcp_types.Implementation(name="durachat", version="0.1.0")
_RETRYABLE_STATUSES: Final = frozenset({408, 425, 429})
_RETRYABLE_MCP_CODES: Final = frozenset({CONNECTION_CLOSED, REQUEST_TIMEOUT})

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)


@dataclass(frozen=True)
class ToolkitConnection:
    """What reaching one toolkit takes, secrets unsealed: storage builds it for the tool activity.

    Never stored, logged, or passed through workflow history: `headers` and `token` are secrets.
    """

    id: str
    name: str
    url: str
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    token: str | None = field(default=None, repr=False)
    # The server's tool names offered; None offers every tool.
    allowed_tools: list[str] | None = None
    # The tool names that wait for a person's approval; ["*"] means every tool.
    approval_tools: list[str] = field(default_factory=list)

    def offers(self, tool_name: str) -> bool:
        return self.allowed_tools is None or tool_name in self.allowed_tools

    def needs_approval(self, tool_name: str) -> bool:
        return ALL_TOOLS in self.approval_tools or tool_name in self.approval_tools

    def request_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers


@dataclass(frozen=True)
class McpTool:
    """One tool of a toolkit as offered to a model: `definition.name` is the exposed name,
    `tool_name` the server's own."""

    toolkit_id: str
    toolkit_name: str
    tool_name: str
    definition: ToolDefinition
    needs_approval: bool

    @property
    def name(self) -> str:
        return self.definition.name


class UnknownFunctions(ValueError):
    """A send named functions none of its toolkits offers; `names` lists them."""

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__(f"no toolkit of this send offers {', '.join(map(repr, names))}")
        self.names = list(names)


def exposed_tool_name(toolkit_name: str, tool_name: str) -> str:
    """The name a model calls a toolkit's tool by: `<toolkit>__<tool>` when that fits
    `^[a-zA-Z0-9_-]{1,64}$` as it is, otherwise its fitting part and a hash of the tool's name."""
    exposed = f"{toolkit_name}{TOOL_NAME_SEPARATOR}{tool_name}"
    if _EXPOSED.fullmatch(exposed):
        return exposed
    digest = hashlib.sha256(tool_name.encode()).hexdigest()[:_HASH_CHARS]
    readable = _NOT_EXPOSABLE.sub("_", exposed)[: 64 - _HASH_CHARS - 1]
    return f"{readable}_{digest}"


class McpToolkits:
    """Lists and calls toolkit tools; holds no connection, so one instance serves every caller."""

    def __init__(
        self,
        policy: OutboundPolicy,
        *,
        call_timeout_seconds: float = 60.0,
        list_timeout_seconds: float = 10.0,
    ) -> None:
        self._policy = policy
        self._call_timeout = call_timeout_seconds
        self._list_timeout = list_timeout_seconds
        # A turn offers a toolkit's tools at every model step and runs each call against them;
        # listing them once per TOOL_LIST_TTL_SECONDS instead of each time spares the server (and
        # the turn) a round trip per step and per call.
        self._listed: dict[tuple[str, str, str], tuple[float, list[McpTool]]] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> McpToolkits:
        return cls(
            OutboundPolicy.from_settings(settings),
            call_timeout_seconds=settings.mcp_call_timeout_seconds,
            list_timeout_seconds=settings.mcp_list_timeout_seconds,
        )

    async def list_tools(self, toolkit: ToolkitConnection) -> list[McpTool]:
        """The server's tools that the toolkit offers, live, in the server's order."""
        listed = await self._session(toolkit, self._list_timeout, _all_tools)
        return [
            McpTool(
                toolkit_id=toolkit.id,
                toolkit_name=toolkit.name,
                tool_name=tool.name,
                definition=ToolDefinition(
                    name=exposed_tool_name(toolkit.name, tool.name),
                    description=tool.description or tool.title or "",
                    input_schema=dict(tool.input_schema),
                ),
                needs_approval=toolkit.needs_approval(tool.name),
            )
            for tool in listed
            if toolkit.offers(tool.name)
        ]

    async def _recently_listed(self, toolkit: ToolkitConnection) -> list[McpTool]:
        """`list_tools`, answered from the last listing of the same server for a few seconds."""
        # Keyed by what reaches the server (never the secrets themselves): a toolkit whose URL,
        # headers, token or lists changed is listed again at once.
        key = (
            toolkit.id,
            toolkit.url,
            hashlib.sha256(
                repr(
                    (
                        sorted(toolkit.request_headers().items()),
                        toolkit.allowed_tools,
                        toolkit.approval_tools,
                    )
                ).encode()
            ).hexdigest(),
        )
        now = time.monotonic()
        cached = self._listed.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        tools = await self.list_tools(toolkit)
        self._listed = {k: v for k, v in self._listed.items() if v[0] > now}
        self._listed[key] = (now + TOOL_LIST_TTL_SECONDS, tools)
        return tools

    async def tools_for(
        self, toolkits: Sequence[ToolkitConnection], functions: Sequence[str] | None
    ) -> list[McpTool]:
        """The tools a send offers its model: every offered tool of `toolkits`, or only those
        whose exposed names `functions` lists. Raises UnknownFunctions for a function none of them
        offers, and the first toolkit's ToolFailed when one cannot be listed."""
        try:
            # A task group rather than gather: the first failure cancels the other listings.
            async with asyncio.TaskGroup() as group:
                listings = [
                    group.create_task(self._recently_listed(toolkit)) for toolkit in toolkits
                ]
        except ExceptionGroup as failures:
            failed = _first(_leaves(failures), ToolFailed)
            if failed is None:
                raise
            raise failed from None
        tools = [tool for listing in listings for tool in listing.result()]
        if functions is None:
            return tools
        wanted = set(functions)
        unknown = sorted(wanted - {tool.name for tool in tools})
        if unknown:
            raise UnknownFunctions(unknown)
        return [tool for tool in tools if tool.name in wanted]

    async def call_tool(
        self,
        toolkit: ToolkitConnection,
        tool_name: str,
        arguments: dict[str, Any],
        status: StatusReporter,
    ) -> ToolOutcome:
        """Call the server's tool `tool_name` (its own name, not the exposed one)."""
        if not toolkit.offers(tool_name):
            raise ToolFailed(f"{toolkit.name} does not offer a tool named {tool_name!r}")
        await status(f"calling {toolkit.name}.{tool_name}")

        async def call(client: Client) -> mcp_types.CallToolResult:
            return await client.call_tool(tool_name, arguments)

        result = await self._session(toolkit, self._call_timeout, call)
        if result.is_error:
            message = _content_text(result.content) or f"{toolkit.name}.{tool_name} failed"
            raise ToolFailed(_bounded(message))
        return ToolOutcome(output=_output(result))

    async def _session(
        self,
        toolkit: ToolkitConnection,
        time_limit: float,
        action: Callable[[Client], Awaitable[T]],
    ) -> T:
        """Run `action` in a new MCP session with the toolkit's server, within `time_limit`
        seconds in all (connecting included)."""
        # POST answers only: the SDK's GET stream may well be refused (405) by a working server.
        statuses: list[int] = []

        async def record(response: httpx2.Response) -> None:
            if response.request.method == "POST":
                statuses.append(response.status_code)

        try:
            async with asyncio.timeout(time_limit):
                # Checked before any connection, so a refused address is never even probed; each
                # connection is checked again by the client itself.
                await check_outbound_url(self._policy, toolkit.url)
                http = guarded_httpx2_client(
                    self._policy,
                    timeout_seconds=time_limit,
                    headers=toolkit.request_headers(),
                    event_hooks={"response": [record]},
                )
                transport = streamable_http_client(toolkit.url, http_client=http)
                async with http, Client(transport, cache=None, client_info=_CLIENT_INFO) as client:
                    return await action(client)
        except Exception as exc:
            failure = _failure(toolkit, exc, time_limit, statuses[-1] if statuses else None)
            log.warning(
                "mcp.toolkit_failed",
                toolkit_id=toolkit.id,
                toolkit=toolkit.name,
                error=failure.message,
                retryable=failure.retryable,
            )
            raise failure from None


async def _all_tools(client: Client) -> list[mcp_types.Tool]:
    tools: list[mcp_types.Tool] = []
    cursor: str | None = None
    for _page in range(MAX_TOOL_PAGES):
        page = await client.list_tools(cursor=cursor)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if cursor is None:
            break
    return tools


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside `exc`: the SDK's task groups wrap what failed in exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _failure(
    toolkit: ToolkitConnection, exc: Exception, time_limit: float, last_status: int | None
) -> ToolFailed:
    leaves = _leaves(exc)
    name = toolkit.name
    # In order of how surely each says what went wrong.
    if (own := _first(leaves, ToolFailed)) is not None:
        return own
    if (refused := _first(leaves, OutboundRefused)) is not None:
        return ToolFailed(f"{name}: {refused}")
    if any(isinstance(leaf, TimeoutError | httpx2.TimeoutException) for leaf in leaves):
        return ToolFailed(f"{name} did not answer within {time_limit:g} s", retryable=True)
    network = _first(leaves, httpx2.TransportError) or _first(leaves, httpx.TransportError)
    if network is not None:
        return ToolFailed(f"{name} could not be reached: {network}", retryable=True)
    if last_status is not None and last_status >= 400:
        if last_status in (401, 403):
            return ToolFailed(f"{name} refused the toolkit's credentials (HTTP {last_status})")
        retryable = last_status >= 500 or last_status in _RETRYABLE_STATUSES
        return ToolFailed(f"{name} answered HTTP {last_status}", retryable=retryable)
    if (error := _first(leaves, MCPError)) is not None:
        return ToolFailed(
            _bounded(f"{name}: {error.message}"), retryable=error.code in _RETRYABLE_MCP_CODES
        )
    if _first(leaves, ValidationError) is not None:
        return ToolFailed(f"{name} answered with a result that is not valid MCP")
    log.error("mcp.unexpected_failure", toolkit_id=toolkit.id, exc_info=exc)
    return ToolFailed(f"{name} failed unexpectedly", retryable=True)


def _first(leaves: Sequence[BaseException], kind: type[E]) -> E | None:
    return next((leaf for leaf in leaves if isinstance(leaf, kind)), None)


def _output(result: mcp_types.CallToolResult) -> Any:
    """What a call gave back, JSON-serialisable: its text, and its structured content if any."""
    text = _content_text(result.content)
    if result.structured_content is None:
        return text
    return {"text": text, "structuredContent": result.structured_content}


def _content_text(content: Sequence[mcp_types.ContentBlock]) -> str:
    return "\n".join(filter(None, (_block_text(block) for block in content)))


def _block_text(block: mcp_types.ContentBlock) -> str:
    if isinstance(block, mcp_types.TextContent):
        return block.text
    if isinstance(block, mcp_types.ImageContent | mcp_types.AudioContent):
        # Tool outputs reach models as text: a note keeps the model from assuming nothing came.
        return f"[{block.type} ({block.mime_type}) not shown]"
    if isinstance(block, mcp_types.ResourceLink):
        return f"[resource {block.uri}]"
    resource = block.resource
    if isinstance(resource, mcp_types.TextResourceContents):
        return resource.text
    return f"[resource {resource.uri} ({resource.mime_type or 'binary'}) not shown]"


def _bounded(message: str) -> str:
    if len(message) <= MAX_ERROR_CHARS:
        return message
    return message[:MAX_ERROR_CHARS] + "…"
