"""Rules for piece keys and values, checked before anything is written."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any, BinaryIO, Protocol

from piecestore.backends.base import read_exact as base_read_exact
from piecestore.errors import InvalidKeyError, InvalidValueError

MAX_KEY_BYTES = 1024


def check_key(key: object) -> str:
    """Keys are str of 1..1024 UTF-8 bytes without NUL; anything else is refused."""
    if type(key) is str and key.isascii() and 0 < len(key) <= MAX_KEY_BYTES and "\x00" not in key:
        return key  # the common case, without encoding it
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
        _check_stream(key, value)
        return value  # type: ignore[return-value]
    hint = "; encode it first, e.g. value.encode()" if isinstance(value, str) else ""
    raise InvalidValueError(
        f"value for piece {key[:60]!r} must be bytes-like, got {type(value).__name__}{hint}"
    )


def check_keys(keys: object) -> list[str]:
    """An iterable of keys; a single str (or bytes) is refused, not taken as its characters."""
    if isinstance(keys, (str, bytes, bytearray)):
        raise InvalidKeyError(
            f"expected an iterable of keys, got a single {type(keys).__name__} {keys[:60]!r}; "
            "wrap it in a list"
        )
    return [check_key(k) for k in keys]  # type: ignore[attr-defined]


def check_items(items: object) -> list[tuple[str, bytes | BinaryIO]]:
    """put_many's argument: a mapping or (key, value) pairs, every key and value checked.

    A (str, bytes) pair that passes is kept as it is: a big batch allocates no new objects.
    """
    if isinstance(items, (str, bytes, bytearray)):
        raise InvalidValueError(
            f"put_many takes a mapping or (key, value) pairs, got a single {type(items).__name__}"
        )
    pairs: list[Any] = list(items.items() if isinstance(items, Mapping) else items)  # type: ignore[call-overload]
    for pos, pair in enumerate(pairs):
        if type(pair) is not tuple or len(pair) != 2:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise InvalidValueError(
                    f"put_many takes (key, value) pairs, got {type(pair).__name__} {pair!r:.60}"
                )
            pair = pairs[pos] = tuple(pair)
        key, value = pair
        if not (
            type(key) is str and key.isascii() and 0 < len(key) <= MAX_KEY_BYTES and "\x00" not in key
        ):
            key = check_key(key)
            pairs[pos] = pair = (key, value)
        if type(value) is not bytes:
            pairs[pos] = (key, check_value(key, value))
    return pairs


def _check_stream(key: str, stream: object) -> None:
    """Refuse, before anything is written, a file object that cannot give bytes."""
    if isinstance(stream, io.TextIOBase):
        raise InvalidValueError(
            f"the file object given for piece {key[:60]!r} is in text mode; open it in binary mode ('rb')"
        )
    readable = getattr(stream, "readable", None)
    if readable is None:
        return
    try:
        ok = readable()
    except ValueError as e:  # closed
        raise InvalidValueError(f"the file object given for piece {key[:60]!r} is closed ({e})") from e
    if not ok:
        raise InvalidValueError(
            f"the file object given for piece {key[:60]!r} is not readable (opened for writing?); "
            "open it with 'rb'"
        )


class Readable(Protocol):
    def read(self, n: int = -1, /) -> Any: ...


def read_some(key: str, stream: Readable, n: int) -> bytes:
    """One read of at most ``n`` bytes (all, if ``n`` < 0); b"" only at the end of the stream.

    A non-blocking stream with nothing to give (``None``) and a stream that cannot be read
    are refused with InvalidValueError, never taken for the end of the value.
    """
    try:
        chunk = stream.read(n)
    except (io.UnsupportedOperation, ValueError) as e:  # not readable, or closed meanwhile
        raise InvalidValueError(f"the file object given for piece {key[:60]!r} cannot be read ({e})") from e
    if chunk is None:
        raise InvalidValueError(
            f"the file object given for piece {key[:60]!r} is non-blocking and had no data ready; "
            "pass a blocking stream (or the bytes)"
        )
    return check_read(key, chunk)


def read_exact(key: str, stream: Readable, n: int) -> bytes:
    """``n`` bytes, or fewer only at the end of the stream: pipes and sockets return short reads."""
    return base_read_exact(lambda size: read_some(key, stream, size), n)


def check_read(key: str, chunk: object) -> bytes:
    """What a file object given as a value returned: bytes, or a clear error (text mode?)."""
    if isinstance(chunk, bytes):
        return chunk
    if isinstance(chunk, (bytearray, memoryview)):
        return bytes(chunk)
    raise InvalidValueError(
        f"the file object given for piece {key[:60]!r} returned {type(chunk).__name__}, not bytes; "
        "open it in binary mode ('rb')"
    )
