"""The egress policy: which registries, artifact URLs and addresses a job may make a scanner
connect to.

Two layers, both always on:

- **Names** (what a submitter may name): a job's registry must match ``--allowed-registries``
  (default ``*``: any registry on its default port), an artifact URL must match
  ``--allowed-artifact-urls`` (default: none), an ``oci://`` artifact's registry the allowed
  registries. A registry's token realm must be on the registry's own host or on an allowed
  registry.
- **Addresses** (where a connection really goes): loopback, link-local, private and the other
  non-global classes (:mod:`.addresses`) are refused unless ``--allowed-networks`` holds them,
  and the handler's own endpoints are refused always. The handler applies this to addresses
  written into a job (``http://127.1/``); a scanner applies it to every address a name resolves
  to, before every connection (redirects and token realms included), and connects to the
  address it checked.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from imagehandler.jobpolicy.addresses import (
    IPAddress,
    IPNetwork,
    address_class,
    literal_address,
    parse_networks,
)
from imagehandler.jobpolicy.patterns import (
    HostPattern,
    ParsedUrl,
    UrlPattern,
    any_host,
    parse_hosts,
    parse_url,
    parse_urls,
    split_host,
)
from imagehandler.jobpolicy.refusal import Refused

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
# Docker Hub's API and token service, which a job naming docker.io reaches.
DOCKER_HUB_HOSTS = frozenset({"docker.io", "registry-1.docker.io", "auth.docker.io"})
DEFAULT_REGISTRIES = ("*",)
# Schemes an artifact URL may have (the builtin engine fetches http(s) and oci).
ARTIFACT_SCHEMES = frozenset({"http", "https", "oci", "s3", "gs"})


def _words(values: str | Iterable[str]) -> tuple[str, ...]:
    items = values.split(",") if isinstance(values, str) else values
    return tuple(item.strip() for item in items if item.strip())


@dataclass(frozen=True)
class EgressPolicy:
    registries: tuple[HostPattern, ...] = field(
        default_factory=lambda: parse_hosts(DEFAULT_REGISTRIES, "--allowed-registries")
    )
    artifact_urls: tuple[UrlPattern, ...] = ()
    networks: tuple[IPNetwork, ...] = ()
    # The handler's own endpoints, as names (host, port) and as addresses (ip, port); port 0
    # stands for every port of that host.
    own_names: frozenset[tuple[str, int]] = frozenset()
    own_addresses: frozenset[tuple[IPAddress, int]] = frozenset()

    @classmethod
    def parse(
        cls,
        *,
        registries: str | Iterable[str] = DEFAULT_REGISTRIES,
        artifact_urls: str | Iterable[str] = (),
        networks: str | Iterable[str] = (),
    ) -> EgressPolicy:
        """The policy from its flags' values (comma-separated strings or lists); ValueError
        naming the flag of a value that does not parse."""
        return cls(
            registries=parse_hosts(_words(registries), "--allowed-registries"),
            artifact_urls=parse_urls(_words(artifact_urls), "--allowed-artifact-urls"),
            networks=parse_networks(_words(networks), "--allowed-networks"),
        )

    def with_own_endpoints(self, endpoints: Iterable[tuple[str, int]]) -> EgressPolicy:
        """This policy refusing ``endpoints`` (host or address, port) as the handler's own."""
        names = set(self.own_names)
        addresses = set(self.own_addresses)
        for host, port in endpoints:
            host = host.strip("[]").lower()
            address = literal_address(host)
            if address is None:
                names.add((host, port))
            elif address.is_unspecified:  # 0.0.0.0 / :: : the handler is on every address
                for local in ("127.0.0.1", "::1"):
                    addresses.add((ipaddress.ip_address(local), port))
                names.add(("localhost", port))
            else:
                addresses.add((address, port))
        return EgressPolicy(
            self.registries,
            self.artifact_urls,
            self.networks,
            frozenset(names),
            frozenset(addresses),
        )

    # ---- addresses -------------------------------------------------------------------------

    def allowed_network(self, address: IPAddress) -> bool:
        return any(address.version == net.version and address in net for net in self.networks)

    def check_address(self, address: IPAddress, port: int, what: str) -> None:
        """Refused unless ``address`` may be connected to for ``what`` (a phrase naming the
        job field or connection, for the message)."""
        if (address, port) in self.own_addresses or (address, 0) in self.own_addresses:
            raise Refused(
                "handler",
                f"{what} is the handler's own endpoint {_endpoint(address, port)}",
                "a job never makes a scanner call the handler",
            )
        found = address_class(address)
        if found is None or self.allowed_network(address):
            return
        raise Refused(
            found,
            f"{what} is {address}, a {found} address",
            f"an operator can allow its network with --allowed-networks (for example "
            f"{ipaddress.ip_network(address)})",
        )

    def check_host(self, host: str, port: int, what: str) -> None:
        """The checks that need no resolution: an address written as the host, ``localhost``
        (RFC 6761: always loopback), and the handler's own names."""
        name = host.strip("[]").lower().rstrip(".")
        if (name, port) in self.own_names or (name, 0) in self.own_names:
            raise Refused(
                "handler",
                f"{what} names the handler's own endpoint {name}:{port}",
                "a job never makes a scanner call the handler",
            )
        address = literal_address(name)
        if address is not None:
            self.check_address(address, port, what)
        elif name == "localhost" or name.endswith(".localhost"):
            self.check_address(ipaddress.IPv4Address("127.0.0.1"), port, f"{what} ({name})")

    # ---- names -----------------------------------------------------------------------------

    def check_registry(self, registry: str, field: str = "image.registry") -> None:
        """A job's registry (``host[:port]``, "" meaning docker.io)."""
        text = registry or DOCKER_HUB
        try:
            host, port = split_host(text)
        except ValueError as exc:
            raise Refused("allowed-registries", f"{field} {text!r}: {exc}") from None
        if not any_host(self.registries, host, port):
            raise Refused(
                "allowed-registries",
                f"{field} {text!r} is not an allowed registry",
                "an operator can allow it with --allowed-registries",
            )
        self.check_host(host, int(port) if port.isdigit() else 443, f"{field} {text!r}")

    def check_artifact_url(self, url: str, field: str = "artifact.url") -> ParsedUrl:
        parsed = parse_url(url, field)
        if parsed.scheme not in ARTIFACT_SCHEMES:
            raise Refused(
                "url",
                f"{field} {url[:200]!r} must be an http(s), oci, s3 or gs URL",
            )
        if parsed.scheme == "oci":
            self.check_registry(parsed.netloc, f"{field} (oci:// registry)")
            return parsed
        if not any(pattern.matches(parsed) for pattern in self.artifact_urls):
            raise Refused(
                "allowed-artifact-urls",
                f"{field} {url[:200]!r} is not under an allowed artifact URL prefix",
                "an operator can allow a prefix with --allowed-artifact-urls",
            )
        self.check_host(parsed.host, _port(parsed), f"{field} {url[:200]!r}")
        return parsed

    def check_proxy(self, url: str, field: str = "image.proxy_url") -> None:
        """A proxy a job names is a connection target like any other."""
        if not url:
            return
        try:
            host, port = split_host(url.partition("://")[2].rpartition("@")[2].split("/")[0])
        except ValueError:
            return  # the proxy URL's own check says what is wrong with it (HNDL-011)
        self.check_host(host, int(port) if port.isdigit() else 0, f"{field} {url[:200]!r}")

    def check_realm(self, realm: str, registry: str, api_host: str) -> ParsedUrl:
        """A token realm a registry names: on the registry's host (or the host its API is on),
        or on an allowed registry."""
        parsed = parse_url(realm, f"the token realm of {registry}")
        if parsed.scheme not in ("http", "https"):
            raise Refused("token-realm", f"the token realm {realm[:200]!r} is not http(s)")
        own = {_netloc(registry or DOCKER_HUB), _netloc(api_host)}
        if (registry or DOCKER_HUB) == DOCKER_HUB:
            own |= DOCKER_HUB_HOSTS
        if parsed.netloc not in own and not any_host(self.registries, parsed.host, parsed.port):
            raise Refused(
                "token-realm",
                f"registry {registry} names the token realm {realm[:200]!r}, which is neither "
                "on the registry's host nor an allowed registry",
                "an operator can allow the token service's host with --allowed-registries",
            )
        self.check_host(parsed.host, _port(parsed), f"the token realm {realm[:200]!r}")
        return parsed


def _netloc(text: str) -> str:
    host, port = split_host(text)
    return f"{host}:{port}" if port else host


def _port(parsed: ParsedUrl) -> int:
    if parsed.port.isdigit():
        return int(parsed.port)
    return {"http": 80, "https": 443}.get(parsed.scheme, 443)


def _endpoint(address: IPAddress, port: int) -> str:
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"{host}:{port}" if port else host


__all__ = [
    "DEFAULT_REGISTRIES",
    "DOCKER_HUB",
    "DOCKER_HUB_API",
    "DOCKER_HUB_HOSTS",
    "EgressPolicy",
]
