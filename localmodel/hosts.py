"""Which hosts a source in a cluster may not name, pure: :func:`internal_host_error`.

A cache's http(s):// source is fetched by the agent, a pod on the node with the node's network: a
host that is the node itself (loopback: the kubelet's port 10250, the agent's own ports), the cloud's
metadata service (link-local 169.254.169.254, fd00:ec2::254), "any address" or the cluster's own
services would turn a cache into a request the tenant could not make. The controller's cache webhook
refuses them by the host as written; resolving a name and refusing the peer actually connected to is
the agent's part (a name may resolve anywhere).
"""

from __future__ import annotations

import ipaddress
import re

# Names that are the node or the cluster's own services whatever they resolve to: localhost (RFC
# 6761 §6.3), Kubernetes' Service names (<svc>.<ns>.svc[.<cluster domain>]) and the API server's.
_INTERNAL_SUFFIXES = (".localhost", ".svc", ".svc.cluster.local", ".cluster.local")
_INTERNAL_NAMES = ("localhost", "kubernetes", "kubernetes.default")
# AWS's IPv6 instance metadata address: not link-local, but the same service.
_METADATA_V6 = ipaddress.IPv6Address("fd00:ec2::254")


def ipv4_literal(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address ``host`` spells in any form inet_aton(3) and browsers (WHATWG URL, "IPv4
    parser") accept: 1 to 4 dot-separated parts, each decimal, octal (leading ``0``) or hex
    (``0x``), the last filling the remaining bytes (``127.1``, ``2130706433``, ``0x7f.0.0.1``,
    ``0177.0.0.1``); None when it is not one (a name)."""
    parts = host.split(".")
    if parts and parts[-1] == "" and len(parts) > 1:
        parts = parts[:-1]  # a trailing dot
    if not 1 <= len(parts) <= 4:
        return None
    values: list[int] = []
    for part in parts:
        lower = part.lower()
        try:
            if lower.startswith("0x"):
                value = int(lower[2:] or "0", 16)
            elif len(lower) > 1 and lower.startswith("0"):
                value = int(lower, 8)
            else:
                value = int(lower, 10) if lower.isdigit() else -1
        except ValueError:
            return None
        if value < 0:
            return None
        values.append(value)
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (5 - len(values)):
        return None
    number = last
    for i, v in enumerate(head):
        number += v << (8 * (3 - i))
    return ipaddress.IPv4Address(number)


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    inner = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if ":" in inner:
        try:
            address = ipaddress.IPv6Address(inner.split("%", 1)[0])  # without a zone (fe80::1%eth0)
        except ValueError:
            return None
        mapped = address.ipv4_mapped or address.sixtofour
        return mapped if mapped is not None else address
    return ipv4_literal(inner)


def internal_host_error(host: str) -> str | None:
    """Why a cluster's source may not name ``host`` (as urlsplit's ``hostname`` gives it, or with
    brackets), or None when it may. Refused: loopback, link-local (cloud metadata services),
    unspecified and AWS's IPv6 metadata addresses in any literal form (IPv4 forms of
    :func:`ipv4_literal`, IPv6, IPv4-mapped IPv6), ``localhost`` and ``*.localhost``, and the
    cluster's internal names (``kubernetes``, ``kubernetes.default[.*]``, ``*.svc``,
    ``*.svc.cluster.local``, ``*.cluster.local``)."""
    name = host.strip().lower().rstrip(".")
    address = _address(name)
    if address is not None:
        if address.is_loopback:
            return f"{host!r} is a loopback address (the node itself)"
        if address.is_link_local:
            return f"{host!r} is a link-local address (the cloud's metadata service lives there)"
        if address.is_unspecified:
            return f"{host!r} is the unspecified address (the node itself)"
        if address == _METADATA_V6:
            return f"{host!r} is the cloud's metadata service"
        return None
    if name == "localhost" or name.endswith(".localhost"):
        return f"{host!r} is the node itself"
    if name in _INTERNAL_NAMES or name.startswith("kubernetes.default."):
        return f"{host!r} is the cluster's API server"
    if name.endswith(_INTERNAL_SUFFIXES):
        return f"{host!r} is a name inside the cluster (a Service)"
    return None


# RFC 1123 §2.1 host names: dot-separated labels of letters, digits and hyphens, 1-63 each, not
# starting or ending with a hyphen, 253 characters in all.
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)", re.ASCII)


def host_error(host: str) -> str | None:
    """Why ``host`` (of a ``HOST:PORT`` another process connects to) is not a host, or None when it
    is an IPv4 address, an IPv6 address (bracketed or not) or an RFC 1123 name. Catches a URL
    (``http://10.0.0.7``), a blank or a space (``bad host``) before any connection is tried."""
    inner = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(inner)
        return None
    except ValueError:
        pass
    name = inner.rstrip(".")
    if not name:
        return "no host"
    if "://" in host:
        return "a URL, not a host (write HOST:PORT without a scheme)"
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        return f"{host!r} is not a host name or an IP address"
    return None


def is_wildcard(host: str) -> bool:
    """Whether ``host`` (bracketed or not) is an unspecified address (``0.0.0.0``, ``::`` in any
    spelling): one to listen on, never one to reach."""
    inner = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(inner).is_unspecified
    except ValueError:
        return False


def port_number(text: str) -> int | None:
    """The TCP port ``text`` spells in ASCII digits, 1-65535; None for anything else."""
    if not (text.isascii() and text.isdigit()) or len(text) > 5:
        return None
    port = int(text)
    return port if 0 < port <= 65535 else None
