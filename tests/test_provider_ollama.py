"""The native Ollama adapter against a fake Ollama server, through the real `ollama` SDK."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest

from providers.base import (
    DocumentInput,
    Finish,
    ImageInput,
    InputKind,
    PromptMessage,
    ProviderError,
    ReasoningDelta,
    TextDelta,
    Usage,
)
from providers.ollama import DEFAULT_BASE_URL, OllamaProvider, ollama_options
from tests.support.ollama_server import MIDSTREAM_ERROR, OllamaServer, Script
from tests.support.provider_contract import (
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
)
from tests.support.provider_events import (
    collect,
    collect_failure,
    failure_of,
    reasoning_of,
    text_of,
)


def adapter_for(base_url: str, **overrides: Any) -> OllamaProvider:
    settings: dict[str, Any] = {
        "base_url": base_url,
        "api_key": "",
        "models": ["echo", "vision", "text-only"],
        "timeout_seconds": 10,
        "image_models": ["echo", "vision"],
    }
    return OllamaProvider("ollama", **(settings | overrides))


@pytest.fixture(scope="module")
def server() -> Iterator[OllamaServer]:
    with OllamaServer() as running:
        yield running


@pytest.fixture
async def provider(server: OllamaServer) -> AsyncIterator[OllamaProvider]:
    server.reset()
    adapter = adapter_for(server.base_url)
    yield adapter
    await adapter.aclose()


# --- streaming ----------------------------------------------------------------------------------


async def test_streams_text_then_usage_and_finish(
    provider: OllamaProvider, server: OllamaServer
) -> None:
    sent = await check_streams_text_then_usage_and_finish(provider, server)

    assert sent.path == "/api/chat"
    assert sent.body["stream"] is True
    assert "think" not in sent.body
    assert "options" not in sent.body
    assert sent.messages == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say something nice"},
    ]


async def test_thinking_streams_as_reasoning_before_the_text(
    provider: OllamaProvider, server: OllamaServer
) -> None:
    events = await collect(provider.stream(request("thinking-a-haiku", think=True)))

    assert reasoning_of(events) == "The user wants a haiku. I will answer."
    assert text_of(events) == "a haiku"
    kinds = [type(event) for event in events]
    assert kinds.index(TextDelta) > max(i for i, k in enumerate(kinds) if k is ReasoningDelta)
    # eval_count covers thinking and answer alike; Ollama reports no breakdown.
    assert events[-2:] == [Usage(input_tokens=PROMPT_WORDS, output_tokens=10), Finish("stop")]
    assert only_request(server).body["think"] is True


async def test_allowed_options_reach_options_and_think_and_the_rest_stay_behind(
    provider: OllamaProvider, server: OllamaServer
) -> None:
    options: dict[str, Any] = {
        "temperature": 0.2,
        "topP": 0.9,
        "top_k": 40,
        "numCtx": 8192,
        "maxTokens": 2,
        "seed": 7,
        "stop": "END",
        "think": "high",
        # Runner settings and wire-contract keys a caller must not reach.
        "num_gpu": 0,
        "use_mmap": False,
        "stream": False,
        "format": "json",
        "keep_alive": 0,
        "unused": None,
    }
    events = await collect(provider.stream(request("reply-one-two-three", **options)))

    sent = only_request(server).body
    assert sent["options"] == {
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 40,
        "num_ctx": 8192,
        "num_predict": 2,
        "seed": 7,
        "stop": ["END"],
    }
    assert sent["think"] == "high"
    assert sent["stream"] is True
    assert set(sent) - {"tools"} == {"model", "messages", "stream", "options", "think"}
    assert not sent.get("tools")
    assert text_of(events) == "one two "
    assert events[-1] == Finish("length")


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": "hot"},
        {"temperature": float("inf")},
        {"topP": True},
        {"top_k": 1.5},
        {"numCtx": "8k"},
        {"maxTokens": 2.0},
        {"seed": "7"},
        {"stop": ["END", 3]},
        {"think": "extreme"},
        {"think": 1},
    ],
)
async def test_ill_typed_options_are_rejected_before_any_request(
    provider: OllamaProvider, server: OllamaServer, options: dict[str, Any]
) -> None:
    error = await refused_before_sending(provider, server, request("echo", **options))

    [key] = options
    assert f"providerOptions.ollama.{key} must be" in str(error)


def test_option_aliases_and_think_levels() -> None:
    assert ollama_options({"num_predict": 5, "stop": ["a", "b"]}, provider="p") == (
        {"num_predict": 5, "stop": ["a", "b"]},
        None,
    )
    assert ollama_options({"numPredict": 3, "think": False}, provider="p") == (
        {"num_predict": 3},
        False,
    )
    for level in ("low", "medium", "high", "max"):
        assert ollama_options({"think": level}, provider="p") == ({}, level)


@pytest.mark.parametrize("think", [["high"], {"level": "high"}, "extreme", 1])
def test_an_ill_typed_think_is_rejected(think: object) -> None:
    with pytest.raises(ProviderError) as raised:
        ollama_options({"think": think}, provider="p")
    assert not raised.value.retryable


@pytest.mark.parametrize(
    ("script", "finish"),
    [
        (Script(reply="cut short", done_reason="length"), "length"),
        (Script(reply="loaded", done_reason="load"), "other"),
    ],
)
async def test_done_reason_becomes_the_finish_reason(
    provider: OllamaProvider, server: OllamaServer, script: Script, finish: Any
) -> None:
    server.script(f"done-{finish}", script)
    events = await collect(provider.stream(request(f"done-{finish}")))

    assert events[-1] == Finish(finish)


async def test_counts_ollama_omits_read_as_zero(
    provider: OllamaProvider, server: OllamaServer
) -> None:
    server.script("silent", Script(reply=""))
    events = await collect(provider.stream(request("silent", messages=[PromptMessage("user", "")])))

    assert events == [Usage(input_tokens=0, output_tokens=0), Finish("stop")]


# --- images and documents -------------------------------------------------------------------------


async def test_an_image_reaches_the_server_as_base64_of_its_bytes(
    provider: OllamaProvider, server: OllamaServer
) -> None:
    messages = [PromptMessage("user", "Look", inputs=(ImageInput("image/png", PNG),))]
    events = await collect(provider.stream(request("echo", messages=messages)))

    sent = only_request(server)
    assert sent.messages == [
        {"role": "user", "content": "Look", "images": [base64.b64encode(PNG).decode("ascii")]}
    ]
    assert sent.images() == [PNG]
    assert text_of(events) == "Look"


@pytest.mark.parametrize("name", ["secret.txt", "secret.png"])
async def test_image_bytes_naming_a_local_file_are_sent_as_they_are_never_read_as_a_path(
    provider: OllamaProvider, server: OllamaServer, tmp_path: Path, name: str
) -> None:
    # The SDK reads a *string* image naming an existing file and uploads the file instead.
    secret = tmp_path / name
    secret.write_bytes(b"the contents of a local file")
    path_bytes = str(secret).encode()
    messages = [PromptMessage("user", "Look", inputs=(ImageInput("image/png", path_bytes),))]
    await collect(provider.stream(request("echo", messages=messages)))

    assert only_request(server).images() == [path_bytes]


async def test_images_for_a_model_without_vision_are_rejected_before_any_request(
    provider: OllamaProvider, server: OllamaServer
) -> None:
    messages = [PromptMessage("user", "Look", inputs=(ImageInput("image/png", PNG),))]
    error = await refused_before_sending(provider, server, request("text-only", messages=messages))

    assert "ollama/text-only does not take image inputs" in str(error)


async def test_a_pdf_is_rejected_before_any_request(
    provider: OllamaProvider, server: OllamaServer
) -> None:
    pdf = DocumentInput("application/pdf", b"%PDF-1.7\n", "r.pdf")
    messages = [PromptMessage("user", "Read", inputs=(pdf,))]
    error = await refused_before_sending(provider, server, request("echo", messages=messages))

    assert "does not take document inputs" in str(error)


def test_input_kinds_follow_image_models_and_never_include_documents() -> None:
    adapter = adapter_for(DEFAULT_BASE_URL)
    assert adapter.input_kinds("vision") == {InputKind.IMAGE}
    assert adapter.input_kinds("text-only") == frozenset()
    every = adapter_for(DEFAULT_BASE_URL, image_models=None)
    assert all(every.input_kinds(model) == {InputKind.IMAGE} for model in every.models())
    with pytest.raises(ValueError, match="document_models must be empty"):
        adapter_for(DEFAULT_BASE_URL, document_models=["echo"])
    with pytest.raises(ValueError, match="base_url is required"):
        adapter_for("")


# --- failures -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "retryable"),
    [
        (400, False),
        (401, False),
        (403, False),
        (404, False),
        (429, True),
        (500, True),
        (502, True),
        (503, True),
    ],
)
async def test_http_status_decides_whether_a_failure_is_retryable(
    provider: OllamaProvider, status: int, retryable: bool
) -> None:
    error = await status_failure(provider, status, retryable=retryable)

    assert f"ollama/fail-{status}: HTTP {status}: " in str(error)
    assert error.__cause__ is None
    assert error.__suppress_context__


async def test_a_model_not_pulled_is_rejected_with_ollamas_message(
    provider: OllamaProvider,
) -> None:
    error = await failure_of(provider.stream(request("llama9")))

    assert error.status_code == 404
    assert not error.retryable
    assert str(error) == "ollama/llama9: HTTP 404: model 'llama9' not found"


async def test_an_error_line_inside_the_stream_is_retryable(provider: OllamaProvider) -> None:
    seen, error = await collect_failure(provider.stream(request("midstream-error")))

    assert text_of(seen) == "this answer breaks "
    assert not any(isinstance(event, Finish | Usage) for event in seen)
    assert error.retryable
    assert error.status_code is None
    assert str(error) == f"ollama/midstream-error: error in stream: {MIDSTREAM_ERROR}"


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ("drop", "connection failed"),
        ("truncated", "the stream ended before its final line"),
        ("garbage", "malformed line"),
    ],
)
async def test_a_stream_that_breaks_after_some_text_is_retryable(
    provider: OllamaProvider, model: str, reason: str
) -> None:
    seen, error = await broken_off_failure(provider, model)

    assert len([event for event in seen if isinstance(event, TextDelta)]) == 3
    assert reason in str(error)


async def test_a_stalled_stream_times_out_as_retryable(server: OllamaServer) -> None:
    seen, _ = await timeout_failure(adapter_for(server.base_url, timeout_seconds=0.3), "slow-5000")

    assert text_of(seen) == "w0 "


async def test_connection_refused_is_retryable() -> None:
    await connection_refused_failure(adapter_for(closed_origin(), timeout_seconds=5))


async def test_a_rejected_key_is_not_retryable_and_never_appears_in_the_error() -> None:
    wrong_key = "ollama-wrong-secret-9876543210"
    with OllamaServer(api_key="ollama-right-key") as keyed:
        async with aclosing(adapter_for(keyed.base_url, api_key=wrong_key)) as adapter:
            error = await failure_of(adapter.stream(request("echo")))
        sent = only_request(keyed)

    assert sent.authorization == f"Bearer {wrong_key}"
    assert error.status_code == 401
    assert not error.retryable
    assert_kept_out(wrong_key, error)


# --- environment and connections ------------------------------------------------------------------


@pytest.mark.parametrize("api_key", ["", "ollama-configured-key"])
async def test_ollama_environment_variables_never_leak_into_requests(
    monkeypatch: pytest.MonkeyPatch, server: OllamaServer, api_key: str
) -> None:
    server.reset()
    with OllamaServer() as decoy:
        # The SDK falls back to OLLAMA_HOST for its host and sends OLLAMA_API_KEY to any host.
        monkeypatch.setenv("OLLAMA_HOST", decoy.base_url)
        monkeypatch.setenv("OLLAMA_API_KEY", "ollama-key-from-the-environment")
        async with aclosing(adapter_for(server.base_url, api_key=api_key)) as adapter:
            events = await collect(adapter.stream(request("echo")))
        assert decoy.requests == []

    assert text_of(events) == "Say something nice"
    sent = only_request(server)
    assert sent.authorization == (f"Bearer {api_key}" if api_key else None)


async def test_closing_the_stream_midway_closes_the_http_connection(
    provider: OllamaProvider, server: OllamaServer
) -> None:
    await check_closing_midway_closes_the_connection(provider, server)


async def test_cancelling_the_consumer_closes_the_http_connection(
    provider: OllamaProvider, server: OllamaServer
) -> None:
    await check_cancelling_the_consumer_closes_the_connection(provider, server)
