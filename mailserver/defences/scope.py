"""
Which clients the defences look at: strangers on the MX role.

Submission is for our own users, who authenticate; an authenticated client
is never screened, greylisted or refused by a blocklist, and neither is a
client in C{checks.skip_networks} (a backup MX, a monitoring host).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from mailserver.config.values import Network
from mailserver.hooks import Client

MX_ROLE = "smtp"


def client_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """
    The client's IP address (an IPv4-mapped IPv6 address as IPv4), or
    C{None} for a client that has none (a UNIX socket).
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def client_network(address: str) -> str:
    """
    The unit a greylisting retry may come from: the IPv4 /24 or the IPv6
    /64, since big senders retry from another host of the same farm.
    """
    ip = client_ip(address)
    if ip is None:
        return address
    prefix = 24 if ip.version == 4 else 64
    return str(ipaddress.ip_network((ip, prefix), strict=False))


@dataclass(frozen=True)
class Scope:
    skip_networks: tuple[Network, ...] = ()

    def covers(self, client: Client) -> bool:
        """
        Is this a stranger on the MX role, outside the skipped networks?
        """
        if client.role != MX_ROLE or client.authenticated is not None:
            return False
        ip = client_ip(client.address)
        if ip is None:
            return False
        return not any(ip in network for network in self.skip_networks)
