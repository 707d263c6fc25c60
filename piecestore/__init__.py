"""piecestore: keep pieces (blobs named by string keys) on any object store.

    import piecestore
    with piecestore.open("file:///tmp/pieces") as store:
        store.put("a/1", b"...")
        store.get("a/1")

Names are imported lazily, so ``import piecestore.backends`` stays light and a service that
only needs the drivers does not load the engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from piecestore.errors import (
    AlreadyExistsError,
    BackendUnavailableError,
    BucketNotFoundError,
    ConfigError,
    ConflictError,
    CorruptionError,
    InvalidKeyError,
    InvalidValueError,
    NotFoundError,
    PermissionDeniedError,
    PieceStoreError,
    PreconditionFailedError,
    ReadOnlyError,
    UnsupportedError,
)

if TYPE_CHECKING:
    from piecestore.api import open, open_with_settings
    from piecestore.store import PieceInfo, PieceStore

__version__ = "0.1.0"

_LAZY = {
    "open": "piecestore.api",
    "open_with_settings": "piecestore.api",
    "PieceInfo": "piecestore.store",
    "PieceStore": "piecestore.store",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'piecestore' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "AlreadyExistsError",
    "BackendUnavailableError",
    "BucketNotFoundError",
    "ConfigError",
    "ConflictError",
    "CorruptionError",
    "InvalidKeyError",
    "InvalidValueError",
    "NotFoundError",
    "PermissionDeniedError",
    "PieceInfo",
    "PieceStore",
    "PieceStoreError",
    "PreconditionFailedError",
    "ReadOnlyError",
    "UnsupportedError",
    "open",
    "open_with_settings",
]
