"""The one guarded HTTP client for URLs users or models name (attachment URLs today; web fetches,
webhooks and MCP servers later). Must never import fastapi, temporalio, sqlalchemy, redis or
aiobotocore.

Every request, and every redirect hop, is checked before anything is sent: http(s) only, no
credentials in the URL, and every address the host resolves to must be globally reachable unless the
policy lets that host or network through (`DURACHAT_OUTBOUND_ALLOWED_HOSTS`). The connection itself
goes through httpx-secure, which validates the address it actually connects to, so a name that
resolves differently a moment later (DNS rebinding) is refused too. Redirects are followed here, hop
by hop, never by httpx; environment proxies are ignored; TLS is verified.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import httpx
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
        client = httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,
            verify=True,
            timeout=httpx.Timeout(timeout_seconds),
            headers={"User-Agent": user_agent},
        )
        self._client = httpx_ssrf_protection(
            client,
            check_globally_reachable=False,
            custom_validator=lambda host, address, _port: policy.address_allowed(host, address),
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
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise OutboundRefused(f"{_shown(url)} is not a valid URL") from exc
        if parsed.scheme not in self._policy.schemes:
            raise OutboundRefused(
                f"{_shown(url)}: only {', '.join(sorted(self._policy.schemes))} URLs are fetched"
            )
        if parsed.userinfo:
            raise OutboundRefused(f"{_shown(url)}: URLs with credentials are not fetched")
        host = parsed.host
        if not host:
            raise OutboundRefused(f"{_shown(url)} names no host")
        if host.lower().rstrip(".") in _METADATA_HOSTS and not self._policy.host_allowed(host):
            raise OutboundRefused(f"{_shown(url)} names a cloud metadata service")
        # Resolved here too, before any connection: the client's own check would otherwise open a
        # (data-less) probe connection to a refused address while it picks one.
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        for address in await _resolve(host, port):
            if not self._policy.address_allowed(host, address):
                raise OutboundRefused(
                    f"{_shown(url)} resolves to {address}, {_kind(address)}, which is not allowed"
                )
        return parsed


async def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise httpx.ConnectError(f"{host} does not resolve: {exc}") from None
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
