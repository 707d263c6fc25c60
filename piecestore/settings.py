"""Settings: one typed object built from defaults, a TOML file, the environment and keyword arguments.

Precedence, lowest to highest: defaults < config file < environment < keyword arguments.

* Config file: ``load_settings(config_file=...)``, else ``$PIECESTORE_CONFIG``, else ``./config.toml``
  when it exists; decided at call time. A named file that is missing is an error (an empty
  ``PIECESTORE_CONFIG`` means "no file"). The file holds our tables (``[store]``, ``[s3]``, ...)
  and/or a Go PieceStore section (``[PieceStore]`` / ``[PieceStore.Store]``), read unchanged.
* Environment: ``PIECESTORE_<GROUP>__<FIELD>`` (e.g. ``PIECESTORE_GC__GRACE_SECONDS=5``), plus the
  Go PieceStore / AWS / MinIO names (``BUCKET_URL``, ``AWS_ACCESS_KEY``, ``AWS_ACCESS_KEY_ID``, ...)
  as lower-priority aliases: a ``PIECESTORE_`` name always wins over an alias.
* Keyword arguments: flat ``<group>_<field>`` names (``gc_grace_seconds=0``), or the bare field
  name when no other group has it (``grace_seconds=0``), or a whole group as a dict (``gc={...}``).

Every mistake (unknown key, bad value, conflicting settings) is a ``ConfigError`` naming the key and
where it came from; no message, ``repr`` or ``str`` ever shows a secret.

Go PieceStore compatibility choices (see ``_go_store``):
* ``MinRetryDelay`` is a Go ``time.Duration`` (the Go code does ``time.Duration(cfg.MinRetryDelay)``),
  so a bare integer is **nanoseconds**: ``MinRetryDelay = 1`` is 1 ns, not 1 s (a warning says so
  for non-zero values under 1 ms). A Go duration string (``"500ms"``, ``"1s"``, ``"1m30s"``) is also
  accepted. ``0`` means "SDK default" in Go and so leaves ``retry.min_retry_delay`` at its default.
* ``IAMType`` takes the Go values ``"AKSK"`` (access key + secret key, read from the environment)
  and ``"SA"`` (service account: web identity from ``AWS_ROLE_ARN`` + ``AWS_WEB_IDENTITY_TOKEN_FILE``),
  case-insensitively, plus ``""`` (ours: keys if given, else the SDK's default chain).
* ``BucketURL`` in Go is an http(s) endpoint URL (path- or virtual-hosted style); it becomes an
  ``s3://`` or ``minio://`` store URL. A Go ``%d`` shard verb becomes our ``{shard}`` placeholder.
"""

from __future__ import annotations

import contextvars
import difflib
import json
import math
import os
import re
import tomllib
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, Self
from urllib.parse import urlencode, urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic.config import ExtraValues
from pydantic_core import ErrorDetails, PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from piecestore.errors import ConfigError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

ENV_PREFIX = "PIECESTORE_"
CONFIG_ENV = "PIECESTORE_CONFIG"
DEFAULT_CONFIG_NAME = "config.toml"
# PIECESTORE_* variables that are not settings, so the unknown-variable check must not reject them.
RESERVED_ENV_VARS = frozenset({"PIECESTORE_CONFIG", "PIECESTORE_REQUIRE_S3", "PIECESTORE_SOAK"})
# Benchmarks keep their knobs out of Settings (no bench group), under this prefix.
RESERVED_ENV_PREFIXES = ("PIECESTORE_BENCH_",)

# Schemes a store URL may use (the drivers' open_backend); a plain path means the file driver.
STORE_SCHEMES = ("memory", "file", "s3", "s3a", "minio")
_SHARD_PLACEHOLDER = re.compile(r"\{shard(?::([^{}]*))?\}")
_SECRET_FIELDS = ("access_key", "secret_key", "session_token")


# --------------------------------------------------------------------------------------------
# value parsers shared by the groups


_SIZE_UNITS = {"b": 1, "kib": KiB, "mib": MiB, "gib": GiB, "tib": 1024 * GiB}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]ib|b)", re.IGNORECASE)


def _parse_size(value: Any) -> Any:
    """Let sizes be written "64MiB" as well as 67108864: config files are for people."""
    if not isinstance(value, str):
        return value
    text = value.strip().replace("_", "")
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)  # let the field's bounds report a negative size
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise ValueError(
            "must be a whole number of bytes or a size such as '64MiB' (units B, KiB, MiB, GiB, TiB)"
        )
    try:
        amount = Decimal(match[1]) * _SIZE_UNITS[match[2].lower()]
    except InvalidOperation:  # pragma: no cover - the regex only lets decimals through
        raise ValueError("is not a number") from None
    if amount != amount.to_integral_value():
        raise ValueError(f"{value!r} is not a whole number of bytes")
    return int(amount)


def _parse_optional_size(value: Any) -> Any:
    """``"auto"`` (or ``""``) spells None in TOML and env, which have no null."""
    if isinstance(value, str) and value.strip().lower() in ("", "auto", "none", "default"):
        return None
    return _parse_size(value)


def _parse_secret(value: Any) -> Any:
    """An empty secret is no secret, so ``access_key = ""`` in a file means "not set"."""
    if value is None or (isinstance(value, str) and value == ""):
        return None
    if isinstance(value, SecretStr) and value.get_secret_value() == "":
        return None
    return value


def _parse_list(value: Any) -> Any:
    """Env values are strings: accept a JSON list or a comma-separated list."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not text:
        return []
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise ValueError('is not a valid JSON list; write ["a", "b"] or a,b') from None
    return [item.strip() for item in text.split(",") if item.strip()]


_IAM_TYPES = {"": "", "aksk": "AKSK", "sa": "SA"}


def _parse_iam_type(value: Any) -> Any:
    """The Go PieceStore spells these AKSK and SA; accept any case."""
    if isinstance(value, str):
        return _IAM_TYPES.get(value.strip().lower(), value)
    return value


def _check_store_url(value: str, *, what: str = "store URL") -> str:
    """Catch a mistyped scheme at load time instead of at first use."""
    if not value or "://" not in value:
        return value  # empty (caller decides) or a plain path (file driver)
    scheme = value.split("://", 1)[0].lower()
    if scheme in ("http", "https"):
        raise ValueError(
            f"{value!r} is an http(s) endpoint, not a {what}; write s3://BUCKET?endpoint={scheme}://HOST "
            "or minio://HOST:PORT/BUCKET (BUCKET_URL and the Go [PieceStore.Store] BucketURL accept "
            "endpoint URLs and convert them)"
        )
    if scheme not in STORE_SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; use one of {', '.join(STORE_SCHEMES)} or a plain path")
    return value


def _url_check(value: Any) -> Any:
    return _check_store_url(value) if isinstance(value, str) else value


def _endpoint_check(value: Any) -> Any:
    if isinstance(value, str) and value and not value.lower().startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https:// (e.g. http://127.0.0.1:8333)")
    return value


Bytes = Annotated[int, BeforeValidator(_parse_size)]
OptionalBytes = Annotated[int | None, BeforeValidator(_parse_optional_size)]
Secret = Annotated[SecretStr | None, BeforeValidator(_parse_secret)]
StoreURL = Annotated[str, BeforeValidator(_url_check)]


# --------------------------------------------------------------------------------------------
# the groups


class _Group(BaseModel):
    """Base of every group: unknown keys are mistakes, not extensions."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class StoreSettings(_Group):
    """Where the pieces live and how the store is opened."""

    url: StoreURL = Field(
        default="",
        description="store URL (memory://, file://, s3://, minio:// or a path); empty: the caller decides",
    )
    read_only: bool = Field(default=False, description="refuse every write")
    buffered_writes: bool = Field(
        default=False, description="acknowledge puts before they are durable (flush() makes them so)"
    )
    create: bool = Field(default=True, description="create the bucket/directory if it is missing")


class ShardingSettings(_Group):
    """Spread pieces over several stores: either N shards from a template, or explicit targets."""

    shards: int = Field(
        default=0, ge=0, le=65536, description="number of shards from the template; 0 = no sharding"
    )
    targets: Annotated[list[StoreURL], NoDecode, BeforeValidator(_parse_list)] = Field(
        default_factory=list, description="explicit shard store URLs (exclusive with shards > 0)"
    )
    weights: Annotated[
        list[Annotated[float, Field(gt=0, allow_inf_nan=False)]], NoDecode, BeforeValidator(_parse_list)
    ] = Field(default_factory=list, description="relative shard weights, one per shard; empty = equal")
    template: str = Field(
        default="", description="shard URL template with {shard}, e.g. s3://pieces-{shard}; empty = store.url"
    )


class S3Settings(_Group):
    """Credentials and transport for the s3 and minio drivers."""

    access_key: Secret = Field(
        default=None, description="access key id (env: AWS_ACCESS_KEY_ID, AWS_ACCESS_KEY, MINIO_ACCESS_KEY)"
    )
    secret_key: Secret = Field(
        default=None, description="secret key (env: AWS_SECRET_ACCESS_KEY, AWS_SECRET_KEY, MINIO_SECRET_KEY)"
    )
    session_token: Secret = Field(
        default=None, description="temporary-credential session token (env: AWS_SESSION_TOKEN)"
    )
    region: str = Field(default="", description="region; empty = from the URL or the SDK default")
    endpoint: Annotated[str, BeforeValidator(_endpoint_check)] = Field(
        default="", description="endpoint URL for non-AWS S3"
    )
    addressing: Literal["auto", "path", "virtual"] = Field(
        default="auto", description="bucket addressing style"
    )
    anonymous: bool = Field(
        default=False, description="send unsigned requests (public buckets); Go NoSignRequest"
    )
    role_arn: str = Field(default="", description="role to assume with web identity (env: AWS_ROLE_ARN)")
    web_identity_token_file: str = Field(
        default="", description="web identity token file (env: AWS_WEB_IDENTITY_TOKEN_FILE)"
    )
    iam_type: Annotated[Literal["", "AKSK", "SA"], BeforeValidator(_parse_iam_type)] = Field(
        default="",
        description="Go IAMType: AKSK = access keys, SA = service account (web identity); empty = auto",
    )
    tls_verify: bool = Field(
        default=True, description="verify TLS certificates (Go TLSInsecureSkipVerify is the inverse)"
    )
    connect_timeout: float = Field(
        default=5.0, gt=0, le=3600, description="seconds to establish a connection"
    )
    read_timeout: float = Field(default=30.0, gt=0, le=3600, description="seconds to wait for a response")
    concurrency: int = Field(default=16, ge=1, le=1024, description="parallel requests per store")
    multipart_threshold: Bytes = Field(
        default=32 * MiB,
        ge=5 * MiB,
        le=5 * GiB,
        description="objects above this size upload in parts of 8 MiB (or this size, if smaller)",
    )


class RetrySettings(_Group):
    """Bounded retries with jittered exponential backoff for remote calls."""

    max_retries: int = Field(default=5, ge=0, le=100, description="retries after the first attempt")
    min_retry_delay: float = Field(default=0.05, ge=0, le=3600, description="first backoff, seconds")
    max_retry_delay: float = Field(default=2.0, ge=0, le=3600, description="backoff cap, seconds")
    deadline: float = Field(
        default=30.0, gt=0, le=86400, description="bound on one call including waits, seconds"
    )


class EngineSettings(_Group):
    """The piece engine: packing small pieces into tables, flushing, reading back."""

    small_piece_max_bytes: Bytes = Field(
        default=1 * MiB, ge=0, description="pieces above this are stored as their own object"
    )
    table_target_bytes: Bytes = Field(
        default=64 * MiB, ge=64 * KiB, le=5 * GiB, description="size a packed table file aims for"
    )
    flush_bytes: Bytes = Field(
        default=16 * MiB, ge=1, description="flush the memtable at this many buffered bytes"
    )
    flush_count: int = Field(default=100_000, ge=1, description="... or at this many buffered pieces")
    flush_linger_ms: float = Field(
        default=2.0, ge=0, le=60_000, description="... or this long after the first buffered put"
    )
    read_concurrency: int = Field(default=16, ge=1, le=1024, description="parallel range reads")
    write_concurrency: int = Field(default=4, ge=1, le=1024, description="parallel table uploads")
    coalesce_gap_bytes: OptionalBytes = Field(
        default=None, ge=0, description="merge ranged reads this close; auto = driver default"
    )
    max_request_bytes: OptionalBytes = Field(
        default=None, ge=1, description="largest merged ranged read; auto = driver default"
    )
    refresh_interval_seconds: float = Field(
        default=5.0,
        ge=0,
        allow_inf_nan=False,
        description="re-read the manifest this often; 0 = before every read",
    )
    commit_retries: int = Field(
        default=50, ge=0, le=10_000, description="manifest compare-and-swap attempts before ConflictError"
    )


class CacheSettings(_Group):
    """Read caches: hot pieces in memory, ranges of table files on local disk."""

    memory_bytes: Bytes = Field(default=64 * MiB, ge=0, description="LRU of hot pieces; 0 disables")
    disk_dir: str = Field(default="", description="directory of the on-disk range cache; empty disables")
    disk_bytes: Bytes = Field(default=1 * GiB, ge=0, description="on-disk cache budget")


class GcSettings(_Group):
    """Garbage collection: trash first, delete after the grace period, compact sparse tables."""

    grace_seconds: float = Field(
        default=3600.0,
        ge=0,
        le=10 * 365 * 86400,  # ten years: beyond that a date overflows, and nothing is ever reclaimed
        allow_inf_nan=False,
        description="keep unreferenced objects this long before deleting",
    )
    dead_fraction: float = Field(
        default=0.3, gt=0, le=1, description="compact a table once this fraction of it is dead"
    )
    auto_compact: bool = Field(default=True, description="compact in the background; false turns it off")
    compact_min_tables: int = Field(
        default=8,
        ge=2,
        le=100_000,
        description="background compaction starts once the manifest lists this many tables",
    )
    compact_max_tables: int = Field(
        default=256,
        ge=2,
        le=1_000_000,
        description="beyond this many tables, background compaction also merges full-size ones",
    )
    lease_seconds: float = Field(
        default=60.0, gt=0, le=86400, description="GC/compaction lease; a crashed holder loses it after this"
    )
    share_while_writing: float = Field(
        default=0.1,
        gt=0,
        le=1,
        description="while other threads of this process write, GC and compaction work this share "
        "of the time (1: no pause)",
    )


# --------------------------------------------------------------------------------------------
# Settings


class Settings(BaseSettings):
    """All of piecestore's settings; build it with ``load_settings`` (or ``Settings()`` for env + file)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
        extra="forbid",
        validate_default=True,
    )

    store: StoreSettings = Field(default_factory=StoreSettings)
    sharding: ShardingSettings = Field(default_factory=ShardingSettings)
    s3: S3Settings = Field(default_factory=S3Settings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    gc: GcSettings = Field(default_factory=GcSettings)

    def __init__(self, **values: Any) -> None:
        """Turn every validation failure into a ConfigError that names the key and its source."""
        load = _ACTIVE.get()
        token = None
        if load is None:
            load = _Load.start(None, values, {(name,): f"keyword argument {name}" for name in values})
            token = _ACTIVE.set(load)
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(_explain(exc.errors(), load)) from None
        except SettingsError as exc:
            raise ConfigError(load.scrub(_explain_settings_error(exc))) from None
        except ConfigError as exc:
            message = load.scrub(str(exc))
            if message != str(exc):
                raise ConfigError(message) from None
            raise
        finally:
            if token is not None:
                _ACTIVE.reset(token)

    @classmethod
    def model_validate(
        cls,
        obj: Any,
        *,
        strict: bool | None = None,
        extra: ExtraValues | None = None,
        from_attributes: bool | None = None,
        context: Any | None = None,
        by_alias: bool | None = None,
        by_name: bool | None = None,
    ) -> Self:
        """Send dicts through ``__init__``: pydantic would wrap our ConfigError (a ValueError) otherwise."""
        if isinstance(obj, Mapping):
            return cls(**obj)
        return super().model_validate(
            obj,
            strict=strict,
            extra=extra,
            from_attributes=from_attributes,
            context=context,
            by_alias=by_alias,
            by_name=by_name,
        )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """kwargs > PIECESTORE_* env > Go/AWS env aliases > config file; no dotenv, no secrets dir."""
        load = _ACTIVE.get()
        if load is None:  # pragma: no cover - __init__ always sets one
            load = _Load.start(None, {}, {})
        _check_env_names(load)
        toml = _TomlSource(settings_cls, load)
        aliases = _EnvAliasSource(settings_cls, load)
        return init_settings, env_settings, aliases, toml

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        """Checks that span fields, so each message can name every key involved."""
        sh = self.sharding
        if sh.shards > 0 and sh.targets:
            _conflict(
                "sharding.shards and sharding.targets are mutually exclusive; give a shard count "
                "with a template, or an explicit list of targets",
                "sharding.shards",
                "sharding.targets",
            )
        if sh.weights:
            count = len(sh.targets) or sh.shards
            if count == 0:
                _conflict(
                    "sharding.weights is set but there are no shards; "
                    "set sharding.targets or sharding.shards",
                    "sharding.weights",
                )
            elif len(sh.weights) != count:
                _conflict(
                    f"sharding.weights has {len(sh.weights)} entries but there are {count} shards; "
                    "give one weight per shard",
                    "sharding.weights",
                    "sharding.targets" if sh.targets else "sharding.shards",
                )
        if sh.shards > 0:
            key = "sharding.template" if sh.template else "store.url"
            template = sh.template or self.store.url
            if not template:
                _conflict(
                    "sharding.shards > 0 needs a URL template with {shard}: set sharding.template "
                    "(e.g. s3://pieces-{shard}) or put {shard} in store.url",
                    "sharding.shards",
                    "sharding.template",
                    "store.url",
                )
            problem = _template_problem(template)
            if problem:
                _conflict(f"{key}: {problem} (sharding.shards is {sh.shards})", key, "sharding.shards")
            try:
                _check_store_url(_render_template(template, 0), what="shard URL")
            except ValueError as exc:
                _conflict(f"{key}: {exc}", key)
        else:
            if sh.template:
                _conflict(
                    "sharding.template is set but sharding.shards is 0; set sharding.shards",
                    "sharding.template",
                    "sharding.shards",
                )
            if not sh.targets and _SHARD_PLACEHOLDER.search(self.store.url):
                _conflict(
                    "store.url contains {shard} but sharding.shards is 0; "
                    "set sharding.shards or remove {shard}",
                    "store.url",
                    "sharding.shards",
                )
        if self.retry.max_retry_delay < self.retry.min_retry_delay:
            _conflict(
                f"retry.max_retry_delay ({self.retry.max_retry_delay:g}) must be >= retry.min_retry_delay "
                f"({self.retry.min_retry_delay:g})",
                "retry.max_retry_delay",
                "retry.min_retry_delay",
            )
        if self.engine.small_piece_max_bytes > self.engine.table_target_bytes:
            _conflict(
                "engine.small_piece_max_bytes must be <= engine.table_target_bytes "
                "(a small piece has to fit in a table)",
                "engine.small_piece_max_bytes",
                "engine.table_target_bytes",
            )
        return self

    def shard_urls(self) -> list[str]:
        """The store URL of each shard, in shard order: targets, the rendered template, or [store.url]."""
        if self.sharding.targets:
            return list(self.sharding.targets)
        if self.sharding.shards > 0:
            template = self.sharding.template or self.store.url
            return [_render_template(template, i) for i in range(self.sharding.shards)]
        return [self.store.url]

    def redacted(self) -> dict[str, Any]:
        """JSON-able settings for display (``config show``): set secrets as "***", URL passwords masked."""
        data = self.model_dump(mode="json")
        for name in _SECRET_FIELDS:
            data["s3"][name] = None if getattr(self.s3, name) is None else "***"
        data["store"]["url"] = _mask_url_password(data["store"]["url"])
        data["sharding"]["template"] = _mask_url_password(data["sharding"]["template"])
        data["sharding"]["targets"] = [_mask_url_password(t) for t in data["sharding"]["targets"]]
        return data


GROUP_MODELS: dict[str, type[BaseModel]] = {
    name: info.annotation for name, info in Settings.model_fields.items() if isinstance(info.annotation, type)
}
SETTING_PATHS: tuple[tuple[str, str], ...] = tuple(
    (group, name) for group, model in GROUP_MODELS.items() for name in model.model_fields
)
SECRET_PATHS = frozenset(("s3", name) for name in _SECRET_FIELDS)


def _flat_keys() -> dict[str, tuple[str, str]]:
    keys = {f"{group}_{name}": (group, name) for group, name in SETTING_PATHS}
    counts: dict[str, int] = {}
    for _, name in SETTING_PATHS:
        counts[name] = counts.get(name, 0) + 1
    for group, name in SETTING_PATHS:
        if counts[name] == 1 and name not in keys:
            keys[name] = (group, name)
    return keys


# Keyword names load_settings accepts: "<group>_<field>" always, the bare field when unique.
FLAT_KEYS: dict[str, tuple[str, str]] = _flat_keys()


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build Settings from defaults < config file < environment < these keyword overrides.

    ``config_file`` beats ``$PIECESTORE_CONFIG``, which beats ``./config.toml``; a named file that
    does not exist is a ConfigError, and ``""`` means "read no file".
    """
    nested, origins = _nest_overrides(overrides)
    load = _Load.start(config_file, nested, origins)
    token = _ACTIVE.set(load)
    try:
        return Settings(**nested)
    finally:
        _ACTIVE.reset(token)


# --------------------------------------------------------------------------------------------
# one load: where the file is, where each value came from, which strings are secret


_KWARGS, _ENV, _ALIAS, _FILE = range(4)


@dataclass
class _Load:
    """State of one load, so sources and the error explainer agree on origins and secrets."""

    config_path: Path | None
    config_label: str
    origins: list[dict[tuple[str, ...], str]] = field(default_factory=lambda: [{}, {}, {}, {}])
    secrets: set[str] = field(default_factory=set)
    kwargs: dict[str, Any] = field(default_factory=dict)
    go_storage: str | None = None
    file_store_url: str | None = None

    @classmethod
    def start(
        cls, config_file: str | Path | None, kwargs: dict[str, Any], kw_origins: dict[tuple[str, ...], str]
    ) -> _Load:
        path, label = _resolve_config_file(config_file)
        load = cls(path, label, kwargs=kwargs)
        load.origins[_KWARGS].update(kw_origins)
        s3 = kwargs.get("s3")
        if isinstance(s3, Mapping):
            load.add_secrets(s3)
        for name in list(_ENV_SECRET_NAMES) + [f"{ENV_PREFIX}S3__{f.upper()}" for f in _SECRET_FIELDS]:
            value = _getenv(name)
            if value:
                load.secrets.add(value)
        blob = _getenv(f"{ENV_PREFIX}S3")
        if blob:
            try:
                parsed = json.loads(blob)
            except ValueError:
                load.secrets.add(blob)
            else:
                if isinstance(parsed, dict):
                    load.add_secrets(parsed)
        return load

    def add_secrets(self, group: Mapping[str, Any]) -> None:
        for name in _SECRET_FIELDS:
            value = group.get(name)
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if isinstance(value, str) and value:
                self.secrets.add(value)

    def origin_of(self, path: tuple[str, ...]) -> str | None:
        """Where the winning value for ``path`` came from (highest-priority source that set it)."""
        for rank in (_KWARGS, _ENV, _ALIAS, _FILE):
            for n in range(len(path), 0, -1):
                label = self.origins[rank].get(path[:n])
                if label:
                    return label
        return None

    def scrub(self, text: str) -> str:
        """Last line of defence: no secret string survives into a message."""
        for secret in sorted(self.secrets, key=len, reverse=True):
            if len(secret) >= 4:
                text = text.replace(secret, "***")
        return text


_ACTIVE: contextvars.ContextVar[_Load | None] = contextvars.ContextVar(
    "piecestore_settings_load", default=None
)


def _getenv(name: str) -> str | None:
    """Environment lookup that treats an empty value as unset (shells make those easily)."""
    value = os.environ.get(name)
    return value if value else None


def _resolve_config_file(config_file: str | Path | None) -> tuple[Path | None, str]:
    """Pick the config file now (not at import) so tests and long-lived processes see changes."""
    if config_file is not None:
        if str(config_file) == "":
            return None, ""
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(
                f"config file {str(config_file)!r} does not exist or is not a file (passed as config_file); "
                "fix the path"
            )
        return path, str(config_file)
    named = os.environ.get(CONFIG_ENV)
    if named is not None:
        if named == "":
            return None, ""
        path = Path(named)
        if not path.is_file():
            raise ConfigError(
                f"{CONFIG_ENV}={named!r} names a config file that does not exist; fix the path, or unset "
                f"{CONFIG_ENV} to use ./{DEFAULT_CONFIG_NAME} when present"
            )
        return path, named
    default = Path(DEFAULT_CONFIG_NAME)
    if default.is_file():
        return default, DEFAULT_CONFIG_NAME
    return None, ""


# --------------------------------------------------------------------------------------------
# keyword overrides


def _nest_overrides(overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """Flat ``gc_grace_seconds=0`` (or ``grace_seconds=0``, or ``gc={...}``) -> nested dicts."""
    nested: dict[str, dict[str, Any]] = {}
    origins: dict[tuple[str, ...], str] = {}
    problems: list[str] = []
    for name, value in overrides.items():
        if name in GROUP_MODELS:
            if isinstance(value, BaseModel):
                value = {k: getattr(value, k) for k in value.model_fields_set}
            if not isinstance(value, Mapping):
                problems.append(
                    f"{name}: a whole group must be a dict of its fields (got {type(value).__name__}) "
                    f"[from keyword argument {name}]"
                )
                continue
            fields = GROUP_MODELS[name].model_fields
            for sub, sub_value in value.items():
                if sub not in fields:
                    problems.append(
                        _unknown_line(
                            f"{name}.{sub}", f"keyword argument {name}", _suggest(str(sub), list(fields))
                        )
                    )
                    continue
                _put(nested, origins, problems, (name, sub), sub_value, f"keyword argument {name}")
        elif name in FLAT_KEYS:
            _put(nested, origins, problems, FLAT_KEYS[name], value, f"keyword argument {name}")
        else:
            hint = _suggest(name, list(FLAT_KEYS))
            problems.append(
                f"{name}: unknown setting [from keyword argument {name}]"
                + (f"; did you mean {hint}?" if hint else ";")
                + " keyword names are <group>_<field>, e.g. gc_grace_seconds"
            )
    if problems:
        raise ConfigError(_join(problems))
    return dict(nested), origins


def _put(
    nested: dict[str, dict[str, Any]],
    origins: dict[tuple[str, ...], str],
    problems: list[str],
    path: tuple[str, str],
    value: Any,
    label: str,
) -> None:
    group, name = path
    if name in nested.get(group, {}):
        problems.append(f"{group}.{name}: given twice ({origins[path]} and {label}); pass it once")
        return
    nested.setdefault(group, {})[name] = value
    origins[path] = label


# --------------------------------------------------------------------------------------------
# environment


def _env_name(group: str, name: str | None = None) -> str:
    return f"{ENV_PREFIX}{group.upper()}" + (f"__{name.upper()}" if name else "")


def _check_env_names(load: _Load) -> None:
    """PIECESTORE_* variables that map to no setting are typos; say so instead of ignoring them."""
    valid = {_env_name(g): (g,) for g in GROUP_MODELS} | {_env_name(g, f): (g, f) for g, f in SETTING_PATHS}
    problems = []
    for raw in os.environ:
        name = raw.upper()
        if (
            not name.startswith(ENV_PREFIX)
            or name in RESERVED_ENV_VARS
            or name.startswith(RESERVED_ENV_PREFIXES)
        ):
            continue
        path = valid.get(name)
        if path is not None:
            load.origins[_ENV][path] = f"environment variable {name}"
            continue
        hint = _suggest(name, list(valid))
        problems.append(
            f"{name}: environment variable maps to no setting"
            + (f"; did you mean {hint}?" if hint else ";")
            + f" names are {ENV_PREFIX}<GROUP>__<FIELD> (double underscore); fix or unset it"
        )
    if problems:
        raise ConfigError(_join(problems))


# Go PieceStore / AWS / MinIO names. Credentials come as a family so a key never pairs with
# another family's secret; the MinIO family goes first when the store is minio.
_CRED_FAMILIES = {
    "aws-go": ("AWS_ACCESS_KEY", "AWS_SECRET_KEY", "AWS_SESSION_TOKEN"),
    "aws": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"),
    "minio": ("MINIO_ACCESS_KEY", "MINIO_SECRET_KEY", "MINIO_SESSION_TOKEN"),
}
_ENV_SECRET_NAMES = frozenset(name for family in _CRED_FAMILIES.values() for name in family)
ENV_ALIASES: dict[str, tuple[str, str]] = {
    "BUCKET_URL": ("store", "url"),
    **{fam[0]: ("s3", "access_key") for fam in _CRED_FAMILIES.values()},
    **{fam[1]: ("s3", "secret_key") for fam in _CRED_FAMILIES.values()},
    **{fam[2]: ("s3", "session_token") for fam in _CRED_FAMILIES.values()},
    "AWS_REGION": ("s3", "region"),
    "AWS_DEFAULT_REGION": ("s3", "region"),
    "MINIO_REGION": ("s3", "region"),
    "AWS_ROLE_ARN": ("s3", "role_arn"),
    "AWS_WEB_IDENTITY_TOKEN_FILE": ("s3", "web_identity_token_file"),
}


class _EnvAliasSource(PydanticBaseSettingsSource):
    """The Go PieceStore / AWS / MinIO environment names, below PIECESTORE_* and above the file."""

    def __init__(self, settings_cls: type[BaseSettings], load: _Load) -> None:
        super().__init__(settings_cls)
        self._load = load

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False  # unused: __call__ builds the whole dict

    def __call__(self) -> dict[str, Any]:
        out: dict[str, dict[str, Any]] = {}
        labels = self._load.origins[_ALIAS]

        def put(path: tuple[str, str], value: Any, env: str) -> None:
            out.setdefault(path[0], {})[path[1]] = value
            labels[path] = f"environment variable {env}"

        bucket_url = _getenv("BUCKET_URL")
        if bucket_url:
            try:
                url, extra = _go_bucket_url(self._load.go_storage, bucket_url)
            except ValueError as exc:
                raise ConfigError(
                    f"BUCKET_URL: {exc} [from environment variable BUCKET_URL]; fix or unset it"
                ) from None
            put(("store", "url"), url, "BUCKET_URL")
            for s3_name, implied in extra.items():
                put(("s3", s3_name), implied, "BUCKET_URL")

        minio_first = self._store_scheme() == "minio"
        order = ["minio", "aws-go", "aws"] if minio_first else ["aws-go", "aws", "minio"]
        family = next(
            (f for f in order if _getenv(_CRED_FAMILIES[f][0]) or _getenv(_CRED_FAMILIES[f][1])), None
        )
        if family is not None:
            for env, name in zip(_CRED_FAMILIES[family], _SECRET_FIELDS, strict=True):
                value = _getenv(env)
                if value:
                    put(("s3", name), value, env)
        else:
            token = next((e for e in (_CRED_FAMILIES[f][2] for f in order) if _getenv(e)), None)
            if token:
                put(("s3", "session_token"), _getenv(token), token)
        regions = (
            ["MINIO_REGION", "AWS_REGION", "AWS_DEFAULT_REGION"]
            if minio_first
            else ["AWS_REGION", "AWS_DEFAULT_REGION", "MINIO_REGION"]
        )
        region = next((e for e in regions if _getenv(e)), None)
        if region:
            put(("s3", "region"), _getenv(region), region)
        for env in ("AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
            value = _getenv(env)
            if value:
                put(ENV_ALIASES[env], value, env)
        return out

    def _store_scheme(self) -> str:
        """The store's scheme as the higher sources will decide it, to order the credential families."""
        if self._load.go_storage == "minio":
            return "minio"
        candidates: list[Any] = [
            (self._load.kwargs.get("store") or {}).get("url")
            if isinstance(self._load.kwargs.get("store"), Mapping)
            else None,
            _getenv(_env_name("store", "url")),
            _getenv("BUCKET_URL"),
            self._load.file_store_url,
        ]
        for value in candidates:
            if isinstance(value, str) and "://" in value:
                return value.split("://", 1)[0].lower()
        return ""


# --------------------------------------------------------------------------------------------
# config file (ours and the Go PieceStore's)


class _TomlSource(TomlConfigSettingsSource):
    """pydantic-settings' TOML source, translating Go PieceStore tables and rejecting unknown keys."""

    def __init__(self, settings_cls: type[BaseSettings], load: _Load) -> None:
        self._load = load
        super().__init__(settings_cls, toml_file=load.config_path)

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        try:
            raw = super()._read_file(file_path)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{self._load.config_label}: not valid TOML ({exc}); fix the syntax") from None
        except OSError as exc:
            raise ConfigError(
                f"{self._load.config_label}: cannot read the config file ({exc.strerror})"
            ) from None
        return _translate_file(raw, self._load)


def _translate_file(raw: dict[str, Any], load: _Load) -> dict[str, Any]:
    """Our tables pass through (unknown keys rejected); a Go [PieceStore] section is mapped onto them."""
    label = load.config_label
    out: dict[str, dict[str, Any]] = {}
    origins: dict[tuple[str, ...], str] = {}
    problems: list[str] = []
    for table in raw.values():  # gather secrets before anything can fail
        if isinstance(table, dict):
            load.add_secrets(table)
            store = _go_lookup(table, "store")
            if isinstance(store, dict):
                load.add_secrets(
                    {
                        n: _go_lookup(store, k)
                        for n, k in (
                            ("access_key", "accesskey"),
                            ("secret_key", "secretkey"),
                            ("session_token", "sessiontoken"),
                        )
                    }
                )
                load.add_secrets(
                    {
                        "access_key": _go_lookup(store, "accesskeyid"),
                        "secret_key": _go_lookup(store, "accesssecretkey"),
                    }
                )
    go: tuple[str, Any] | None = None
    for key, value in raw.items():
        if key in GROUP_MODELS:
            if not isinstance(value, dict):
                problems.append(f"{key}: must be a table, written [{key}] [from {label}]")
                continue
            fields = GROUP_MODELS[key].model_fields
            for sub, sub_value in value.items():
                if sub not in fields:
                    problems.append(_unknown_line(f"{key}.{sub}", label, _suggest(sub, list(fields))))
                    continue
                out.setdefault(key, {})[sub] = sub_value
                origins[(key, sub)] = label
        elif _norm(key) == "piecestore":
            go = (key, value)
        else:
            owner = next((g for g, f in SETTING_PATHS if f == key), None)
            if owner:
                hint = f"; settings live in tables: put it under [{owner}];"
            else:
                near = _suggest(key, [*GROUP_MODELS, "PieceStore"])
                hint = f"; did you mean [{near}]?" if near else ";"
            problems.append(
                f"{key}: unknown top-level {'table' if isinstance(value, dict) else 'key'} "
                f"[from {label}]{hint} "
                f"known tables: {', '.join(GROUP_MODELS)}, and the Go PieceStore's [PieceStore]"
            )
    if go is not None:
        _go_section(go[0], go[1], label, out, origins, problems, load)
    if problems:
        raise ConfigError(_join(problems))
    load.origins[_FILE].update(origins)
    url = out.get("store", {}).get("url")
    load.file_store_url = url if isinstance(url, str) else None
    return out


def _norm(key: str) -> str:
    """Go's TOML decoding matches field names case- and underscore-insensitively; so do we."""
    return key.replace("_", "").lower()


def _go_lookup(table: Mapping[str, Any], normalized: str) -> Any:
    return next((v for k, v in table.items() if _norm(k) == normalized), None)


_GO_STORE_KEYS = {
    "storage": None,
    "bucketurl": None,
    "maxretries": ("retry", "max_retries"),
    "minretrydelay": ("retry", "min_retry_delay"),
    "tlsinsecureskipverify": ("s3", "tls_verify"),
    "iamtype": ("s3", "iam_type"),
    "accesskey": ("s3", "access_key"),
    "accesskeyid": ("s3", "access_key"),
    "secretkey": ("s3", "secret_key"),
    "accesssecretkey": ("s3", "secret_key"),
    "sessiontoken": ("s3", "session_token"),
    "nosignrequest": ("s3", "anonymous"),
}
_GO_STORAGES = ("s3", "minio", "file", "memory")


def _go_section(
    key: str,
    section: Any,
    label: str,
    out: dict[str, dict[str, Any]],
    origins: dict[tuple[str, ...], str],
    problems: list[str],
    load: _Load,
) -> None:
    """Map ``[PieceStore]`` (Shards) and ``[PieceStore.Store]`` (Go's ObjectStorageConfig) onto our groups."""
    if not isinstance(section, dict):
        problems.append(f"{key}: must be a table [{key}] [from {label}]")
        return
    mapped: dict[tuple[str, str], tuple[Any, str]] = {}
    store: dict[str, Any] | None = None
    store_key = f"{key}.Store"
    for name, value in section.items():
        if _norm(name) == "shards":
            mapped[("sharding", "shards")] = (value, f"[{key}] {name}")
        elif _norm(name) == "store":
            if not isinstance(value, dict):
                problems.append(f"[{key}] {name}: must be a table [{key}.{name}] [from {label}]")
            else:
                store, store_key = value, f"{key}.{name}"
        else:
            problems.append(
                f"[{key}] {name}: unknown Go PieceStore key [from {label}]; "
                "known keys: Shards, and the table Store"
            )
    if store is not None:
        _go_store(store, store_key, mapped, problems, load, label)
    min_delay = mapped.get(("retry", "min_retry_delay"))
    default_max = RetrySettings.model_fields["max_retry_delay"].default
    if min_delay is not None and min_delay[0] > default_max and "max_retry_delay" not in out.get("retry", {}):
        # Go has no MaxRetryDelay; keep a long MinRetryDelay valid by raising our cap to it.
        mapped[("retry", "max_retry_delay")] = min_delay
    for path, (value, where) in mapped.items():
        mine = out.get(path[0], {})
        if path[1] in mine and mine[path[1]] != value:
            problems.append(
                f"{path[0]}.{path[1]} is set both in [{path[0]}] and as {where} in {label}, with different "
                "values; keep one"
            )
            continue
        out.setdefault(path[0], {})[path[1]] = value
        origins[path] = f"{label} {where}"


def _go_store(
    store: dict[str, Any],
    table: str,
    mapped: dict[tuple[str, str], tuple[Any, str]],
    problems: list[str],
    load: _Load,
    label: str,
) -> None:
    """Translate one Go ObjectStorageConfig table; values keep their Go meaning."""
    by_norm: dict[str, tuple[str, Any]] = {}
    for name, value in store.items():
        norm = _norm(name)
        if norm not in _GO_STORE_KEYS:
            known = (
                "Storage, BucketURL, MaxRetries, MinRetryDelay, TLSInsecureSkipVerify, IAMType, "
                "AccessKey, SecretKey, SessionToken, NoSignRequest"
            )
            problems.append(
                f"[{table}] {name}: unknown Go PieceStore key [from {label}]; known keys: {known}"
            )
            continue
        by_norm[norm] = (name, value)

    def where(norm: str) -> str:
        return f"[{table}] {by_norm[norm][0]}"

    storage: str | None = None
    if "storage" in by_norm:
        raw_storage = by_norm["storage"][1]
        if not isinstance(raw_storage, str) or raw_storage.strip().lower() not in _GO_STORAGES:
            problems.append(
                f"{where('storage')}: {raw_storage!r} is not supported by piecestore [from {label}]; "
                f"use one of {', '.join(_GO_STORAGES)}"
            )
        else:
            storage = raw_storage.strip().lower()
    load.go_storage = storage
    if "bucketurl" in by_norm or storage == "memory":
        bucket_url = by_norm["bucketurl"][1] if "bucketurl" in by_norm else ""
        w = where("bucketurl") if "bucketurl" in by_norm else where("storage")
        if not isinstance(bucket_url, str):
            problems.append(f"{w}: must be a string (got {type(bucket_url).__name__}) [from {label}]")
        elif bucket_url or storage == "memory":
            try:
                url, extra = _go_bucket_url(storage, bucket_url)
            except ValueError as exc:
                problems.append(f"{w}: {exc} [from {label}]")
            else:
                mapped[("store", "url")] = (url, w)
                for name, value in extra.items():
                    mapped[("s3", name)] = (value, w)
    for norm, (name, value) in by_norm.items():
        target = _GO_STORE_KEYS[norm]
        if target is None:
            continue
        w = f"[{table}] {name}"
        if norm == "minretrydelay":
            try:
                seconds = _go_duration_seconds(value)
            except ValueError as exc:
                problems.append(f"{w}: {exc} [from {label}]")
                continue
            if isinstance(value, int) and 0 < value < 1_000_000:
                warnings.warn(
                    f"{label}: [{table}] {name} = {value} is {value} ns "
                    "(a Go time.Duration counts nanoseconds); "
                    'write "1s" or 1000000000 for one second',
                    UserWarning,
                    stacklevel=2,
                )
            if seconds == 0:
                continue  # Go: 0 = the SDK's default delay; keep ours
            mapped[target] = (seconds, w)
        elif norm == "tlsinsecureskipverify":
            flag = _go_bool(value)
            if flag is None:
                problems.append(f"{w}: must be true or false (got {value!r}) [from {label}]")
                continue
            mapped[target] = (not flag, w)
        elif norm == "nosignrequest":
            flag = _go_bool(value)
            if flag is None:
                problems.append(f"{w}: must be true or false (got {value!r}) [from {label}]")
                continue
            mapped[target] = (flag, w)
        else:
            mapped[target] = (value, w)


def _go_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


_GO_UNITS = {"ns": Decimal("1e-9"), "us": Decimal("1e-6"), "µs": Decimal("1e-6"), "μs": Decimal("1e-6"),
             "ms": Decimal("1e-3"), "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600)}  # fmt: skip
_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def _go_duration_seconds(value: Any) -> float:
    """A Go time.Duration: integer nanoseconds, or a string such as "1.5s", "500ms", "1m30s"."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(
            f'must be integer nanoseconds or a Go duration string like "500ms" (got {value!r}); '
            "a float is ambiguous here"
        )
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"must be >= 0 (got {value})")
        return value / 1e9
    text = value.strip()
    if text in ("0", "+0"):
        return 0.0
    if text.startswith("-"):
        raise ValueError(f"must be >= 0 (got {value!r})")
    text = text.removeprefix("+")
    total, pos = Decimal(0), 0
    while pos < len(text):
        match = _GO_DURATION_PART.match(text, pos)
        if match is None:
            raise ValueError(
                f'{value!r} is not a Go duration; write e.g. "500ms", "1s", "1m30s" or integer nanoseconds'
            )
        total += Decimal(match[1]) * _GO_UNITS[match[2]]
        pos = match.end()
    if not text:
        raise ValueError('is empty; write a Go duration such as "1s"')
    return float(total)


def _go_bucket_url(storage: str | None, bucket_url: str) -> tuple[str, dict[str, str]]:
    """A Go BucketURL (+ Storage) -> our store URL and any s3 settings it implies (addressing).

    A ``%d`` (or ``%0Nd``) shard verb becomes ``{shard}`` (``{shard:0Nd}``).
    """
    text = bucket_url.strip()
    text = re.sub(r"%(0?\d*)d", lambda m: "{shard" + (f":{m[1]}d" if m[1] else "") + "}", text)
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if storage is None:
        storage = "s3" if scheme in ("http", "https") else ("file" if scheme == "" else None)
    if scheme in STORE_SCHEMES:
        family = "s3" if scheme == "s3a" else scheme
        if storage is not None and storage != family:
            raise ValueError(f"Storage is {storage!r} but the URL {text!r} is {scheme}://; make them agree")
        return text, {}
    if storage == "memory":
        name = text if re.fullmatch(r"[A-Za-z0-9._{}:-]+", text or "-") and text else "piecestore"
        return f"memory://{name}", {}
    if storage == "file":
        if scheme:
            raise ValueError(f"Storage is 'file' but {text!r} is a URL; give a directory path")
        return (f"file://{text}" if text.startswith("/") else text), {}
    if scheme not in ("http", "https"):
        raise ValueError(
            f"{text!r} is not an http(s) endpoint URL, which Storage={storage!r} needs (e.g. https://s3.us-east-1.amazonaws.com/mybucket)"
        )
    if storage == "minio":
        return _go_minio_url(text), {}
    return _go_s3_url(text)


def _protect_placeholders(text: str) -> tuple[str, Callable[[str], str]]:
    """Hide {shard...} from urlsplit (a ':' in it would look like a port)."""
    found: list[str] = []

    def hide(match: re.Match[str]) -> str:
        found.append(match[0])
        return f"zzshard{len(found) - 1}zz"

    hidden = _SHARD_PLACEHOLDER.sub(hide, text)

    def restore(value: str) -> str:
        for i, original in enumerate(found):
            value = value.replace(f"zzshard{i}zz", original)
        return value

    return hidden, restore


def _go_s3_url(text: str) -> tuple[str, dict[str, str]]:
    """Path style https://s3.<region>.amazonaws.com/<bucket>[/prefix] or virtual https://<bucket>.s3.<region>.amazonaws.com."""
    hidden, restore = _protect_placeholders(text.strip("/"))
    parts = urlsplit(hidden)
    host = (parts.hostname or "").lower()
    if not host:
        raise ValueError(f"{text!r} has no host")
    port = f":{parts.port}" if parts.port else ""
    segments = [s for s in parts.path.split("/") if s]
    is_aws = ".amazonaws.com" in host
    if segments:
        bucket, prefix = segments[0], "/".join(segments[1:])
        endpoint = f"{parts.scheme}://{host}{port}"
        region = _aws_region(host) if is_aws else ""
        addressing = "path"
    else:
        if not is_aws or ".s3" not in host:
            raise ValueError(
                f"cannot tell the bucket from {text!r}; for non-AWS endpoints use path style https://HOST/BUCKET"
            )
        bucket, rest = host.split(".s3", 1)
        prefix = ""
        endpoint = f"{parts.scheme}://s3{rest}{port}"
        region = _aws_region("s3" + rest)
        addressing = "virtual"
    query = {"endpoint": endpoint}
    if region:
        query["region"] = region
    url = f"s3://{bucket}" + (f"/{prefix}" if prefix else "") + "?" + urlencode(query, safe=":/")
    return restore(url), {"addressing": addressing}


def _aws_region(host: str) -> str:
    """The region in an AWS S3 endpoint host, as the Go PieceStore reads it (us-east-1 if none)."""
    rest = host
    if rest.startswith(("s3-", "s3.")):
        rest = rest[3:]
    rest = rest.removeprefix("dualstack.")
    if rest.startswith("amazonaws.com"):
        return "us-east-1"
    region = rest.split(".", 1)[0]
    return "us-east-1" if region == "external-1" else region


def _go_minio_url(text: str) -> str:
    """http(s)://host:port/bucket[/prefix] -> minio://host:port/bucket[/prefix] (secure=false for http)."""
    hidden, restore = _protect_placeholders(text.strip("/"))
    parts = urlsplit(hidden)
    if not parts.hostname or not [s for s in parts.path.split("/") if s]:
        raise ValueError(
            f"cannot tell the bucket from {text!r}; MinIO needs path style http(s)://HOST:PORT/BUCKET"
        )
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    query = "secure=false" if parts.scheme.lower() == "http" else ""
    return restore(urlunsplit(("minio", netloc, parts.path, query, "")))


# --------------------------------------------------------------------------------------------
# shard templates


def _template_problem(template: str) -> str | None:
    if not _SHARD_PLACEHOLDER.search(template):
        return f"{template!r} has no {{shard}} placeholder to number the shards (e.g. s3://pieces-{{shard}})"
    for match in _SHARD_PLACEHOLDER.finditer(template):
        try:
            format(0, match[1] or "")
        except ValueError:
            return f"{match[0]!r} has a bad format spec; use {{shard}} or e.g. {{shard:02d}}"
    return None


def _render_template(template: str, shard: int) -> str:
    return _SHARD_PLACEHOLDER.sub(lambda m: format(shard, m[1] or ""), template)


def _mask_url_password(url: str) -> str:
    if "://" not in url or "@" not in url:
        return url
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return url


# --------------------------------------------------------------------------------------------
# error messages


def _conflict(message: str, *keys: str) -> NoReturn:
    raise PydanticCustomError("settings_conflict", "{message}", {"message": message, "keys": ",".join(keys)})


def _suggest(name: str, candidates: list[str]) -> str | None:
    lowered = {c.lower(): c for c in candidates}
    found = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[found[0]] if found else None


def _unknown_line(key: str, label: str, hint: str | None) -> str:
    group = key.split(".", 1)[0]
    known = ", ".join(GROUP_MODELS[group].model_fields) if group in GROUP_MODELS else ""
    text = f"{key}: unknown setting [from {label}]"
    if hint:
        text += f"; did you mean {group}.{hint}?"
    if known:
        text += f"{'' if hint else ';'} valid keys in [{group}]: {known}"
    return text


def _join(problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems in the settings:\n  " + "\n  ".join(problems)


_NAMED = {
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "model_type": "must be a table of settings",
    "model_attributes_type": "must be a table of settings",
    "dict_type": "must be a table of settings",
}


def _problem(error: ErrorDetails) -> str:
    kind = error["type"]
    ctx: dict[str, Any] = dict(error.get("ctx") or {})
    if kind in _NAMED:
        return _NAMED[kind]
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        limit = next(iter(v for k, v in ctx.items() if k in ("ge", "gt", "le", "lt")), "?")
        return f"must be {bounds[kind]} {_number(limit)}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '?')}"
    if kind == "extra_forbidden":
        return "unknown setting"
    if kind == "value_error":
        return str(error["msg"]).removeprefix("Value error, ")
    return str(error["msg"])


def _number(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= MiB and value % MiB == 0:
        return f"{value} ({value // MiB} MiB)"
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return str(value)


def _shown(value: Any) -> str | None:
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 80 else value[:77] + "...")
    return None


def _dotted(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _explain(errors: list[ErrorDetails], load: _Load) -> str:
    """ValidationError -> lines of 'key: problem (got X) [from source]', secrets never shown."""
    lines = []
    for error in errors:
        loc = tuple(error["loc"])
        if error["type"] == "settings_conflict":
            ctx = dict(error.get("ctx") or {})
            keys = [k for k in str(ctx.get("keys", "")).split(",") if k]
            sources = []
            for key in keys:
                origin = load.origin_of(tuple(key.split(".")))
                sources.append(f"{key} from {origin or 'the default'}")
            lines.append(f"{ctx.get('message', error['msg'])} [{'; '.join(sources)}]")
            continue
        path = tuple(str(p) for p in loc if isinstance(p, str))
        key = _dotted(loc) or "settings"
        text = f"{key}: {_problem(error)}"
        if error["type"] == "extra_forbidden" and len(path) >= 2 and path[0] in GROUP_MODELS:
            hint = _suggest(path[1], list(GROUP_MODELS[path[0]].model_fields))
            if hint:
                text += f"; did you mean {path[0]}.{hint}?"
        elif path[:2] not in SECRET_PATHS and error["type"] not in ("extra_forbidden", "value_error"):
            shown = _shown(error.get("input"))
            if shown is not None:
                text += f" (got {shown})"
        origin = load.origin_of(path)
        if origin:
            text += f" [from {origin}]"
        lines.append(text)
    return load.scrub(_join(lines) + _fix_hint(lines))


def _fix_hint(lines: list[str]) -> str:
    if not any("[from " in line for line in lines):
        return ""
    if len(lines) == 1:
        return "; fix it there"
    return "\nFix each value where it came from (shown in [from ...])."


def _explain_settings_error(exc: SettingsError) -> str:
    """pydantic-settings' own failures (e.g. bad JSON in PIECESTORE_S3) in our words."""
    text = str(exc)
    match = re.search(r'field "(\w+)"', text)
    if match and match[1] in GROUP_MODELS:
        name = _env_name(match[1])
        return (
            f"{name}: is not a valid JSON object of [{match[1]}] settings; "
            f"fix it, or set one field per variable ({name}__FIELD)"
        )
    return f"could not read the settings: {text}"


__all__ = [
    "ENV_ALIASES",
    "FLAT_KEYS",
    "GROUP_MODELS",
    "RESERVED_ENV_VARS",
    "CacheSettings",
    "EngineSettings",
    "GcSettings",
    "RetrySettings",
    "S3Settings",
    "Settings",
    "ShardingSettings",
    "StoreSettings",
    "load_settings",
]
