"""ImagePolicy: which image references written by a model the tools may open.

The arguments of every tool call are written by a language model that may have read a
hostile web page. A tool that opens any path is a file-disclosure hole; one that fetches
any URL is an SSRF hole (``http://169.254.169.254/`` is the cloud metadata service). The
policy closes both:

- **Local paths** only inside ``allowed_dirs``, after resolving symlinks and ``..``; only
  regular files (no devices, FIFOs or directories), size-capped before reading. Default:
  no directories, so only handles the application registered work.
- **URLs** off by default. When on: http and https only; every address the host resolves
  to must be public (no loopback, private, link-local, multicast, reserved, unspecified,
  shared or IPv6-mapped/embedded forms of those); the connection goes to exactly the
  address that was checked (resolved once and pinned, so DNS rebinding cannot switch it);
  every redirect is checked the same way (3 at most); the download is capped in bytes
  while it streams and in time; the answer must say it is an image or start like one.
  ``allowed_hosts`` restricts URLs to named hosts, which are then also trusted to resolve
  to private addresses (an internal CDN); a redirect to any other host is checked again.
- **Images** over ``max_pixels`` are refused before decoding, over ``max_bytes`` before
  reading; only common photo formats are decoded.

Every refusal is an :class:`~moondream_tools.ImageAccessError` (or :class:`ImageError`)
saying what is allowed, without revealing anything about the filesystem outside the
allowed directories.

Example::

    from moondream_tools import ImagePolicy, VisionTools

    policy = ImagePolicy(allowed_dirs=["/srv/uploads"], allow_urls=True,
                         allowed_hosts={"images.example.com"})
    tools = VisionTools(md, image_policy=policy)
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from .errors import ImageAccessError, ImageError
from .images import (
    DEFAULT_FORMATS,
    ImageInput,
    ImageSettings,
    ReferenceKind,
    read_response_capped,
    reference_kind,
    sniff_image,
)

__all__ = ["ImagePolicy", "is_public_address"]

_REDIRECTS = frozenset({301, 302, 303, 307, 308})


def is_public_address(address: str) -> bool:
    """Whether an IP address is a public unicast address a tool may connect to.

    IPv4-mapped, 6to4 and Teredo IPv6 forms are judged by the IPv4 address they carry.

    >>> [is_public_address(a) for a in ("93.184.216.34", "127.0.0.1", "10.0.0.1", "169.254.169.254")]
    [True, False, False, False]
    >>> [is_public_address(a) for a in ("::1", "::ffff:10.0.0.1", "fe80::1", "224.0.0.1", "0.0.0.0")]
    [False, False, False, False, False]
    """
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            ip = embedded
    return ip.is_global and not (
        ip.is_multicast or ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved
        or ip.is_unspecified
    )


class _PinnedResolver(AbstractResolver):
    """Answers aiohttp's lookup with the addresses that were already checked."""

    def __init__(self, host: str, addresses: list[tuple[int, str]]) -> None:
        self._host = host
        self._addresses = addresses

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        if host != self._host:  # pragma: no cover - aiohttp only asks for the URL's host
            raise OSError(f"unexpected lookup of {host!r}")
        return [
            ResolveResult(hostname=host, host=address, port=port, family=fam, proto=0,
                          flags=socket.AI_NUMERICHOST)
            for fam, address in self._addresses
        ]

    async def close(self) -> None:
        return None


@dataclass(frozen=True)
class ImagePolicy:
    """Which image references the tools accept from an agent, and how big they may be.

    Args:
        allowed_dirs: directories (``~`` expanded) whose files (after resolving symlinks and ``..``) the
            tools may read. Default: none; only registered handles work.
        allow_urls: whether ``http(s)`` URLs may be fetched. Default: off.
        allowed_hosts: when URLs are on, the only hosts allowed (None: any host with a
            public address). Hosts named here may resolve to private addresses.
        max_bytes: largest encoded image accepted (file, download or data URL).
        max_pixels: largest image accepted, checked before decoding.
        max_redirects: redirects followed when fetching a URL, each one checked.
        download_timeout: seconds allowed for fetching a URL, redirects included.
        formats: the Pillow formats that may be decoded.

    Example::

        policy = ImagePolicy(allowed_dirs=["/srv/uploads"], allow_urls=True,
                             allowed_hosts={"images.example.com"})
    """

    allowed_dirs: Sequence[str | os.PathLike[str]] = ()
    allow_urls: bool = False
    allowed_hosts: frozenset[str] | set[str] | None = None
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000
    max_redirects: int = 3
    download_timeout: float = 15.0
    formats: frozenset[str] = DEFAULT_FORMATS
    _roots: tuple[Path, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.allowed_dirs, (str, os.PathLike)):
            raise TypeError("allowed_dirs must be a list of directories, not a single path")
        roots = tuple(Path(os.path.realpath(os.path.expanduser(os.fspath(d)))) for d in self.allowed_dirs)
        object.__setattr__(self, "allowed_dirs", tuple(str(r) for r in roots))
        object.__setattr__(self, "_roots", roots)
        if self.allowed_hosts is not None:
            object.__setattr__(self, "allowed_hosts", frozenset(h.lower() for h in self.allowed_hosts))
        if self.max_redirects < 0:
            raise ValueError("max_redirects must be >= 0")
        self.image_settings()  # validates the limits

    def image_settings(self, base: ImageSettings | None = None) -> ImageSettings:
        """``base`` (the backend's :class:`ImageSettings`) held to this policy's limits.

        The encoding (JPEG quality, crops, segment size) stays ``base``'s, so an image a
        model names by path is uploaded exactly as the application's own copy would be,
        and shares its cache entry; each limit is the tighter of the two.

        >>> ImagePolicy(max_pixels=1_000_000).image_settings(ImageSettings(jpeg_quality=80)).jpeg_quality
        80
        """
        limits = ImageSettings(
            max_pixels=self.max_pixels,
            max_bytes=self.max_bytes,
            download_timeout=self.download_timeout,
            formats=self.formats,
        )
        return limits if base is None else base.within(limits)

    async def resolve(self, reference: str) -> ImageInput:
        """Turn a model-written reference into a trusted image source, or refuse it.

        An ``http(s)`` URL is fetched under this policy (its bytes are returned), a ``data:``
        URL is returned as is (its size is checked when it is prepared), a ``file:`` URL or
        a path is checked against ``allowed_dirs`` (the resolved :class:`~pathlib.Path` is
        returned). Prepare the result with :meth:`image_settings` as the settings.

        Raises:
            ImageAccessError: the reference is not allowed.
            ImageError: it is allowed but cannot be read.
        """
        kind = reference_kind(reference)
        if kind is ReferenceKind.URL:
            return await self.fetch(reference)
        if kind is ReferenceKind.DATA_URL:
            return reference
        if kind is ReferenceKind.FILE_URL:
            return self.check_path(urllib.request.url2pathname(urllib.parse.urlsplit(reference).path))
        return self.check_path(reference)

    def _where(self) -> str:
        return ", ".join(str(r) for r in self._roots)

    # ---------------------------------------------------------------- paths

    def check_path(self, reference: str) -> Path:
        """Resolve a local path and return it if it lies inside an allowed directory.

        Relative paths are taken relative to each allowed directory in turn. Symlinks and
        ``..`` are resolved before the check. Raises :class:`ImageAccessError` otherwise,
        without saying anything about files outside the allowed directories.
        """
        if not self._roots:
            raise ImageAccessError(f"path {reference!r} is not allowed: this tool reads no local files")
        raw = Path(reference)
        candidates = [raw] if raw.is_absolute() else [root / raw for root in self._roots]
        inside = False
        for candidate in candidates:
            resolved = Path(os.path.realpath(candidate))
            if any(resolved.is_relative_to(root) for root in self._roots):
                if resolved.exists():
                    return resolved
                inside = True
        if inside:
            raise ImageError(f"image file not found: {reference!r} (looked under {self._where()})")
        raise ImageAccessError(f"path {reference!r} is not allowed: images must be under {self._where()}")

    # ---------------------------------------------------------------- URLs

    def check_url(self, url: str) -> str:
        """Return ``url`` if its scheme and host are allowed (before any lookup), else raise
        :class:`ImageAccessError`."""
        if not self.allow_urls:
            raise ImageAccessError(f"URL {url!r} is not allowed: this tool does not fetch URLs")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() not in ("http", "https"):
            raise ImageAccessError(f"URL {url!r} is not allowed: only http and https URLs can be fetched")
        host = (parts.hostname or "").lower()
        if not host:
            raise ImageAccessError(f"URL {url!r} has no host")
        if parts.username or parts.password:
            raise ImageAccessError(f"URL {url!r} is not allowed: URLs with credentials are refused")
        if self.allowed_hosts is not None and host not in self.allowed_hosts:
            allowed = ", ".join(sorted(self.allowed_hosts)) or "none"
            raise ImageAccessError(f"URL host {host!r} is not allowed; allowed hosts: {allowed}")
        return url

    async def _checked_addresses(self, url: str) -> tuple[str, list[tuple[int, str]]]:
        """Resolve the URL's host once and check every address; return them for pinning."""
        self.check_url(url)
        parts = urllib.parse.urlsplit(url)
        host = (parts.hostname or "").lower()
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            family = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
            addresses = [(family, host)]
        else:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError) as exc:
                raise ImageError(f"cannot download {url!r}: the host {host!r} cannot be resolved ({exc})") from None
            addresses = list(dict.fromkeys((info[0], str(info[4][0])) for info in infos))
            if not addresses:
                raise ImageError(f"cannot download {url!r}: the host {host!r} has no address")
        trusted = self.allowed_hosts is not None and host in self.allowed_hosts
        if not trusted and not all(is_public_address(address) for _, address in addresses):
            raise ImageAccessError(
                f"URL {url!r} is not allowed: it points to a loopback, private, link-local or"
                " otherwise non-public address; images can only be fetched from public hosts"
            )
        return host, addresses

    async def fetch(self, url: str) -> bytes:
        """Download an image under this policy (SSRF-safe); return its bytes.

        Raises:
            ImageAccessError: the URL, a redirect, or an address it resolves to is not allowed.
            ImageError: the download failed, timed out, was too large or is not an image.
        """
        timeout = aiohttp.ClientTimeout(total=self.download_timeout)
        try:
            async with asyncio.timeout(self.download_timeout):
                for _hop in range(self.max_redirects + 1):
                    host, addresses = await self._checked_addresses(url)
                    connector = aiohttp.TCPConnector(
                        resolver=_PinnedResolver(host, addresses), use_dns_cache=False, force_close=True
                    )
                    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                        async with session.get(
                            url, allow_redirects=False, headers={"Accept": "image/*"}
                        ) as resp:
                            if resp.status in _REDIRECTS:
                                location = resp.headers.get("Location")
                                if not location:
                                    raise ImageError(f"downloading {url!r} failed: redirect without a Location")
                                url = urllib.parse.urljoin(url, location)
                                continue
                            return await self._read_image(url, resp)
                raise ImageAccessError(
                    f"downloading the image was refused: more than {self.max_redirects} redirects"
                )
        except TimeoutError:
            raise ImageError(f"downloading {url!r} timed out after {self.download_timeout} s") from None
        except aiohttp.ClientError as exc:
            raise ImageError(f"downloading {url!r} failed: {type(exc).__name__}: {exc}") from None

    async def _read_image(self, url: str, resp: aiohttp.ClientResponse) -> bytes:
        data = await read_response_capped(resp, self.max_bytes, url)
        if not resp.content_type.startswith("image/") and sniff_image(data) is None:
            raise ImageError(f"{url!r} is not an image (content type {resp.content_type!r})")
        return data
