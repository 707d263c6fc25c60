"""Where the bench runs: the built-in providers (memory, file, a local SeaweedFS through the
s3 and the minio driver) and any store URL a user names, each under a throwaway prefix.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

from piecestore.api import open_store_backend, open_with_settings
from piecestore.backends import Backend
from piecestore.errors import ConfigError
from piecestore.settings import Settings, load_settings
from piecestore.store import PieceStore

BUILTINS = ("memory", "file", "s3", "minio")
BUCKET = "piecestore-bench"
DIRECT_CONCURRENCY = 64  # the driver's own request cap, raised so one-object-per-piece is not throttled


def join_url(url: str, sub: str) -> str:
    """``url`` with ``sub`` appended to its path, query kept (s3://b/p?endpoint=.. -> s3://b/p/sub?..)."""
    if not sub:
        return url
    base, sep, query = url.partition("?")
    return f"{base.rstrip('/')}/{sub.strip('/')}{sep}{query}"


@dataclass
class Provider:
    """One target of the bench: a name, a base URL unique to this run, and how to reach it."""

    name: str
    url: str
    overrides: dict[str, Any] = field(default_factory=dict)  # settings keywords (credentials)
    builtin: bool = False
    server: str = ""  # the storage behind the URL; providers sharing it share the obstore rows
    local_dir: Path | None = None  # file providers: the directory (the disk-bandwidth test writes here)
    peer_config: dict[str, Any] | None = None  # how obstore reaches the same storage
    _peer_stores: dict[str, Any] = field(default_factory=dict)

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme.lower()

    def settings(self, sub: str, **extra: Any) -> Settings:
        # Built-in providers are fully described here, so a config.toml in the cwd cannot skew them.
        return load_settings(
            "" if self.builtin else None, store_url=join_url(self.url, sub), **self.overrides, **extra
        )

    def open_store(self, sub: str, **extra: Any) -> PieceStore:
        return cast(PieceStore, open_with_settings(self.settings(sub, **extra)))

    def open_backend(self, sub: str, *, direct: bool = False) -> Backend:
        """A bare driver; ``direct`` raises its request cap for one-object-per-piece work."""
        extra: dict[str, Any] = {}
        if direct and self.scheme in ("s3", "minio"):
            extra["s3_concurrency"] = DIRECT_CONCURRENCY
        settings = self.settings(sub, **extra)
        return open_store_backend(join_url(self.url, sub), settings)

    def cleanup(self, sub: str) -> None:
        """Delete everything under ``sub`` (untimed)."""
        self._peer_stores.pop(sub, None)
        if self.scheme == "file":  # one rmtree beats a list-and-delete per file
            shutil.rmtree(unquote(urlsplit(join_url(self.url, sub)).path), ignore_errors=True)
            return
        with self.open_backend(sub, direct=True) as backend:
            batch: list[str] = []
            for meta in backend.list():
                batch.append(meta.name)
                if len(batch) >= 1000:
                    backend.delete_many(batch)
                    batch = []
            if batch:
                backend.delete_many(batch)

    def peer_store(self, sub: str) -> Any:
        """An obstore store on the same storage and prefix (cached: memory stores are per instance)."""
        if self.peer_config is None:
            raise ConfigError(f"no obstore equivalent is known for {self.name}")
        found = self._peer_stores.get(sub)
        if found is not None:
            return found
        from obstore.store import LocalStore, MemoryStore, S3Store

        cfg = self.peer_config
        store: Any
        if cfg["kind"] == "memory":
            store = MemoryStore()
        elif cfg["kind"] == "file":
            path = Path(cfg["dir"]) / sub
            path.mkdir(parents=True, exist_ok=True)
            store = LocalStore(prefix=path)
        else:
            prefix = "/".join(p for p in (cfg["prefix"], sub) if p)
            kwargs: dict[str, Any] = dict(cfg["s3"])
            plain_http = str(kwargs.get("endpoint", "")).startswith("http:")
            client: Any = {"allow_http": True} if plain_http else {}
            store = S3Store(cfg["bucket"], prefix=prefix or None, client_options=client, **kwargs)
        self._peer_stores[sub] = store
        return store


def builtin_provider(name: str, run_id: str, *, endpoint: str = "", s3_port: int = 0) -> Provider:
    from piecestore.localserver import ACCESS_KEY, SECRET_KEY

    if name == "memory":
        return Provider(
            "memory",
            f"memory://pbench-{run_id}",
            builtin=True,
            server="memory",
            peer_config={"kind": "memory"},
        )
    if name == "file":
        root = Path(tempfile.mkdtemp(prefix="piecestore-bench-"))
        return Provider(
            "file",
            "file://" + str(root / "store"),
            builtin=True,
            server=f"file:{root}",
            local_dir=root,
            peer_config={"kind": "file", "dir": str(root / "obstore")},
        )
    creds = {"s3_access_key": ACCESS_KEY, "s3_secret_key": SECRET_KEY}
    prefix = f"{run_id}/{name}"
    peer = {
        "kind": "s3",
        "bucket": BUCKET,
        "prefix": f"{run_id}/obstore",
        "s3": {
            "endpoint": endpoint,
            "access_key_id": ACCESS_KEY,
            "secret_access_key": SECRET_KEY,
            "region": "us-east-1",
            "virtual_hosted_style_request": False,
        },
    }
    if name == "s3":
        url = f"s3://{BUCKET}/{prefix}?endpoint={endpoint}&region=us-east-1"
    elif name == "minio":
        url = f"minio://127.0.0.1:{s3_port}/{BUCKET}/{prefix}?secure=false"
    else:
        raise ConfigError(f"unknown built-in provider {name!r}; use one of {', '.join(BUILTINS)} or a URL")
    return Provider(name, url, creds, builtin=True, server=f"seaweedfs@{endpoint}", peer_config=peer)


def url_provider(url: str, run_id: str) -> Provider:
    """A user's store URL; the bench works under ``<url>/piecestore-bench-<run>/`` and removes it."""
    if "://" not in url:
        url = "file://" + os.path.abspath(url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    sub = f"piecestore-bench-{run_id}"
    base = join_url(url, sub)
    local_dir = Path(parts.path) / sub if scheme == "file" else None
    peer: dict[str, Any] | None = None
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if scheme == "memory":
        peer = {"kind": "memory"}
    elif scheme == "file" and local_dir is not None:
        peer = {"kind": "file", "dir": str(local_dir / "obstore")}
    elif scheme in ("s3", "s3a", "minio"):
        if scheme == "minio":
            bucket, _, prefix = parts.path.strip("/").partition("/")
            secure = query.get("secure", "true").lower() not in ("0", "false", "no", "off")
            endpoint = ("https://" if secure else "http://") + parts.netloc
        else:
            bucket, prefix = parts.netloc, parts.path.strip("/")
            endpoint = query.get("endpoint", "")
        s3: dict[str, Any] = {"virtual_hosted_style_request": False} if endpoint else {}
        if endpoint:
            s3["endpoint"] = endpoint
        if query.get("region"):
            s3["region"] = query["region"]
        peer = {"kind": "s3", "bucket": bucket, "prefix": "/".join(p for p in (prefix, sub, "obstore") if p)}
        peer["s3"] = s3
    name = url.split("?", 1)[0]
    return Provider(name, base, builtin=False, server=base, local_dir=None, peer_config=peer)


def new_run_id() -> str:
    return uuid.uuid4().hex[:10]


def drop_builtin(provider: Provider) -> None:
    """Free a built-in provider's storage at the end (memory space, temp directory)."""
    if provider.name == "memory" and provider.builtin:
        from piecestore.backends.memory import drop_space

        drop_space(urlsplit(provider.url).netloc)
    elif provider.local_dir is not None and provider.builtin:
        with contextlib.suppress(OSError):
            shutil.rmtree(provider.local_dir)
