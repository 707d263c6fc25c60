"""Credential resolution: precedence, environment names, half pairs, masking. No network."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from piecestore.backends.credentials import env_region, hide_in_logs, resolve_credentials
from piecestore.errors import ConfigError

SECRET = "sEcReT-value-0123456789"
TOKEN = "tOkEn-value-9876543210"
ALL_VARS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY", "AWS_SECRET_KEY",
    "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY", "MINIO_SESSION_TOKEN", "MINIO_REGION", "AWS_REGION",
    "AWS_DEFAULT_REGION", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
)  # fmt: skip


AWS_STD = {"AWS_ACCESS_KEY_ID": "A1", "AWS_SECRET_ACCESS_KEY": "s1"}
AWS_GO = {"AWS_ACCESS_KEY": "G1", "AWS_SECRET_KEY": "s2"}  # the Go PieceStore's names
MINIO = {"MINIO_ACCESS_KEY": "M1", "MINIO_SECRET_KEY": "s3"}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ALL_VARS:
        monkeypatch.delenv(name, raising=False)


def resolve(flavor: str = "s3", **options: Any) -> Any:
    return resolve_credentials(options, flavor=flavor)  # type: ignore[arg-type]


def test_options_beat_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ENVKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envsecret")
    creds = resolve(access_key="OPTKEY", secret_key=SECRET, session_token=TOKEN)
    assert creds.kind == "static" and creds.source == "options" and creds.access_key == "OPTKEY"
    assert creds.secret_key.get_secret_value() == SECRET
    assert creds.session_token.get_secret_value() == TOKEN


def test_options_are_consumed() -> None:
    options: dict[str, Any] = {"access_key": "K", "secret_key": SECRET, "other": 1}
    resolve_credentials(options, flavor="s3")
    assert options == {"other": 1}


@pytest.mark.parametrize(
    ("env", "flavor", "key", "source"),
    [
        ({**AWS_STD}, "s3", "A1", "environment AWS_ACCESS_KEY_ID"),
        ({**AWS_GO}, "s3", "G1", "environment AWS_ACCESS_KEY"),
        ({**AWS_STD, **AWS_GO}, "s3", "A1", "environment AWS_ACCESS_KEY_ID"),
        ({**MINIO}, "minio", "M1", "environment MINIO_ACCESS_KEY"),
        ({**MINIO, **AWS_STD, **AWS_GO}, "minio", "M1", "environment MINIO_ACCESS_KEY"),
        ({**AWS_STD, **AWS_GO}, "minio", "A1", "environment AWS_ACCESS_KEY_ID"),
        ({**AWS_GO}, "minio", "G1", "environment AWS_ACCESS_KEY"),
        # the s3 driver does not read MINIO_* names
        ({**MINIO}, "s3", None, "the provider's default credential chain"),
    ],
)  # fmt: skip
def test_environment_names(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], flavor: str, key: str | None, source: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    creds = resolve(flavor)
    assert creds.access_key == key and creds.source == source


def test_session_token_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY", "G1")
    monkeypatch.setenv("AWS_SECRET_KEY", "s1")
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    assert resolve().session_token.get_secret_value() == TOKEN
    monkeypatch.setenv("MINIO_ACCESS_KEY", "M1")
    monkeypatch.setenv("MINIO_SECRET_KEY", "s2")
    monkeypatch.setenv("MINIO_SESSION_TOKEN", "minio-token")
    assert resolve("minio").session_token.get_secret_value() == "minio-token"


@pytest.mark.parametrize(
    ("options", "missing"),
    [({"access_key": "K"}, "without secret_key"), ({"secret_key": SECRET}, "without access_key"),
     ({"session_token": TOKEN}, "needs access_key and secret_key")],
)  # fmt: skip
def test_half_pair_in_options(options: dict[str, Any], missing: str) -> None:
    with pytest.raises(ConfigError, match=missing) as info:
        resolve(**options)
    assert SECRET not in str(info.value) and TOKEN not in str(info.value)


@pytest.mark.parametrize(
    ("env", "message"),
    [({"AWS_ACCESS_KEY_ID": "K"}, "AWS_SECRET_ACCESS_KEY is missing"),
     ({"AWS_SECRET_ACCESS_KEY": SECRET}, "AWS_ACCESS_KEY_ID is missing"),
     ({"AWS_ACCESS_KEY": "K"}, "AWS_SECRET_KEY is missing"),
     ({"AWS_SECRET_KEY": SECRET}, "AWS_ACCESS_KEY is missing")],
)  # fmt: skip
def test_half_pair_in_environment(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message) as info:
        resolve()
    assert SECRET not in str(info.value)


def test_minio_half_pair(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINIO_ACCESS_KEY", "K")
    with pytest.raises(ConfigError, match="MINIO_SECRET_KEY is missing"):
        resolve("minio")


def test_anonymous() -> None:
    assert resolve(anonymous=True).kind == "anonymous"
    assert resolve(anonymous="true").kind == "anonymous"
    with pytest.raises(ConfigError, match="anonymous=True cannot be combined with access_key"):
        resolve(anonymous=True, access_key="K", secret_key=SECRET)


def test_anonymous_ignores_environment_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "K")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    assert resolve(anonymous=True).kind == "anonymous"


def test_no_keys_means_default_chain() -> None:
    creds = resolve()
    assert creds.kind == "default_chain" and creds.access_key is None and creds.secret_key is None


def test_web_identity_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("jwt")
    monkeypatch.setenv("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/r")
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token_file))
    creds = resolve()
    assert creds.kind == "web_identity" and creds.access_key is None  # nothing forces keys
    assert (
        creds.role_arn == "arn:aws:iam::123456789012:role/r" and creds.source == "web identity (environment)"
    )


def test_web_identity_options_beat_environment_and_keys_beat_both(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("jwt")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ENVKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envsecret")
    creds = resolve(role_arn="arn:aws:iam::1:role/x", web_identity_token_file=str(token_file))
    assert creds.kind == "web_identity" and creds.source == "web identity (options)"
    assert resolve().kind == "static"  # environment keys come before environment web identity


def test_web_identity_half_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="web_identity_token_file is missing"):
        resolve(role_arn="arn:aws:iam::1:role/x")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(role_arn="arn:aws:iam::1:role/x", web_identity_token_file=str(tmp_path / "nope"))
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="AWS_ROLE_ARN is missing"):
        resolve()


def test_repr_and_str_mask_secrets() -> None:
    creds = resolve(access_key="AKIAEXAMPLEKEY1234", secret_key=SECRET, session_token=TOKEN)
    for text in (repr(creds), str(creds), f"{creds}", repr(creds.secret_key), str(creds.session_token)):
        assert SECRET not in text and TOKEN not in text
        assert "AKIAEXAMPLEKEY1234" not in text
    assert "1234" in repr(creds)  # enough to recognise which key


def test_region_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert env_region("s3") is None
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert env_region("s3") == "eu-west-1" and env_region("minio") == "eu-west-1"
    monkeypatch.setenv("AWS_REGION", "eu-west-2")
    assert env_region("s3") == "eu-west-2"
    monkeypatch.setenv("MINIO_REGION", "home-1")
    assert env_region("minio") == "home-1" and env_region("s3") == "eu-west-2"


def test_log_redaction(caplog: pytest.LogCaptureFixture) -> None:
    creds = resolve(access_key="K", secret_key=SECRET, session_token=TOKEN)
    stop = hide_in_logs(creds)
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("botocore.endpoint").debug(
            "headers %s", {"x-amz-security-token": TOKEN, "s": SECRET}
        )
    stop()
    assert TOKEN not in caplog.text and SECRET not in caplog.text and "***" in caplog.text
