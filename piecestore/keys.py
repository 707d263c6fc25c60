"""Rules for piece keys and values, checked before anything is written."""

from __future__ import annotations

from typing import BinaryIO

from piecestore.errors import InvalidKeyError, InvalidValueError

MAX_KEY_BYTES = 1024


def check_key(key: object) -> str:
    """Keys are str of 1..1024 UTF-8 bytes without NUL; anything else is refused."""
    if not isinstance(key, str):
        raise InvalidKeyError(f"piece key must be str, got {type(key).__name__}; decode bytes keys first")
    if not key:
        raise InvalidKeyError("piece key is empty; keys are 1..1024 UTF-8 bytes")
    if "\x00" in key:
        raise InvalidKeyError(f"piece key {key[:60]!r} contains NUL; remove it")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise InvalidKeyError(f"piece key {key[:60]!r} is not valid UTF-8 (lone surrogate?)") from e
    if size > MAX_KEY_BYTES:
        raise InvalidKeyError(f"piece key is {size} UTF-8 bytes; at most {MAX_KEY_BYTES} are allowed")
    return key


def check_value(key: str, value: object) -> bytes | BinaryIO:
    """Values are bytes-like (or a binary file object, streamed); str and None are refused."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if hasattr(value, "read") and hasattr(value, "seek") and not isinstance(value, str):
        return value  # type: ignore[return-value]
    hint = "; encode it first, e.g. value.encode()" if isinstance(value, str) else ""
    raise InvalidValueError(
        f"value for piece {key[:60]!r} must be bytes-like, got {type(value).__name__}{hint}"
    )
