"""Groq and OpenRouter as dialects of the OpenAI-compatible adapter, against the fake server speaking each."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from decimal import Decimal
from typing import Any, Literal

import httpx
import pytest

from providers.base import Finish, TextDelta, Usage
from providers.openai_compatible import (
    GROQ_BASE_URL,
    OPENAI_BASE_URL,
    OPENROUTER_BASE_URL,
    OpenAICompatibleProvider,
    OpenAIDialect,
)
from tests.support.openai_server import KEEPALIVE, OpenAICompatibleServer, Script
from tests.support.provider_contract import only_request, request, status_failure
from tests.support.provider_events import (
    collect,
    collect_failure,
    failure_of,
    reasoning_of,
    text_of,
)

API_KEY = "sk-dialect-0123456789abcdef"


def adapter_for(
    server: OpenAICompatibleServer, dialect: OpenAIDialect | str
) -> OpenAICompatibleProvider:
    return OpenAICompatibleProvider(
        str(dialect),
        base_url=server.base_url,
        api_key=API_KEY,
        models=["echo"],
        timeout_seconds=10,
        dialect=OpenAIDialect(dialect),
    )


def usages(events: list[Any]) -> list[Usage]:
    return [event for event in events if isinstance(event, Usage)]


def serving(dialect: Literal["openai", "groq", "openrouter"]) -> Iterator[OpenAICompatibleServer]:
    with OpenAICompatibleServer(api_key=API_KEY, dialect=dialect) as running:
        yield running


@pytest.fixture(scope="module")
def groq_server() -> Iterator[OpenAICompatibleServer]:
    yield from serving("groq")


@pytest.fixture(scope="module")
def openrouter_server() -> Iterator[OpenAICompatibleServer]:
    yield from serving("openrouter")


@pytest.fixture(scope="module")
def openai_server() -> Iterator[OpenAICompatibleServer]:
    yield from serving("openai")


@pytest.fixture
async def groq(groq_server: OpenAICompatibleServer) -> AsyncIterator[OpenAICompatibleProvider]:
    groq_server.reset()
    adapter = adapter_for(groq_server, OpenAIDialect.GROQ)
    yield adapter
    await adapter.aclose()


@pytest.fixture
async def openrouter(
    openrouter_server: OpenAICompatibleServer,
) -> AsyncIterator[OpenAICompatibleProvider]:
    openrouter_server.reset()
    adapter = adapter_for(openrouter_server, OpenAIDialect.OPENROUTER)
    yield adapter
    await adapter.aclose()


def test_dialects_and_their_endpoints() -> None:
    assert [str(dialect) for dialect in OpenAIDialect] == ["openai", "groq", "openrouter"]
    assert OPENAI_BASE_URL == "https://api.openai.com/v1"
    assert GROQ_BASE_URL == "https://api.groq.com/openai/v1"
    assert OPENROUTER_BASE_URL == "https://openrouter.ai/api/v1"
    adapter = OpenAICompatibleProvider(
        "p", base_url=OPENAI_BASE_URL, api_key="", models=[], timeout_seconds=1
    )
    assert adapter.dialect is OpenAIDialect.OPENAI


# --- Groq ---------------------------------------------------------------------------------------


async def test_groq_usage_comes_from_x_groq_when_no_usage_chunk_arrives(
    groq: OpenAICompatibleProvider, groq_server: OpenAICompatibleServer
) -> None:
    events = await collect(groq.stream(request("reply-hello-big-world")))

    assert text_of(events) == "hello big world"
    assert events[-2:] == [Usage(input_tokens=6, output_tokens=3), Finish("stop")]
    assert only_request(groq_server).body["stream_options"] == {"include_usage": True}


async def test_groq_usage_in_both_places_is_counted_once(
    groq: OpenAICompatibleProvider, groq_server: OpenAICompatibleServer
) -> None:
    groq_server.script("both", Script(reply="hi there", usage_placement="both", cached_tokens=2))
    events = await collect(groq.stream(request("both")))

    assert usages(events) == [Usage(input_tokens=6, output_tokens=2, cached_input_tokens=2)]


async def test_x_groq_is_read_only_in_the_groq_dialect(
    groq_server: OpenAICompatibleServer,
) -> None:
    async with aclosing(adapter_for(groq_server, OpenAIDialect.OPENAI)) as plain:
        events = await collect(plain.stream(request("reply-hello")))

    assert usages(events) == []
    assert events[-1] == Finish("stop")


async def test_groq_reasoning_arrives_in_the_reasoning_field(
    groq: OpenAICompatibleProvider,
) -> None:
    events = await collect(groq.stream(request("reasoning-a-haiku")))

    assert reasoning_of(events) == "The user wants a haiku. I will answer."
    assert text_of(events) == "a haiku"
    assert usages(events) == [Usage(input_tokens=6, output_tokens=10, reasoning_tokens=8)]


@pytest.mark.parametrize(
    ("dialect", "retryable"), [(OpenAIDialect.GROQ, True), (OpenAIDialect.OPENAI, False)]
)
async def test_498_capacity_exceeded_is_retryable_only_from_groq(
    groq_server: OpenAICompatibleServer, dialect: OpenAIDialect, retryable: bool
) -> None:
    async with aclosing(adapter_for(groq_server, dialect)) as adapter:
        error = await failure_of(adapter.stream(request("fail-498")))

    assert error.status_code == 498
    assert error.retryable is retryable
    assert "HTTP 498: Flex tier capacity exceeded, try again later." in str(error)


async def test_a_498_inside_a_groq_stream_is_retryable(groq: OpenAICompatibleProvider) -> None:
    seen, error = await collect_failure(groq.stream(request("midstream-498")))

    assert text_of(seen) == "this answer breaks "
    assert error.retryable
    assert error.status_code == 498


async def test_groq_rate_limit_is_retryable_with_retry_after(
    groq: OpenAICompatibleProvider,
) -> None:
    error = await failure_of(groq.stream(request("fail-429")))

    assert error.retryable
    assert error.retry_after == 2.0
    assert "Rate limit reached for requests." in str(error)


# --- OpenRouter ---------------------------------------------------------------------------------


async def test_openrouter_keepalive_comments_are_skipped(
    openrouter: OpenAICompatibleProvider, openrouter_server: OpenAICompatibleServer
) -> None:
    events = await collect(openrouter.stream(request("reply-hello-big-world")))

    assert [type(event) for event in events] == [TextDelta] * 3 + [Usage, Finish]
    assert text_of(events) == "hello big world"
    # The stream did carry the comments the adapter had to get past.
    async with httpx.AsyncClient() as client:
        raw = await client.post(
            f"{openrouter_server.base_url}/chat/completions",
            headers={"authorization": f"Bearer {API_KEY}"},
            json={"model": "reply-hello", "messages": [], "stream": True},
        )
    assert raw.content.count(KEEPALIVE) == 2


async def test_openrouter_usage_carries_its_cost_as_an_exact_decimal(
    openrouter: OpenAICompatibleProvider,
) -> None:
    events = await collect(openrouter.stream(request("reply-hello-big-world")))

    # 6 prompt tokens at $1.50/M and 3 completion tokens at $2/M, as the fake prices them.
    [usage] = usages(events)
    assert usage == Usage(input_tokens=6, output_tokens=3, reported_cost_usd=Decimal("0.000015"))


@pytest.mark.parametrize(
    ("cost", "expected"),
    [
        (0.95, Decimal("0.95")),  # not Decimal(0.95) = 0.94999999999999995559...
        (0.1, Decimal("0.1")),
        (1.23e-05, Decimal("0.0000123")),
        ("0.0123", Decimal("0.0123")),
        (0, Decimal(0)),
        (-1.0, None),
        ("free", None),
        ("NaN", None),
    ],
)
async def test_openrouter_cost_is_parsed_from_its_decimal_text(
    openrouter: OpenAICompatibleProvider,
    openrouter_server: OpenAICompatibleServer,
    cost: float | str,
    expected: Decimal | None,
) -> None:
    openrouter_server.script("priced", Script(reply="ok", cost=cost))
    events = await collect(openrouter.stream(request("priced")))

    [usage] = usages(events)
    assert usage.reported_cost_usd == expected
    if expected is not None:
        assert str(usage.reported_cost_usd) == str(expected)


async def test_openrouter_usage_details_become_cache_and_reasoning_counts(
    openrouter: OpenAICompatibleProvider, openrouter_server: OpenAICompatibleServer
) -> None:
    openrouter_server.script(
        "cached",
        Script(
            reply="forty two",
            reasoning="Let me think it over.",
            reasoning_field="reasoning",
            cached_tokens=4,
            cache_write_tokens=2,
            cost=0.0042,
        ),
    )
    events = await collect(openrouter.stream(request("cached")))

    assert reasoning_of(events) == "Let me think it over."
    assert usages(events) == [
        Usage(
            input_tokens=6,
            output_tokens=7,
            cached_input_tokens=4,
            cache_write_tokens=2,
            reasoning_tokens=5,
            reported_cost_usd=Decimal("0.0042"),
        )
    ]


@pytest.mark.parametrize(
    ("code", "retryable"),
    [
        (402, False),
        (400, False),
        (403, False),
        (408, True),
        (429, True),
        (500, True),
        (502, True),
        (503, True),
        ("server_error", True),
    ],
)
async def test_an_openrouter_error_chunk_is_classified_by_its_code(
    openrouter: OpenAICompatibleProvider, code: int | str, retryable: bool
) -> None:
    seen, error = await collect_failure(openrouter.stream(request(f"midstream-{code}")))

    assert text_of(seen) == "this answer breaks "
    assert not any(isinstance(event, Usage | Finish) for event in seen)
    assert error.retryable is retryable
    assert error.status_code == (code if isinstance(code, int) else None)
    assert str(error) == (
        f"openrouter/midstream-{code}: error in stream: "
        "Provider returned error (provider: TestUpstream)"
    )
    assert error.__cause__ is None


async def test_a_finish_reason_of_error_without_details_is_retryable(
    openrouter: OpenAICompatibleProvider,
) -> None:
    seen, error = await collect_failure(openrouter.stream(request("error-finish")))

    assert text_of(seen) == "this answer ends in an error"
    assert error.retryable
    assert str(error) == "openrouter/error-finish: the answer ended with an error"


@pytest.mark.parametrize(
    ("status", "retryable", "detail"),
    [
        (402, False, "Insufficient credits. Add more using https://openrouter.ai/credits"),
        (403, False, "Input was flagged by moderation. (reasons: harassment)"),
        (404, False, "No endpoints found for fail-404."),
        (429, True, "Rate limit exceeded."),
        (502, True, "Provider returned error (provider: TestUpstream)"),
        (503, True, "No instances available."),
    ],
)
async def test_openrouter_http_errors_keep_its_message_and_metadata(
    openrouter: OpenAICompatibleProvider, status: int, retryable: bool, detail: str
) -> None:
    error = await status_failure(openrouter, status, retryable=retryable)

    assert str(error) == f"openrouter/fail-{status}: HTTP {status}: {detail}"


async def test_cost_is_reported_only_by_the_openrouter_dialect(
    openrouter_server: OpenAICompatibleServer,
) -> None:
    async with aclosing(adapter_for(openrouter_server, OpenAIDialect.OPENAI)) as plain:
        events = await collect(plain.stream(request("reply-hello-big-world")))

    assert usages(events) == [Usage(input_tokens=6, output_tokens=3)]


# --- plain OpenAI -------------------------------------------------------------------------------


async def test_plain_openai_reads_cached_cache_write_and_reasoning_tokens(
    openai_server: OpenAICompatibleServer,
) -> None:
    openai_server.script(
        "detailed",
        Script(reply="forty two", reasoning="Hmm.", cached_tokens=5, cache_write_tokens=1),
    )
    async with aclosing(adapter_for(openai_server, OpenAIDialect.OPENAI)) as adapter:
        events = await collect(adapter.stream(request("detailed")))

    assert usages(events) == [
        Usage(
            input_tokens=6,
            output_tokens=3,
            cached_input_tokens=5,
            cache_write_tokens=1,
            reasoning_tokens=1,
        )
    ]
