"""The built-in web tools, `web_search` and `web_fetch`, as a library the tool activity calls. Never
imports temporalio/fastapi/sqlalchemy/redis.

`web_search` asks the first configured search backend (SearXNG, then Brave, then Tavily) over a
plain httpx client: those URLs are the operator's, not a user's. `web_fetch` reads a URL a user or
model names, so it goes only through the outbound guard (every redirect hop checked, the connected
address pinned), within a byte cap and a time cap, and turns what arrives into text: HTML's main
text as Markdown (trafilatura), a PDF's text layer (media.documents), plain text and Markdown as
they are. Every failure is a ToolFailed whose message is safe to show, marked retryable when it
may pass (timeouts, connection errors, 429 and 5xx) and final otherwise.
"""

from __future__ import annotations

import asyncio
import codecs
import html
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any, Final

import filetype
import httpx
import trafilatura

from agent_tools.base import SourceLink, StatusReporter, ToolFailed, ToolOutcome
from core.settings import Settings
from media.documents import DocumentRefused, pdf_text
from outbound.guard import GuardedHttpClient, OutboundPolicy, OutboundRefused
from providers.base import ToolDefinition

WEB_SEARCH: Final = "web_search"
WEB_FETCH: Final = "web_fetch"
WEB_TOOL_NAMES: Final = frozenset({WEB_SEARCH, WEB_FETCH})

MAX_QUERY_CHARS: Final = 500
MAX_URL_CHARS: Final = 2_048

_HTML_TYPES: Final = frozenset({"text/html", "application/xhtml+xml"})
# Markdown travels under either name; it is reported as text/markdown.
_TEXT_TYPES: Final = {"text/plain": "text/plain", "text/markdown": "text/markdown"}
_TEXT_TYPES_ALIASES: Final = {"text/x-markdown": "text/markdown"}
_PDF: Final = "application/pdf"
# Declared types that say nothing about the bytes: the bytes decide.
_UNDECLARED: Final = frozenset({"", "application/octet-stream", "binary/octet-stream"})
_ACCEPT: Final = (
    "text/html,application/xhtml+xml,text/markdown;q=0.9,text/plain;q=0.9,"
    "application/pdf;q=0.8,*/*;q=0.1"
)
# Enough of a body for filetype's signatures and for an HTML or charset sniff.
_SNIFF_BYTES: Final = 4_096
# A title lives in <head>; reading further for it would only cost time on a large page.
_TITLE_SCAN_CHARS: Final = 200_000
_TAG: Final = re.compile(r"<[^>]{0,200}>")
_META_CHARSET: Final = re.compile(
    rb"""<meta[^>]{0,200}?charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]{1,40})""", re.I
)


class WebTools:
    """`web_search` and `web_fetch` for one worker: build once, `run` many calls, `aclose` at the
    end. Clients passed in stay the caller's to close; the ones built here are closed by aclose."""

    def __init__(
        self,
        settings: Settings,
        *,
        fetch_client: GuardedHttpClient | None = None,
        search_client: httpx.AsyncClient | None = None,
    ) -> None:
        self._settings = settings
        self._owned_fetch = fetch_client is None
        self._owned_search = search_client is None
        # The guard's own timeout bounds each connect and read; the whole fetch is bounded by
        # web_fetch_timeout_seconds in _fetch.
        self._fetch_client = fetch_client or GuardedHttpClient(
            OutboundPolicy.from_settings(settings),
            timeout_seconds=settings.web_fetch_timeout_seconds,
        )
        self._search_client = search_client or httpx.AsyncClient(
            trust_env=False,
            follow_redirects=False,
            timeout=httpx.Timeout(settings.web_search_timeout_seconds),
            headers={"User-Agent": "durachat", "Accept": "application/json"},
        )

    @property
    def search_configured(self) -> bool:
        """Whether any search backend is configured (else `web_search` is not offered)."""
        s = self._settings
        return bool(s.searxng_url) or s.brave_api_key is not None or s.tavily_api_key is not None

    def definitions(self) -> list[ToolDefinition]:
        """The tools offered to a model: `web_search` when a backend is configured, and
        `web_fetch`."""
        tools: list[ToolDefinition] = []
        if self.search_configured:
            most = self._settings.web_search_results
            tools.append(
                ToolDefinition(
                    name=WEB_SEARCH,
                    description=(
                        "Search the web. Returns the top results, each with a title, a URL and a "
                        "short snippet. Use it for recent events and for facts you are not sure "
                        "of; snippets are short, so read the pages that matter with web_fetch. "
                        "Cite the URLs you rely on."
                    ),
                    input_schema={
                        "type": "object",
                        "properties": {
                            "query": {
                                "type": "string",
                                "description": (
                                    "What to search for, as you would type it into a search "
                                    f"engine (at most {MAX_QUERY_CHARS} characters)."
                                ),
                            },
                            "count": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": most,
                                "description": f"How many results to return (default {most}).",
                            },
                        },
                        "required": ["query"],
                    },
                )
            )
        tools.append(
            ToolDefinition(
                name=WEB_FETCH,
                description=(
                    "Read a web page or online document at an http(s) URL: HTML pages come back "
                    "as their main text in Markdown (menus and footers left out), PDFs as their "
                    "text, plain text and Markdown as they are. Returns the final URL after "
                    "redirects, the title, the content type and the text; `truncated` is true "
                    "when the text was cut to fit. Use it on search results or links the user "
                    "gives. Cite the URL you read."
                ),
                input_schema={
                    "type": "object",
                    "properties": {
                        "url": {
                            "type": "string",
                            "description": "The absolute http:// or https:// URL to read.",
                        }
                    },
                    "required": ["url"],
                },
            )
        )
        return tools

    async def run(
        self, name: str, tool_input: dict[str, Any], status: StatusReporter
    ) -> ToolOutcome:
        """Run one call of `name`; raises ToolFailed."""
        if name == WEB_SEARCH:
            return await self._search(tool_input, status)
        if name == WEB_FETCH:
            return await self._fetch(tool_input, status)
        raise ToolFailed(f"{name!r} is not a web tool")

    async def aclose(self) -> None:
        if self._owned_fetch:
            await self._fetch_client.aclose()
        if self._owned_search:
            await self._search_client.aclose()

    # --- web_search -------------------------------------------------------------------------

    async def _search(self, tool_input: dict[str, Any], status: StatusReporter) -> ToolOutcome:
        query = tool_input.get("query")
        if not isinstance(query, str) or not query.strip():
            raise ToolFailed("`query` must be a non-empty string")
        query = query.strip()
        if len(query) > MAX_QUERY_CHARS:
            raise ToolFailed(f"`query` must be at most {MAX_QUERY_CHARS} characters")
        count = _count(tool_input.get("count"), self._settings.web_search_results)
        if not self.search_configured:
            raise ToolFailed("web search is not configured on this server")
        await status(f"searching the web for “{query}”")
        results = (await self._ask_backend(query, count))[:count]
        return ToolOutcome(
            output={
                "query": query,
                "results": [
                    {"title": r.title, "url": r.url, "snippet": r.snippet} for r in results
                ],
            },
            sources=[SourceLink(r.url, r.title) for r in results],
        )

    async def _ask_backend(self, query: str, count: int) -> list[_SearchResult]:
        s = self._settings
        # The first configured backend answers; another is never asked behind its back, so a
        # failing one is reported (and retried) rather than silently replaced.
        if s.searxng_url:
            body = await self._backend_json(
                "SearXNG",
                "GET",
                s.searxng_url.rstrip("/") + "/search",
                params={"q": query, "format": "json"},
            )
            return _results("SearXNG", body, ("results",), snippet_key="content")
        if s.brave_api_key is not None:
            body = await self._backend_json(
                "Brave",
                "GET",
                s.brave_search_url,
                params={"q": query, "count": count},
                headers={"X-Subscription-Token": s.brave_api_key.get_secret_value()},
            )
            # Brave leaves `web` out altogether when nothing was found.
            return _results("Brave", body, ("web", "results"), snippet_key="description")
        assert s.tavily_api_key is not None  # search_configured was checked
        body = await self._backend_json(
            "Tavily",
            "POST",
            s.tavily_search_url,
            json={"query": query, "max_results": count, "search_depth": "basic"},
            headers={"Authorization": f"Bearer {s.tavily_api_key.get_secret_value()}"},
        )
        return _results("Tavily", body, ("results",), snippet_key="content")

    async def _backend_json(self, backend: str, method: str, url: str, **kwargs: Any) -> Any:
        """A backend's JSON answer. Messages name the backend and the status only: never the URL,
        a header or the body, where a key could show."""
        timeout = self._settings.web_search_timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                response = await self._search_client.request(method, url, **kwargs)
        except (TimeoutError, httpx.TimeoutException):
            raise ToolFailed(
                f"{backend} search did not answer within {timeout:g} seconds", retryable=True
            ) from None
        except httpx.TransportError as exc:
            raise ToolFailed(
                f"{backend} search could not be reached ({type(exc).__name__})", retryable=True
            ) from None
        except httpx.HTTPError as exc:
            raise ToolFailed(
                f"{backend} search could not be asked ({type(exc).__name__})"
            ) from None
        code = response.status_code
        if code == 429:
            raise ToolFailed(f"{backend} search is rate limited (HTTP 429)", retryable=True)
        if code >= 500:
            raise ToolFailed(f"{backend} search is unavailable (HTTP {code})", retryable=True)
        if code in (401, 403) and backend != "SearXNG":
            raise ToolFailed(
                f"{backend} search refused the request (HTTP {code}); check its API key"
            )
        if code == 403:
            raise ToolFailed(
                "SearXNG refused the request (HTTP 403); its JSON format may not be enabled "
                "(search.formats in its settings.yml)"
            )
        if code != 200:
            raise ToolFailed(f"{backend} search refused the request (HTTP {code})")
        try:
            return response.json()
        except ValueError:
            raise ToolFailed(f"{backend} search answered with something other than JSON") from None

    # --- web_fetch --------------------------------------------------------------------------

    async def _fetch(self, tool_input: dict[str, Any], status: StatusReporter) -> ToolOutcome:
        url, host = _valid_url(tool_input.get("url"))
        await status(f"reading {host}")
        timeout = self._settings.web_fetch_timeout_seconds
        try:
            # The whole download (names resolved, every redirect hop, every byte) within the cap;
            # turning the bytes into text afterwards is bounded by the byte cap instead.
            async with asyncio.timeout(timeout):
                download = await self._download(url)
        except OutboundRefused as exc:
            raise ToolFailed(str(exc)) from None
        except (TimeoutError, httpx.TimeoutException):
            raise ToolFailed(
                f"{_shown(url)} did not arrive within {timeout:g} seconds", retryable=True
            ) from None
        except httpx.TransportError as exc:
            raise ToolFailed(f"{_shown(url)} could not be reached: {exc}", retryable=True) from None
        except httpx.HTTPError as exc:
            raise ToolFailed(f"{_shown(url)} could not be read: {exc}") from None
        # Parsing HTML or a PDF is CPU work; it must not hold the worker's event loop.
        page = await asyncio.to_thread(_readable, download, self._settings.web_fetch_max_chars)
        return ToolOutcome(
            output={
                "url": download.url,
                "title": page.title,
                "contentType": page.content_type,
                "text": page.text,
                "truncated": page.truncated,
            },
            sources=[SourceLink(download.url, page.title)],
        )

    async def _download(self, url: str) -> _Download:
        max_bytes = self._settings.web_fetch_max_bytes
        async with self._fetch_client.stream("GET", url, headers={"Accept": _ACCEPT}) as response:
            final = str(response.url)
            code = response.status_code
            if code == 429 or code >= 500:
                raise ToolFailed(
                    f"{_shown(final)} answered HTTP {code}; try again later", retryable=True
                )
            if code >= 400:
                raise ToolFailed(f"{_shown(final)} answered HTTP {code}")
            if not 200 <= code < 300:
                raise ToolFailed(f"{_shown(final)} answered HTTP {code}, which has no page to read")
            declared, charset = _content_type(response.headers.get("content-type", ""))
            length = response.headers.get("content-length", "")
            if declared == _PDF and length.isdigit() and int(length) > max_bytes:
                # Said up front: no need to download what would be refused anyway.
                raise ToolFailed(_pdf_too_large(max_bytes))
            chunks: list[bytes] = []
            size = 0
            # One byte past the cap tells a body that was cut from one that just fits.
            async for chunk in response.aiter_bytes():
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    break
        body = b"".join(chunks)
        return _Download(
            url=final,
            declared=declared,
            charset=charset,
            body=body[:max_bytes],
            cut=len(body) > max_bytes,
        )


@dataclass(frozen=True)
class _SearchResult:
    title: str
    url: str
    snippet: str


@dataclass(frozen=True)
class _Download:
    url: str  # after redirects
    declared: str  # the Content-Type's media type, lower-cased; "" when absent
    charset: str | None
    body: bytes
    cut: bool  # the body went on past web_fetch_max_bytes


@dataclass(frozen=True)
class _Page:
    title: str | None
    content_type: str
    text: str
    truncated: bool


def _count(value: object, most: int) -> int:
    """The result count asked for, within 1..most; a number out of range is brought into it (a
    model asking for 50 results wants many, not an error)."""
    if value is None:
        return most
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ToolFailed(f"`count` must be an integer from 1 to {most}")
    return max(1, min(value, most))


def _results(
    backend: str, body: object, path: tuple[str, ...], *, snippet_key: str
) -> list[_SearchResult]:
    """The results at `path` in a backend's answer; a missing list is no results."""
    items: object = body
    for key in path:
        if not isinstance(items, dict):
            raise ToolFailed(f"{backend} search answered with something other than results")
        if key not in items:
            return []
        items = items[key]
    if not isinstance(items, list):
        raise ToolFailed(f"{backend} search answered with something other than results")
    results: list[_SearchResult] = []
    for item in items:
        if not isinstance(item, dict):
            continue
        url = item.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            continue
        title, snippet = item.get("title"), item.get(snippet_key)
        results.append(
            _SearchResult(
                title=_plain(title) if isinstance(title, str) and title.strip() else url,
                url=url,
                snippet=_plain(snippet) if isinstance(snippet, str) else "",
            )
        )
    return results


def _plain(text: str) -> str:
    # Brave marks the matched words with <strong>; entities show up in every backend's text.
    return " ".join(html.unescape(_TAG.sub("", text)).split())


def _valid_url(value: object) -> tuple[str, str]:
    """The URL to fetch and its host; the guard checks the destination itself."""
    if not isinstance(value, str) or not value.strip():
        raise ToolFailed("`url` must be a non-empty string")
    url = value.strip()
    if len(url) > MAX_URL_CHARS:
        raise ToolFailed(f"`url` must be at most {MAX_URL_CHARS} characters")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise ToolFailed(f"{_shown(url)} is not a valid URL") from None
    if parsed.scheme not in ("http", "https"):
        raise ToolFailed("`url` must be an absolute http:// or https:// URL")
    if not parsed.host:
        raise ToolFailed(f"{_shown(url)} names no host")
    return url, parsed.host


def _shown(url: str) -> str:
    return url if len(url) <= 200 else url[:200] + "…"


def _content_type(header: str) -> tuple[str, str | None]:
    media_type, _, params = header.partition(";")
    charset = None
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip():
            charset = value.strip().strip("\"'")
    return media_type.strip().lower(), charset


def _pdf_too_large(max_bytes: int) -> str:
    return (
        f"the PDF is larger than {max_bytes:,} bytes, the most web_fetch reads; a PDF cut short "
        "cannot be read"
    )


def _sniffed(declared: str, body: bytes) -> str:
    """The type of the body: its bytes where they say (a PDF, an image, an archive), else the
    declared type, else a look at the bytes for HTML or text."""
    head = body[:_SNIFF_BYTES]
    if head.lstrip()[:5] == b"%PDF-":
        return _PDF
    textual = _TEXT_TYPES_ALIASES.get(declared, declared)
    if textual not in _HTML_TYPES and textual not in _TEXT_TYPES:
        textual = ""
    # Text is believed when it looks like text: filetype's signatures are short and could match
    # the first letters of a text file ("ID3", "BM"); a binary body under a text type is not.
    if textual and _looks_like_text(head):
        return textual
    guessed = filetype.guess(head) if head else None
    if guessed is not None:
        return str(guessed.mime)
    if textual:
        return textual  # text in another charset than UTF-8
    # A server that calls a web page a PDF (a login or error page) is not believed either.
    if declared in _UNDECLARED or declared == _PDF:
        start = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
        if start.startswith((b"<!doctype html", b"<html")) or b"<html" in start[:1_024]:
            return "text/html"
        if _looks_like_text(head):
            return "text/plain"
        return declared or "application/octet-stream"
    return declared


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # The sniffed head may end inside a character; anything earlier is not UTF-8 text.
        return exc.start >= len(head) - 3
    return True


def _decoded(body: bytes, charset: str | None, *, html_page: bool) -> str:
    """The body as text: a byte-order mark, else the declared charset, else a `<meta charset>`,
    else UTF-8. Undecodable bytes (a cut character at a byte cap) become U+FFFD."""
    if body.startswith(codecs.BOM_UTF8):
        return body[3:].decode("utf-8", errors="replace")
    if body.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return body.decode("utf-16", errors="replace")
    candidates = [charset]
    if html_page:
        meta = _META_CHARSET.search(body[:_SNIFF_BYTES])
        candidates.append(meta.group(1).decode("ascii") if meta else None)
    for name in candidates:
        if name:
            try:
                return body.decode(codecs.lookup(name).name, errors="replace")
            except LookupError:
                continue
    return body.decode("utf-8", errors="replace")


def _readable(download: _Download, max_chars: int) -> _Page:
    """The text of a downloaded body, cut to `max_chars`; raises ToolFailed for a type web_fetch
    does not read."""
    content_type = _sniffed(download.declared, download.body)
    truncated = download.cut
    if content_type == _PDF:
        if download.cut:
            raise ToolFailed(_pdf_too_large(len(download.body)))
        try:
            extracted = pdf_text(download.body, max_chars=max_chars)
        except DocumentRefused as exc:
            raise ToolFailed(str(exc)) from None
        text = extracted.text or (
            f"[This PDF has no text layer: its {extracted.pages} pages are probably scanned "
            "images.]"
        )
        return _Page(_file_name(download.url), _PDF, *_cut(text, max_chars, extracted.truncated))
    if content_type in _HTML_TYPES:
        page = _decoded(download.body, download.charset, html_page=True)
        title, text = _html_text(page, download.url)
        return _Page(title, content_type, *_cut(text, max_chars, truncated))
    if content_type in _TEXT_TYPES:
        text = _decoded(download.body, download.charset, html_page=False)
        title = _markdown_title(text) if content_type == "text/markdown" else None
        return _Page(
            title or _file_name(download.url), content_type, *_cut(text, max_chars, truncated)
        )
    raise ToolFailed(
        f"{_shown(download.url)} is {content_type}, which web_fetch does not read (it reads HTML, PDF, "
        "plain text and Markdown)"
    )


def _cut(text: str, max_chars: int, truncated: bool) -> tuple[str, bool]:
    if len(text) > max_chars:
        return text[:max_chars], True
    return text, truncated


def _html_text(page: str, url: str) -> tuple[str | None, str]:
    """A page's title and main text as Markdown; when trafilatura finds no main text, all the
    visible text, so a page that is all sidebar still says something."""
    heading = _PageScan()
    heading.feed(page[:_TITLE_SCAN_CHARS])
    text = trafilatura.extract(
        page,
        url=url,
        output_format="markdown",
        include_links=True,
        include_tables=True,
        include_comments=False,
    )
    if not text or not text.strip():
        scan = _PageScan()
        scan.feed(page)
        scan.close()
        text = scan.text or "[No readable text was found on this page.]"
    return heading.title, text.strip()


class _PageScan(HTMLParser):
    """The title of a page (<title>, else og:title) and its visible text (no script, style or
    other non-text elements), for when trafilatura finds no main text."""

    _HIDDEN: Final = frozenset({"script", "style", "noscript", "template", "svg", "head"})
    _BLOCKS: Final = frozenset(
        {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article"}
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._title: list[str] = []
        self._og_title: str | None = None
        self._in_title = False
        self._hidden = 0
        self._pieces: list[str] = []

    @property
    def title(self) -> str | None:
        title = " ".join("".join(self._title).split()) or self._og_title
        return title[:300] if title else None

    @property
    def text(self) -> str:
        lines = (" ".join(line.split()) for line in "".join(self._pieces).split("\n"))
        return "\n".join(line for line in lines if line)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
        elif tag == "meta" and self._og_title is None:
            values = dict(attrs)
            if values.get("property") == "og:title" and values.get("content"):
                self._og_title = " ".join((values["content"] or "").split()) or None
        if tag == "body":
            self._hidden = 0  # a <head> nobody closed ends here, as it does in a browser
        elif tag in self._HIDDEN:
            self._hidden += 1
        if tag in self._BLOCKS:
            self._pieces.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        if tag in self._HIDDEN and self._hidden:
            self._hidden -= 1
        if tag in self._BLOCKS:
            self._pieces.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self._title.append(data)
        elif not self._hidden:
            self._pieces.append(data)


def _markdown_title(text: str) -> str | None:
    for line in text[:_SNIFF_BYTES].splitlines():
        if line.startswith("# "):
            return line[2:].strip()[:300] or None
    return None


def _file_name(url: str) -> str | None:
    """The last path segment of a URL (`report.pdf`), the best title a PDF or text file has."""
    name = httpx.URL(url).path.rstrip("/").rsplit("/", 1)[-1]
    return name or None
