"""The outbound guard against real local HTTP servers: private destinations are refused before any
connection, on the first URL and on every redirect hop; allowed hosts and networks pass."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from outbound.guard import GuardedHttpClient, OutboundPolicy, OutboundRefused
from tests.support.file_server import FileServer


@pytest.fixture(scope="module")
def loopback_server() -> Iterator[FileServer]:
    with FileServer("127.0.0.2") as server:
        server.serve("/hello.txt", b"hello", "text/plain")
        yield server


async def fetch(policy: OutboundPolicy, url: str, *, max_redirects: int = 5) -> bytes:
    async with (
        GuardedHttpClient(policy, timeout_seconds=5, max_redirects=max_redirects) as http,
        http.stream("GET", url) as response,
    ):
        return await response.aread()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "https://127.0.0.1/",
        "http://[::1]/",
        "http://2130706433/",  # 127.0.0.1 in decimal
        "http://0x7f.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "http://100.64.0.1/",
        "http://[::ffff:127.0.0.1]/",
        "http://localhost/",
        "http://metadata.google.internal/",
        "http://user:secret@example.com/",
        "ftp://example.com/file",
    ],
)
async def test_private_and_odd_destinations_are_refused(url: str) -> None:
    with pytest.raises(OutboundRefused):
        await fetch(OutboundPolicy.parse(""), url)


async def test_an_allowed_host_passes_and_its_body_streams(loopback_server: FileServer) -> None:
    assert (
        await fetch(OutboundPolicy.parse("127.0.0.2"), loopback_server.base_url + "/hello.txt")
        == b"hello"
    )
    assert (
        await fetch(OutboundPolicy.parse("127.0.0.0/30"), loopback_server.base_url + "/hello.txt")
        == b"hello"
    )


@pytest.mark.parametrize(
    "location",
    ["http://127.0.0.1:{port}/hello.txt", "http://169.254.169.254/", "http://[::1]:{port}/"],
)
async def test_a_redirect_to_a_private_address_is_refused_on_the_hop(
    loopback_server: FileServer, location: str
) -> None:
    hop = loopback_server.redirect(
        f"/hop-{abs(hash(location))}", location.format(port=loopback_server.port)
    )
    with pytest.raises(OutboundRefused, match="not allowed"):
        await fetch(OutboundPolicy.parse("127.0.0.2"), hop)


async def test_a_redirect_within_the_allowed_hosts_is_followed_up_to_the_cap(
    loopback_server: FileServer,
) -> None:
    policy = OutboundPolicy.parse("127.0.0.2")
    first = loopback_server.redirect("/one", loopback_server.base_url + "/two")
    loopback_server.redirect("/two", loopback_server.base_url + "/hello.txt")
    assert await fetch(policy, first) == b"hello"
    with pytest.raises(OutboundRefused, match="redirected more than 1 times"):
        await fetch(policy, first, max_redirects=1)


def test_a_policy_refuses_garbage_entries() -> None:
    with pytest.raises(ValueError, match="neither a host name"):
        OutboundPolicy.parse("example.com, http://x/")
