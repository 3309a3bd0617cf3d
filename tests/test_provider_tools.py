"""Tool calling in every provider adapter, against the local server speaking each provider's wire format.

Tools offered in the provider's format, streamed calls as ToolCallStart, ToolCallDeltas and ToolCall
before the usage and a "tool-calls" finish, parallel calls, tool history sent back in the
provider's format, and input that is not JSON. Adapter-level: no Temporal, no Postgres.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import pytest

from providers.anthropic import AnthropicProvider
from providers.base import (
    Finish,
    ModelProvider,
    PromptMessage,
    PromptToolCall,
    PromptToolResult,
    ProviderEvent,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallStart,
    ToolDefinition,
    Usage,
)
from providers.gemini import GeminiProvider
from providers.ollama import OllamaProvider
from providers.openai_compatible import OpenAICompatibleProvider, OpenAIDialect
from tests.conftest import NativeServers
from tests.support import anthropic_server, gemini_server, ollama_server, openai_server
from tests.support.provider_contract import only_request, refused_before_sending, request
from tests.support.provider_events import collect, text_of, tool_calls_of
from tests.support.wire_server import (
    BAD_INPUT_TEXT,
    SeenToolCall,
    SeenToolResult,
    ToolHistory,
    ToolStep,
    WireScript,
    WireServer,
)

SEARCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"query": {"type": "string", "description": "What to search for"}},
    "required": ["query"],
}
FETCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"url": {"type": "string", "description": "The page's address"}},
    "required": ["url"],
}
WEB_SEARCH = ToolDefinition("web_search", "Search the web.", SEARCH_SCHEMA)
FETCH_PAGE = ToolDefinition("fetch_page", "Read a web page.", FETCH_SCHEMA)
TOOLS = (WEB_SEARCH, FETCH_PAGE)

ASKED = "durable workflows"
SEARCH_CALL = PromptToolCall("call_search_1", "web_search", {"query": ASKED})
FETCH_CALL = PromptToolCall("call_fetch_2", "fetch_page", {"url": "https://temporal.io"})
SEARCH_RESULT = PromptToolResult(
    "call_search_1", "web_search", "Temporal runs durable workflows that survive crashes."
)
FETCH_RESULT = PromptToolResult("call_fetch_2", "fetch_page", "the page timed out", is_error=True)
# A step's calls and their results, after the user asked: what every history check sends.
HISTORY = [
    PromptMessage("system", "You are terse."),
    PromptMessage("user", ASKED),
    PromptMessage("assistant", "Searching.", tool_calls=(SEARCH_CALL, FETCH_CALL)),
    PromptMessage("tool", "", tool_results=(SEARCH_RESULT, FETCH_RESULT)),
]
PARALLEL: ToolStep = [
    ("web_search", {"query": "temporal"}),
    ("fetch_page", {"url": "https://x.io"}),
]

# Ids an adapter makes up where its provider gives none.
MADE_UP_ID = re.compile(r"call_[0-9a-f]{32}")


def asking(text: str = ASKED) -> list[PromptMessage]:
    return [PromptMessage("system", "You are terse."), PromptMessage("user", text)]


class ToolRecording(Protocol):
    """A recorded request of any of the servers, as far as these tests read it."""

    body: dict[str, Any]

    def tool_history(self) -> ToolHistory: ...


@dataclass
class Wire:
    """One adapter and the test server speaking its provider's wire format."""

    name: str
    server: WireServer[Any, Any]
    script_type: type[WireScript]
    adapter: ModelProvider
    streams_input: bool  # the call's input JSON arrives in several pieces
    call_id: re.Pattern[str]  # what the call ids of this wire look like

    def scripted(self, model: str, **fields: Any) -> str:
        """`model`, answered with a Script of this server's type made of `fields`."""
        self.server.script(model, self.script_type(**fields))
        return model

    def sent(self) -> ToolRecording:
        recorded: ToolRecording = only_request(self.server)
        return recorded


def _openai(server: openai_server.OpenAICompatibleServer, dialect: OpenAIDialect) -> Wire:
    adapter = OpenAICompatibleProvider(
        str(dialect),
        base_url=server.base_url,
        api_key=server.api_key or "",
        models=["echo"],
        timeout_seconds=10,
        dialect=dialect,
    )
    return Wire(
        name=str(dialect),
        server=server,
        script_type=openai_server.Script,
        adapter=adapter,
        streams_input=True,
        call_id=re.compile(r"call_\w{24}"),
    )


def _wires(
    provider_server: openai_server.OpenAICompatibleServer, native: NativeServers
) -> dict[str, Callable[[], Wire]]:
    settings: dict[str, Any] = {"models": ["echo"], "timeout_seconds": 10}
    return {
        "openai": lambda: _openai(provider_server, OpenAIDialect.OPENAI),
        "groq": lambda: _openai(native.groq, OpenAIDialect.GROQ),
        "openrouter": lambda: _openai(native.openrouter, OpenAIDialect.OPENROUTER),
        "anthropic": lambda: Wire(
            name="anthropic",
            server=native.anthropic,
            script_type=anthropic_server.Script,
            adapter=AnthropicProvider(
                "anthropic",
                base_url=native.anthropic.base_url,
                api_key=native.anthropic.api_key,
                **settings,
            ),
            streams_input=True,
            call_id=re.compile(r"toolu_01\w{22}"),
        ),
        "google": lambda: Wire(
            name="google",
            server=native.google,
            script_type=gemini_server.Script,
            adapter=GeminiProvider(
                "google", base_url=native.google.base_url, api_key=native.google.api_key, **settings
            ),
            streams_input=False,
            call_id=MADE_UP_ID,
        ),
        "ollama": lambda: Wire(
            name="ollama",
            server=native.ollama,
            script_type=ollama_server.Script,
            adapter=OllamaProvider(
                "ollama", base_url=native.ollama.base_url, api_key="", **settings
            ),
            streams_input=False,
            call_id=MADE_UP_ID,
        ),
    }


ALL_WIRES = ["openai", "groq", "openrouter", "anthropic", "google", "ollama"]
# Where input arrives as text, so a model can send text that is not JSON: Gemini and Ollama carry
# it as an object.
TEXT_INPUT_WIRES = ["openai", "groq", "openrouter", "anthropic"]


@pytest.fixture
async def wire(
    request: pytest.FixtureRequest,
    provider_server: openai_server.OpenAICompatibleServer,
    native_servers: NativeServers,
) -> AsyncIterator[Wire]:
    built = _wires(provider_server, native_servers)[request.param]()
    built.server.reset()
    yield built
    await built.adapter.aclose()


def each_wire(*names: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("wire", names or ALL_WIRES, indirect=True)


def call_events(events: list[ProviderEvent], call_id: str) -> list[ProviderEvent]:
    return [
        event
        for event in events
        if isinstance(event, ToolCallStart | ToolCallDelta | ToolCall) and event.call_id == call_id
    ]


def assert_one_call_streamed(events: list[ProviderEvent], call: ToolCall, wire: Wire) -> None:
    """`call`'s events are its start, its input deltas, then the call, and the deltas spell its
    input text."""
    own = call_events(events, call.call_id)
    assert own[0] == ToolCallStart(call.call_id, call.name)
    assert own[-1] == call
    deltas = own[1:-1]
    assert all(isinstance(delta, ToolCallDelta) for delta in deltas)
    assert "".join(d.input_text for d in deltas if isinstance(d, ToolCallDelta)) == call.input_text
    # Streaming providers send the input in pieces; the others whole, as one delta.
    assert len(deltas) > 1 if wire.streams_input else len(deltas) == 1


# --- streamed calls ------------------------------------------------------------------------------


@each_wire()
async def test_a_streamed_call_comes_as_start_deltas_call_then_usage_and_finish(
    wire: Wire,
) -> None:
    events = await collect(
        wire.adapter.stream(request("calls-web_search", messages=asking(), offered_tools=TOOLS))
    )

    [call] = tool_calls_of(events)
    assert call.name == "web_search"
    assert call.input == {"query": ASKED}
    assert json.loads(call.input_text) == {"query": ASKED}
    assert wire.call_id.fullmatch(call.call_id)
    assert_one_call_streamed(events, call, wire)
    # Nothing else comes with the call, and the usage and the finish close the stream.
    assert events[: len(events) - 2] == call_events(events, call.call_id)
    usage, finish = events[-2:]
    assert isinstance(usage, Usage)
    assert usage.output_tokens > 0
    assert finish == Finish("tool-calls")


@each_wire()
async def test_parallel_calls_all_come_through_in_order(wire: Wire) -> None:
    model = wire.scripted("parallel-tools", tool_steps=[PARALLEL])

    events = await collect(
        wire.adapter.stream(request(model, messages=asking(), offered_tools=TOOLS))
    )

    calls = tool_calls_of(events)
    assert [(call.name, call.input) for call in calls] == PARALLEL
    assert len({call.call_id for call in calls}) == 2
    for call in calls:
        assert_one_call_streamed(events, call, wire)
    # The first call starts before the second does.
    starts = [event for event in events if isinstance(event, ToolCallStart)]
    assert [start.call_id for start in starts] == [call.call_id for call in calls]
    assert isinstance(events[-2], Usage)
    assert events[-1] == Finish("tool-calls")


@each_wire()
async def test_text_before_a_call_still_streams(wire: Wire) -> None:
    model = wire.scripted(
        "text-then-call",
        text_before_calls="Let me look that up.",
        tool_steps=[[("web_search", {"query": "temporal"})]],
    )

    events = await collect(
        wire.adapter.stream(request(model, messages=asking(), offered_tools=TOOLS))
    )

    assert text_of(events) == "Let me look that up."
    first_start = next(i for i, event in enumerate(events) if isinstance(event, ToolCallStart))
    assert all(isinstance(event, TextDelta) for event in events[:first_start])
    [call] = tool_calls_of(events)
    assert call.input == {"query": "temporal"}
    assert events[-1] == Finish("tool-calls")


@each_wire(*TEXT_INPUT_WIRES)
async def test_input_that_is_not_json_gives_a_call_without_input(wire: Wire) -> None:
    model = wire.scripted(
        "bad-input", tool_steps=[[("web_search", {"query": "temporal"})]], bad_input=True
    )

    events = await collect(
        wire.adapter.stream(request(model, messages=asking(), offered_tools=TOOLS))
    )

    [call] = tool_calls_of(events)
    assert call.input is None
    assert call.input_text == BAD_INPUT_TEXT
    assert_one_call_streamed(events, call, wire)
    assert events[-1] == Finish("tool-calls")


@each_wire()
async def test_without_tools_nothing_about_tools_is_sent(wire: Wire) -> None:
    events = await collect(wire.adapter.stream(request("reply-plain-answer")))

    body = wire.sent().body
    assert not body.get("tools")
    assert {"tool_choice", "toolConfig"}.isdisjoint(body)
    assert text_of(events) == "plain answer"
    assert events[-1] == Finish("stop")


# --- history ---------------------------------------------------------------------------------


@each_wire()
async def test_results_in_the_history_reach_the_model(wire: Wire) -> None:
    """`calls-<tool>` answers once the history holds its round of results, quoting the last."""
    events = await collect(
        wire.adapter.stream(request("calls-web_search", messages=HISTORY, offered_tools=TOOLS))
    )

    assert text_of(events) == "done: " + FETCH_RESULT.output[:60]
    assert tool_calls_of(events) == []
    assert events[-1] == Finish("stop")
    history = wire.sent().tool_history()
    assert history.rounds == 1
    # Ollama's conversation carries no call ids, and only Anthropic and Gemini an error flag.
    with_ids = wire.name != "ollama"
    flags_errors = wire.name in ("anthropic", "google")
    assert history.calls == [
        SeenToolCall(call.call_id if with_ids else None, call.name, call.input)
        for call in (SEARCH_CALL, FETCH_CALL)
    ]
    assert history.results == [
        SeenToolResult(
            result.call_id if with_ids else None,
            result.name,
            result.output,
            result.is_error and flags_errors,
        )
        for result in (SEARCH_RESULT, FETCH_RESULT)
    ]


@each_wire()
async def test_each_step_follows_the_rounds_of_results(wire: Wire) -> None:
    model = wire.scripted(
        "two-steps",
        tool_steps=[[("web_search", {"query": ASKED})], [("fetch_page", {"url": "https://b.io"})]],
        reply="all done",
    )
    after_one_round = [
        *HISTORY[:2],
        PromptMessage("assistant", "", tool_calls=(SEARCH_CALL,)),
        PromptMessage("tool", "", tool_results=(SEARCH_RESULT,)),
    ]
    second_round = [
        PromptMessage("assistant", "", tool_calls=(FETCH_CALL,)),
        PromptMessage("tool", "", tool_results=(FETCH_RESULT,)),
    ]

    second = await collect(
        wire.adapter.stream(request(model, messages=after_one_round, offered_tools=TOOLS))
    )
    last = await collect(
        wire.adapter.stream(
            request(model, messages=after_one_round + second_round, offered_tools=TOOLS)
        )
    )
    # A new user message starts a new turn: the steps start over.
    again = await collect(
        wire.adapter.stream(
            request(
                model,
                messages=[*after_one_round, PromptMessage("user", "and again")],
                offered_tools=TOOLS,
            )
        )
    )

    assert [(call.name, call.input) for call in tool_calls_of(second)] == [
        ("fetch_page", {"url": "https://b.io"})
    ]
    assert second[-1] == Finish("tool-calls")
    assert text_of(last) == "all done"
    assert last[-1] == Finish("stop")
    assert [call.name for call in tool_calls_of(again)] == ["web_search"]


# --- each provider's wire format ------------------------------------------------------------------


@each_wire("openai", "groq", "openrouter")
async def test_openai_tools_calls_and_results_in_its_wire_format(wire: Wire) -> None:
    await collect(
        wire.adapter.stream(request("calls-web_search", messages=HISTORY, offered_tools=TOOLS))
    )

    sent = wire.sent()
    assert sent.body["tools"] == [
        {
            "type": "function",
            "function": {"name": tool.name, "description": tool.description, "parameters": schema},
        }
        for tool, schema in ((WEB_SEARCH, SEARCH_SCHEMA), (FETCH_PAGE, FETCH_SCHEMA))
    ]
    assert sent.body["tool_choice"] == "auto"
    assert sent.body["messages"][2:] == [
        {
            "role": "assistant",
            "content": "Searching.",
            "tool_calls": [
                {
                    "id": call.call_id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": json.dumps(call.input)},
                }
                for call in (SEARCH_CALL, FETCH_CALL)
            ],
        },
        # One message per result, in call order.
        {"role": "tool", "tool_call_id": "call_search_1", "content": SEARCH_RESULT.output},
        {"role": "tool", "tool_call_id": "call_fetch_2", "content": FETCH_RESULT.output},
    ]


@each_wire("anthropic")
async def test_anthropic_tools_calls_and_results_in_its_wire_format(wire: Wire) -> None:
    await collect(
        wire.adapter.stream(request("calls-web_search", messages=HISTORY, offered_tools=TOOLS))
    )

    sent = wire.sent()
    assert sent.body["tools"] == [
        {"name": "web_search", "description": "Search the web.", "input_schema": SEARCH_SCHEMA},
        {"name": "fetch_page", "description": "Read a web page.", "input_schema": FETCH_SCHEMA},
    ]
    assert sent.body["tool_choice"] == {"type": "auto"}
    assert sent.body["messages"] == [
        {"role": "user", "content": ASKED},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Searching."},
                {
                    "type": "tool_use",
                    "id": "call_search_1",
                    "name": "web_search",
                    "input": {"query": ASKED},
                },
                {
                    "type": "tool_use",
                    "id": "call_fetch_2",
                    "name": "fetch_page",
                    "input": {"url": "https://temporal.io"},
                },
            ],
        },
        # Every result of the step in one user message.
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "call_search_1",
                    "content": SEARCH_RESULT.output,
                },
                {
                    "type": "tool_result",
                    "tool_use_id": "call_fetch_2",
                    "content": FETCH_RESULT.output,
                    "is_error": True,
                },
            ],
        },
    ]


@each_wire("anthropic")
async def test_anthropic_results_and_the_next_user_message_make_one_message(wire: Wire) -> None:
    history = [*HISTORY, PromptMessage("user", "thanks, and now?")]

    events = await collect(
        wire.adapter.stream(request("echo", messages=history, offered_tools=TOOLS))
    )

    messages = wire.sent().body["messages"]
    assert [message["role"] for message in messages] == ["user", "assistant", "user"]
    assert [block["type"] for block in messages[-1]["content"]] == [
        "tool_result",
        "tool_result",
        "text",
    ]
    assert messages[-1]["content"][-1] == {"type": "text", "text": "thanks, and now?"}
    assert text_of(events) == "thanks, and now?"


@each_wire("anthropic")
async def test_anthropic_calls_without_text_and_empty_results(wire: Wire) -> None:
    history = [
        *HISTORY[:2],
        PromptMessage("assistant", "", tool_calls=(SEARCH_CALL,)),
        PromptMessage(
            "tool", "", tool_results=(PromptToolResult("call_search_1", "web_search", ""),)
        ),
    ]

    events = await collect(
        wire.adapter.stream(request("calls-web_search", messages=history, offered_tools=TOOLS))
    )

    messages = wire.sent().body["messages"]
    # The API refuses empty text, so neither an empty text block nor empty result content goes.
    assert messages[1]["content"] == [
        {"type": "tool_use", "id": "call_search_1", "name": "web_search", "input": {"query": ASKED}}
    ]
    assert messages[2]["content"] == [{"type": "tool_result", "tool_use_id": "call_search_1"}]
    assert text_of(events) == "done: "


@each_wire("google")
async def test_gemini_tools_calls_and_results_in_its_wire_format(wire: Wire) -> None:
    await collect(
        wire.adapter.stream(request("calls-web_search", messages=HISTORY, offered_tools=TOOLS))
    )

    sent = wire.sent()
    assert isinstance(sent, gemini_server.RecordedRequest)
    assert sent.function_declarations() == [
        {
            "name": "web_search",
            "description": "Search the web.",
            "parametersJsonSchema": SEARCH_SCHEMA,
        },
        {
            "name": "fetch_page",
            "description": "Read a web page.",
            "parametersJsonSchema": FETCH_SCHEMA,
        },
    ]
    assert sent.tool_config == {"functionCallingConfig": {"mode": "AUTO"}}
    assert sent.contents[1:] == [
        {
            "role": "model",
            "parts": [
                {"text": "Searching."},
                # Gemini 3 refuses the first call of a step without a signature: the prompt
                # keeps none, so it carries Google's placeholder.
                {
                    "functionCall": {
                        "id": "call_search_1",
                        "name": "web_search",
                        "args": {"query": ASKED},
                    },
                    "thoughtSignature": "skip_thought_signature_validator",
                },
                {
                    "functionCall": {
                        "id": "call_fetch_2",
                        "name": "fetch_page",
                        "args": {"url": "https://temporal.io"},
                    }
                },
            ],
        },
        # Every result of the step in one user content.
        {
            "role": "user",
            "parts": [
                {
                    "functionResponse": {
                        "id": "call_search_1",
                        "name": "web_search",
                        "response": {"output": SEARCH_RESULT.output},
                    }
                },
                {
                    "functionResponse": {
                        "id": "call_fetch_2",
                        "name": "fetch_page",
                        "response": {"error": FETCH_RESULT.output},
                    }
                },
            ],
        },
    ]


@each_wire("google")
async def test_gemini_call_ids_are_kept_when_it_sends_them(wire: Wire) -> None:
    model = wire.scripted("with-ids", tool_steps=[PARALLEL], function_call_ids=True)

    events = await collect(
        wire.adapter.stream(request(model, messages=asking(), offered_tools=TOOLS))
    )

    ids = [call.call_id for call in tool_calls_of(events)]
    assert len(ids) == 2
    assert all(re.fullmatch(r"[0-9a-f]{8}", call_id) for call_id in ids)


@each_wire("ollama")
async def test_ollama_tools_calls_and_results_in_its_wire_format(wire: Wire) -> None:
    await collect(
        wire.adapter.stream(request("calls-web_search", messages=HISTORY, offered_tools=TOOLS))
    )

    sent = wire.sent()
    assert sent.body["tools"] == [
        {
            "type": "function",
            "function": {"name": tool.name, "description": tool.description, "parameters": schema},
        }
        for tool, schema in ((WEB_SEARCH, SEARCH_SCHEMA), (FETCH_PAGE, FETCH_SCHEMA))
    ]
    assert sent.body["messages"][2:] == [
        {
            "role": "assistant",
            "content": "Searching.",
            "tool_calls": [
                {"function": {"name": call.name, "arguments": call.input}}
                for call in (SEARCH_CALL, FETCH_CALL)
            ],
        },
        # One message per result, naming its tool: Ollama's conversation has no call ids.
        {"role": "tool", "content": SEARCH_RESULT.output, "tool_name": "web_search"},
        {"role": "tool", "content": FETCH_RESULT.output, "tool_name": "fetch_page"},
    ]


@each_wire("ollama")
async def test_ollama_refuses_a_schema_it_cannot_take_before_sending(wire: Wire) -> None:
    listing = ToolDefinition("list", "A list.", {"type": "array", "items": {"type": "string"}})

    error = await refused_before_sending(
        wire.adapter, wire.server, request("echo", offered_tools=(WEB_SEARCH, listing))
    )

    assert "'list'" in str(error)


def test_name_conventions_reach_every_server() -> None:
    """`calls-<tool>` means the same to each server, with tool names that hold underscores."""
    conventions: list[Callable[[str], WireScript | None]] = [
        openai_server.script_for_model,
        anthropic_server.script_for_model,
        gemini_server.script_for_model,
        ollama_server.script_for_model,
    ]
    for script_for_model in conventions:
        script = script_for_model("calls-web_search")
        assert script is not None
        assert script.calls_tool == "web_search"
