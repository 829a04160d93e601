"""Private addresses: loopback, link-local (the cloud metadata service at 169.254.169.254) and
unspecified addresses, refused as sources unless allowed (the agent in a cluster without
``--allow-private-sources``). The check is on each address a name resolves to."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from localmodel.errors import SourceNotAllowed


class PrivateAddress(SourceNotAllowed):
    """A connection to a loopback, link-local or unspecified address, refused (``allow_private`` off)."""

    def __init__(self, host: str, address: str) -> None:
        shown = host if host == address else f"{host} ({address})"
        super().__init__(
            f"refusing to connect to {shown}: a loopback, link-local or unspecified address; the agent "
            "in a cluster reaches such addresses only with --allow-private-sources"
        )


def private_address(address: str) -> bool:
    """True for a loopback (127/8, ::1), link-local (169.254/16, fe80::/10) or unspecified (0.0.0.0,
    ::) address, IPv4-mapped IPv6 forms included (``ipaddress``'s classification, RFC 6890)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope ("fe80::1%eth0") aside
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_link_local or ip.is_unspecified


def check_endpoint(url: str, *, allow_private: bool) -> None:
    """Raise :class:`PrivateAddress` when ``url``'s host resolves (now) to an address
    :func:`private_address` refuses, unless ``allow_private``. For clients that connect on their
    own (huggingface_hub's, boto3's): checked before they list. A name that does not resolve is
    left for the client to report."""
    if allow_private:
        return
    parts = urlsplit(url if "//" in url else f"//{url}")
    host = parts.hostname or ""
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return  # a malformed port: the client's own error says so
    check_resolved(host, port)


def check_resolved(host: str, port: int) -> None:
    """:class:`PrivateAddress` when ``host`` resolves (now) to an address :func:`private_address`
    refuses; a name that does not resolve is left for the connection to report."""
    try:
        found = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return
    for *_, where in found:
        if private_address(str(where[0])):
            raise PrivateAddress(host, str(where[0]))
