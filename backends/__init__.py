"""Storage drivers behind one interface: memory, file, s3 (s3fs) and minio (minio SDK).

``open_backend(url, **options)`` picks the driver from the URL scheme:
``memory://NAME``, ``file:///abs/path`` or a plain path, ``s3://bucket[/prefix]?endpoint=...``,
``minio://host:port/bucket[/prefix]?secure=false``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from piecestore.backends.base import (
    Backend,
    Capabilities,
    IfMatch,
    ObjectMeta,
    PutMode,
    coalesce_ranges,
    validate_name,
)
from piecestore.errors import ConfigError

SCHEMES = ("memory", "file", "s3", "minio")


def open_backend(url: str, **options: Any) -> Backend:
    """Build a driver from a store URL; options override what the URL and environment say."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(
            "store URL is empty; give one such as memory://name, file:///path, s3://bucket/prefix "
            "or minio://host:port/bucket"
        )
    if "://" not in url:
        from piecestore.backends.file import from_path

        return from_path(url, options)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        from piecestore.backends.memory import MemoryBackend

        read_only = bool(options.pop("read_only", False))
        _no_more_options("memory", options)
        if parts.query:
            raise ConfigError(f"memory:// URLs take no query parameters, got {parts.query!r}")
        space = parts.netloc
        if not space:
            raise ConfigError("memory:// URL needs a name, e.g. memory://scratch")
        return MemoryBackend(space, prefix=parts.path.strip("/"), read_only=read_only)
    if scheme == "file":
        from piecestore.backends.file import from_url as file_from_url

        return file_from_url(parts, options)
    if scheme in ("s3", "s3a"):
        from piecestore.backends.s3 import from_url as s3_from_url

        return s3_from_url(parts, options)
    if scheme == "minio":
        from piecestore.backends.minio import from_url as minio_from_url

        return minio_from_url(parts, options)
    raise ConfigError(
        f"unknown storage scheme {parts.scheme!r} in store URL; use one of {', '.join(SCHEMES)}"
    )


def _no_more_options(driver: str, options: dict[str, Any]) -> None:
    if options:
        raise ConfigError(f"unknown option(s) for the {driver} driver: {', '.join(sorted(options))}")


__all__ = [
    "SCHEMES",
    "Backend",
    "Capabilities",
    "IfMatch",
    "ObjectMeta",
    "PutMode",
    "coalesce_ranges",
    "open_backend",
    "validate_name",
]
