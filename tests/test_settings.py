"""Settings: precedence, env names and aliases, Go PieceStore configs, errors that help, secrets kept."""

from __future__ import annotations

import os
import tomllib
import warnings
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from piecestore.errors import ConfigError
from piecestore.settings import FLAT_KEYS, GROUP_MODELS, SETTING_PATHS, Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
ALIAS_NAMES = (
    "BUCKET_URL",
    "AWS_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_KEY",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "MINIO_ACCESS_KEY",
    "MINIO_SECRET_KEY",
    "MINIO_SESSION_TOKEN",
    "MINIO_REGION",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No developer AWS_*/MINIO_*/PIECESTORE_* variable and no ./config.toml may leak into a test."""
    for name in list(os.environ):
        upper = name.upper()
        if upper.startswith(("PIECESTORE_", "AWS_", "MINIO_")) or upper in ALIAS_NAMES:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def config_error(**kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(**kwargs)
    assert not isinstance(info.value, ValidationError)
    # Never chained to a ValidationError, whose text would echo inputs (secrets included).
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__
    return str(info.value)


# ---------------------------------------------------------------------------- defaults and precedence


def test_defaults() -> None:
    s = load_settings()
    assert s.store.url == "" and s.store.create is True and s.store.read_only is False
    assert s.sharding.shards == 0 and s.sharding.targets == [] and s.sharding.weights == []
    assert s.s3.access_key is None and s.s3.addressing == "auto" and s.s3.tls_verify is True
    assert s.s3.multipart_threshold == 32 * 1024 * 1024
    assert (s.retry.max_retries, s.retry.min_retry_delay, s.retry.max_retry_delay, s.retry.deadline) == (
        5,
        0.05,
        2.0,
        30.0,
    )
    assert s.engine.small_piece_max_bytes == 1024 * 1024 and s.engine.coalesce_gap_bytes is None
    assert s.cache.memory_bytes == 64 * 1024 * 1024 and s.cache.disk_bytes == 1024**3
    assert s.gc.grace_seconds == 3600 and s.gc.dead_fraction == 0.3
    assert s.shard_urls() == [""]


def test_precedence_defaults_toml_env_kwargs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "p.toml",
        "[gc]\ngrace_seconds = 10\nlease_seconds = 11\ndead_fraction = 0.5\n",
    )
    monkeypatch.setenv("PIECESTORE_GC__GRACE_SECONDS", "20")
    monkeypatch.setenv("PIECESTORE_GC__LEASE_SECONDS", "21")
    s = load_settings(cfg, gc_grace_seconds=30)
    assert s.gc.grace_seconds == 30  # kwargs > env
    assert s.gc.lease_seconds == 21  # env > file
    assert s.gc.dead_fraction == 0.5  # file > default
    assert s.gc.compact_min_tables == 8  # default


def test_config_file_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write(tmp_path / "config.toml", "[gc]\ngrace_seconds = 1\n")
    other = write(tmp_path / "other.toml", "[gc]\ngrace_seconds = 2\n")
    third = write(tmp_path / "third.toml", "[gc]\ngrace_seconds = 3\n")
    assert load_settings().gc.grace_seconds == 1  # ./config.toml when present
    monkeypatch.setenv("PIECESTORE_CONFIG", str(other))
    assert load_settings().gc.grace_seconds == 2  # env beats ./config.toml, read at call time
    assert load_settings(config_file=third).gc.grace_seconds == 3  # argument beats env
    monkeypatch.setenv("PIECESTORE_CONFIG", "")
    assert load_settings().gc.grace_seconds == 3600  # empty = no file
    assert load_settings(config_file="").gc.grace_seconds == 3600


def test_missing_config_file_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PIECESTORE_CONFIG", str(tmp_path / "nope.toml"))
    message = config_error()
    assert "PIECESTORE_CONFIG" in message and "nope.toml" in message
    monkeypatch.delenv("PIECESTORE_CONFIG")
    assert "nope.toml" in config_error(config_file=tmp_path / "nope.toml")


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    cfg = write(tmp_path / "bad.toml", "[gc\ngrace_seconds = 1\n")
    message = config_error(config_file=cfg)
    assert "bad.toml" in message and "not valid TOML" in message


def test_settings_constructor_reads_env_and_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write(tmp_path / "config.toml", "[cache]\ndisk_dir = '/var/cache/p'\n")
    monkeypatch.setenv("PIECESTORE_GC__GRACE_SECONDS", "5")
    s = Settings()
    assert s.gc.grace_seconds == 5 and s.cache.disk_dir == "/var/cache/p"
    with pytest.raises(ConfigError, match=r"gc\.dead_fraction: must be > 0"):
        Settings(gc={"dead_fraction": 0})
    with pytest.raises(ConfigError, match=r"gc\.dead_fraction: must be > 0"):
        Settings.model_validate({"gc": {"dead_fraction": 0}})
    assert Settings.model_validate({"gc": {"dead_fraction": 1}}).gc.dead_fraction == 1


# ---------------------------------------------------------------------------- keyword overrides


def test_flat_keyword_names() -> None:
    s = load_settings(
        gc_grace_seconds=0,
        engine_small_piece_max_bytes=4096,
        s3_access_key="AK",
        lease_seconds=5,  # bare name, unique across groups
        cache={"memory_bytes": 0},  # a whole group as a dict
    )
    assert s.gc.grace_seconds == 0 and s.gc.lease_seconds == 5
    assert s.engine.small_piece_max_bytes == 4096
    assert s.s3.access_key is not None and s.s3.access_key.get_secret_value() == "AK"
    assert s.cache.memory_bytes == 0


def test_every_setting_has_a_flat_name() -> None:
    for group, name in SETTING_PATHS:
        assert FLAT_KEYS[f"{group}_{name}"] == (group, name)
        assert FLAT_KEYS[name] == (group, name)  # all field names are unique today


def test_same_setting_twice_in_kwargs() -> None:
    message = config_error(gc_grace_seconds=1, grace_seconds=2)
    assert "gc.grace_seconds" in message and "twice" in message


def test_unknown_keyword() -> None:
    message = config_error(gc_grace_second=1)
    assert "gc_grace_second" in message and "did you mean gc_grace_seconds" in message
    message = config_error(gc={"grace": 1})
    assert "gc.grace" in message and "keyword argument gc" in message


# ---------------------------------------------------------------------------- environment


def test_nested_env_with_double_underscore(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIECESTORE_GC__GRACE_SECONDS", "5")
    monkeypatch.setenv("piecestore_store__read_only", "true")  # names are case-insensitive
    monkeypatch.setenv("PIECESTORE_ENGINE__TABLE_TARGET_BYTES", "32MiB")
    monkeypatch.setenv("PIECESTORE_ENGINE__COALESCE_GAP_BYTES", "65536")
    monkeypatch.setenv("PIECESTORE_SHARDING__TARGETS", "s3://a, s3://b")
    monkeypatch.setenv("PIECESTORE_SHARDING__WEIGHTS", "[1, 3]")
    monkeypatch.setenv("PIECESTORE_S3", '{"region": "eu-west-1", "concurrency": 4}')
    s = load_settings()
    assert s.gc.grace_seconds == 5 and s.store.read_only is True
    assert s.engine.table_target_bytes == 32 * 1024 * 1024 and s.engine.coalesce_gap_bytes == 65536
    assert s.sharding.targets == ["s3://a", "s3://b"] and s.sharding.weights == [1.0, 3.0]
    assert s.s3.region == "eu-west-1" and s.s3.concurrency == 4
    assert s.shard_urls() == ["s3://a", "s3://b"]


@pytest.mark.parametrize(
    ("env", "group", "field", "value"),
    [
        ("BUCKET_URL", "store", "url", "s3://bucket/prefix"),
        ("AWS_ACCESS_KEY", "s3", "access_key", "AKGO"),
        ("AWS_ACCESS_KEY_ID", "s3", "access_key", "AKSDK"),
        ("AWS_SECRET_KEY", "s3", "secret_key", "SKGO"),
        ("AWS_SECRET_ACCESS_KEY", "s3", "secret_key", "SKSDK"),
        ("AWS_SESSION_TOKEN", "s3", "session_token", "TOKEN"),
        ("AWS_REGION", "s3", "region", "eu-central-1"),
        ("AWS_DEFAULT_REGION", "s3", "region", "ap-south-1"),
        ("AWS_ROLE_ARN", "s3", "role_arn", "arn:aws:iam::123456789012:role/pieces"),
        ("AWS_WEB_IDENTITY_TOKEN_FILE", "s3", "web_identity_token_file", "/var/run/token"),
        ("MINIO_ACCESS_KEY", "s3", "access_key", "minioak"),
        ("MINIO_SECRET_KEY", "s3", "secret_key", "miniosk"),
        ("MINIO_SESSION_TOKEN", "s3", "session_token", "miniotoken"),
        ("MINIO_REGION", "s3", "region", "home-1"),
    ],
)
def test_env_alias(monkeypatch: pytest.MonkeyPatch, env: str, group: str, field: str, value: str) -> None:
    monkeypatch.setenv(env, value)
    got = getattr(getattr(load_settings(), group), field)
    if isinstance(got, SecretStr):
        got = got.get_secret_value()
    assert got == value
    # A PIECESTORE_ name always wins over the alias.
    override = "s3://other" if field == "url" else "from-piecestore"
    monkeypatch.setenv(f"PIECESTORE_{group.upper()}__{field.upper()}", override)
    got = getattr(getattr(load_settings(), group), field)
    if isinstance(got, SecretStr):
        got = got.get_secret_value()
    assert got == override


def test_alias_beats_file_and_kwargs_beat_alias(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.toml", "[s3]\nregion = 'from-file'\n")
    monkeypatch.setenv("AWS_REGION", "from-env")
    assert load_settings(cfg).s3.region == "from-env"
    assert load_settings(cfg, s3_region="from-kwargs").s3.region == "from-kwargs"


def test_credentials_come_from_one_family(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "sdk-ak")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sdk-sk")
    monkeypatch.setenv("MINIO_ACCESS_KEY", "minio-ak")
    monkeypatch.setenv("MINIO_SECRET_KEY", "minio-sk")
    s3 = load_settings().s3
    assert s3.access_key and s3.access_key.get_secret_value() == "sdk-ak"
    assert s3.secret_key and s3.secret_key.get_secret_value() == "sdk-sk"
    # The Go PieceStore names come first, as a pair.
    monkeypatch.setenv("AWS_ACCESS_KEY", "go-ak")
    monkeypatch.setenv("AWS_SECRET_KEY", "go-sk")
    s3 = load_settings().s3
    assert s3.access_key and s3.access_key.get_secret_value() == "go-ak"
    assert s3.secret_key and s3.secret_key.get_secret_value() == "go-sk"
    # For a minio store the MINIO_* family goes first.
    s3 = load_settings(store_url="minio://127.0.0.1:9000/b").s3
    assert s3.access_key and s3.access_key.get_secret_value() == "minio-ak"
    assert s3.secret_key and s3.secret_key.get_secret_value() == "minio-sk"


def test_bucket_url_env_accepts_go_endpoint_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUCKET_URL", "https://s3.us-east-1.amazonaws.com/mybucket")
    s = load_settings()
    assert s.store.url == "s3://mybucket?endpoint=https://s3.us-east-1.amazonaws.com&region=us-east-1"
    assert s.s3.addressing == "path"


def test_unknown_piecestore_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIECESTORE_GC_GRACE_SECONDS", "5")  # single underscore: a typo
    message = config_error()
    assert "PIECESTORE_GC_GRACE_SECONDS" in message and "PIECESTORE_GC__GRACE_SECONDS" in message
    monkeypatch.delenv("PIECESTORE_GC_GRACE_SECONDS")
    monkeypatch.setenv("PIECESTORE_GC__GRACE", "5")
    assert "PIECESTORE_GC__GRACE" in config_error()


def test_reserved_piecestore_env_vars_are_not_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIECESTORE_REQUIRE_S3", "1")
    monkeypatch.setenv("PIECESTORE_SOAK", "1")
    monkeypatch.setenv("PIECESTORE_BENCH_ROUNDS", "3")
    assert load_settings().gc.grace_seconds == 3600


def test_bad_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIECESTORE_ENGINE__FLUSH_LINGER_MS", "-1")
    message = config_error()
    assert "engine.flush_linger_ms: must be >= 0 (got '-1')" in message
    assert "PIECESTORE_ENGINE__FLUSH_LINGER_MS" in message
    monkeypatch.setenv("PIECESTORE_ENGINE__FLUSH_LINGER_MS", "soon")
    assert "must be a number" in config_error()
    monkeypatch.delenv("PIECESTORE_ENGINE__FLUSH_LINGER_MS")
    monkeypatch.setenv("PIECESTORE_S3", "{not json")
    assert "PIECESTORE_S3" in config_error()


# ---------------------------------------------------------------------------- unknown keys and bad values


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[gc]\ngrace_second = 1\n", ["gc.grace_second", "did you mean gc.grace_seconds"]),
        ("[garbage]\nx = 1\n", ["garbage", "unknown top-level table"]),
        ("[Store]\nurl = 'memory://x'\n", ["Store", "did you mean [store]"]),
        ("grace_seconds = 1\n", ["grace_seconds", "put it under [gc]"]),
        ("[PieceStore]\nShard = 2\n", ["[PieceStore] Shard", "unknown Go PieceStore key"]),
        ("[PieceStore.Store]\nBucket = 'x'\n", ["[PieceStore.Store] Bucket", "unknown Go PieceStore key"]),
    ],
)
def test_unknown_keys_in_toml(tmp_path: Path, text: str, expected: list[str]) -> None:
    cfg = write(tmp_path / "c.toml", text)
    message = config_error(config_file=cfg)
    for part in expected:
        assert part in message
    assert "c.toml" in message


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"engine_flush_linger_ms": -1}, "engine.flush_linger_ms: must be >= 0 (got -1)"),
        ({"cache_memory_bytes": -5}, "cache.memory_bytes: must be >= 0 (got -5)"),
        ({"engine_flush_bytes": "16MB"}, "engine.flush_bytes: must be a whole number of bytes or a size"),
        ({"s3_concurrency": "many"}, "s3.concurrency: must be an integer (got 'many')"),
        ({"s3_multipart_threshold": 1024}, "s3.multipart_threshold: must be >= 5242880"),
        ({"store_read_only": "perhaps"}, "store.read_only: must be true or false"),
        ({"s3_addressing": "sideways"}, "s3.addressing: must be one of 'auto', 'path' or 'virtual'"),
        ({"s3_endpoint": "localhost:8333"}, "s3.endpoint: must start with http:// or https://"),
        ({"gc_dead_fraction": 0}, "gc.dead_fraction: must be > 0 (got 0)"),
        ({"gc_dead_fraction": 1.5}, "gc.dead_fraction: must be <= 1 (got 1.5)"),
        ({"store_url": "s4://bucket"}, "store.url: unknown scheme 's4'"),
        (
            {"sharding_weights": [1, -1], "sharding_targets": ["s3://a", "s3://b"]},
            "sharding.weights[1]: must be > 0",
        ),
    ],
)
def test_bad_values_name_the_key(kwargs: dict[str, Any], expected: str) -> None:
    message = config_error(**kwargs)
    assert expected in message
    assert "[from keyword argument" in message


def test_bad_value_in_toml_says_where(tmp_path: Path) -> None:
    write(tmp_path / "config.toml", "[engine]\nflush_linger_ms = -1\n")
    message = config_error()
    assert message.startswith("engine.flush_linger_ms: must be >= 0 (got -1) [from config.toml]")


def test_several_problems_are_reported_together(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.toml", "[engine]\nflush_linger_ms = -1\n[gc]\ndead_fraction = 0\n")
    message = config_error(config_file=cfg)
    assert "2 problems" in message and "engine.flush_linger_ms" in message and "gc.dead_fraction" in message


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"sharding_shards": 2, "sharding_targets": ["s3://a", "s3://b"]}, "mutually exclusive"),
        ({"sharding_targets": ["s3://a", "s3://b"], "sharding_weights": [1.0]}, "one weight per shard"),
        ({"sharding_weights": [1.0]}, "no shards"),
        ({"sharding_shards": 2, "store_url": "s3://bucket"}, "no {shard} placeholder"),
        ({"sharding_shards": 2}, "needs a URL template"),
        ({"sharding_template": "s3://p-{shard}"}, "sharding.shards is 0"),
        ({"store_url": "s3://p-{shard}"}, "store.url contains {shard}"),
        ({"sharding_shards": 2, "sharding_template": "s3://p-{shard:q}"}, "bad format spec"),
        ({"retry_min_retry_delay": 5, "retry_max_retry_delay": 1}, "retry.max_retry_delay (1) must be >="),
        ({"engine_small_piece_max_bytes": "128MiB"}, "engine.small_piece_max_bytes must be <="),
    ],
)
def test_conflicting_settings(kwargs: dict[str, Any], expected: str) -> None:
    message = config_error(**kwargs)
    assert expected in message
    assert "from keyword argument" in message


def test_shard_templates() -> None:
    s = load_settings(sharding_shards=3, store_url="s3://pieces-{shard}?region=eu-west-1")
    assert s.shard_urls() == [f"s3://pieces-{i}?region=eu-west-1" for i in range(3)]
    s = load_settings(
        sharding_shards=2, sharding_template="file:///data/{shard:02d}", sharding_weights=[1, 2]
    )
    assert s.shard_urls() == ["file:///data/00", "file:///data/01"]


def test_sizes_accept_units() -> None:
    s = load_settings(cache_memory_bytes="1.5KiB", cache_disk_bytes="2GiB", engine_max_request_bytes="auto")
    assert s.cache.memory_bytes == 1536 and s.cache.disk_bytes == 2 * 1024**3
    assert s.engine.max_request_bytes is None


# ---------------------------------------------------------------------------- Go PieceStore config


def test_go_config_read_unchanged() -> None:
    with pytest.warns(UserWarning, match="1 ns"):
        s = load_settings(config_file=DATA / "go_piecestore_config.toml")
    assert s.store.url == (
        "s3://greenfield-pieces?endpoint=https://s3.ap-northeast-1.amazonaws.com&region=ap-northeast-1"
    )
    assert s.s3.addressing == "path"
    assert s.sharding.shards == 0
    assert s.retry.max_retries == 5
    assert s.retry.min_retry_delay == pytest.approx(1e-9)  # a Go time.Duration: nanoseconds
    assert s.s3.tls_verify is True
    assert s.s3.iam_type == "AKSK"


def test_go_config_sharded_with_go_verb(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "go.toml",
        """
[PieceStore]
Shards = 3

[PieceStore.Store]
Storage = "s3"
BucketURL = "https://pieces-%d.s3.eu-west-1.amazonaws.com"
MinRetryDelay = "1s"
TLSInsecureSkipVerify = true
IAMType = "sa"
NoSignRequest = true
""",
    )
    s = load_settings(config_file=cfg)
    assert s.store.url == "s3://pieces-{shard}?endpoint=https://s3.eu-west-1.amazonaws.com&region=eu-west-1"
    assert s.s3.addressing == "virtual"
    assert s.shard_urls()[2] == "s3://pieces-2?endpoint=https://s3.eu-west-1.amazonaws.com&region=eu-west-1"
    assert s.retry.min_retry_delay == 1.0
    assert s.s3.tls_verify is False
    assert s.s3.iam_type == "SA"
    assert s.s3.anonymous is True


@pytest.mark.parametrize(
    ("storage", "bucket_url", "url", "addressing"),
    [
        (
            "s3",
            "https://s3.us-east-1.amazonaws.com/mybucket",
            "s3://mybucket?endpoint=https://s3.us-east-1.amazonaws.com&region=us-east-1",
            "path",
        ),
        (
            "s3",
            "https://mybucket.s3.us-east-1.amazonaws.com",
            "s3://mybucket?endpoint=https://s3.us-east-1.amazonaws.com&region=us-east-1",
            "virtual",
        ),
        (
            "s3",
            "https://s3.cn-north-1.amazonaws.com.cn/mybucket/some/prefix",
            "s3://mybucket/some/prefix?endpoint=https://s3.cn-north-1.amazonaws.com.cn&region=cn-north-1",
            "path",
        ),
        (
            "s3",
            "https://s3.amazonaws.com/mybucket",
            "s3://mybucket?endpoint=https://s3.amazonaws.com&region=us-east-1",
            "path",
        ),
        ("s3", "http://127.0.0.1:8333/pieces", "s3://pieces?endpoint=http://127.0.0.1:8333", "path"),
        ("s3", "https://s3.us-east-1.amazonaws.com/b-%02d", None, "path"),
        (
            "minio",
            "http://127.0.0.1:9000/pieces/pre",
            "minio://127.0.0.1:9000/pieces/pre?secure=false",
            "auto",
        ),
        ("minio", "https://play.min.io/pieces", "minio://play.min.io/pieces", "auto"),
        ("file", "/data/pieces", "file:///data/pieces", "auto"),
        ("file", "data/pieces", "data/pieces", "auto"),
        ("memory", "", "memory://piecestore", "auto"),
        ("S3", "s3://already/ours", "s3://already/ours", "auto"),
    ],
)
def test_go_bucket_urls(
    tmp_path: Path, storage: str, bucket_url: str, url: str | None, addressing: str
) -> None:
    shards = "Shards = 2\n" if "%" in bucket_url else ""
    cfg = write(
        tmp_path / "go.toml",
        f'[PieceStore]\n{shards}[PieceStore.Store]\nStorage = "{storage}"\nBucketURL = "{bucket_url}"\n',
    )
    s = load_settings(config_file=cfg)
    if url is None:  # %02d becomes {shard:02d}
        assert s.store.url.startswith("s3://b-{shard:02d}?")
        assert s.shard_urls()[1].startswith("s3://b-01?")
    else:
        assert s.store.url == url
    assert s.s3.addressing == addressing


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("0", 0.05), (0, 0.05), ('"500ms"', 0.5), ('"1m30s"', 90.0), ("1000000000", 1.0), ('"1.5s"', 1.5)],
)
def test_go_min_retry_delay(tmp_path: Path, value: str, seconds: float) -> None:
    cfg = write(tmp_path / "go.toml", f"[PieceStore.Store]\nStorage = 'memory'\nMinRetryDelay = {value}\n")
    s = load_settings(config_file=cfg)
    assert s.retry.min_retry_delay == pytest.approx(seconds)
    assert s.retry.max_retry_delay >= s.retry.min_retry_delay  # a long Go delay raises our cap


@pytest.mark.parametrize("value", ["1.5", "-1", '"1 second"', '"-1s"', "true"])
def test_go_min_retry_delay_rejects(tmp_path: Path, value: str) -> None:
    cfg = write(tmp_path / "go.toml", f"[PieceStore.Store]\nStorage = 'memory'\nMinRetryDelay = {value}\n")
    message = config_error(config_file=cfg)
    assert "[PieceStore.Store] MinRetryDelay" in message


def test_go_min_retry_delay_small_int_warns(tmp_path: Path) -> None:
    cfg = write(tmp_path / "go.toml", "[PieceStore.Store]\nStorage = 'memory'\nMinRetryDelay = 1\n")
    with pytest.warns(UserWarning, match="nanoseconds"):
        load_settings(config_file=cfg)
    cfg = write(tmp_path / "go.toml", "[PieceStore.Store]\nStorage = 'memory'\nMinRetryDelay = 5000000\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_settings(config_file=cfg).retry.min_retry_delay == pytest.approx(0.005)


@pytest.mark.parametrize(("given", "stored"), [("AKSK", "AKSK"), ("aksk", "AKSK"), ("Sa", "SA"), ("", "")])
def test_iam_type_case_insensitive(given: str, stored: str) -> None:
    assert load_settings(s3_iam_type=given).s3.iam_type == stored


def test_iam_type_unknown(tmp_path: Path) -> None:
    cfg = write(tmp_path / "go.toml", "[PieceStore.Store]\nStorage = 's3'\nIAMType = 'IRSA'\n")
    message = config_error(config_file=cfg)
    assert "s3.iam_type" in message and "'AKSK'" in message and "[PieceStore.Store] IAMType" in message


def test_go_unsupported_storage(tmp_path: Path) -> None:
    cfg = write(tmp_path / "go.toml", "[PieceStore.Store]\nStorage = 'oss'\nBucketURL = 'https://x/y'\n")
    message = config_error(config_file=cfg)
    assert "[PieceStore.Store] Storage" in message and "'oss'" in message


def test_go_sharding_needs_the_verb(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "go.toml",
        "[PieceStore]\nShards = 2\n[PieceStore.Store]\nStorage = 's3'\n"
        "BucketURL = 'https://s3.us-east-1.amazonaws.com/one'\n",
    )
    message = config_error(config_file=cfg)
    assert "{shard}" in message and "[PieceStore.Store] BucketURL" in message


def test_mixed_file_ours_and_go(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "mixed.toml",
        "[gc]\ngrace_seconds = 60\n[retry]\nmax_retries = 7\n"
        "[PieceStore.Store]\nStorage = 'file'\nBucketURL = '/srv/pieces'\nMaxRetries = 7\n",
    )
    s = load_settings(config_file=cfg)
    assert s.gc.grace_seconds == 60 and s.retry.max_retries == 7 and s.store.url == "file:///srv/pieces"
    cfg = write(tmp_path / "mixed.toml", "[retry]\nmax_retries = 3\n[PieceStore.Store]\nMaxRetries = 7\n")
    message = config_error(config_file=cfg)
    assert "retry.max_retries" in message and "MaxRetries" in message and "keep one" in message


# ---------------------------------------------------------------------------- secrets


def assert_no_secret(text: str) -> None:
    assert SECRET not in text
    assert SECRET[:12] not in text


def test_secrets_masked_in_repr_str_and_redacted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    cfg = write(tmp_path / "c.toml", f"[s3]\nsession_token = '{SECRET}-token'\n")
    s = load_settings(cfg)
    assert s.s3.secret_key is not None and s.s3.secret_key.get_secret_value() == SECRET
    for text in (repr(s), str(s), repr(s.s3), str(s.s3), s.model_dump_json()):
        assert_no_secret(text)
    shown = s.redacted()
    assert shown["s3"]["secret_key"] == "***" and shown["s3"]["session_token"] == "***"
    assert shown["s3"]["access_key"] == "***"
    assert_no_secret(repr(shown))


def test_redacted_is_json_and_masks_url_passwords() -> None:
    import json

    s = load_settings(store_url=f"minio://user:{SECRET}@127.0.0.1:9000/b")
    shown = s.redacted()
    assert shown["store"]["url"] == "minio://user:***@127.0.0.1:9000/b"
    assert shown["s3"]["secret_key"] is None
    assert_no_secret(json.dumps(shown))


def test_secrets_never_in_error_messages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A secret set in the environment while another value is bad.
    monkeypatch.setenv("AWS_SECRET_KEY", SECRET)
    monkeypatch.setenv("PIECESTORE_S3__CONCURRENCY", "0")
    assert_no_secret(config_error())
    monkeypatch.delenv("PIECESTORE_S3__CONCURRENCY")
    # A secret of the wrong type.
    assert_no_secret(config_error(s3_secret_key=[SECRET]))
    # A secret under a mistyped key in the file.
    cfg = write(tmp_path / "c.toml", f"[s3]\nsecret_kee = '{SECRET}'\n")
    message = config_error(config_file=cfg)
    assert "s3.secret_kee" in message
    assert_no_secret(message)
    # A secret given to a field that is not secret: the scrubber still removes it.
    monkeypatch.setenv("PIECESTORE_S3__SECRET_KEY", SECRET)
    assert_no_secret(config_error(s3_concurrency=SECRET))
    # A secret in a Go table next to a bad value.
    cfg = write(
        tmp_path / "go.toml",
        f"[PieceStore.Store]\nStorage = 's3'\nSecretKey = '{SECRET}'\nMaxRetries = -1\n",
    )
    message = config_error(config_file=cfg)
    assert "retry.max_retries" in message
    assert_no_secret(message)


def test_empty_secret_means_unset() -> None:
    s = load_settings(s3_access_key="", s3_secret_key=SecretStr(""))
    assert s.s3.access_key is None and s.s3.secret_key is None


# ---------------------------------------------------------------------------- the shipped example


def test_example_config_equals_defaults() -> None:
    example = load_settings(config_file=REPO / "config.toml")
    defaults = load_settings(config_file="")
    assert example == defaults
    assert example.model_dump() == defaults.model_dump()


def test_example_config_lists_every_setting() -> None:
    with (REPO / "config.toml").open("rb") as f:
        data = tomllib.load(f)
    assert set(data) == set(GROUP_MODELS)
    listed = {(group, name) for group, table in data.items() for name in table}
    assert listed == set(SETTING_PATHS)
