"""URL safety for model and webhook URLs: no private, loopback, link-local or reserved addresses
(unless the operator sets ``VDU_ALLOW_PRIVATE_URLS``), no ``file://`` or other schemes.

The API checks a URL when it is registered; whoever fetches it later checks again at connect time
(DNS may have changed) and follows no redirect without checking it too.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlparse

from jobs.errors import InvalidInput

ALLOWED_SCHEMES = ("https", "http", "s3")


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (
        ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved or ip.is_unspecified
    )


def resolve_public(host: str, port: int) -> list[str]:
    """The host's addresses, refusing the whole host if any one is not public."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise InvalidInput(f"cannot resolve host {host!r}", field="url") from exc
    addrs = sorted({info[4][0] for info in infos})
    for addr in addrs:
        if not _is_public(ipaddress.ip_address(addr.split("%", 1)[0])):
            raise InvalidInput(f"host {host!r} resolves to a non-public address ({addr})", field="url")
    return addrs


def check_url(
    url: str,
    *,
    field: str,
    allow_private: bool,
    schemes: tuple[str, ...] = ALLOWED_SCHEMES,
    resolve: bool = True,
) -> str:
    """Validate ``url`` (raise ``InvalidInput`` naming ``field``); returns it unchanged."""
    if not isinstance(url, str) or len(url) > 2048 or any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise InvalidInput("a URL of at most 2048 printable characters is required", field=field)
    parsed = urlparse(url)
    if parsed.scheme not in schemes:
        raise InvalidInput(
            f"URL scheme must be one of {', '.join(schemes)}; got {parsed.scheme or 'none'!r}", field=field
        )
    if parsed.scheme == "s3":
        if not parsed.netloc or not parsed.path.strip("/"):
            raise InvalidInput("an s3:// URL needs a bucket and a key", field=field)
        return url
    if not parsed.hostname:
        raise InvalidInput("the URL has no host", field=field)
    if parsed.username or parsed.password:
        raise InvalidInput("credentials in URLs are refused", field=field)
    if allow_private:
        return url
    if parsed.scheme == "http":
        raise InvalidInput("plain http URLs are refused; use https", field=field)
    try:
        ip = ipaddress.ip_address(parsed.hostname)
    except ValueError:
        ip = None
    if ip is not None:
        if not _is_public(ip):
            raise InvalidInput(f"the URL points at a non-public address ({ip})", field=field)
    elif parsed.hostname.lower() in ("localhost",) or parsed.hostname.lower().endswith(".localhost"):
        raise InvalidInput("the URL points at localhost", field=field)
    elif resolve:
        try:
            resolve_public(parsed.hostname, parsed.port or 443)
        except InvalidInput as exc:
            exc.field = field
            raise
    return url
