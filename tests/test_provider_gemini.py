"""The Gemini adapter, through the real google-genai SDK, against a server speaking Gemini's wire format."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

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
from providers.gemini import API_VERSION, DEFAULT_BASE_URL, GeminiProvider
from tests.support.gemini_server import GeminiServer, Script, camel_keys
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

API_KEY = "AIzaSy-test-0123456789abcdef"


def adapter(base_url: str, *, api_key: str = API_KEY, **overrides: Any) -> GeminiProvider:
    settings: dict[str, Any] = {"models": ["echo"], "timeout_seconds": 10, **overrides}
    return GeminiProvider("google", base_url=base_url, api_key=api_key, **settings)


@pytest.fixture(scope="module")
def server() -> Iterator[GeminiServer]:
    with GeminiServer(api_key=API_KEY) as running:
        yield running


@pytest.fixture
async def provider(server: GeminiServer) -> AsyncIterator[GeminiProvider]:
    server.reset()
    gemini = adapter(server.base_url)
    yield gemini
    await gemini.aclose()


# --- answers ------------------------------------------------------------------------------------


async def test_streams_text_usage_and_finish_reason(
    provider: GeminiProvider, server: GeminiServer
) -> None:
    await check_streams_text_then_usage_and_finish(provider, server)


async def test_sends_the_prompt_allowed_options_and_the_key_on_the_pinned_path(
    provider: GeminiProvider, server: GeminiServer
) -> None:
    options: dict[str, Any] = {
        "temperature": 0.2,
        "topP": 0.9,
        "topK": 40,
        "maxOutputTokens": 2,
        "stopSequences": ["END"],
        "candidateCount": 3,
        "responseMimeType": "application/json",
        "tools": [{"googleSearch": {}}],
    }
    events = await collect(provider.stream(request("reply-one-two-three", **options)))

    sent = only_request(server)
    assert sent.path == f"/{API_VERSION}/models/reply-one-two-three:streamGenerateContent"
    assert sent.query == {"alt": "sse"}
    assert sent.api_key == API_KEY
    # A deadline for the whole call would cut long answers at the adapter's silence timeout.
    assert "x-server-timeout" not in sent.headers
    assert sent.system_instruction == "You are terse."
    assert sent.contents == [{"role": "user", "parts": [{"text": "Say something nice"}]}]
    assert sent.generation_config == {
        "temperature": 0.2,
        "topP": 0.9,
        "topK": 40,
        "maxOutputTokens": 2,
        "stopSequences": ["END"],
    }
    assert set(sent.body) == {"contents", "systemInstruction", "generationConfig"}
    assert text_of(events) == "one two "
    assert events[-1] == Finish("length")


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"maxTokens": 5}, {"maxOutputTokens": 5}),
        (
            {"max_output_tokens": 5, "top_p": 0.5, "top_k": 3},
            {"maxOutputTokens": 5, "topP": 0.5, "topK": 3},
        ),
        ({"stop_sequences": [], "temperature": 1}, {"stopSequences": [], "temperature": 1}),
        ({"temperature": None, "maxTokens": None}, {}),
    ],
)
async def test_options_are_read_in_either_spelling(
    provider: GeminiProvider,
    server: GeminiServer,
    options: dict[str, Any],
    expected: dict[str, Any],
) -> None:
    await collect(provider.stream(request("echo", **options)))

    assert only_request(server).generation_config == expected


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"temperature": True}, "temperature must be a number"),
        ({"topP": float("nan")}, "topP must be a number"),
        ({"topK": 0}, "topK must be a positive integer"),
        ({"maxTokens": 1.5}, "maxTokens must be a positive integer"),
        ({"maxOutputTokens": -1}, "maxOutputTokens must be a positive integer"),
        ({"stopSequences": "END"}, "stopSequences must be a list of strings"),
        ({"thinkingConfig": "on"}, "thinkingConfig must be an object"),
        (
            {"thinkingConfig": {"includeThoughts": "yes"}},
            "thinkingConfig.includeThoughts must be true or false",
        ),
        (
            {"thinking_config": {"thinking_budget": -2}},
            "thinking_config.thinking_budget must be an integer of -1",
        ),
        (
            {"thinkingConfig": {"thinkingBudget": 1.5}},
            "thinkingConfig.thinkingBudget must be an integer of -1",
        ),
        (
            {"thinkingConfig": {"thinkingLevel": "extreme"}},
            "thinkingConfig.thinkingLevel must be one of minimal",
        ),
        (
            {"thinkingConfig": {"budgetTokens": 512}},
            "thinkingConfig has unknown fields: budgetTokens",
        ),
    ],
)
async def test_ill_typed_options_are_rejected_before_any_request(
    provider: GeminiProvider, server: GeminiServer, options: dict[str, Any], complaint: str
) -> None:
    error = await refused_before_sending(provider, server, request("echo", **options))

    assert f"providerOptions.google.{complaint}" in str(error)


async def test_thoughts_stream_as_reasoning_before_the_text_when_asked_for(
    provider: GeminiProvider, server: GeminiServer
) -> None:
    thinking = {"includeThoughts": True, "thinkingBudget": 512}
    events = await collect(provider.stream(request("thinking-forty-two", thinkingConfig=thinking)))

    assert reasoning_of(events) == "The user wants forty two. I will answer."
    assert text_of(events) == "forty two"
    kinds = [type(event) for event in events]
    assert kinds.index(TextDelta) > max(i for i, k in enumerate(kinds) if k is ReasoningDelta)
    # Gemini counts thoughts apart from the answer; both are output.
    assert events[-2:] == [
        Usage(input_tokens=PROMPT_WORDS, output_tokens=2 + 8, reasoning_tokens=8),
        Finish("stop"),
    ]
    assert only_request(server).generation_config == {"thinkingConfig": thinking}


async def test_thinking_is_billed_but_not_streamed_unless_asked_for(
    provider: GeminiProvider,
) -> None:
    events = await collect(provider.stream(request("thinking-forty-two")))

    assert not any(isinstance(event, ReasoningDelta) for event in events)
    assert text_of(events) == "forty two"
    assert events[-2] == Usage(input_tokens=PROMPT_WORDS, output_tokens=10, reasoning_tokens=8)


async def test_thought_parts_nobody_asked_for_stay_out_of_the_answer(
    provider: GeminiProvider, server: GeminiServer
) -> None:
    server.script(
        "chatty-thinker",
        Script(reply="the answer", thoughts="secret musing", thoughts_unasked=True),
    )
    events = await collect(provider.stream(request("chatty-thinker")))

    assert text_of(events) == "the answer"
    assert reasoning_of(events) == ""


async def test_thinking_level_and_budget_reach_the_server(
    provider: GeminiProvider, server: GeminiServer
) -> None:
    thinking = {"thinking_level": "low", "include_thoughts": False, "thinking_budget": -1}
    await collect(provider.stream(request("echo", thinking_config=thinking)))

    assert only_request(server).generation_config == {
        "thinkingConfig": {"thinkingLevel": "LOW", "includeThoughts": False, "thinkingBudget": -1}
    }


async def test_cached_prompt_tokens_are_reported_within_the_input(
    provider: GeminiProvider, server: GeminiServer
) -> None:
    server.script("cached", Script(reply="ok", cached_tokens=4))
    events = await collect(provider.stream(request("cached")))

    assert events[-2] == Usage(
        input_tokens=PROMPT_WORDS + 4, output_tokens=1, cached_input_tokens=4
    )


@pytest.mark.parametrize(
    ("gemini_reason", "finish"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content-filter"),
        ("RECITATION", "content-filter"),
        ("BLOCKLIST", "content-filter"),
        ("PROHIBITED_CONTENT", "content-filter"),
        ("SPII", "content-filter"),
        ("LANGUAGE", "other"),
        ("OTHER", "other"),
        ("MALFORMED_FUNCTION_CALL", "other"),
        ("FINISH_REASON_UNSPECIFIED", "other"),
    ],
)
async def test_finish_reasons_map_to_the_ai_sdk_vocabulary(
    provider: GeminiProvider, server: GeminiServer, gemini_reason: str, finish: FinishReason
) -> None:
    server.script(f"finish-{gemini_reason}", Script(reply="some text", finish_reason=gemini_reason))
    events = await collect(provider.stream(request(f"finish-{gemini_reason}")))

    assert text_of(events) == "some text"
    assert events[-1] == Finish(finish)


async def test_a_finish_reason_newer_than_the_sdk_is_other(
    provider: GeminiProvider, server: GeminiServer
) -> None:
    server.script("future", Script(reply="fine", finish_reason="SOMETHING_NEW"))
    with pytest.warns(UserWarning, match="SOMETHING_NEW"):  # the SDK's, for an unknown enum value
        events = await collect(provider.stream(request("future")))

    assert events[-1] == Finish("other")


@pytest.mark.parametrize(
    ("model", "text", "finish"),
    [
        ("max-tokens-cut-short", "cut short", "length"),
        ("safety-so-far-so", "so far so", "content-filter"),
    ],
)
async def test_an_answer_stopped_by_gemini_keeps_its_text(
    provider: GeminiProvider, model: str, text: str, finish: FinishReason
) -> None:
    events = await collect(provider.stream(request(model)))

    assert text_of(events) == text
    assert events[-1] == Finish(finish)


async def test_a_blocked_prompt_finishes_as_content_filter_with_its_usage(
    provider: GeminiProvider,
) -> None:
    events = await collect(provider.stream(request("blocked")))

    assert events == [Usage(input_tokens=PROMPT_WORDS, output_tokens=0), Finish("content-filter")]


async def test_the_conversation_keeps_its_turns_and_leaves_out_empty_messages(
    provider: GeminiProvider, server: GeminiServer
) -> None:
    messages = [
        PromptMessage("system", "You are terse."),
        PromptMessage("user", "first question"),
        PromptMessage("assistant", ""),  # a stopped turn that produced nothing
        PromptMessage("user", "second question"),
        PromptMessage("assistant", "an answer"),
        PromptMessage("system", "Answer in English."),
        PromptMessage("user", "third question"),
    ]
    events = await collect(provider.stream(request("echo", messages=messages)))

    sent = only_request(server)
    assert sent.roles() == ["user", "user", "model", "user"]
    assert [content["parts"] for content in sent.contents][2] == [{"text": "an answer"}]
    assert sent.system_instruction == "You are terse.\nAnswer in English."
    assert text_of(events) == "third question"


# --- failures -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "google_status", "retryable"),
    [
        (400, "INVALID_ARGUMENT", False),
        (401, "UNAUTHENTICATED", False),
        (403, "PERMISSION_DENIED", False),
        (404, "NOT_FOUND", False),
        (429, "RESOURCE_EXHAUSTED", True),
        (500, "INTERNAL", True),
        (503, "UNAVAILABLE", True),
        (504, "DEADLINE_EXCEEDED", True),
    ],
)
async def test_http_status_decides_whether_a_failure_is_retryable(
    provider: GeminiProvider,
    server: GeminiServer,
    status: int,
    google_status: str,
    retryable: bool,
) -> None:
    error = await status_failure(provider, status, retryable=retryable)

    assert f"google/fail-{status}: HTTP {status} {google_status}: " in str(error)
    assert error.__cause__ is None
    assert error.__suppress_context__
    # Temporal owns retries: the SDK made exactly one attempt.
    assert len(server.requests) == 1


async def test_an_unknown_model_is_rejected_with_googles_message(
    provider: GeminiProvider,
) -> None:
    error = await failure_of(provider.stream(request("gemini-9-ultra")))

    assert error.status_code == 404
    assert not error.retryable
    assert "models/gemini-9-ultra is not found for API version v1beta" in str(error)


async def test_a_rate_limit_waits_as_long_as_googles_retry_info_asks(
    provider: GeminiProvider,
) -> None:
    error = await failure_of(provider.stream(request("fail-429")))

    # RetryInfo says 30s, the retry-after header 2: the longer wins.
    assert error.retry_after == 30.0
    assert error.retryable


@pytest.mark.parametrize(
    ("retry_after", "retry_delay", "expected"),
    [
        ("7", None, 7.0),
        (None, "1.500s", 1.5),
        ("3", "0.5s", 3.0),
        (None, "soon", None),
        (None, None, None),
    ],
)
async def test_retry_delay_comes_from_retry_info_or_the_header(
    provider: GeminiProvider,
    server: GeminiServer,
    retry_after: str | None,
    retry_delay: str | None,
    expected: float | None,
) -> None:
    server.script("busy", Script(fail_status=503, retry_after=retry_after, retry_delay=retry_delay))
    error = await failure_of(provider.stream(request("busy")))

    assert error.retryable
    assert error.retry_after == expected


async def test_a_wrong_key_is_rejected_without_appearing_anywhere(server: GeminiServer) -> None:
    server.reset()
    wrong_key = "AIzaSy-wrong-secret-9876543210"
    async with aclosing(adapter(server.base_url, api_key=wrong_key)) as gemini:
        error = await failure_of(gemini.stream(request("echo")))

    # Gemini answers a bad key with 400 API_KEY_INVALID, not 401.
    assert error.status_code == 400
    assert not error.retryable
    assert "API key not valid. Please pass a valid API key." in str(error)
    assert_kept_out(wrong_key, error)
    assert only_request(server).api_key == wrong_key


@pytest.mark.parametrize("status", [401, 403])
async def test_a_key_quoted_back_by_the_server_is_redacted(
    provider: GeminiProvider, status: int
) -> None:
    error = await failure_of(provider.stream(request(f"fail-{status}")))

    assert "api_key:[redacted]" in str(error)
    assert_kept_out(API_KEY, error)


async def test_an_error_inside_the_stream_after_some_text_is_retryable(
    provider: GeminiProvider,
) -> None:
    seen, error = await collect_failure(provider.stream(request("midstream-error")))

    assert text_of(seen) == "this answer breaks "
    assert not any(isinstance(event, Finish) for event in seen)
    assert error.retryable
    assert error.status_code == 503
    assert "google/midstream-error: error in stream: 503 UNAVAILABLE: The model is overloaded" in (
        str(error)
    )


async def test_an_error_inside_the_stream_with_a_client_code_is_not_retried(
    provider: GeminiProvider, server: GeminiServer
) -> None:
    server.script("refused-late", Script(reply="a b c", error_after_chunks=1, error_status=400))
    seen, error = await collect_failure(provider.stream(request("refused-late")))

    assert text_of(seen) == "a "
    assert not error.retryable
    assert error.status_code == 400
    assert "error in stream: 400 INVALID_ARGUMENT" in str(error)


@pytest.mark.parametrize(
    ("model", "complaint"),
    [
        ("drop", "connection failed: RemoteProtocolError"),
        ("truncated", "the stream ended before a finishReason"),
        ("garbage", "malformed chunk in the stream"),
    ],
)
async def test_a_stream_that_breaks_off_is_retryable(
    provider: GeminiProvider, model: str, complaint: str
) -> None:
    seen, error = await broken_off_failure(provider, model)

    assert len([event for event in seen if isinstance(event, TextDelta)]) >= 3
    assert f"google/{model}: {complaint}" in str(error)


async def test_a_stalled_stream_times_out_as_retryable(server: GeminiServer) -> None:
    started = time.monotonic()
    seen, _ = await timeout_failure(adapter(server.base_url, timeout_seconds=0.3), "slow-5000")

    assert text_of(seen) == "w0 "
    assert time.monotonic() - started < 3


async def test_the_timeout_bounds_silence_not_the_whole_answer(server: GeminiServer) -> None:
    # The SDK's default transport (aiohttp) would cut this answer off at 0.5 s.
    words = " ".join(f"w{index}" for index in range(12))
    server.script("steady", Script(reply=words, chunk_delay=0.1))
    async with aclosing(adapter(server.base_url, timeout_seconds=0.5)) as gemini:
        events = await collect(gemini.stream(request("steady")))

    assert text_of(events) == words
    assert events[-1] == Finish("stop")


async def test_connection_refused_fails_fast_and_is_retryable() -> None:
    gemini = adapter(closed_origin(), timeout_seconds=5)
    started = time.monotonic()
    error = await connection_refused_failure(gemini)

    # The SDK's hidden retry would first sleep 1 to 10 s.
    assert time.monotonic() - started < 1
    assert "google/echo: connection failed: ConnectError" in str(error)


# --- closing ------------------------------------------------------------------------------------


async def test_closing_the_stream_closes_the_http_connection_before_it_returns(
    provider: GeminiProvider, server: GeminiServer
) -> None:
    # The SDK's own generators would close the response only when garbage collected.
    await check_closing_midway_closes_the_connection(provider, server, before_returning=True)


async def test_cancelling_the_consumer_closes_the_http_connection(
    provider: GeminiProvider, server: GeminiServer
) -> None:
    await check_cancelling_the_consumer_closes_the_connection(provider, server)


# --- configuration ------------------------------------------------------------------------------


async def test_environment_variables_do_not_change_where_requests_go(
    server: GeminiServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    elsewhere = closed_origin()
    for name, value in {
        "GOOGLE_API_KEY": "AIza-from-the-environment",
        "GEMINI_API_KEY": "AIza-gemini-from-the-environment",
        "GOOGLE_GEMINI_BASE_URL": elsewhere,
        "GOOGLE_VERTEX_BASE_URL": elsewhere,
        "GOOGLE_GENAI_USE_VERTEXAI": "true",
        "GOOGLE_GENAI_USE_ENTERPRISE": "true",
        "GOOGLE_CLOUD_PROJECT": "someone-elses-project",
        "GOOGLE_CLOUD_LOCATION": "us-central1",
        "GOOGLE_GENAI_API_VERSION": "v1alpha",
        "GOOGLE_GENAI_CLIENT_MODE": "replay",
        "GOOGLE_GENAI_REPLAYS_DIRECTORY": str(tmp_path),
        "GOOGLE_GENAI_REPLAY_ID": "recorded",
        "GOOGLE_GENAI_HTTP_CLIENT": "httpx2",
    }.items():
        monkeypatch.setenv(name, value)
    server.reset()
    async with aclosing(adapter(server.base_url)) as gemini:
        events = await collect(gemini.stream(request("echo")))

    sent = only_request(server)
    assert text_of(events) == "Say something nice"
    assert sent.path == "/v1beta/models/echo:streamGenerateContent"
    assert sent.api_key == API_KEY
    assert "authorization" not in sent.headers


async def test_a_keyless_provider_never_sends_a_key_from_the_environment(
    server: GeminiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOOGLE_API_KEY", "AIza-from-the-environment")
    monkeypatch.setenv("GEMINI_API_KEY", "AIza-gemini-from-the-environment")
    server.reset()
    async with aclosing(adapter(server.base_url, api_key="")) as gemini:
        await failure_of(gemini.stream(request("echo")))  # this server wants a key

    assert only_request(server).api_key == "no-key"


def test_input_kinds_follow_the_constructor() -> None:
    every = GeminiProvider(
        "google", base_url=DEFAULT_BASE_URL, api_key=API_KEY, models=["a", "b"], timeout_seconds=5
    )
    some = GeminiProvider(
        "google",
        base_url=DEFAULT_BASE_URL,
        api_key=API_KEY,
        models=["a", "b", "c"],
        timeout_seconds=5,
        image_models=["a", "b"],
        document_models=["b"],
    )

    assert every.models() == ["a", "b"]
    assert every.input_kinds("a") == {InputKind.IMAGE}
    assert some.input_kinds("a") == {InputKind.IMAGE}
    assert some.input_kinds("b") == {InputKind.IMAGE, InputKind.DOCUMENT}
    assert some.input_kinds("c") == frozenset()
    assert some.input_kinds("unknown") == frozenset()


# --- image and document inputs ------------------------------------------------------------------


async def test_an_image_and_a_pdf_reach_the_server_as_inline_data_after_the_text(
    server: GeminiServer,
) -> None:
    server.reset()
    async with aclosing(adapter(server.base_url, document_models=["echo"])) as gemini:
        events = await collect(gemini.stream(request("echo", messages=with_inputs("Look"))))

    sent = only_request(server)
    parts = sent.user_parts()
    assert [next(iter(part)) for part in parts] == ["text", "inlineData", "inlineData"]
    assert parts[0] == {"text": "Look"}
    assert sent.inline_data() == [("image/png", PNG), ("application/pdf", PDF)]
    assert sent.system_instruction == "You are terse."
    assert text_of(events) == "Look"


async def test_inputs_without_text_send_no_text_part(server: GeminiServer) -> None:
    server.reset()
    async with aclosing(adapter(server.base_url, document_models=["echo"])) as gemini:
        await collect(gemini.stream(request("echo", messages=with_inputs(""))))

    assert [next(iter(part)) for part in only_request(server).user_parts()] == [
        "inlineData",
        "inlineData",
    ]


async def test_inputs_a_model_does_not_take_are_rejected_before_any_request(
    server: GeminiServer,
) -> None:
    server.reset()
    async with aclosing(adapter(server.base_url)) as gemini:  # images yes, documents no
        error = await refused_before_sending(
            gemini, server, request("echo", messages=with_inputs("Look"))
        )

    assert "google/echo does not take document inputs" in str(error)


async def test_a_gif_which_gemini_refuses_is_sent_as_its_first_frame(
    provider: GeminiProvider, server: GeminiServer
) -> None:
    frames = [Image.new("RGB", (32, 24), color) for color in ("red", "blue")]
    animated = io.BytesIO()
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:])
    gif = ImageInput("image/gif", animated.getvalue(), filename="a.gif")

    events = await collect(provider.stream(request("echo", messages=with_inputs("Look", gif))))

    [(media_type, data)] = only_request(server).inline_data()
    assert media_type in ("image/png", "image/jpeg")
    with Image.open(io.BytesIO(data)) as still:
        assert still.size == (32, 24)
        pixel = still.convert("RGB").getpixel((16, 12))
        assert isinstance(pixel, tuple)
        red, green, blue = pixel
        assert red > 200
        assert max(green, blue) < 60
    assert events[-1] == Finish("stop")


async def test_an_undecodable_gif_is_rejected_before_any_request(
    provider: GeminiProvider, server: GeminiServer
) -> None:
    broken = ImageInput("image/gif", b"GIF89a" + b"\x00" * 20)
    error = await refused_before_sending(
        provider, server, request("echo", messages=with_inputs("Look", broken))
    )

    assert "a GIF image cannot be sent" in str(error)


# --- the test server itself ---------------------------------------------------------------------


def test_the_server_reads_both_key_spellings_as_google_does() -> None:
    snake = {
        "inline_data": {"mime_type": "image/png"},
        "@type": "x",
        "thinking_config": [{"include_thoughts": True}],
    }
    assert camel_keys(snake) == {
        "inlineData": {"mimeType": "image/png"},
        "@type": "x",
        "thinkingConfig": [{"includeThoughts": True}],
    }


async def test_the_server_answers_v1_and_refuses_what_gemini_refuses(server: GeminiServer) -> None:
    server.reset()
    url = f"{server.base_url}/v1/models/echo:streamGenerateContent"
    body = {
        "contents": [
            {
                "role": "user",
                "parts": [
                    {"text": "hi there"},
                    {
                        "inline_data": {
                            "mime_type": "image/png",
                            "data": base64.b64encode(PNG).decode(),
                        }
                    },
                ],
            }
        ]
    }
    headers = {"x-goog-api-key": API_KEY}
    async with httpx.AsyncClient() as client:
        streamed = await client.post(url, params={"alt": "sse"}, json=body, headers=headers)
        without_sse = await client.post(url, json=body, headers=headers)
        without_key = await client.post(url, params={"alt": "sse"}, json=body)
        gif = {"contents": [{"parts": [{"inlineData": {"mimeType": "image/gif", "data": ""}}]}]}
        refused_gif = await client.post(url, params={"alt": "sse"}, json=gif, headers=headers)
        bad_role = {"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}
        refused_role = await client.post(url, params={"alt": "sse"}, json=bad_role, headers=headers)

    assert streamed.status_code == 200
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.text.startswith('data: {"candidates":')
    assert streamed.text.endswith("}\n\n")
    assert server.requests[0].inline_data() == [("image/png", PNG)]
    assert without_sse.status_code == 400
    assert without_key.json()["error"]["status"] == "PERMISSION_DENIED"
    assert refused_gif.json()["error"]["message"] == "Unsupported MIME type: image/gif"
    assert refused_role.json()["error"]["message"] == "Please use a valid role: user, model."


def test_the_server_gives_a_providers_entry(server: GeminiServer) -> None:
    assert server.providers_entry(["echo", "slow"]) == {
        "type": "google",
        "base_url": server.base_url,
        "api_key": API_KEY,
        "models": ["echo", "slow"],
    }
