"""Model adapters: the local provider, the OpenAI adapter on the real wire format, the registry."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Any

import openai
import pytest
from pydantic import SecretStr

from core.settings import ProviderEntry, Settings
from providers.base import (
    Finish,
    ImageInput,
    InputKind,
    PromptMessage,
    ProviderError,
    ReasoningDelta,
    TextDelta,
    UnknownModelError,
    Usage,
)
from providers.failures import parse_retry_after
from providers.local import LocalOptions, LocalProvider
from providers.openai_compatible import OpenAICompatibleProvider
from providers.registry import ProviderRegistry
from tests.support.openai_server import OpenAICompatibleServer, Script
from tests.support.provider_contract import (
    PDF,
    PNG,
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

API_KEY = "sk-test-0123456789abcdef"


def adapter_for(
    base_url: str, *, api_key: str = API_KEY, **overrides: Any
) -> OpenAICompatibleProvider:
    settings: dict[str, Any] = {"models": ["echo"], "timeout_seconds": 10, **overrides}
    return OpenAICompatibleProvider("test", base_url=base_url, api_key=api_key, **settings)


@pytest.fixture(scope="module")
def server() -> Iterator[OpenAICompatibleServer]:
    with OpenAICompatibleServer(api_key=API_KEY) as running:
        yield running


@pytest.fixture
async def provider(server: OpenAICompatibleServer) -> AsyncIterator[OpenAICompatibleProvider]:
    server.reset()
    adapter = adapter_for(server.base_url)
    yield adapter
    await adapter.aclose()


# --- local provider ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        "hello world",
        "  leading and   inner\tspaces, trailing newline\n",
        "one",
        "   ",
        "multi\n\nline\r\nmessage with émojis 🎉",
    ],
)
async def test_echo_streams_the_last_user_message_back_exactly(message: str) -> None:
    messages = [
        PromptMessage("user", "an earlier question"),
        PromptMessage("assistant", "an earlier answer"),
        PromptMessage("user", message),
    ]
    events = await collect(LocalProvider().stream(request("echo", messages=messages, delayMs=0)))

    deltas = [event for event in events if isinstance(event, TextDelta)]
    assert "".join(delta.text for delta in deltas) == message
    assert len(deltas) == max(1, len(message.split()))
    assert events[-2:] == [
        Usage(input_tokens=6 + len(message.split()), output_tokens=len(message.split())),
        Finish("stop"),
    ]


async def test_echo_words_caps_the_reply_and_finishes_with_length() -> None:
    messages = [PromptMessage("user", "one two three four five")]
    events = await collect(
        LocalProvider().stream(request("echo", messages=messages, words=2, delayMs=0))
    )

    assert text_of(events) == "one two "
    assert events[-2:] == [Usage(input_tokens=5, output_tokens=2), Finish("length")]


async def test_lorem_streams_the_requested_number_of_words() -> None:
    events = await collect(LocalProvider().stream(request("lorem", words=123, delayMs=0)))

    text = text_of(events)
    assert len(text.split()) == 123
    assert text.startswith("Lorem ipsum dolor")
    assert events[-2:] == [Usage(input_tokens=6, output_tokens=123), Finish("stop")]


def test_local_options_parse_pacing_and_failure_injection() -> None:
    assert LocalOptions.parse({}) == LocalOptions(delay_ms=20)
    assert LocalOptions.parse({"delayMs": 0, "words": 5}) == LocalOptions(words=5, delay_ms=0)
    assert LocalOptions.parse({"delayMs": 2.5}).delay_ms == 2.5
    injected = LocalOptions.parse({"failAfterWords": 3, "failTimes": 2, "failRetryable": False})
    assert injected == LocalOptions(
        fail_after_words=3, fail_times=2, fail_retryable=False, delay_ms=20
    )
    assert [injected.fails_on(attempt) for attempt in (1, 2, 3)] == [True, True, False]
    assert LocalOptions.parse({"failTimes": 1}).fail_after_words == 0
    assert not LocalOptions.parse({"unknownOption": "ignored"}).fails_on(1)


@pytest.mark.parametrize(
    "options",
    [
        {"words": -1},
        {"words": "3"},
        {"words": True},
        {"words": 1_000_000},
        {"delayMs": "fast"},
        {"delayMs": -5},
        {"delayMs": float("nan")},
        {"failAfterWords": 1.5},
        {"failTimes": "twice"},
        {"failRetryable": "yes"},
    ],
)
async def test_bad_local_options_are_rejected_without_retry(options: dict[str, Any]) -> None:
    with pytest.raises(ProviderError) as caught:
        await collect(LocalProvider().stream(request("echo", **options)))

    assert caught.value.error_type == ProviderError.PROVIDER_REJECTED
    assert not caught.value.retryable
    assert "providerOptions.local." in str(caught.value)


async def test_injected_failure_fails_only_the_first_attempts_after_some_words() -> None:
    local = LocalProvider()
    options: dict[str, Any] = {"delayMs": 0, "failAfterWords": 2, "failTimes": 2}
    messages = [PromptMessage("user", "alpha beta gamma delta")]

    for attempt in (1, 2):
        seen, error = await collect_failure(
            local.stream(request("echo", messages=messages, attempt=attempt, **options))
        )
        assert text_of(seen) == "alpha beta "
        assert error.retryable
        assert error.error_type == ProviderError.PROVIDER_UNAVAILABLE
        assert f"attempt {attempt}" in str(error)

    events = await collect(local.stream(request("echo", messages=messages, attempt=3, **options)))
    assert text_of(events) == "alpha beta gamma delta"
    assert events[-1] == Finish("stop")


async def test_injected_failure_can_be_non_retryable_and_fail_every_attempt() -> None:
    options: dict[str, Any] = {"delayMs": 0, "failAfterWords": 0, "failRetryable": False}
    for attempt in (1, 5):
        with pytest.raises(ProviderError) as caught:
            await collect(LocalProvider().stream(request("lorem", attempt=attempt, **options)))
        assert not caught.value.retryable


async def test_local_rejects_a_model_it_does_not_have() -> None:
    with pytest.raises(ProviderError) as caught:
        await collect(LocalProvider().stream(request("gpt-4")))
    assert not caught.value.retryable


# --- OpenAI-compatible adapter ------------------------------------------------------------------


async def test_streams_text_usage_and_finish_reason(
    provider: OpenAICompatibleProvider, server: OpenAICompatibleServer
) -> None:
    await check_streams_text_then_usage_and_finish(provider, server)


async def test_sends_messages_allowed_options_and_the_api_key(
    provider: OpenAICompatibleProvider, server: OpenAICompatibleServer
) -> None:
    options: dict[str, Any] = {
        "temperature": 0.2,
        "topP": 0.9,
        "maxTokens": 2,
        "seed": 7,
        "n": 3,
        "stream": False,
    }
    events = await collect(provider.stream(request("reply-one-two-three", **options)))

    sent = only_request(server)
    assert sent.path == "/v1/chat/completions"
    assert sent.authorization == f"Bearer {API_KEY}"
    assert sent.messages == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say something nice"},
    ]
    body = {key: sent.body[key] for key in sent.body if key not in ("messages", "model")}
    assert body == {
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.2,
        "top_p": 0.9,
        "max_tokens": 2,
        "seed": 7,
    }
    assert text_of(events) == "one two "
    assert events[-1] == Finish("length")


async def test_ill_typed_options_are_rejected_before_any_request(
    provider: OpenAICompatibleProvider, server: OpenAICompatibleServer
) -> None:
    error = await refused_before_sending(provider, server, request("echo", temperature="hot"))

    assert "providerOptions.test.temperature" in str(error)


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
async def test_reasoning_streams_before_text_from_either_field_name(
    provider: OpenAICompatibleProvider, server: OpenAICompatibleServer, field: Any
) -> None:
    server.script(
        f"thinker-{field}",
        Script(reply="forty two", reasoning="Let me think it over.", reasoning_field=field),
    )
    events = await collect(provider.stream(request(f"thinker-{field}")))

    assert reasoning_of(events) == "Let me think it over."
    assert text_of(events) == "forty two"
    kinds = [type(event) for event in events]
    assert kinds.index(TextDelta) > max(i for i, k in enumerate(kinds) if k is ReasoningDelta)
    # The server reports the reasoning words in completion_tokens_details.reasoning_tokens.
    assert events[-2:] == [
        Usage(input_tokens=6, output_tokens=7, reasoning_tokens=5),
        Finish("stop"),
    ]


async def test_reasoning_model_named_by_convention(provider: OpenAICompatibleProvider) -> None:
    events = await collect(provider.stream(request("reasoning-a-haiku")))

    assert reasoning_of(events) == "The user wants a haiku. I will answer."
    assert text_of(events) == "a haiku"


@pytest.mark.parametrize(
    ("status", "retryable"),
    [
        (400, False),
        (403, False),
        (404, False),
        (422, False),
        (408, True),
        (500, True),
        (502, True),
        (503, True),
    ],
)
async def test_http_status_decides_whether_a_failure_is_retryable(
    provider: OpenAICompatibleProvider, status: int, retryable: bool
) -> None:
    await status_failure(provider, status, retryable=retryable)


async def test_unknown_model_is_rejected_with_the_servers_message(
    provider: OpenAICompatibleProvider,
) -> None:
    with pytest.raises(ProviderError) as caught:
        await collect(provider.stream(request("unknown")))

    assert caught.value.status_code == 404
    assert not caught.value.retryable
    assert "The model `unknown` does not exist." in str(caught.value)


async def test_rejected_credentials_never_appear_in_the_error(
    server: OpenAICompatibleServer,
) -> None:
    wrong_key = "sk-wrong-secret-9876543210"
    async with aclosing(adapter_for(server.base_url, api_key=wrong_key)) as adapter:
        error = await failure_of(adapter.stream(request("echo")))

    assert error.status_code == 401
    assert not error.retryable
    assert "Incorrect API key provided: [redacted]." in str(error)
    assert_kept_out(wrong_key, error)


async def test_rate_limit_is_retryable_and_carries_retry_after(
    provider: OpenAICompatibleProvider,
) -> None:
    with pytest.raises(ProviderError) as caught:
        await collect(provider.stream(request("fail-429")))

    assert caught.value.status_code == 429
    assert caught.value.retryable
    assert caught.value.retry_after == 2.0


async def test_retry_after_ms_takes_precedence_over_retry_after(
    provider: OpenAICompatibleProvider, server: OpenAICompatibleServer
) -> None:
    server.script("busy", Script(fail_status=503, retry_after="30", retry_after_ms="1500"))
    with pytest.raises(ProviderError) as caught:
        await collect(provider.stream(request("busy")))

    assert caught.value.retryable
    assert caught.value.retry_after == 1.5


def test_retry_after_accepts_seconds_http_dates_and_ignores_garbage() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after({"retry-after": "7"}, now=now) == 7.0
    assert parse_retry_after({"retry-after": "0.25"}, now=now) == 0.25
    assert parse_retry_after({"retry-after": "Thu, 01 Jan 2026 12:00:30 GMT"}, now=now) == 30.0
    assert parse_retry_after({"retry-after": "Thu, 01 Jan 2026 11:00:00 GMT"}, now=now) == 0.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}, now=now) == 0.25
    assert parse_retry_after({"retry-after": "soon"}, now=now) is None
    assert parse_retry_after({"retry-after": "-3"}, now=now) is None
    assert parse_retry_after({"retry-after-ms": "nan"}, now=now) is None
    assert parse_retry_after({}, now=now) is None


async def test_flaky_model_fails_its_first_requests_then_succeeds(
    provider: OpenAICompatibleProvider, server: OpenAICompatibleServer
) -> None:
    messages = [PromptMessage("user", "still there?")]
    for _ in range(2):
        with pytest.raises(ProviderError) as caught:
            await collect(provider.stream(request("flaky-2-adapter-test", messages=messages)))
        assert caught.value.retryable

    events = await collect(provider.stream(request("flaky-2-adapter-test", messages=messages)))
    assert text_of(events) == "still there?"
    assert len(server.requests_for("flaky-2-adapter-test")) == 3


async def test_connection_refused_is_retryable() -> None:
    await connection_refused_failure(adapter_for(f"{closed_origin()}/v1", timeout_seconds=5))


async def test_a_stalled_stream_times_out_as_retryable(server: OpenAICompatibleServer) -> None:
    await timeout_failure(adapter_for(server.base_url, timeout_seconds=0.3), "slow-5000")


@pytest.mark.parametrize("model", ["midstream-error", "drop"])
async def test_a_stream_that_breaks_after_some_text_is_retryable(
    provider: OpenAICompatibleProvider, model: str
) -> None:
    seen, _ = await broken_off_failure(provider, model)

    assert len([event for event in seen if isinstance(event, TextDelta)]) == 3


async def test_closing_the_stream_midway_closes_the_http_connection(
    provider: OpenAICompatibleProvider, server: OpenAICompatibleServer
) -> None:
    await check_closing_midway_closes_the_connection(provider, server)


async def test_cancelling_the_consumer_closes_the_http_connection(
    provider: OpenAICompatibleProvider, server: OpenAICompatibleServer
) -> None:
    await check_cancelling_the_consumer_closes_the_connection(provider, server)


async def test_a_keyless_provider_streams_without_openai_environment_leaking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The SDK would read these and send them as headers to whatever endpoint is configured.
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment")
    monkeypatch.setenv("OPENAI_ORG_ID", "org-from-the-environment")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-from-the-environment")
    with OpenAICompatibleServer() as keyless:
        async with aclosing(adapter_for(keyless.base_url, api_key="")) as adapter:
            events = await collect(adapter.stream(request("echo")))
        sent = only_request(keyless)

    assert text_of(events) == "Say something nice"
    assert sent.authorization == "Bearer no-key"
    assert "openai-organization" not in sent.headers
    assert "openai-project" not in sent.headers


# --- registry -----------------------------------------------------------------------------------


def settings_with(server: OpenAICompatibleServer) -> Settings:
    entry = ProviderEntry(base_url=server.base_url, api_key=API_KEY, models=["echo", "org/model"])
    return Settings(providers={"test": entry})


async def test_registry_resolves_local_and_configured_models(
    server: OpenAICompatibleServer,
) -> None:
    registry = ProviderRegistry.from_settings(settings_with(server))
    try:
        assert registry.available_models() == [
            "local/echo",
            "local/lorem",
            "test/echo",
            "test/org/model",
        ]
        local, model = registry.resolve("local/lorem")
        assert (local.name, model) == ("local", "lorem")
        nested, model = registry.resolve("test/org/model")
        assert (nested.name, model) == ("test", "org/model")

        remote, model = registry.resolve("test/echo")
        events = await collect(remote.stream(request(model)))
        assert text_of(events) == "Say something nice"
    finally:
        await registry.aclose()


@pytest.mark.parametrize(
    ("model_ref", "expected"),
    [
        ("echo", "must look like 'provider/model'"),
        ("/echo", "must look like 'provider/model'"),
        ("local/", "must look like 'provider/model'"),
        ("openai/gpt-4o", "unknown provider 'openai'; configured providers: local, test"),
        ("local/gpt-4o", "provider 'local' has no model 'gpt-4o'; its models: echo, lorem"),
        ("test/org", "provider 'test' has no model 'org'; its models: echo, org/model"),
    ],
)
async def test_registry_rejects_unknown_models_without_leaking_configuration(
    server: OpenAICompatibleServer, model_ref: str, expected: str
) -> None:
    registry = ProviderRegistry.from_settings(settings_with(server))
    try:
        with pytest.raises(UnknownModelError) as caught:
            registry.resolve(model_ref)
    finally:
        await registry.aclose()

    assert expected in str(caught.value)
    assert caught.value.model_ref == model_ref
    assert API_KEY not in str(caught.value)
    assert server.base_url not in str(caught.value)


def test_registry_refuses_a_configured_provider_named_local() -> None:
    entry = ProviderEntry(base_url="http://127.0.0.1:1/v1", models=["echo"])
    with pytest.raises(ValueError, match="reserved"):
        ProviderRegistry.from_settings(Settings(providers={"local": entry}))


@pytest.mark.parametrize("name", ["anthropic", "google", "openai", "groq", "openrouter"])
async def test_a_known_provider_needs_only_a_key(name: str) -> None:
    registry = ProviderRegistry.from_settings(
        Settings(providers={name: ProviderEntry(api_key=SecretStr("a-key-0123456789"))})
    )
    try:
        cards = [card for card in registry.catalog.cards if card.provider == name]
        assert cards, f"{name} has curated models"
        assert all(card.priced and card.context_window > 0 for card in cards)
        assert registry.card(f"{name}/{cards[0].model}") == cards[0]
    finally:
        await registry.aclose()


@pytest.mark.parametrize(
    ("name", "entry", "says"),
    [
        ("ollama", {}, "needs `models`"),
        ("work-vllm", {"models": ["m"]}, "needs `base_url`"),
        ("work-vllm", {"base_url": "http://127.0.0.1:1/v1"}, "needs `models`"),
        ("anthropic", {"type": "google"}, "anthropic adapter"),
    ],
)
def test_provider_entries_that_cannot_work_are_refused_at_startup(
    name: str, entry: dict[str, Any], says: str
) -> None:
    with pytest.raises(ValueError, match=says):
        ProviderRegistry.from_settings(
            Settings(providers={name: ProviderEntry.model_validate(entry)})
        )


# --- image and document inputs -----------------------------------------------------------------


async def test_an_image_and_a_pdf_reach_the_server_as_content_parts(
    server: OpenAICompatibleServer,
) -> None:
    server.reset()
    async with aclosing(adapter_for(server.base_url, document_models=["echo"])) as adapter:
        events = await collect(adapter.stream(request("echo", messages=with_inputs("Look"))))

    sent = only_request(server)
    parts = sent.user_content_parts()
    assert [part["type"] for part in parts] == ["text", "image_url", "file"]
    assert parts[0] == {"type": "text", "text": "Look"}
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert parts[2]["file"]["file_data"].startswith("data:application/pdf;base64,")
    assert sent.images() == [("image/png", PNG)]
    assert sent.documents() == [("r.pdf", "application/pdf", PDF)]
    assert sent.messages[0] == {"role": "system", "content": "You are terse."}
    assert text_of(events) == "Look"


async def test_inputs_without_text_send_no_text_part(server: OpenAICompatibleServer) -> None:
    server.reset()
    async with aclosing(adapter_for(server.base_url, document_models=["echo"])) as adapter:
        await collect(adapter.stream(request("echo", messages=with_inputs(""))))

    assert [part["type"] for part in only_request(server).user_content_parts()] == [
        "image_url",
        "file",
    ]


async def test_inputs_a_model_does_not_take_are_rejected_before_any_request(
    server: OpenAICompatibleServer,
) -> None:
    server.reset()
    async with aclosing(adapter_for(server.base_url)) as adapter:  # images yes, documents no
        error = await refused_before_sending(
            adapter, server, request("echo", messages=with_inputs("Look"))
        )

    assert "test/echo does not take document inputs" in str(error)


def test_input_kinds_follow_the_provider_entry(server: OpenAICompatibleServer) -> None:
    entry = ProviderEntry(
        base_url=server.base_url,
        models=["a", "b", "c"],
        image_models=["a", "b"],
        document_models=["b"],
    )
    registry = ProviderRegistry.from_settings(
        Settings(providers={"p": entry, "q": ProviderEntry(base_url=server.base_url, models=["x"])})
    )
    assert registry.input_kinds("p/a") == {InputKind.IMAGE}
    assert registry.input_kinds("p/b") == {InputKind.IMAGE, InputKind.DOCUMENT}
    assert registry.input_kinds("p/c") == frozenset()
    assert registry.input_kinds("q/x") == {InputKind.IMAGE}
    assert registry.input_kinds("local/lorem") == frozenset()
    assert registry.models_accepting(InputKind.IMAGE) == ["local/echo", "p/a", "p/b", "q/x"]
    assert registry.models_accepting(InputKind.DOCUMENT) == ["local/echo", "p/b"]
    with pytest.raises(UnknownModelError):
        registry.input_kinds("p/zzz")


def test_input_model_lists_must_name_configured_models() -> None:
    with pytest.raises(ValueError, match="image_models"):
        ProviderEntry(base_url="http://127.0.0.1:1/v1", models=["a"], image_models=["b"])
    with pytest.raises(ValueError, match="document_models"):
        ProviderEntry(base_url="http://127.0.0.1:1/v1", models=["a"], document_models=["b"])


async def test_local_echo_reports_each_input_after_the_text() -> None:
    events = await collect(
        LocalProvider().stream(request("echo", messages=with_inputs("Look"), delayMs=0))
    )

    assert text_of(events) == (
        f"Look\n[image: image/png, {len(PNG)} bytes]"
        f"\n[document: r.pdf, application/pdf, {len(PDF)} bytes]"
    )


async def test_local_lorem_takes_no_inputs() -> None:
    with pytest.raises(ProviderError) as caught:
        await collect(LocalProvider().stream(request("lorem", messages=with_inputs("x"))))
    assert not caught.value.retryable


async def test_the_test_server_refuses_an_image_url_that_is_not_a_url(
    server: OpenAICompatibleServer, provider: OpenAICompatibleProvider
) -> None:
    client = provider._client
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(
            model="echo",
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}],
                }
            ],
        )


async def test_a_large_image_is_encoded_off_the_loop_and_arrives_intact(
    server: OpenAICompatibleServer,
) -> None:
    server.reset()
    large = PNG * 300  # about 3 MB, past the inline threshold
    messages = [PromptMessage("user", "big", inputs=(ImageInput("image/png", large),))]
    async with aclosing(adapter_for(server.base_url)) as adapter:
        await collect(adapter.stream(request("echo", messages=messages)))

    assert only_request(server).images() == [("image/png", large)]
