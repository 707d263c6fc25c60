"""The one exception hierarchy of piecestore.

Every provider error is mapped into it and chained (``raise ... from e``), so callers
catch ``PieceStoreError`` (or the builtin it also is: ``NotFoundError`` is a
``FileNotFoundError``, ``InvalidKeyError`` a ``ValueError``) and never a driver's own type.
"""

from __future__ import annotations


class PieceStoreError(Exception):
    """Base of every error piecestore raises."""


class NotFoundError(PieceStoreError, FileNotFoundError):
    """The piece, object, bucket or store does not exist."""


class BucketNotFoundError(NotFoundError):
    """The bucket a store lives in does not exist (so neither does the store)."""


class AlreadyExistsError(PieceStoreError, FileExistsError):
    """A create-only write found the object already there."""


class PreconditionFailedError(PieceStoreError):
    """A conditional write lost: the object's etag is no longer the one expected."""


class PermissionDeniedError(PieceStoreError, PermissionError):
    """The credentials are refused, expired, or the store is read-only."""


class ReadOnlyError(PermissionDeniedError):
    """A write was attempted on a store opened read-only; nothing was sent."""


class InvalidKeyError(PieceStoreError, ValueError):
    """A piece key or object name breaks the naming rules."""


class InvalidValueError(PieceStoreError, TypeError):
    """A piece value is not bytes-like."""


class ConfigError(PieceStoreError, ValueError):
    """A setting, URL or option is unknown or has a bad value."""


class UnsupportedError(PieceStoreError):
    """The backend lacks a capability the operation needs (e.g. conditional writes)."""


class BackendUnavailableError(PieceStoreError, ConnectionError):
    """The backend could not be reached after bounded retries with backoff."""


class CorruptionError(PieceStoreError):
    """Stored bytes fail their checksum or a structure is malformed; nothing wrong is returned."""


class LayoutMismatchError(ConfigError):
    """The shard layout recorded in the store differs from the one configured."""


class ConflictError(PieceStoreError):
    """A commit kept losing compare-and-swap races past its retry budget."""


__all__ = [
    "AlreadyExistsError",
    "BackendUnavailableError",
    "BucketNotFoundError",
    "ConfigError",
    "ConflictError",
    "CorruptionError",
    "InvalidKeyError",
    "InvalidValueError",
    "LayoutMismatchError",
    "NotFoundError",
    "PermissionDeniedError",
    "PieceStoreError",
    "PreconditionFailedError",
    "ReadOnlyError",
    "UnsupportedError",
]
