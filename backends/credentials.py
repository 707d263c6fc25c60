"""One credential resolver for the s3 and minio drivers.

Order: explicit options > environment > the provider's own default chain. Both drivers use
this so the same options and environment mean the same identity on either. Secrets are
kept in ``SecretStr``: ``repr``/``str`` of anything here never shows them.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import SecretStr

from piecestore.errors import ConfigError

Flavor = Literal["s3", "minio"]
Kind = Literal["static", "web_identity", "anonymous", "default_chain"]

CREDENTIAL_OPTIONS = (
    "access_key",
    "secret_key",
    "session_token",
    "anonymous",
    "role_arn",
    "web_identity_token_file",
)

# (key variable, secret variable, token variable), first complete pair wins.
_AWS_ENV = (
    ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"),
    ("AWS_ACCESS_KEY", "AWS_SECRET_KEY", "AWS_SESSION_TOKEN"),  # the Go PieceStore's names
)
_MINIO_ENV = (("MINIO_ACCESS_KEY", "MINIO_SECRET_KEY", "MINIO_SESSION_TOKEN"), *_AWS_ENV)
_REGION_ENV: dict[Flavor, tuple[str, ...]] = {
    "s3": ("AWS_REGION", "AWS_DEFAULT_REGION"),
    "minio": ("MINIO_REGION", "AWS_REGION", "AWS_DEFAULT_REGION"),
}


def mask(value: str | None) -> str:
    """Show just enough of an access key id to recognise it."""
    if not value:
        return "None"
    return f"'...{value[-4:]}'" if len(value) > 8 else "'***'"


@dataclass(frozen=True, slots=True, repr=False)
class ResolvedCredentials:
    """Who the driver signs as, and where that came from (for error messages)."""

    kind: Kind
    source: str
    access_key: str | None = None
    secret_key: SecretStr | None = None
    session_token: SecretStr | None = None
    role_arn: str | None = None
    web_identity_token_file: str | None = None

    def secret_values(self) -> list[str]:
        """The raw secrets, for log redaction only."""
        return [s.get_secret_value() for s in (self.secret_key, self.session_token) if s is not None]

    def __repr__(self) -> str:
        return (
            f"ResolvedCredentials(kind={self.kind!r}, source={self.source!r}"
            f", access_key={mask(self.access_key)}"
            f", secret_key={'***' if self.secret_key else None}"
            f", session_token={'***' if self.session_token else None}, role_arn={self.role_arn!r})"
        )

    __str__ = __repr__


def _text(options: dict[str, Any], key: str) -> str | None:
    value = options.pop(key, None)
    if value is None:
        return None
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if not isinstance(value, str):
        raise ConfigError(f"option {key} must be a string, got {type(value).__name__}")
    return value or None


def parse_bool(key: str, value: object) -> bool:
    """Accept real booleans and the usual spellings from URLs and CLIs."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key} must be true or false, got {value!r}")


def resolve_credentials(
    options: dict[str, Any], *, flavor: Flavor, env: Mapping[str, str] | None = None
) -> ResolvedCredentials:
    """Pop the credential options and decide the identity; raises ConfigError on half a pair."""
    env = os.environ if env is None else env
    access_key = _text(options, "access_key")
    secret_key = _text(options, "secret_key")
    token = _text(options, "session_token")
    role_arn = _text(options, "role_arn")
    token_file = _text(options, "web_identity_token_file")
    anonymous = parse_bool("anonymous", options.pop("anonymous", False))

    if anonymous:
        explicit = {
            "access_key": access_key,
            "secret_key": secret_key,
            "session_token": token,
            "role_arn": role_arn,
            "web_identity_token_file": token_file,
        }
        given = [k for k, v in explicit.items() if v]
        if given:
            raise ConfigError(
                f"anonymous=True cannot be combined with {', '.join(given)}; drop one or the other"
            )
        return ResolvedCredentials("anonymous", "options (anonymous, unsigned requests)")

    if access_key or secret_key:
        if not secret_key:
            raise ConfigError("option access_key was given without secret_key; pass both or neither")
        if not access_key:
            raise ConfigError("option secret_key was given without access_key; pass both or neither")
        return ResolvedCredentials(
            "static", "options", access_key, SecretStr(secret_key), SecretStr(token) if token else None
        )
    if token:
        raise ConfigError("option session_token needs access_key and secret_key as well")

    if role_arn or token_file:
        return _web_identity(role_arn, token_file, "options", "role_arn", "web_identity_token_file")

    for key_var, secret_var, token_var in _MINIO_ENV if flavor == "minio" else _AWS_ENV:
        key, secret = env.get(key_var) or None, env.get(secret_var) or None
        if key and secret:
            env_token = env.get(token_var) or None
            return ResolvedCredentials(
                "static",
                f"environment {key_var}",
                key,
                SecretStr(secret),
                SecretStr(env_token) if env_token else None,
            )
        if key:
            raise ConfigError(
                f"environment variable {key_var} is set but {secret_var} is missing; set both or neither"
            )
        if secret:
            raise ConfigError(
                f"environment variable {secret_var} is set but {key_var} is missing; set both or neither"
            )

    env_file = env.get("AWS_WEB_IDENTITY_TOKEN_FILE") or None
    if env_file:
        return _web_identity(
            env.get("AWS_ROLE_ARN") or None,
            env_file,
            "environment",
            "AWS_ROLE_ARN",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
        )
    return ResolvedCredentials("default_chain", "the provider's default credential chain")


def _web_identity(
    role_arn: str | None, token_file: str | None, source: str, role_name: str, file_name: str
) -> ResolvedCredentials:
    if not role_arn:
        raise ConfigError(f"{file_name} is set but {role_name} is missing; web identity needs both")
    if not token_file:
        raise ConfigError(f"{role_name} is set but {file_name} is missing; web identity needs both")
    if not os.path.isfile(token_file):
        raise ConfigError(f"web identity token file {token_file!r} (from {file_name}) does not exist")
    return ResolvedCredentials(
        "web_identity", f"web identity ({source})", role_arn=role_arn, web_identity_token_file=token_file
    )


def env_region(flavor: Flavor, env: Mapping[str, str] | None = None) -> str | None:
    """The region the environment asks for (MINIO_REGION first for minio), if any."""
    env = os.environ if env is None else env
    for name in _REGION_ENV[flavor]:
        if env.get(name):
            return env[name]
    return None


def read_token_file(path: str) -> str:
    """Read a web identity token afresh (it is rotated on disk by the platform)."""
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


class _Redactor(logging.Filter):
    """Masks registered secrets in log records (botocore's DEBUG output shows request headers,
    including x-amz-security-token). Records are only built when DEBUG is on, so this is free
    otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._secrets: dict[str, int] = {}

    def add(self, values: list[str]) -> Callable[[], None]:
        with self._lock:
            for v in values:
                self._secrets[v] = self._secrets.get(v, 0) + 1

        def remove() -> None:
            with self._lock:
                for v in values:
                    left = self._secrets.get(v, 0) - 1
                    if left > 0:
                        self._secrets[v] = left
                    else:
                        self._secrets.pop(v, None)

        return remove

    def redact(self, text: str) -> str:
        with self._lock:
            secrets = list(self._secrets)
        for secret in secrets:
            text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        with self._lock:
            secrets = list(self._secrets)
        if secrets:
            message = record.getMessage()
            masked = message
            for secret in secrets:
                masked = masked.replace(secret, "***")
            if masked != message:
                record.msg, record.args = masked, None
        return True


_REDACTOR = _Redactor()
# The loggers that print request headers or signing material at DEBUG.
_LEAKY_LOGGERS = ("botocore.auth", "botocore.endpoint", "aiobotocore.endpoint", "urllib3.connectionpool")


def hide_in_logs(creds: ResolvedCredentials) -> Callable[[], None]:
    """Mask these credentials' secrets in SDK log lines; call the result to stop."""
    values = [v for v in creds.secret_values() if len(v) >= 4]
    if not values:
        return lambda: None
    for name in _LEAKY_LOGGERS:
        logger = logging.getLogger(name)
        if _REDACTOR not in logger.filters:
            logger.addFilter(_REDACTOR)
    return _REDACTOR.add(values)


def redact(text: str) -> str:
    """Mask every live driver's secrets in text taken from a foreign exception."""
    return _REDACTOR.redact(text)
