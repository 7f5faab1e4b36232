"""Where a scanner connects for a job: every connection checked, at the address it goes to.

The job policy's names were checked before the job started (scanner_client.job_policy); this is
the second layer, for what only the moment of connecting shows. Each HTTP connection a job
makes (a registry, its redirects to blob storage, its token realm, an artifact download) goes
through :class:`GuardedBackend`, httpcore's network backend wrapped:

1. the host is resolved once, here;
2. *every* address it resolves to is checked (loopback, link-local, private, ... are refused
   unless ``--allowed-networks`` holds them; the handler's own endpoints always are), so a name
   that resolves to an internal address, or to a public one and an internal one, is refused;
3. the connection is made to the checked address itself, never by name, so a second
   resolution (DNS rebinding) cannot send it elsewhere. TLS still verifies the certificate
   against the name.

Through a proxy the scanner cannot pin the far end (the proxy resolves it): the target's name
is checked, and its addresses when this machine can resolve it. The scanner's own
``--proxy-url`` is the operator's and trusted; a proxy a job names is a connection target like
any other.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import httpcore
import httpx

from imagehandler.jobpolicy import EgressPolicy, Refused
from imagehandler.jobpolicy.addresses import IPAddress, literal_address
from imagehandler.jobpolicy.patterns import split_host

Resolver = Callable[[str, int], Awaitable[list[str]]]
# How long a name may take to resolve when the caller gives no connect timeout.
RESOLVE_TIMEOUT = 15.0


async def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (the system resolver, as a connection would use)."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    found: list[str] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in found:
            found.append(address)
    return found


class EgressGuard:
    """Resolves and checks the addresses a job's connections go to."""

    def __init__(
        self, policy: EgressPolicy, handler: str = "", resolver: Resolver | None = None
    ) -> None:
        self.policy = policy
        # The handler (--handler HOST:PORT): refused as a target, by name and by its addresses.
        self._handler = handler
        self._handler_done = not handler
        self._resolve = resolver or resolve

    async def _with_handler(self) -> EgressPolicy:
        if self._handler_done:
            return self.policy
        try:
            host, port = _host_port(self._handler)
        except ValueError:  # a gRPC target such as unix:/path or dns:///name: no TCP endpoint
            self._handler_done = True
            return self.policy
        endpoints: list[tuple[str, int]] = [(host, port)]
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT):
                endpoints += [(address, port) for address in await self._resolve(host, port)]
        except (OSError, TimeoutError):
            return self.policy.with_own_endpoints(endpoints)  # resolved again next time
        self.policy = self.policy.with_own_endpoints(endpoints)
        self._handler_done = True
        return self.policy

    async def addresses(
        self, host: str, port: int, what: str, within: float | None = None
    ) -> list[str]:
        """The addresses to connect to for ``host``, each checked; Refused when any is not
        allowed. OSError when the name does not resolve (within ``within`` seconds)."""
        policy = await self._with_handler()
        name = host.strip("[]")
        policy.check_host(name, port, what)
        literal = literal_address(name)
        if literal is not None:
            return [str(literal)]
        async with asyncio.timeout(within or RESOLVE_TIMEOUT):
            found = await self._resolve(name, port)
        if not found:
            raise OSError(f"{name} resolves to no address")
        for address in found:
            policy.check_address(_ip(address), port, f"{what} ({name} resolves to {address})")
        return found

    async def check_via_proxy(self, host: str, port: int, what: str) -> None:
        """A target reached through a proxy: its name, and its addresses where this machine
        resolves it (a name only the proxy can resolve is left to the proxy)."""
        try:
            await self.addresses(host, port, what)
        except (OSError, TimeoutError):
            return


def _ip(address: str) -> IPAddress:
    found = literal_address(address.split("%", 1)[0])  # fe80::1%eth0: the scope is not ours
    if found is None:
        raise OSError(f"the resolver returned {address!r}, which is not an address")
    return found


def _host_port(address: str) -> tuple[str, int]:
    """``host:port`` of the handler; ValueError for a gRPC target of another form."""
    if ":/" in address or address.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        raise ValueError(f"{address!r} is not HOST:PORT")
    host, port = split_host(address)
    return host.strip("[]"), int(port) if port.isdigit() else 0


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, connecting only to checked addresses (see the module)."""

    def __init__(
        self,
        guard: EgressGuard,
        trusted: tuple[str, int] | None = None,
        inner: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self.guard = guard
        self.trusted = trusted
        self.inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109  (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if self.trusted is not None and (host.lower(), port) == self.trusted:
            return await self.inner.connect_tcp(host, port, timeout, local_address, socket_options)
        try:
            addresses = await self.guard.addresses(
                host, port, f"a connection to {host}:{port}", timeout
            )
        except (OSError, TimeoutError) as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from None
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self.inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109  (httpcore's interface)
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise Refused("url", f"a job's connection may not use the Unix socket {path!r}")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over :class:`GuardedBackend`. ``proxy``: the proxy this client goes
    through ("" none); ``trusted_proxy``: the scanner's own (not checked as a target)."""

    def __init__(
        self,
        guard: EgressGuard,
        *,
        proxy: str = "",
        trusted_proxy: str = "",
        verify: bool | str | ssl.SSLContext = True,
    ) -> None:
        super().__init__(verify=verify, proxy=proxy or None, trust_env=False)
        trusted = None
        if proxy and proxy == trusted_proxy:
            url = httpx.URL(proxy)
            trusted = (url.host.lower(), url.port or (443 if url.scheme == "https" else 80))
        pool = self._pool
        # httpcore takes a network backend when it makes its pool; httpx does not pass one
        # through, so it is set on the pool it made (checked, so that a change in httpcore fails
        # loudly here rather than connecting unchecked).
        if not hasattr(pool, "_network_backend"):
            raise RuntimeError("httpcore's pool has no _network_backend: the egress guard needs it")
        pool._network_backend = GuardedBackend(guard, trusted)
        self.guard = guard
        self.proxied = bool(proxy)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.proxied:
            url = request.url
            port = url.port or (443 if url.scheme == "https" else 80)
            await self.guard.check_via_proxy(url.host, port, f"{url.host}:{port} via the proxy")
        return await super().handle_async_request(request)


def guarded_client(
    guard: EgressGuard,
    *,
    proxy: str = "",
    trusted_proxy: str = "",
    verify: bool | str | ssl.SSLContext = True,
    timeout: httpx.Timeout | float = 60.0,
) -> httpx.AsyncClient:
    """An httpx client whose every connection, redirects included, the guard checks."""
    return httpx.AsyncClient(
        transport=GuardedTransport(guard, proxy=proxy, trusted_proxy=trusted_proxy, verify=verify),
        timeout=timeout,
        follow_redirects=True,
        trust_env=False,
    )


__all__ = ["EgressGuard", "GuardedBackend", "GuardedTransport", "guarded_client", "resolve"]
