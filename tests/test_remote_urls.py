"""s3:// and minio:// URL parsing and client configuration, without any network."""

from __future__ import annotations

from typing import Any

import pytest

from piecestore.backends import open_backend
from piecestore.backends.minio import MinioBackend
from piecestore.backends.s3 import S3Backend
from piecestore.errors import ConfigError, PieceStoreError

KEYS = {"access_key": "AKIAEXAMPLE", "secret_key": "example-secret-value"}


@pytest.fixture(autouse=True)
def no_region_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "MINIO_REGION"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("url", "display", "region", "addressing"),
    [
        ("s3://bucket", "s3://bucket", None, "auto"),
        ("s3://my.bucket-1/a/b", "s3://my.bucket-1/a/b", None, "auto"),
        ("s3://bucket/pre/?region=eu-central-1", "s3://bucket/pre", "eu-central-1", "auto"),
        ("s3://bucket/p?endpoint=http://127.0.0.1:9000", "s3://bucket/p?endpoint=http://127.0.0.1:9000",
         "us-east-1", "path"),
        ("s3://bucket/p?endpoint=https://s3.example.com/&addressing=virtual&region=r1",
         "s3://bucket/p?endpoint=https://s3.example.com", "r1", "virtual"),
        ("s3://bucket/sp%20ace", "s3://bucket/sp ace", None, "auto"),
    ],
)  # fmt: skip
def test_good_s3_urls(url: str, display: str, region: str | None, addressing: str) -> None:
    with open_backend(url, **KEYS) as b:
        assert isinstance(b, S3Backend)
        assert b.display_url == display
        assert b._loc.region == region and b._loc.addressing == addressing
        assert b.capabilities.remote and b.capabilities.max_delete_batch == 1000


@pytest.mark.parametrize(
    ("url", "options", "problem"),
    [
        ("s3://", {}, "names no bucket"),
        ("s3://ab/x", {}, "must be 3 to 63 characters"),
        ("s3://" + "a" * 64, {}, "must be 3 to 63 characters"),
        ("s3://My-Bucket", {}, "only lowercase letters"),
        ("s3://bucket_1", {}, "only lowercase letters"),
        ("s3://-bucket", {}, "begin and end with a letter or digit"),
        ("s3://bucket-", {}, "begin and end with a letter or digit"),
        ("s3://a..b", {}, "two adjacent dots"),
        ("s3://192.168.1.1", {}, "IP address"),
        ("s3://xn--bucket", {}, "reserved"),
        ("s3://bucket:9000/x", {}, "only lowercase letters"),
        ("s3://key:secret@bucket/x", {}, "must not carry credentials"),
        ("s3://bucket/a/../b", {}, "store prefix"),
        ("s3://bucket/a//b", {}, "store prefix"),
        ("s3://bucket/x?secret_key=abc", {}, "must not carry credentials"),
        ("s3://bucket/x?colour=blue", {}, "unknown query parameter 'colour'"),
        ("s3://bucket/x?region=a&region=b", {}, "repeated"),
        ("s3://bucket/x?endpoint=ftp://host", {}, "must look like http"),
        ("s3://bucket/x?endpoint=http://host/path", {}, "without a path"),
        ("s3://bucket/x?endpoint=http://host:99999", {}, "invalid port"),
        ("s3://bucket/x?addressing=sideways", {}, "addressing must be"),
        ("s3://bucket/x?region=Not_A_Region", {}, "region 'Not_A_Region' is invalid"),
        ("s3://bucket/x", {"colour": "blue", "flavour": 1}, "for the s3 driver: colour, flavour"),
        ("s3://bucket/x", {"concurrency": 0}, "concurrency must be between"),
        ("s3://bucket/x", {"concurrency": "many"}, "concurrency must be a number"),
        ("s3://bucket/x", {"multipart_threshold": 1024}, "multipart_threshold must be between"),
        ("s3://bucket/x", {"max_retries": -1}, "max_retries must be between"),
        ("s3://bucket/x", {"read_only": "perhaps"}, "read_only must be true or false"),
        ("s3://bucket/x", {"list_order": "random"}, "list_order must be"),
        ("s3://bucket/x#frag", {}, "fragment"),
    ],
)  # fmt: skip
def test_bad_s3_urls(url: str, options: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        open_backend(url, **KEYS, **options)
    assert problem in str(info.value)
    assert KEYS["secret_key"] not in str(info.value)


def test_bucket_error_names_bucket_and_rule() -> None:
    with pytest.raises(
        ConfigError, match=r"bucket name 'Bad_Bucket' is invalid: an S3 bucket name may contain only"
    ):
        open_backend("s3://Bad_Bucket/x", **KEYS)


def test_options_override_url() -> None:
    with open_backend(
        "s3://bucket/p?endpoint=http://127.0.0.1:1&region=r1&addressing=path",
        endpoint="http://127.0.0.1:2", region="r2", addressing="virtual", **KEYS,
    ) as b:  # fmt: skip
        assert (
            b._loc.endpoint == "http://127.0.0.1:2"
            and b._loc.region == "r2"
            and b._loc.addressing == "virtual"
        )


def test_region_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    with open_backend("s3://bucket", **KEYS) as b:
        assert b._loc.region == "ap-south-1"
    with open_backend("s3://bucket?region=eu-west-3", **KEYS) as b:
        assert b._loc.region == "eu-west-3"  # the URL beats the environment


@pytest.mark.parametrize(
    ("region", "endpoint"),
    [
        ("cn-north-1", "https://s3.cn-north-1.amazonaws.com.cn"),
        ("cn-northwest-1", "https://s3.cn-northwest-1.amazonaws.com.cn"),
        ("eu-west-1", "https://s3.eu-west-1.amazonaws.com"),
    ],
)
def test_aws_endpoints_resolved_by_botocore(region: str, endpoint: str) -> None:
    with open_backend(f"s3://bucket/p?region={region}", **KEYS) as b:
        assert isinstance(b, S3Backend)
        assert b.client_endpoint() == endpoint


def test_addressing_style_reaches_botocore() -> None:
    with open_backend("s3://bucket/p?region=eu-west-1&addressing=virtual", **KEYS) as b:
        assert isinstance(b, S3Backend)
        assert b.addressing_style() == "virtual"
    with open_backend("s3://bucket/p?endpoint=http://127.0.0.1:1", **KEYS) as b:
        assert isinstance(b, S3Backend)
        assert b.addressing_style() == "path"


class Captured(Exception):
    pass


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://bucket/p?region=cn-north-1&addressing=virtual", "https://bucket.s3.cn-north-1.amazonaws.com.cn/p/k"),
        ("s3://bucket/p?region=eu-west-1&addressing=path", "https://s3.eu-west-1.amazonaws.com/bucket/p/k"),
        ("s3://bucket/p?endpoint=http://127.0.0.1:9&addressing=path", "http://127.0.0.1:9/bucket/p/k"),
        ("s3://bucket/p?endpoint=https://store.example:8443&addressing=virtual",
         "https://bucket.store.example:8443/p/k"),
    ],
)  # fmt: skip
def test_request_urls_without_sending(url: str, expected: str) -> None:
    """Stop each request just before it is sent and look at where it would have gone."""
    seen: list[str] = []

    def stop(request: Any, **_: Any) -> None:
        seen.append(request.url)
        raise Captured

    with open_backend(url, **KEYS) as b:
        assert isinstance(b, S3Backend)

        async def hook() -> None:
            client = await b._fs.set_session()
            client.meta.events.register("before-send.s3", stop)

        b._loop.run(hook())
        with pytest.raises(PieceStoreError, match="Captured") as info:
            b.get("k")
        assert isinstance(info.value.__cause__, Captured)
    assert seen == [expected]


@pytest.mark.parametrize(
    ("url", "options", "display", "secure", "region"),
    [
        ("minio://127.0.0.1:9000/bucket", {}, "minio://127.0.0.1:9000/bucket", True, "us-east-1"),
        ("minio://127.0.0.1:9000/bucket/a/b?secure=false", {}, "minio://127.0.0.1:9000/bucket/a/b", False,
         "us-east-1"),
        ("minio://host.example/bucket?region=eu-1", {}, "minio://host.example/bucket", True, "eu-1"),
        ("minio://host:9000/bucket?secure=true", {"secure": False, "region": "r9"}, "minio://host:9000/bucket",
         False, "r9"),
        ("minio://[::1]:9000/bucket", {}, "minio://[::1]:9000/bucket", True, "us-east-1"),
        ("minio://s3.amazonaws.com/bucket", {}, "minio://s3.amazonaws.com/bucket", True, None),
    ],
)  # fmt: skip
def test_good_minio_urls(
    url: str, options: dict[str, Any], display: str, secure: bool, region: str | None
) -> None:
    with open_backend(url, **KEYS, **options) as b:
        assert isinstance(b, MinioBackend)
        assert b.display_url == display
        assert b._client._base_url.is_https is secure
        assert (b._client._base_url.region or None) == region  # AWS: discovered per bucket


def test_minio_pool_sized_to_concurrency() -> None:
    with open_backend("minio://127.0.0.1:9000/bucket", concurrency=24, **KEYS) as b:
        assert isinstance(b, MinioBackend)
        assert b._http.connection_pool_kw["maxsize"] == 24
        assert b._client._http is b._http
        assert b.capabilities.concurrency == 24


def test_minio_region_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_REGION", "aws-region")
    with open_backend("minio://127.0.0.1:9000/bucket", **KEYS) as b:
        assert b._client._base_url.region == "aws-region"  # type: ignore[attr-defined]
    monkeypatch.setenv("MINIO_REGION", "minio-region")
    with open_backend("minio://127.0.0.1:9000/bucket", **KEYS) as b:
        assert b._client._base_url.region == "minio-region"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("url", "options", "problem"),
    [
        ("minio:///bucket", {}, "needs a host"),
        ("minio://127.0.0.1:9000", {}, "names no bucket"),
        ("minio://127.0.0.1:9000/", {}, "names no bucket"),
        ("minio://127.0.0.1:9000/BAD", {}, "only lowercase letters"),
        ("minio://127.0.0.1:0/bucket", {}, "invalid port"),
        ("minio://127.0.0.1:99999/bucket", {}, "invalid port"),
        ("minio://user:pw@127.0.0.1:9000/bucket", {}, "must not carry credentials"),
        ("minio://127.0.0.1:9000/bucket?secure=maybe", {}, "secure must be true or false"),
        ("minio://127.0.0.1:9000/bucket?endpoint=x", {}, "unknown query parameter 'endpoint'"),
        ("minio://127.0.0.1:9000/bucket?access_key=x", {}, "must not carry credentials"),
        ("minio://127.0.0.1:9000/bucket/a/./b", {}, "store prefix"),
        ("minio://127.0.0.1:9000/bucket", {"endpoint": "http://x"}, "unknown option(s) for the minio driver"),
        ("minio://127.0.0.1:9000/bucket", {"access_key": "K"}, "without secret_key"),
    ],
)  # fmt: skip
def test_bad_minio_urls(url: str, options: dict[str, Any], problem: str) -> None:
    opts = {**KEYS, **options} if "access_key" not in options else options
    with pytest.raises(ConfigError) as info:
        open_backend(url, **opts)
    assert problem in str(info.value)
