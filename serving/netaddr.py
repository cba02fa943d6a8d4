"""Address rules shared by the server and the gateway (kept free of torch imports, so the
gateway stays a light process)."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """Only loopback binds may go without an API key."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve to anything
        return False
