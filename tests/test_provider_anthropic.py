"""The Anthropic adapter on the official SDK, against a local server speaking its wire format."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from providers.anthropic import DEFAULT_MAX_TOKENS, AnthropicProvider
from providers.base import (
    Finish,
    FinishReason,
    ImageInput,
    InputKind,
    PromptMessage,
    ReasoningDelta,
    TextDelta,
    Usage,
)
from tests.support.anthropic_server import (
    API_VERSION,
    CACHE_READ_TOKENS,
    CACHE_WRITE_TOKENS,
    AnthropicServer,
)
from tests.support.provider_contract import (
    PDF,
    PNG,
    PROMPT_WORDS,
    assert_kept_out,
    broken_off_failure,
    check_cancelling_the_consumer_closes_the_connection,
    check_closing_midway_closes_the_connection,
    check_streams_text_then_usage_and_finish,
    closed_origin,
    connection_refused_failure,
    only_request,
    refused_before_sending,
    request,
    status_failure,
    timeout_failure,
    with_inputs,
)
from tests.support.provider_events import (
    collect,
    collect_failure,
    failure_of,
    reasoning_of,
    text_of,
)

API_KEY = "sk-ant-test-0123456789abcdef"


@pytest.fixture(scope="module")
def server() -> Iterator[AnthropicServer]:
    with AnthropicServer(api_key=API_KEY) as running:
        yield running


def adapter_for(base_url: str, *, api_key: str = API_KEY, **overrides: Any) -> AnthropicProvider:
    settings: dict[str, Any] = {"models": ["echo"], "timeout_seconds": 10, **overrides}
    return AnthropicProvider("test", base_url=base_url, api_key=api_key, **settings)


@pytest.fixture
async def provider(server: AnthropicServer) -> AsyncIterator[AnthropicProvider]:
    server.reset()
    adapter = adapter_for(server.base_url, document_models=["echo"])
    yield adapter
    await adapter.aclose()


# --- text, reasoning, usage, stop reasons ---------------------------------------------------------


async def test_streams_text_usage_and_finish(
    provider: AnthropicProvider, server: AnthropicServer
) -> None:
    await check_streams_text_then_usage_and_finish(provider, server)


async def test_sends_the_system_prompt_apart_with_the_key_version_and_a_default_max_tokens(
    provider: AnthropicProvider, server: AnthropicServer
) -> None:
    await collect(provider.stream(request("echo")))

    sent = only_request(server)
    assert sent.path == "/v1/messages"
    assert sent.headers["authorization"] == f"Bearer {API_KEY}"
    assert sent.headers["anthropic-version"] == API_VERSION
    assert sent.body == {
        "model": "echo",
        "max_tokens": DEFAULT_MAX_TOKENS,
        "system": "You are terse.",
        "messages": [{"role": "user", "content": "Say something nice"}],
        "stream": True,
    }


async def test_echo_streams_the_last_user_message_back(provider: AnthropicProvider) -> None:
    messages = [
        PromptMessage("user", "an earlier question"),
        PromptMessage("assistant", "an earlier answer"),
        PromptMessage("user", "and now  this one"),
    ]
    events = await collect(provider.stream(request("echo", messages=messages)))

    assert text_of(events) == "and now  this one"
    assert events[-1] == Finish("stop")


async def test_several_system_messages_become_text_blocks_and_empty_messages_are_left_out(
    provider: AnthropicProvider, server: AnthropicServer
) -> None:
    messages = [
        PromptMessage("system", "You are terse."),
        PromptMessage("system", "Answer in English."),
        PromptMessage("user", "first"),
        PromptMessage("assistant", ""),  # a turn stopped before it said anything
        PromptMessage("user", "second"),
    ]
    events = await collect(provider.stream(request("echo", messages=messages)))

    sent = only_request(server)
    assert sent.system == [
        {"type": "text", "text": "You are terse."},
        {"type": "text", "text": "Answer in English."},
    ]
    assert sent.messages == [
        {"role": "user", "content": "first"},
        {"role": "user", "content": "second"},
    ]
    assert text_of(events) == "second"


async def test_thinking_streams_as_reasoning_before_the_text_and_counts_its_tokens(
    provider: AnthropicProvider,
) -> None:
    events = await collect(provider.stream(request("thinking-a-haiku")))

    reasoning = "The user wants a haiku. I will answer."
    assert reasoning_of(events) == reasoning
    assert text_of(events) == "a haiku"
    kinds = [type(event) for event in events]
    assert kinds.index(TextDelta) > max(i for i, k in enumerate(kinds) if k is ReasoningDelta)
    thinking_tokens = len(reasoning.split())
    assert events[-2:] == [
        Usage(
            input_tokens=PROMPT_WORDS,
            output_tokens=2 + thinking_tokens,
            reasoning_tokens=thinking_tokens,
        ),
        Finish("stop"),
    ]


async def test_usage_counts_cache_reads_and_writes_as_input_once(
    provider: AnthropicProvider,
) -> None:
    # The server repeats the input counts in message_delta; adding instead of overwriting would
    # double them.
    events = await collect(provider.stream(request("cached-hi-there")))

    assert events[-2] == Usage(
        input_tokens=PROMPT_WORDS + CACHE_READ_TOKENS + CACHE_WRITE_TOKENS,
        output_tokens=2,
        cached_input_tokens=CACHE_READ_TOKENS,
        cache_write_tokens=CACHE_WRITE_TOKENS,
    )


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool-calls"),
        ("refusal", "content-filter"),
        ("pause_turn", "other"),
        ("a_reason_added_later", "other"),
    ],
)
async def test_stop_reason_becomes_the_finish_reason(
    provider: AnthropicProvider, stop_reason: str, finish: FinishReason
) -> None:
    events = await collect(provider.stream(request(f"stop-{stop_reason}")))

    assert text_of(events) == "a short answer"
    assert events[-1] == Finish(finish)


# --- providerOptions ------------------------------------------------------------------------------


async def test_allowed_options_reach_the_request_in_the_wire_spelling(
    provider: AnthropicProvider, server: AnthropicServer
) -> None:
    options: dict[str, Any] = {
        "maxTokens": 3000,
        "thinking": {"type": "enabled", "budgetTokens": 2048, "display": "summarized"},
        "stopSequences": ["END"],
        "effort": "low",
        "stream": False,
        "tools": [{"name": "rm", "input_schema": {}}],
        "service_tier": "auto",
    }
    events = await collect(provider.stream(request("reply-one-two-END-three", **options)))

    sent = only_request(server)
    body = {key: sent.body[key] for key in sent.body if key not in ("messages", "model", "system")}
    assert body == {
        "max_tokens": 3000,
        "thinking": {"type": "enabled", "budget_tokens": 2048, "display": "summarized"},
        "stop_sequences": ["END"],
        "output_config": {"effort": "low"},
        "stream": True,
    }
    assert text_of(events) == "one two "
    assert events[-1] == Finish("stop")


async def test_a_thinking_budget_without_max_tokens_leaves_the_answer_its_default_room(
    provider: AnthropicProvider, server: AnthropicServer
) -> None:
    thinking = {"type": "enabled", "budget_tokens": 4096}
    await collect(provider.stream(request("reply-ok", thinking=thinking)))

    sent = only_request(server)
    assert sent.body["thinking"] == thinking
    assert sent.max_tokens == DEFAULT_MAX_TOKENS + 4096


@pytest.mark.parametrize(
    "thinking",
    [{"type": "adaptive"}, {"type": "adaptive", "display": "omitted"}, {"type": "disabled"}],
)
async def test_adaptive_and_disabled_thinking_pass_as_given(
    provider: AnthropicProvider, server: AnthropicServer, thinking: dict[str, Any]
) -> None:
    await collect(provider.stream(request("reply-ok", thinking=thinking)))

    sent = only_request(server)
    assert sent.body["thinking"] == thinking
    assert sent.max_tokens == DEFAULT_MAX_TOKENS


async def test_max_tokens_caps_the_reply_and_finishes_with_length(
    provider: AnthropicProvider, server: AnthropicServer
) -> None:
    events = await collect(provider.stream(request("reply-one-two-three", max_tokens=2)))

    assert only_request(server).max_tokens == 2
    assert text_of(events) == "one two "
    assert events[-1] == Finish("length")


async def test_sampling_parameters_never_reach_the_api(
    provider: AnthropicProvider, server: AnthropicServer
) -> None:
    # API version 2026-10-21 answers any of them with 400, even at their default values.
    options: dict[str, Any] = {
        "temperature": 0.2,
        "topP": 0.9,
        "top_p": 0.9,
        "topK": 40,
        "top_k": 40,
    }
    events = await collect(provider.stream(request("reply-fine", **options)))

    assert text_of(events) == "fine"
    assert not {"temperature", "top_p", "top_k", "topP", "topK"} & set(only_request(server).body)


async def test_the_server_refuses_sampling_parameters_as_the_api_does(
    provider: AnthropicProvider,
) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        await provider._client.messages.create(
            model="echo",
            max_tokens=10,
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"temperature": 1.0},
        )
    assert caught.value.api_message == "temperature: Extra inputs are not permitted"


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"maxTokens": "lots"}, "providerOptions.test.maxTokens must be a positive integer"),
        ({"max_tokens": 0}, "providerOptions.test.max_tokens must be a positive integer"),
        ({"maxTokens": True}, "providerOptions.test.maxTokens must be a positive integer"),
        ({"stopSequences": "END"}, "providerOptions.test.stopSequences must be a list of strings"),
        ({"stop_sequences": ["a", 1]}, "providerOptions.test.stop_sequences must be a list"),
        ({"effort": "huge"}, "providerOptions.test.effort must be one of low, medium, high"),
        ({"thinking": "on"}, "providerOptions.test.thinking must be an object"),
        ({"thinking": {"type": "enabled"}}, "thinking.budgetTokens must be a positive integer"),
        (
            {"thinking": {"type": "enabled", "budgetTokens": 2048.5}},
            "thinking.budgetTokens must be a positive integer",
        ),
        (
            {"thinking": {"type": "sometimes"}},
            "thinking.type must be enabled, adaptive or disabled",
        ),
        (
            {"thinking": {"type": "adaptive", "budgetTokens": 2048}},
            "thinking takes a budget or display only when enabled",
        ),
        (
            {"thinking": {"type": "adaptive", "display": "verbose"}},
            "thinking.display must be summarized or omitted",
        ),
        (
            {"thinking": {"type": "enabled", "budgetTokens": 2048, "temperature": 1}},
            "thinking has unknown fields: temperature",
        ),
    ],
)
async def test_ill_typed_options_are_rejected_before_any_request(
    provider: AnthropicProvider, server: AnthropicServer, options: dict[str, Any], named: str
) -> None:
    error = await refused_before_sending(provider, server, request("echo", **options))

    assert named in str(error)


async def test_a_thinking_budget_the_api_refuses_is_rejected_with_its_message(
    provider: AnthropicProvider,
) -> None:
    thinking = {"type": "enabled", "budgetTokens": 2048}
    error = await failure_of(provider.stream(request("echo", maxTokens=1000, thinking=thinking)))

    assert error.status_code == 400
    assert not error.retryable
    assert "`max_tokens` must be greater than `thinking.budget_tokens`" in str(error)


# --- image and document inputs --------------------------------------------------------------------


async def test_an_image_and_a_pdf_arrive_as_base64_blocks_after_the_text(
    provider: AnthropicProvider, server: AnthropicServer
) -> None:
    events = await collect(provider.stream(request("echo", messages=with_inputs("Look"))))

    sent = only_request(server)
    blocks = sent.user_blocks()
    assert [block["type"] for block in blocks] == ["text", "image", "document"]
    assert blocks[0] == {"type": "text", "text": "Look"}
    assert blocks[1]["source"]["type"] == "base64"
    assert sent.images() == [("image/png", PNG)]
    assert sent.documents() == [("r.pdf", "application/pdf", PDF)]
    assert sent.system == "You are terse."
    assert text_of(events) == "Look"


async def test_inputs_without_text_send_no_text_block(
    provider: AnthropicProvider, server: AnthropicServer
) -> None:
    await collect(provider.stream(request("echo", messages=with_inputs(""))))

    assert [block["type"] for block in only_request(server).user_blocks()] == ["image", "document"]


async def test_inputs_a_model_does_not_take_are_rejected_before_any_request(
    server: AnthropicServer,
) -> None:
    server.reset()
    async with aclosing(adapter_for(server.base_url)) as adapter:  # images yes, documents no
        error = await refused_before_sending(
            adapter, server, request("echo", messages=with_inputs("Look"))
        )

    assert "test/echo does not take document inputs" in str(error)


async def test_a_large_image_is_encoded_off_the_loop_and_arrives_intact(
    provider: AnthropicProvider, server: AnthropicServer
) -> None:
    large = PNG * 300  # about 3 MB, past the inline threshold
    messages = [PromptMessage("user", "big", inputs=(ImageInput("image/png", large),))]
    await collect(provider.stream(request("echo", messages=messages)))

    assert only_request(server).images() == [("image/png", large)]


def test_input_kinds_follow_the_provider_entry(server: AnthropicServer) -> None:
    adapter = AnthropicProvider(
        "p",
        base_url=server.base_url,
        api_key=API_KEY,
        models=["a", "b", "c"],
        timeout_seconds=10,
        image_models=["a", "b"],
        document_models=["b"],
    )
    assert adapter.models() == ["a", "b", "c"]
    assert adapter.input_kinds("a") == {InputKind.IMAGE}
    assert adapter.input_kinds("b") == {InputKind.IMAGE, InputKind.DOCUMENT}
    assert adapter.input_kinds("c") == frozenset()
    assert adapter.input_kinds("unknown") == frozenset()
    every = adapter_for(server.base_url)
    assert every.input_kinds("echo") == {InputKind.IMAGE}


# --- failures -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "retryable", "says"),
    [
        (400, False, "There was an issue with the format or content of your request."),
        (402, False, "Your credit balance is too low"),
        (403, False, "Your API key does not have permission"),
        (404, False, "model: fail-404"),
        (413, False, "Request exceeds the maximum allowed number of bytes."),
        (429, True, "Number of request tokens has exceeded your per-minute rate limit."),
        (500, True, "Internal server error"),
        (504, True, "Request timed out"),
        (529, True, "Overloaded"),
    ],
)
async def test_http_status_decides_whether_a_failure_is_retryable(
    provider: AnthropicProvider, status: int, retryable: bool, says: str
) -> None:
    error = await status_failure(provider, status, retryable=retryable)

    assert f"test/fail-{status}: HTTP {status}: {says}" in str(error)
    assert "(request-id req_" in str(error)


@pytest.mark.parametrize("status", [429, 529])
async def test_rate_limit_and_overload_carry_retry_after(
    provider: AnthropicProvider, status: int
) -> None:
    error = await failure_of(provider.stream(request(f"fail-{status}")))

    assert error.retryable
    assert error.retry_after == 2.0


async def test_unknown_model_is_rejected_with_the_servers_message(
    provider: AnthropicProvider,
) -> None:
    error = await failure_of(provider.stream(request("unknown")))

    assert error.status_code == 404
    assert not error.retryable
    assert "test/unknown: HTTP 404: model: unknown" in str(error)


@pytest.mark.parametrize("model", ["fail-401", "echo"])
async def test_rejected_credentials_never_appear_in_the_error(
    server: AnthropicServer, model: str
) -> None:
    # fail-401 quotes the presented key back; echo gets the 401 of a key the server does not know.
    wrong_key = "sk-ant-wrong-secret-9876543210"
    async with aclosing(adapter_for(server.base_url, api_key=wrong_key)) as adapter:
        error = await failure_of(adapter.stream(request(model)))

    assert error.status_code == 401
    assert not error.retryable
    assert "invalid x-api-key: [redacted]" in str(error)
    assert_kept_out(wrong_key, error)


@pytest.mark.parametrize(
    ("model", "error_type", "retryable"),
    [
        ("midstream-overloaded", "overloaded_error", True),
        ("midstream-api_error", "api_error", True),
        ("midstream-rate_limit_error", "rate_limit_error", True),
        ("midstream-timeout_error", "timeout_error", True),
        ("midstream-invalid", "invalid_request_error", False),
        ("midstream-billing_error", "billing_error", False),
    ],
)
async def test_an_error_event_inside_the_stream_is_classified_by_its_type(
    provider: AnthropicProvider, model: str, error_type: str, retryable: bool
) -> None:
    # The SDK raises these with the stream's own status, 200.
    seen, error = await collect_failure(provider.stream(request(model)))

    assert text_of(seen) == "this answer breaks "
    assert not any(isinstance(event, Finish | Usage) for event in seen)
    assert error.retryable is retryable
    assert error.status_code is None
    assert f"test/{model}: error in stream: {error_type}: " in str(error)
    assert "(request-id req_" in str(error)


@pytest.mark.parametrize("model", ["drop", "truncated"])
async def test_a_stream_cut_short_after_some_text_is_retryable(
    provider: AnthropicProvider, model: str
) -> None:
    seen, _ = await broken_off_failure(provider, model)

    assert len([event for event in seen if isinstance(event, TextDelta)]) == 3


@pytest.mark.parametrize("model", ["slow-5000", "stall-2000"])
async def test_a_stalled_stream_times_out_as_retryable(server: AnthropicServer, model: str) -> None:
    # slow-5000 stalls after its first text delta, stall-2000 before sending any headers.
    await timeout_failure(adapter_for(server.base_url, timeout_seconds=0.3), model)


async def test_connection_refused_is_retryable() -> None:
    error = await connection_refused_failure(adapter_for(closed_origin(), timeout_seconds=5))

    assert API_KEY not in str(error)


# --- closing --------------------------------------------------------------------------------------


async def test_closing_the_stream_midway_closes_the_http_connection(
    provider: AnthropicProvider, server: AnthropicServer
) -> None:
    await check_closing_midway_closes_the_connection(provider, server)


async def test_cancelling_the_consumer_closes_the_http_connection(
    provider: AnthropicProvider, server: AnthropicServer
) -> None:
    await check_cancelling_the_consumer_closes_the_connection(provider, server)


# --- configuration --------------------------------------------------------------------------------


async def test_nothing_reaches_the_request_from_anthropic_environment_variables(
    server: AnthropicServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The SDK reads each of these; the custom headers would go to whatever endpoint is configured,
    # and the server prefers x-api-key over the bearer token, so a leaked one fails the request.
    monkeypatch.setenv("ANTHROPIC_CUSTOM_HEADERS", "x-leaked: yes\nx-api-key: sk-ant-from-env")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-from-env")
    monkeypatch.setenv("ANTHROPIC_AUTH_TOKEN", "token-from-env")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("ANTHROPIC_PROFILE", "a-profile-that-does-not-exist")
    monkeypatch.setenv("ANTHROPIC_CONFIG_DIR", str(tmp_path))
    server.reset()
    async with aclosing(adapter_for(server.base_url)) as adapter:
        events = await collect(adapter.stream(request("echo")))

    assert text_of(events) == "Say something nice"
    sent = only_request(server)
    assert sent.headers["authorization"] == f"Bearer {API_KEY}"
    assert "x-api-key" not in sent.headers
    assert "x-leaked" not in sent.headers


async def test_no_trace_context_travels_to_the_provider(
    provider: AnthropicProvider, server: AnthropicServer
) -> None:
    # The SDK would send the caller's OpenTelemetry context (here a sampled span of the worker's)
    # as a traceparent header to a third party.
    caller = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    with trace.use_span(NonRecordingSpan(caller)):
        await collect(provider.stream(request("echo")))

    assert "traceparent" not in only_request(server).headers


async def test_a_keyless_provider_sends_a_placeholder_not_the_environments_key(
    server: AnthropicServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-from-env")
    server.reset()
    async with aclosing(adapter_for(server.base_url, api_key="")) as adapter:
        error = await failure_of(adapter.stream(request("echo")))

    assert error.status_code == 401
    assert only_request(server).headers["authorization"] == "Bearer no-key"


async def test_the_server_takes_the_key_as_x_api_key_and_requires_a_version(
    server: AnthropicServer,
) -> None:
    body = {
        "model": "reply-hi",
        "max_tokens": 5,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        answered = await client.post(
            "/v1/messages",
            json=body,
            headers={"x-api-key": API_KEY, "anthropic-version": API_VERSION},
        )
        unversioned = await client.post("/v1/messages", json=body, headers={"x-api-key": API_KEY})

    assert answered.status_code == 200
    assert answered.text.startswith("event: message_start\ndata: ")
    assert "event: ping\n" in answered.text
    assert answered.text.endswith('event: message_stop\ndata: {"type":"message_stop"}\n\n')
    assert unversioned.status_code == 400
    assert unversioned.json()["error"] == {
        "type": "invalid_request_error",
        "message": "anthropic-version: header is required",
    }
    assert unversioned.json()["request_id"] == unversioned.headers["request-id"]


def test_providers_entry_points_at_the_origin_with_the_key(server: AnthropicServer) -> None:
    assert server.providers_entry(["echo", "slow"]) == {
        "type": "anthropic",
        "base_url": f"http://127.0.0.1:{server.port}",
        "api_key": API_KEY,
        "models": ["echo", "slow"],
    }
