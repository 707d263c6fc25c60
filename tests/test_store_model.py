"""Model-based test: the store against a dict, through random put/get/delete/flush/reopen."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

import piecestore
from piecestore import NotFoundError, PieceStore

KEYS = st.sampled_from([f"k/{i}" for i in range(12)] + ["a", "a/b", "ключ", "z" * 300])
VALUES = st.one_of(st.binary(max_size=64), st.binary(min_size=2000, max_size=5000))
SMALL_LIMIT = 4096  # values above it become their own object, exercising the large path too


class StoreModel(RuleBasedStateMachine):
    keys = Bundle("keys")

    def __init__(self, url_factory: Any) -> None:
        super().__init__()
        self.url_factory = url_factory

    @initialize()
    def start(self) -> None:
        self.url, self.cleanup = self.url_factory()
        self.model: dict[str, bytes] = {}
        self.buffered = False
        self.store = self._open()

    def _open(self, **kw: Any) -> PieceStore:
        s = piecestore.open(
            self.url, engine_small_piece_max_bytes=SMALL_LIMIT, engine_flush_linger_ms=0.5, **kw
        )
        assert isinstance(s, PieceStore)
        return s

    @rule(target=keys, key=KEYS, value=VALUES)
    def put(self, key: str, value: bytes) -> str:
        self.store.put(key, value)
        self.model[key] = value
        return key

    @rule(items=st.dictionaries(KEYS, VALUES, max_size=8))
    def put_many(self, items: dict[str, bytes]) -> None:
        self.store.put_many(items)
        self.model.update(items)

    @rule(key=keys)
    def delete(self, key: str) -> None:
        self.store.delete(key)
        self.model.pop(key, None)

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        if key in self.model:
            assert self.store.get(key) == self.model[key]
        else:
            with pytest.raises(NotFoundError):
                self.store.get(key)

    @rule(key=keys, offset=st.integers(0, 70), length=st.one_of(st.none(), st.integers(0, 3000)))
    def get_range(self, key: str, offset: int, length: int | None) -> None:
        if key in self.model:
            end = None if length is None else offset + length
            assert self.store.get(key, offset=offset, length=length) == self.model[key][offset:end]

    @rule(keys=st.lists(KEYS, max_size=6))
    def get_many(self, keys: list[str]) -> None:
        got = self.store.get_many(keys, missing="skip")
        assert got == {k: self.model[k] for k in keys if k in self.model}

    @rule()
    def flush(self) -> None:
        self.store.flush()

    @rule(grace_passed=st.booleans())
    def gc(self, grace_passed: bool) -> None:
        ahead = timedelta(days=1) if grace_passed else timedelta(0)
        self.store.gc(clock=lambda: datetime.now(UTC) + ahead)

    @rule(buffered=st.booleans())
    def reopen(self, buffered: bool) -> None:
        self.store.close()
        self.store = self._open(store_buffered_writes=buffered)

    @invariant()
    def listing_matches(self) -> None:
        if hasattr(self, "store"):
            listed = [(p.key, p.size) for p in self.store.list()]
            assert listed == sorted((k, len(v)) for k, v in self.model.items())

    def teardown(self) -> None:
        if hasattr(self, "store"):
            self.store.close()
            self.cleanup()


def memory_url() -> tuple[str, Any]:
    return f"memory://model-{uuid.uuid4().hex}", lambda: None


def file_url() -> tuple[str, Any]:
    path = tempfile.mkdtemp(prefix="piecestore-model-")
    return "file://" + path, lambda: shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("factory", [memory_url, file_url], ids=["memory", "file"])
def test_store_matches_dict_model(factory: Any) -> None:
    machine = type("Machine", (StoreModel,), {"__init__": lambda self: StoreModel.__init__(self, factory)})
    runner = settings(max_examples=25, stateful_step_count=30, deadline=None,
                      suppress_health_check=list(HealthCheck))(machine)  # fmt: skip
    runner.TestCase().runTest()
