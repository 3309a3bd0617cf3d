"""The built-in web tools against local servers: web_search through each backend's wire format,
web_fetch of HTML, PDF and text pages within its byte and time caps, every failure classified as
retryable or final, and URLs that lead to private addresses refused (also on a redirect hop)."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from pydantic import SecretStr

from agent_tools.base import SourceLink, ToolFailed
from agent_tools.web import WEB_FETCH, WEB_SEARCH, WEB_TOOL_NAMES, WebTools
from core.settings import Settings
from outbound.guard import GuardedHttpClient, OutboundPolicy
from tests.support.file_server import FileServer
from tests.support.search_server import BRAVE_KEY, TAVILY_KEY, SearchHit, SearchServer
from tests.test_attachments import pdf_with_text, png

ARTICLE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>Durable turns explained</title></head>
<body>
<nav><a href="/">Home</a> | <a href="/pricing">Pricing menu entry</a></nav>
<article>
<h1>Durable turns</h1>
<p>A durable turn survives a worker crash because every step is recorded by the workflow engine
and replayed on another worker, so the answer continues where it stopped.</p>
<p>Read the <a href="https://docs.example.org/replay">replay guide</a> for the details of how the
history is replayed and why activities must be idempotent.</p>
<table><tr><th>Step</th><th>Owner</th></tr><tr><td>generate</td><td>activity</td></tr></table>
</article>
<footer>Copyright 2026 Example footer legal text</footer>
</body></html>
"""


class Statuses:
    """A StatusReporter that remembers what it was told."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def __call__(self, message: str) -> None:
        self.seen.append(message)


def settings_with(**overrides: Any) -> Settings:
    # Every web setting a test relies on is spelled out, so DURACHAT_* variables cannot leak in.
    values: dict[str, Any] = {
        "searxng_url": None,
        "brave_api_key": None,
        "tavily_api_key": None,
        "outbound_allowed_hosts": ["127.0.0.2"],
        "web_search_results": 5,
        "web_search_timeout_seconds": 5.0,
        "web_fetch_timeout_seconds": 5.0,
        "web_fetch_max_bytes": 5_000_000,
        "web_fetch_max_chars": 100_000,
    }
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def web_tools(
    settings: Settings | None = None, *, fetch_client: GuardedHttpClient | None = None
) -> AsyncIterator[WebTools]:
    tools = WebTools(settings or settings_with(), fetch_client=fetch_client)
    try:
        yield tools
    finally:
        await tools.aclose()


async def failure_of(tools: WebTools, name: str, tool_input: dict[str, Any]) -> ToolFailed:
    with pytest.raises(ToolFailed) as caught:
        await tools.run(name, tool_input, Statuses())
    return caught.value


# --- web_search ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def running_search_server() -> Iterator[SearchServer]:
    with SearchServer() as server:
        yield server


@pytest.fixture
def search_server(running_search_server: SearchServer) -> SearchServer:
    running_search_server.reset()
    return running_search_server


HITS = [
    SearchHit(
        "Temporal &amp; durable execution",
        "https://temporal.io/",
        "Durable <strong>execution</strong>.",
    ),
    SearchHit("Second", "https://example.org/second", "The second hit."),
    SearchHit("No URL", "javascript:alert(1)", "Dropped: not a web page."),
    SearchHit("Third", "https://example.org/third", "The third hit."),
]


async def test_searxng_results_become_titles_urls_snippets_and_sources(
    search_server: SearchServer,
) -> None:
    search_server.results_for("durable execution", HITS)
    statuses = Statuses()
    async with web_tools(settings_with(searxng_url=search_server.searxng_url)) as tools:
        outcome = await tools.run(WEB_SEARCH, {"query": "  durable execution "}, statuses)
    assert statuses.seen == ["searching the web for “durable execution”"]
    assert outcome.output == {
        "query": "durable execution",
        "results": [
            {
                "title": "Temporal & durable execution",
                "url": "https://temporal.io/",
                "snippet": "Durable execution.",
            },
            {"title": "Second", "url": "https://example.org/second", "snippet": "The second hit."},
            {"title": "Third", "url": "https://example.org/third", "snippet": "The third hit."},
        ],
    }
    assert outcome.sources == [
        SourceLink("https://temporal.io/", "Temporal & durable execution"),
        SourceLink("https://example.org/second", "Second"),
        SourceLink("https://example.org/third", "Third"),
    ]
    [request] = search_server.requests_to("searxng")
    assert request.params == {"q": "durable execution", "format": "json"}


async def test_brave_is_asked_with_its_key_and_count(search_server: SearchServer) -> None:
    settings = settings_with(
        brave_api_key=SecretStr(BRAVE_KEY), brave_search_url=search_server.brave_url
    )
    async with web_tools(settings) as tools:
        outcome = await tools.run(WEB_SEARCH, {"query": "temporal", "count": 3}, Statuses())
    assert [r["url"] for r in outcome.output["results"]] == [
        f"https://example.com/temporal/{index}" for index in (1, 2, 3)
    ]
    assert outcome.output["results"][0]["snippet"] == "Snippet 1 about temporal."
    [request] = search_server.requests_to("brave")
    assert request.params == {"q": "temporal", "count": "3"}
    assert request.headers["x-subscription-token"] == BRAVE_KEY


async def test_brave_finding_nothing_is_an_empty_list(search_server: SearchServer) -> None:
    search_server.results_for("nothing at all", [])
    settings = settings_with(
        brave_api_key=SecretStr(BRAVE_KEY), brave_search_url=search_server.brave_url
    )
    async with web_tools(settings) as tools:
        outcome = await tools.run(WEB_SEARCH, {"query": "nothing at all"}, Statuses())
    assert outcome.output == {"query": "nothing at all", "results": []}
    assert outcome.sources == []


async def test_tavily_is_posted_a_basic_search_with_a_bearer_key(
    search_server: SearchServer,
) -> None:
    settings = settings_with(
        tavily_api_key=SecretStr(TAVILY_KEY), tavily_search_url=search_server.tavily_url
    )
    async with web_tools(settings) as tools:
        outcome = await tools.run(WEB_SEARCH, {"query": "tavily test"}, Statuses())
    assert len(outcome.output["results"]) == 5
    assert outcome.sources[0] == SourceLink(
        "https://example.com/tavily-test/1", "tavily test — result 1"
    )
    [request] = search_server.requests_to("tavily")
    assert request.method == "POST"
    assert request.body == {"query": "tavily test", "max_results": 5, "search_depth": "basic"}
    assert request.headers["authorization"] == f"Bearer {TAVILY_KEY}"


@pytest.mark.parametrize(
    ("count", "expected"), [(None, 5), (2, 2), (2.0, 2), (50, 5), (0, 1), (-3, 1)]
)
async def test_the_result_count_defaults_to_the_setting_and_stays_within_it(
    search_server: SearchServer, count: object, expected: int
) -> None:
    tool_input: dict[str, Any] = {"query": "counted"}
    if count is not None:
        tool_input["count"] = count
    async with web_tools(settings_with(searxng_url=search_server.searxng_url)) as tools:
        outcome = await tools.run(WEB_SEARCH, tool_input, Statuses())
    assert len(outcome.output["results"]) == expected
    assert len(outcome.sources) == expected


async def test_the_first_configured_backend_answers_searxng_then_brave_then_tavily(
    search_server: SearchServer,
) -> None:
    keys: dict[str, Any] = {
        "brave_api_key": SecretStr(BRAVE_KEY),
        "brave_search_url": search_server.brave_url,
        "tavily_api_key": SecretStr(TAVILY_KEY),
        "tavily_search_url": search_server.tavily_url,
    }
    async with web_tools(settings_with(searxng_url=search_server.searxng_url, **keys)) as tools:
        await tools.run(WEB_SEARCH, {"query": "order"}, Statuses())
    assert [r.backend for r in search_server.requests] == ["searxng"]
    async with web_tools(settings_with(**keys)) as tools:
        await tools.run(WEB_SEARCH, {"query": "order"}, Statuses())
    assert [r.backend for r in search_server.requests] == ["searxng", "brave"]
    async with web_tools(settings_with(**{**keys, "brave_api_key": None})) as tools:
        await tools.run(WEB_SEARCH, {"query": "order"}, Statuses())
    assert [r.backend for r in search_server.requests] == ["searxng", "brave", "tavily"]


async def test_without_a_backend_only_web_fetch_is_offered() -> None:
    async with web_tools() as tools:
        assert not tools.search_configured
        assert [tool.name for tool in tools.definitions()] == [WEB_FETCH]
        failure = await failure_of(tools, WEB_SEARCH, {"query": "anything"})
    assert not failure.retryable
    assert "not configured" in failure.message


async def test_definitions_carry_json_schemas_bounded_by_the_settings() -> None:
    async with web_tools(
        settings_with(searxng_url="http://search.invalid", web_search_results=7)
    ) as tools:
        search, fetch = tools.definitions()
    assert {WEB_SEARCH, WEB_FETCH} == WEB_TOOL_NAMES
    assert (search.name, fetch.name) == (WEB_SEARCH, WEB_FETCH)
    assert search.input_schema["required"] == ["query"]
    assert search.input_schema["properties"]["query"]["type"] == "string"
    assert search.input_schema["properties"]["count"] == {
        "type": "integer",
        "minimum": 1,
        "maximum": 7,
        "description": "How many results to return (default 7).",
    }
    assert fetch.input_schema["required"] == ["url"]
    assert fetch.input_schema["properties"]["url"]["type"] == "string"
    assert search.description
    assert fetch.description


@pytest.mark.parametrize(
    "tool_input",
    [
        {},
        {"query": ""},
        {"query": "   "},
        {"query": 42},
        {"query": "x" * 501},
        {"query": "q", "count": "three"},
        {"query": "q", "count": True},
    ],
)
async def test_a_bad_search_input_fails_for_good_before_any_request(
    search_server: SearchServer, tool_input: dict[str, Any]
) -> None:
    async with web_tools(settings_with(searxng_url=search_server.searxng_url)) as tools:
        failure = await failure_of(tools, WEB_SEARCH, tool_input)
    assert not failure.retryable
    assert search_server.requests == []


@pytest.mark.parametrize(
    ("status", "retryable"), [(429, True), (500, True), (503, True), (400, False), (404, False)]
)
@pytest.mark.parametrize("backend", ["searxng", "brave", "tavily"])
async def test_backend_statuses_are_retryable_only_when_they_may_pass(
    search_server: SearchServer, backend: Any, status: int, retryable: bool
) -> None:
    settings = {
        "searxng": settings_with(searxng_url=search_server.searxng_url),
        "brave": settings_with(
            brave_api_key=SecretStr(BRAVE_KEY), brave_search_url=search_server.brave_url
        ),
        "tavily": settings_with(
            tavily_api_key=SecretStr(TAVILY_KEY), tavily_search_url=search_server.tavily_url
        ),
    }[backend]
    search_server.fail(backend, status)
    async with web_tools(settings) as tools:
        failure = await failure_of(tools, WEB_SEARCH, {"query": "failing"})
        assert failure.retryable is retryable
        assert f"HTTP {status}" in failure.message
        assert {"searxng": "SearXNG", "brave": "Brave", "tavily": "Tavily"}[
            backend
        ] in failure.message
        for key in (BRAVE_KEY, TAVILY_KEY):
            assert key not in failure.message
        # The failure was the server's first answer only: the retry the activity makes succeeds.
        outcome = await tools.run(WEB_SEARCH, {"query": "failing"}, Statuses())
    assert len(outcome.output["results"]) == 5


@pytest.mark.parametrize(
    ("backend", "overrides"),
    [
        ("Brave", {"brave_api_key": SecretStr("wrong-brave-key-0123")}),
        ("Tavily", {"tavily_api_key": SecretStr("wrong-tavily-key-0123")}),
    ],
)
async def test_a_refused_key_fails_for_good_naming_the_backend_but_never_the_key(
    search_server: SearchServer, backend: str, overrides: dict[str, Any]
) -> None:
    settings = settings_with(
        brave_search_url=search_server.brave_url,
        tavily_search_url=search_server.tavily_url,
        **overrides,
    )
    async with web_tools(settings) as tools:
        failure = await failure_of(tools, WEB_SEARCH, {"query": "keyed"})
    assert not failure.retryable
    assert backend in failure.message
    assert "HTTP 401" in failure.message
    assert "wrong-" not in failure.message
    assert "key-0123" not in failure.message
    assert "wrong-" not in repr(failure)


async def test_a_searxng_without_the_json_format_is_a_final_failure_saying_so() -> None:
    with SearchServer(searxng_formats=("html",)) as server:
        async with web_tools(settings_with(searxng_url=server.searxng_url)) as tools:
            failure = await failure_of(tools, WEB_SEARCH, {"query": "formats"})
    assert not failure.retryable
    assert "HTTP 403" in failure.message
    assert "JSON format" in failure.message


async def test_a_slow_backend_times_out_and_a_closed_one_fails_retryably(
    search_server: SearchServer,
) -> None:
    search_server.delay("searxng", 3.0)
    settings = settings_with(searxng_url=search_server.searxng_url, web_search_timeout_seconds=0.3)
    started = time.monotonic()
    async with web_tools(settings) as tools:
        failure = await failure_of(tools, WEB_SEARCH, {"query": "slow"})
    assert failure.retryable
    assert "did not answer within 0.3 seconds" in failure.message
    assert time.monotonic() - started < 2.5

    with socket.socket() as sock:  # a port nothing listens on any more
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    async with web_tools(settings_with(searxng_url=closed)) as tools:
        failure = await failure_of(tools, WEB_SEARCH, {"query": "closed"})
    assert failure.retryable
    assert "could not be reached" in failure.message


# --- web_fetch ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pages() -> Iterator[FileServer]:
    with FileServer("127.0.0.2") as server:
        yield server


@pytest.fixture(scope="module")
def private_server() -> Iterator[FileServer]:
    """A server on an address the tests' policy does not allow: nothing may ever reach it."""
    with FileServer("127.0.0.1") as server:
        server.serve("/secret", b"internal only", "text/plain")
        yield server


async def test_an_html_page_is_its_main_text_as_markdown_with_its_title(pages: FileServer) -> None:
    url = pages.serve("/article.html", ARTICLE, "text/html; charset=utf-8")
    statuses = Statuses()
    async with web_tools() as tools:
        outcome = await tools.run(WEB_FETCH, {"url": url}, statuses)
    assert statuses.seen == ["reading 127.0.0.2"]
    output = outcome.output
    assert output["url"] == url
    assert output["title"] == "Durable turns explained"
    assert output["contentType"] == "text/html"
    assert output["truncated"] is False
    text = output["text"]
    assert "# Durable turns" in text
    assert "survives a worker crash" in text
    assert "[replay guide](https://docs.example.org/replay)" in text
    assert "| generate | activity |" in text
    assert "Pricing menu entry" not in text  # the nav
    assert "footer legal text" not in text  # the footer
    assert outcome.sources == [SourceLink(url, "Durable turns explained")]


async def test_a_page_with_no_main_text_falls_back_to_its_visible_text(pages: FileServer) -> None:
    url = pages.serve(
        "/sidebar.html",
        b"<html><head><title>Side</title><style>p{color:red}</style></head>"
        b"<body><aside>Only sidebar words here</aside><script>var hidden = 1;</script></body></html>",
        "text/html",
    )
    async with web_tools() as tools:
        outcome = await tools.run(WEB_FETCH, {"url": url}, Statuses())
    assert outcome.output["text"] == "Only sidebar words here"
    assert outcome.output["title"] == "Side"


async def test_a_page_in_another_charset_is_decoded(pages: FileServer) -> None:
    body = "<html><head><meta charset='iso-8859-1'><title>Café</title></head><body><p>Crème brûlée recipe, with enough words in it to be the main text of the page.</p></body></html>"
    url = pages.serve("/latin1.html", body.encode("iso-8859-1"), "text/html")
    async with web_tools() as tools:
        outcome = await tools.run(WEB_FETCH, {"url": url}, Statuses())
    assert outcome.output["title"] == "Café"
    assert "Crème brûlée" in outcome.output["text"]


async def test_a_pdf_is_its_text_even_when_served_as_octet_stream(pages: FileServer) -> None:
    pdf = pdf_with_text("Quarterly revenue grew by 42 percent")
    async with web_tools() as tools:
        for path, declared in (
            ("/report.pdf", "application/pdf"),
            ("/download", "application/octet-stream"),
        ):
            url = pages.serve(path, pdf, declared)
            outcome = await tools.run(WEB_FETCH, {"url": url}, Statuses())
            assert outcome.output["contentType"] == "application/pdf"
            assert "Quarterly revenue grew by 42 percent" in outcome.output["text"]
            assert outcome.output["truncated"] is False
    assert outcome.output["title"] == "download"


async def test_plain_text_and_markdown_come_back_as_they_are(pages: FileServer) -> None:
    markdown = "# Release notes\n\n- faster turns\n- **fewer** retries\n"
    async with web_tools() as tools:
        text_url = pages.serve("/notes.txt", b"line one\n  line two\n", "text/plain; charset=utf-8")
        plain = await tools.run(WEB_FETCH, {"url": text_url}, Statuses())
        md_url = pages.serve("/notes.md", markdown.encode(), "text/markdown")
        md = await tools.run(WEB_FETCH, {"url": md_url}, Statuses())
    assert plain.output == {
        "url": text_url,
        "title": "notes.txt",
        "contentType": "text/plain",
        "text": "line one\n  line two\n",
        "truncated": False,
    }
    assert md.output["text"] == markdown
    assert md.output["contentType"] == "text/markdown"
    assert md.output["title"] == "Release notes"


@pytest.mark.parametrize(
    ("body", "declared", "named"),
    [
        (png(4, 4, (255, 0, 0)), "image/png", "image/png"),
        (png(4, 4, (255, 0, 0)), "text/html", "image/png"),  # the bytes, not the header
        (b'{"a": 1}', "application/json", "application/json"),
    ],
)
async def test_an_unsupported_type_fails_for_good_naming_the_type(
    pages: FileServer, body: bytes, declared: str, named: str
) -> None:
    url = pages.serve(f"/unsupported-{abs(hash((body, declared)))}", body, declared)
    async with web_tools() as tools:
        failure = await failure_of(tools, WEB_FETCH, {"url": url})
    assert not failure.retryable
    assert named in failure.message


async def test_text_past_the_byte_cap_is_kept_up_to_it_and_marked_truncated(
    pages: FileServer,
) -> None:
    paragraphs = "".join(
        f"<p>Paragraph {index} of a very long page about nothing much.</p>"
        for index in range(5_000)
    )
    html_url = pages.serve(
        "/long.html",
        f"<html><body><article>{paragraphs}</article></body></html>".encode(),
        "text/html",
    )
    text_url = pages.serve("/long.txt", b"0123456789" * 1_000, "text/plain")
    async with web_tools(settings_with(web_fetch_max_bytes=20_000)) as tools:
        page = await tools.run(WEB_FETCH, {"url": html_url}, Statuses())
        text = await tools.run(WEB_FETCH, {"url": text_url}, Statuses())
    assert page.output["truncated"] is True
    assert "Paragraph 0 of" in page.output["text"]
    assert "Paragraph 4999" not in page.output["text"]
    assert text.output["truncated"] is False
    assert len(text.output["text"]) == 10_000

    async with web_tools(settings_with(web_fetch_max_bytes=1_000)) as tools:
        text = await tools.run(WEB_FETCH, {"url": text_url}, Statuses())
    assert text.output["text"] == ("0123456789" * 1_000)[:1_000]
    assert text.output["truncated"] is True


async def test_a_pdf_past_the_byte_cap_is_refused_since_a_cut_pdf_cannot_be_read(
    pages: FileServer,
) -> None:
    pdf = pdf_with_text("A long report " * 200)
    assert len(pdf) > 1_000
    async with web_tools(settings_with(web_fetch_max_bytes=1_000)) as tools:
        for path, declared in (
            ("/big.pdf", "application/pdf"),
            ("/big-download", "application/octet-stream"),
        ):
            url = pages.serve(path, pdf, declared)
            failure = await failure_of(tools, WEB_FETCH, {"url": url})
            assert not failure.retryable
            assert "larger than 1,000 bytes" in failure.message


async def test_text_past_the_character_cap_is_cut_and_marked_truncated(pages: FileServer) -> None:
    url = pages.serve("/chars.txt", ("é" * 3_000).encode(), "text/plain; charset=utf-8")
    async with web_tools(settings_with(web_fetch_max_chars=1_000)) as tools:
        outcome = await tools.run(WEB_FETCH, {"url": url}, Statuses())
    assert outcome.output["text"] == "é" * 1_000
    assert outcome.output["truncated"] is True


async def test_a_page_slower_than_the_time_cap_fails_retryably_on_time(pages: FileServer) -> None:
    url = pages.serve_slowly("/slow.txt", b"x" * (65_536 * 20), "text/plain", piece_delay=0.3)
    started = time.monotonic()
    async with web_tools(settings_with(web_fetch_timeout_seconds=0.5)) as tools:
        failure = await failure_of(tools, WEB_FETCH, {"url": url})
    assert failure.retryable
    assert "did not arrive within 0.5 seconds" in failure.message
    assert time.monotonic() - started < 3


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(404, False), (410, False), (403, False), (429, True), (503, True), (500, True)],
)
async def test_http_errors_are_retryable_only_when_they_may_pass(
    pages: FileServer, status: int, retryable: bool
) -> None:
    url = pages.serve(f"/flaky-{status}.txt", b"fine now", "text/plain")
    pages.fail(f"/flaky-{status}.txt", status, times=1)
    async with web_tools() as tools:
        failure = await failure_of(tools, WEB_FETCH, {"url": url})
        assert failure.retryable is retryable
        assert f"HTTP {status}" in failure.message
        outcome = await tools.run(WEB_FETCH, {"url": url}, Statuses())
    assert outcome.output["text"] == "fine now"


async def test_a_missing_page_is_a_final_failure(pages: FileServer) -> None:
    async with web_tools() as tools:
        failure = await failure_of(tools, WEB_FETCH, {"url": pages.base_url + "/nowhere"})
    assert not failure.retryable
    assert "HTTP 404" in failure.message


async def test_a_redirect_within_allowed_hosts_reports_the_final_url(pages: FileServer) -> None:
    final = pages.serve("/landing.txt", b"landed", "text/plain")
    start = pages.redirect("/moved", final)
    async with web_tools() as tools:
        outcome = await tools.run(WEB_FETCH, {"url": start}, Statuses())
    assert outcome.output["url"] == final
    assert outcome.sources == [SourceLink(final, "landing.txt")]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://[::1]/",
        "http://2130706433/",  # 127.0.0.1 in decimal
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
    ],
)
async def test_private_destinations_are_refused_for_good(url: str) -> None:
    async with (
        GuardedHttpClient(OutboundPolicy.parse(""), timeout_seconds=5) as guarded,
        web_tools(fetch_client=guarded) as tools,
    ):
        failure = await failure_of(tools, WEB_FETCH, {"url": url})
    assert not failure.retryable
    assert "not allowed" in failure.message


async def test_a_redirect_to_a_private_address_is_refused_on_the_hop(
    pages: FileServer, private_server: FileServer
) -> None:
    hop = pages.redirect("/to-private", f"http://127.0.0.1:{private_server.port}/secret")
    async with (
        GuardedHttpClient(OutboundPolicy.parse("127.0.0.2"), timeout_seconds=5) as guarded,
        web_tools(fetch_client=guarded) as tools,
    ):
        failure = await failure_of(tools, WEB_FETCH, {"url": hop})
    assert not failure.retryable
    assert "not allowed" in failure.message
    assert private_server.requests == []


@pytest.mark.parametrize(
    "tool_input",
    [
        {},
        {"url": ""},
        {"url": 42},
        {"url": "ftp://example.com/file"},
        {"url": "example.com/page"},
        {"url": "http://"},
        {"url": "https://example.com/" + "a" * 3_000},
    ],
)
async def test_a_bad_url_fails_for_good_without_a_status(tool_input: dict[str, Any]) -> None:
    statuses = Statuses()
    async with web_tools() as tools:
        with pytest.raises(ToolFailed) as caught:
            await tools.run(WEB_FETCH, tool_input, statuses)
    assert not caught.value.retryable
    assert statuses.seen == []


async def test_an_unknown_tool_name_fails_for_good() -> None:
    async with web_tools() as tools:
        failure = await failure_of(tools, "web_browse", {})
    assert not failure.retryable
