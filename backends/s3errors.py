"""S3 error codes and HTTP statuses -> piecestore errors or Retryable, for both S3 drivers.

The s3 (botocore) and minio drivers each pull (code, status) out of their SDK's exception and
ask :func:`map_error` what it means, so both give the same error for the same server answer.
Messages name the object and the store's display URL, never a secret.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from piecestore.backends.credentials import redact
from piecestore.backends.retry import Retryable
from piecestore.errors import (
    AlreadyExistsError,
    BucketNotFoundError,
    NotFoundError,
    PermissionDeniedError,
    PieceStoreError,
    PreconditionFailedError,
)


class Outcome(Enum):
    NOT_FOUND = "not_found"
    NO_BUCKET = "no_bucket"
    DENIED = "denied"
    PRECONDITION = "precondition"
    INVALID_RANGE = "invalid_range"
    RETRY = "retry"
    OTHER = "other"


_NOT_FOUND = {"NoSuchKey", "NotFound", "404", "NoSuchVersion"}
_DENIED = {
    "AccessDenied", "Forbidden", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
    "TokenRefreshRequired", "InvalidToken", "AccountProblem", "AllAccessDisabled", "InvalidSecurity",
    "RequestTimeTooSkewed", "NotSignedUp", "UnauthorizedAccess",
}  # fmt: skip
_RETRY = {
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequests", "TooManyRequestsException", "RequestLimitExceeded",
    "BandwidthLimitExceeded", "RequestTimeout", "RequestTimeoutException", "InternalError",
    "ServiceUnavailable", "ConditionalRequestConflict", "PriorRequestNotComplete", "OperationAborted",
    "XAmzContentSHA256Mismatch",
}  # fmt: skip
_HINTS = {
    "ExpiredToken": "the session token has expired; refresh it (or drop session_token for long-lived keys)",
    "TokenRefreshRequired": "the session token must be refreshed",
    "InvalidToken": "the session token is malformed or revoked; refresh it",
    "InvalidAccessKeyId": "the server does not know this access key id; check access_key",
    "SignatureDoesNotMatch": "the secret key does not match the access key; check secret_key",
    "RequestTimeTooSkewed": "this machine's clock is too far from the server's; sync the clock",
}


def classify(code: str | None, status: int | None) -> Outcome:
    """Decide what a server answer means; code wins over status when both are known."""
    if code == "NoSuchBucket":
        return Outcome.NO_BUCKET
    if code in _NOT_FOUND:
        return Outcome.NOT_FOUND
    if code in _DENIED:
        return Outcome.DENIED
    if code in ("PreconditionFailed", "412"):
        return Outcome.PRECONDITION
    if code in ("InvalidRange", "416"):
        return Outcome.INVALID_RANGE
    if code in _RETRY:
        return Outcome.RETRY
    if status is not None:
        if status == 404:
            return Outcome.NOT_FOUND
        if status == 403:
            return Outcome.DENIED
        if status == 412:
            return Outcome.PRECONDITION
        if status == 416:
            return Outcome.INVALID_RANGE
        if status == 429 or status >= 500:
            return Outcome.RETRY
    return Outcome.OTHER


@dataclass(frozen=True, slots=True)
class ErrorContext:
    """What was being done, for the message: the operation, the object, the store."""

    op: str
    name: str | None
    display_url: str
    bucket: str
    credential_source: str = ""
    create: bool = False
    expected_etag: str | None = None


def map_error(
    code: str | None, status: int | None, message: str | None, ctx: ErrorContext, cause: BaseException
) -> PieceStoreError | Retryable:
    """The exception to raise (``from`` the SDK's) for a server error answer."""
    outcome = classify(code, status)
    what = f"{ctx.name!r}" if ctx.name else "the store"
    label = f"{code or 'HTTP ' + str(status)}"
    if outcome is Outcome.RETRY:
        return Retryable(f"{ctx.op} {what}: server answered {label} (HTTP {status})", cause)
    if outcome is Outcome.NO_BUCKET:
        return BucketNotFoundError(
            f"bucket {ctx.bucket!r} does not exist (store {ctx.display_url}); create the bucket first"
        )
    if outcome is Outcome.NOT_FOUND:
        return NotFoundError(f"{what} not found in {ctx.display_url}")
    if outcome is Outcome.DENIED:
        hint = _HINTS.get(
            code or "", "check the access key and secret, or refresh the session token if it expired"
        )
        source = f" (credentials from {ctx.credential_source})" if ctx.credential_source else ""
        return PermissionDeniedError(
            f"{ctx.op} {what} on {ctx.display_url} was refused ({label}){source}: {hint}"
        )
    if outcome is Outcome.PRECONDITION:
        if ctx.create:
            return AlreadyExistsError(f"{what} already exists in {ctx.display_url}")
        return PreconditionFailedError(
            f"{what} in {ctx.display_url} changed or is gone "
            f"(expected etag {ctx.expected_etag!r}); re-read and retry"
        )
    detail = f": {redact(message)}" if message else ""
    return PieceStoreError(
        f"{ctx.op} {what} on {ctx.display_url} failed with {label} (HTTP {status}){detail}"
    )
