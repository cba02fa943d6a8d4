"""Address rules shared by the server and the gateway (kept free of torch imports, so the
gateway stays a light process)."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """Whether `host` (a bind address or a client's address) is this machine's loopback: only
    loopback binds may go without an API key, and only loopback clients reach the gateway's
    admin routes without the admin key."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:  # a host name other than localhost may resolve to anything
        return False
    # A dual-stack socket reports an IPv4 client as ::ffff:a.b.c.d.
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def local_address(host: str) -> str:
    """The address a client on this machine reaches a bind on `host` at: a wildcard bind
    (0.0.0.0, ::, empty) is reached on loopback."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
