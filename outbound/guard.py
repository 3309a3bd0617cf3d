"""The one guarded way out to URLs users or models name (attachment URLs, web fetches, webhooks, MCP
servers). Must never import fastapi, temporalio, sqlalchemy, redis or aiobotocore.

Every request, and every redirect hop, is checked before anything is sent: http(s) only, no
credentials in the URL, and every address the host resolves to must be globally reachable unless the
policy lets that host or network through (`DURACHAT_OUTBOUND_ALLOWED_HOSTS`). The connection itself
goes through httpx-secure, which validates the address it actually connects to, so a name that
resolves differently a moment later (DNS rebinding) is refused too. Redirects are followed here, hop
by hop, never by httpx; environment proxies are ignored; TLS is verified.

SDKs that take a bare client get one from here: `guarded_httpx_client` (httpx) or
`guarded_httpx2_client` (httpx2, which the MCP SDK speaks). Both connect only to addresses the same
policy admits, and neither follows redirects on its own.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import httpcore2
import httpx
import httpx2
from httpx_secure import SSRFProtectionError, httpx_ssrf_protection

from core.settings import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# Names of cloud metadata services, refused whatever they resolve to.
_METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data"})
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class OutboundRefused(Exception):
    """The URL, or an address it resolves or redirects to, is not allowed; safe to show."""


@dataclass(frozen=True)
class OutboundPolicy:
    """Which destinations the guard lets through."""

    # Host names, IPs or CIDRs let through although not globally reachable.
    allowed: tuple[str, ...] = ()
    schemes: frozenset[str] = frozenset({"https", "http"})
    _networks: tuple[IPNetwork, ...] = field(default=(), repr=False)
    _names: frozenset[str] = field(default=frozenset(), repr=False)

    @classmethod
    def parse(
        cls, allowed_hosts: str | Sequence[str], *, schemes: frozenset[str] | None = None
    ) -> OutboundPolicy:
        entries = (
            [item.strip() for item in allowed_hosts.split(",")]
            if isinstance(allowed_hosts, str)
            else [item.strip() for item in allowed_hosts]
        )
        networks: list[IPNetwork] = []
        names: set[str] = set()
        for entry in filter(None, entries):
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            name = entry.lower().rstrip(".")
            if not name or any(ch in name for ch in "/:@ ") or name.startswith("."):
                raise ValueError(f"{entry!r} is neither a host name, an IP nor a CIDR")
            names.add(name)
        return cls(
            allowed=tuple(filter(None, entries)),
            schemes=schemes or cls.schemes,
            _networks=tuple(networks),
            _names=frozenset(names),
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> OutboundPolicy:
        return cls.parse(settings.outbound_allowed_hosts)

    def host_allowed(self, host: str) -> bool:
        return host.lower().rstrip(".") in self._names

    def address_allowed(self, host: str, address: IPAddress) -> bool:
        """Whether connecting to `address` (which `host` resolved to) is allowed."""
        if self.host_allowed(host) or any(address in network for network in self._networks):
            return True
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is not None:
                return address.ipv4_mapped.is_global and not self._refused_v4(address.ipv4_mapped)
            if address in _NAT64:
                embedded = ipaddress.IPv4Address(address.packed[-4:])
                return embedded.is_global and not self._refused_v4(embedded)
        if isinstance(address, ipaddress.IPv4Address) and self._refused_v4(address):
            return False
        return address.is_global and not address.is_multicast

    @staticmethod
    def _refused_v4(address: ipaddress.IPv4Address) -> bool:
        # Shared address space (CGNAT, 100.64/10) is "not global" to ipaddress already; these are
        # here for clarity and for what `is_global` treats as global.
        return address.is_multicast or address.is_reserved or address.is_link_local


class GuardedHttpClient:
    """An httpx client whose every connection is checked against an OutboundPolicy."""

    def __init__(
        self,
        policy: OutboundPolicy,
        *,
        timeout_seconds: float = 30.0,
        max_redirects: int = 5,
        user_agent: str = "durachat",
    ) -> None:
        self._policy = policy
        self._max_redirects = max_redirects
        self._client = guarded_httpx_client(
            policy, timeout_seconds=timeout_seconds, headers={"User-Agent": user_agent}
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    @asynccontextmanager
    async def stream(self, method: str, url: str, **kwargs: Any) -> AsyncIterator[httpx.Response]:
        """An open response to `url`, after following at most `max_redirects` redirects (each hop
        checked like the first). Raises OutboundRefused for a destination the policy refuses;
        network errors are httpx's, statuses are the caller's to judge."""
        current = url
        for _hop in range(self._max_redirects + 1):
            target = await self._checked(current)
            try:
                request = self._client.build_request(method, target, **kwargs)
                response = await self._client.send(request, stream=True)
            except SSRFProtectionError as exc:
                raise OutboundRefused(f"{_shown(current)} is not allowed: {exc}") from None
            try:
                location = response.headers.get("location")
                if response.status_code in _REDIRECTS and location:
                    current = str(response.url.join(location))
                    if response.status_code == 303:
                        method = "GET"
                    continue
                yield response
                return
            finally:
                await response.aclose()
        raise OutboundRefused(f"{_shown(url)} redirected more than {self._max_redirects} times")

    async def _checked(self, url: str) -> httpx.URL:
        return await check_outbound_url(self._policy, url)


async def check_outbound_url(policy: OutboundPolicy, url: str) -> httpx.URL:
    """`url` parsed, once it passed every check made before a request: scheme, credentials, host,
    metadata names, and every address the host resolves to. Raises OutboundRefused with the reason
    (safe to show), or httpx.ConnectError when the host does not resolve."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise OutboundRefused(f"{_shown(url)} is not a valid URL") from exc
    if parsed.scheme not in policy.schemes:
        raise OutboundRefused(
            f"{_shown(url)}: only {', '.join(sorted(policy.schemes))} URLs are fetched"
        )
    if parsed.userinfo:
        raise OutboundRefused(f"{_shown(url)}: URLs with credentials are not fetched")
    host = parsed.host
    if not host:
        raise OutboundRefused(f"{_shown(url)} names no host")
    if _is_metadata_host(policy, host):
        raise OutboundRefused(f"{_shown(url)} names a cloud metadata service")
    # Resolved here too, before any connection: the client's own check would otherwise open a
    # (data-less) probe connection to a refused address while it picks one.
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    for address in await _resolve(host, port):
        if not policy.address_allowed(host, address):
            raise OutboundRefused(
                f"{_shown(url)} resolves to {address}, {_kind(address)}, which is not allowed"
            )
    return parsed


def guarded_httpx_client(
    policy: OutboundPolicy,
    *,
    timeout_seconds: float = 30.0,
    headers: dict[str, str] | None = None,
) -> httpx.AsyncClient:
    """A bare httpx client connecting only to addresses `policy` admits (httpx-secure validates
    the address each connection uses). It follows no redirects and ignores environment proxies;
    callers check URLs first with `check_outbound_url` so a refused address is never probed."""
    client = httpx.AsyncClient(
        follow_redirects=False,
        trust_env=False,
        verify=True,
        timeout=httpx.Timeout(timeout_seconds),
        headers=headers,
    )
    return httpx_ssrf_protection(
        client,
        check_globally_reachable=False,
        custom_validator=lambda host, address, _port: policy.address_allowed(host, address),
    )


def guarded_httpx2_client(
    policy: OutboundPolicy,
    *,
    timeout_seconds: float = 30.0,
    headers: dict[str, str] | None = None,
    event_hooks: dict[str, list[Any]] | None = None,
) -> httpx2.AsyncClient:
    """`guarded_httpx_client` for SDKs built on httpx2 (the MCP SDK), which httpx-secure does not
    reach: every connection resolves its host, refuses it unless `policy` admits every address it
    resolves to, and connects to one of those very addresses (so DNS rebinding fails too).

    Redirects are not followed by the client; an SDK that follows them itself (the MCP SDK does,
    within the endpoint's origin) opens each hop's connection through the same check. A refused
    destination raises OutboundRefused from the request (httpx2 passes it through unmapped)."""
    return httpx2.AsyncClient(
        follow_redirects=False,
        trust_env=False,
        timeout=httpx2.Timeout(timeout_seconds),
        headers=headers,
        event_hooks=event_hooks,
        transport=_GuardedHttpx2Transport(policy),
    )


class _GuardedHttpx2Transport(httpx2.AsyncHTTPTransport):
    """httpx2's own transport over a connection pool whose network backend is guarded."""

    def __init__(self, policy: OutboundPolicy) -> None:
        super().__init__(verify=True, trust_env=False)
        # httpx2 takes no network backend, so the pool it built is replaced by one that has ours:
        # same TLS context (verification on, no SSLKEYLOGFILE and the like from the environment).
        self._pool = httpcore2.AsyncConnectionPool(
            ssl_context=httpx2.create_ssl_context(verify=True, trust_env=False),
            max_connections=20,
            max_keepalive_connections=10,
            keepalive_expiry=5.0,
            network_backend=_GuardedNetworkBackend(policy),
        )


class _GuardedNetworkBackend(httpcore2.AsyncNetworkBackend):
    """Opens TCP connections only to addresses the policy admits, by address rather than by name."""

    def __init__(self, policy: OutboundPolicy) -> None:
        self._policy = policy
        self._backend = httpcore2.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore2's interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore2.SOCKET_OPTION] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        if _is_metadata_host(self._policy, host):
            raise OutboundRefused(f"{host} names a cloud metadata service")
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            async with asyncio.timeout(timeout):
                addresses = await _addresses(host, port)
        except TimeoutError:
            raise httpcore2.ConnectTimeout(f"resolving {host} timed out") from None
        except _Unresolvable as exc:
            raise httpcore2.ConnectError(str(exc)) from None
        for address in addresses:
            if not self._policy.address_allowed(host, address):
                raise OutboundRefused(
                    f"{host} resolves to {address}, {_kind(address)}, which is not allowed"
                )
        failure: Exception | None = None
        for address in addresses:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                return await self._backend.connect_tcp(
                    str(address),
                    port,
                    timeout=remaining,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore2.ConnectError, httpcore2.ConnectTimeout) as exc:
                failure = exc
        raise failure or httpcore2.ConnectError(f"{host} resolves to no address")

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore2's interface
        socket_options: Iterable[httpcore2.SOCKET_OPTION] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        raise OutboundRefused("Unix sockets are not a way out")

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


def _is_metadata_host(policy: OutboundPolicy, host: str) -> bool:
    return host.lower().rstrip(".") in _METADATA_HOSTS and not policy.host_allowed(host)


class _Unresolvable(OSError):
    pass


async def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        return await _addresses(host, port)
    except _Unresolvable as exc:
        raise httpx.ConnectError(str(exc)) from None


async def _addresses(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to, in the resolver's order (an IP names only itself)."""
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        # UnicodeError: a name the resolver cannot even encode (a label over 63 characters).
        raise _Unresolvable(f"{host} does not resolve: {exc}") from None
    addresses: list[IPAddress] = []
    for info in infos:
        # The scope of a link-local IPv6 address (`fe80::1%eth0`) is no part of the address.
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def _kind(address: IPAddress) -> str:
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address (cloud metadata lives there)"
    if address.is_private:
        return "a private address"
    if address.is_multicast:
        return "a multicast address"
    return "an address that is not globally reachable"


def _shown(url: str) -> str:
    return url if len(url) <= 200 else url[:200] + "…"
