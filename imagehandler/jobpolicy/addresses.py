"""Which IP addresses a scanner may connect to for a job.

Every address that is not globally routable is refused unless an operator allows its network:
loopback (the scanner's own services), link-local (169.254.169.254 and fd00:ec2::254 are cloud
metadata services), private and unique-local (cluster services, pods, the corporate network),
shared (100.64.0.0/10, carrier NAT), unspecified (0.0.0.0 reaches the host itself), multicast and
reserved. IPv6 forms that carry an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, 6to4
``2002::/16``, Teredo, NAT64 ``64:ff9b::/96``) are judged by the IPv4 address inside them, so
``::ffff:127.0.0.1`` is loopback too.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SHARED = ipaddress.IPv4Network("100.64.0.0/10")


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, if it carries one."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]  # the client's address
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_class(address: IPAddress) -> str | None:
    """The name of the refused class ``address`` is in (``loopback``, ``link-local``,
    ``private``, ``shared``, ``unspecified``, ``multicast``, ``reserved``), or None for a
    globally routable address."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = embedded_ipv4(address)
        if inner is not None:
            found = address_class(inner)
            if found is not None:
                return found
            if address.ipv4_mapped is not None:
                return None
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_unspecified:
        return "unspecified"
    if address.is_multicast:
        return "multicast"
    if isinstance(address, ipaddress.IPv4Address) and address in _SHARED:
        return "shared"
    if address.is_private:
        return "private"
    if not address.is_global or address.is_reserved:
        return "reserved"
    return None


def literal_address(host: str) -> IPAddress | None:
    """``host`` as an IP address when it is one, in any form a resolver would take: dotted
    quads, ``[v6]``, and the shorthand forms inet_aton reads (``127.1``, ``2130706433``,
    ``0x7f.1``), so that those cannot pass as names. None for a name."""
    text = host.strip("[]")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if text and all(c in "0123456789abcdefxABCDEFX." for c in text) and text[0].isdigit():
        try:
            return ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    return None


def parse_networks(values: Iterable[str], flag: str) -> tuple[IPNetwork, ...]:
    """CIDR networks (a bare address is its /32 or /128); ValueError naming ``flag``."""
    found = []
    for value in values:
        try:
            found.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(
                f"{flag}: {value!r} is not a network (CIDR, e.g. 10.0.0.0/8): {exc}"
            ) from None
    return tuple(found)


__all__ = [
    "IPAddress",
    "IPNetwork",
    "address_class",
    "embedded_ipv4",
    "literal_address",
    "parse_networks",
]
