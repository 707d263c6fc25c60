"""``piecestore.open``: settings in, a ready store out (sharded or not)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from piecestore.backends import Backend, open_backend
from piecestore.errors import ConfigError
from piecestore.settings import Settings, load_settings
from piecestore.sharding.layout import LAYOUT_OBJECT
from piecestore.store import PieceStore

DEFAULT_URL = "./piecestore-data"  # a path: relative to the working directory


def backend_options(settings: Settings, url: str) -> dict[str, Any]:
    """The driver options a URL's scheme understands, taken from the settings."""
    scheme = urlsplit(url).scheme.lower() if "://" in url else "file"
    options: dict[str, Any] = {"read_only": settings.store.read_only}
    if scheme in ("s3", "s3a", "minio"):
        s3 = settings.s3
        secrets = {
            "access_key": s3.access_key,
            "secret_key": s3.secret_key,
            "session_token": s3.session_token,
        }
        options.update({k: v.get_secret_value() for k, v in secrets.items() if v is not None})
        plain: dict[str, Any] = {
            "region": s3.region,
            "tls_verify": s3.tls_verify,
            "connect_timeout": s3.connect_timeout,
            "read_timeout": s3.read_timeout,
            "concurrency": s3.concurrency,
            "max_retries": settings.retry.max_retries,
            "min_retry_delay": settings.retry.min_retry_delay,
            "max_retry_delay": settings.retry.max_retry_delay,
            "retry_deadline": settings.retry.deadline,
        }
        if scheme != "minio":
            plain.update(
                endpoint=s3.endpoint,
                addressing=s3.addressing,
                anonymous=s3.anonymous,
                role_arn=s3.role_arn,
                web_identity_token_file=s3.web_identity_token_file,
                multipart_threshold=s3.multipart_threshold,
            )
        # Settings left at "unset" must not override what the URL itself says.
        options.update({k: v for k, v in plain.items() if v not in ("", None, "auto")})
        if "anonymous" in options and not options["anonymous"]:
            del options["anonymous"]
    return options


def open_store_backend(url: str, settings: Settings) -> Backend:
    return open_backend(url, **backend_options(settings, url))


def open(url: str | None = None, *, shards: Any = None, **overrides: Any) -> Any:
    """Open a store: ``piecestore.open("s3://bucket/prefix?endpoint=...", gc_grace_seconds=0)``.

    With no URL the settings decide (config.toml, PIECESTORE_* and the AWS/BUCKET_URL names).
    ``shards`` is a list of target URLs, or a count used with a ``{shard}`` template URL.
    """
    if url is not None:
        if not isinstance(url, str) or not url.strip():
            # An explicit empty URL (an unset variable?) must not quietly open the default store.
            raise ConfigError(
                f"store URL {url!r} is empty; give one such as memory://name, file:///path, "
                "s3://bucket/prefix or minio://host:port/bucket, or pass None to use the settings"
            )
        overrides["store_url"] = url
    if shards is not None:
        if isinstance(shards, int):
            overrides["sharding_shards"] = shards
        else:
            overrides["sharding_targets"] = list(shards)
    settings = load_settings(**overrides)
    return open_with_settings(settings)


def open_with_settings(settings: Settings) -> Any:
    sharding = settings.sharding
    if sharding.targets or sharding.shards:
        from piecestore.sharding.store import ShardedStore

        return ShardedStore.open(settings)
    url = settings.store.url or DEFAULT_URL
    backend = open_store_backend(url, settings)
    try:
        # One shard of a sharded store opened alone would miss every other shard's pieces.
        if backend.exists(LAYOUT_OBJECT):
            from piecestore.sharding.store import check_unsharded

            check_unsharded(backend)
        return PieceStore(backend, settings)
    except BaseException:
        backend.close()
        raise
