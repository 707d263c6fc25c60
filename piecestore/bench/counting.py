"""Count the requests a driver sends, by type: the bench's cost proxy.

Where a driver funnels every request through one call we count there, so retries, multipart
parts and list pages are each one request (s3: ``_s3(method)``; minio: its urllib3 pool).
Other drivers (memory, file) are counted at the driver primitives, one per primitive call
(one per span for grouped ranged reads, one per batch for batched deletes).
"""

from __future__ import annotations

import functools
import inspect
import math
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from piecestore.backends import Backend

# S3 API operation -> request type shown in the results.
S3_KINDS = {
    "put_object": "PUT",
    "upload_part": "PUT",
    "get_object": "GET",
    "head_object": "HEAD",
    "head_bucket": "HEAD",
    "list_objects_v2": "LIST",
    "delete_object": "DELETE",
    "delete_objects": "DELETE_BATCH",
    "create_multipart_upload": "MPU",
    "complete_multipart_upload": "MPU",
    "abort_multipart_upload": "MPU",
}


class RequestCounter:
    """Thread-safe counts of requests by type."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self.method = "none"  # how requests are counted: http, driver or none

    def add(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self._counts[kind] += n

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self._counts)


def http_kind(method: str, url: str) -> str:
    """Classify one S3 HTTP request by verb and query string."""
    query = parse_qs(urlsplit(url).query, keep_blank_values=True)
    method = method.upper()
    if method == "GET":
        if "list-type" in query or "prefix" in query:
            return "LIST"
        if "location" in query:
            return "META"
        return "GET"
    if method == "PUT":
        return "PUT"
    if method == "HEAD":
        return "HEAD"
    if method == "DELETE":
        return "MPU" if "uploadId" in query else "DELETE"
    if method == "POST":
        if "delete" in query:
            return "DELETE_BATCH"
        if "uploads" in query or "uploadId" in query:
            return "MPU"
    return method


def instrument(backend: Backend, counter: RequestCounter) -> RequestCounter:
    """Make ``backend`` report its requests to ``counter`` (patches this instance only)."""
    s3_call = getattr(backend, "_s3", None)
    if s3_call is not None and inspect.iscoroutinefunction(s3_call):
        _count_s3(backend, s3_call, counter)
        counter.method = "http"
        return counter
    http = getattr(backend, "_http", None)
    if http is not None and callable(getattr(http, "urlopen", None)):
        _count_urllib3(http, counter)
        counter.method = "http"
        return counter
    _count_primitives(backend, counter)
    counter.method = "driver"
    return counter


def _count_s3(backend: Backend, call: Callable[..., Any], counter: RequestCounter) -> None:
    @functools.wraps(call)
    async def counted(method: str, **kwargs: Any) -> Any:
        counter.add(S3_KINDS.get(method, method.upper()))
        return await call(method, **kwargs)

    setattr(backend, "_s3", counted)  # noqa: B010 - an instance attribute shadows the method


def _count_urllib3(http: Any, counter: RequestCounter) -> None:
    urlopen = http.urlopen

    @functools.wraps(urlopen)
    def counted(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        counter.add(http_kind(method, url))
        return urlopen(method, url, *args, **kwargs)

    http.urlopen = counted


def _count_primitives(backend: Backend, counter: RequestCounter) -> None:
    batch = max(1, backend.capabilities.max_delete_batch if backend.capabilities.batch_delete else 1)

    def wrap(name: str, kind: str, many: Callable[..., int] | None = None) -> None:
        original = getattr(backend, name)

        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            counter.add(kind, many(*args) if many is not None else 1)
            return original(*args, **kwargs)

        setattr(backend, name, counted)

    def overridden(name: str) -> bool:
        # Base-class fallbacks call other primitives, which are counted themselves.
        return getattr(type(backend), name) is not getattr(Backend, name)

    wrap("_put", "PUT")
    wrap("_get", "GET")
    wrap("_head", "HEAD")
    wrap("_list", "LIST")
    wrap("_delete", "DELETE")
    if overridden("_get_with_meta"):
        wrap("_get_with_meta", "GET")
    if overridden("_get_groups"):
        wrap("_get_groups", "GET", lambda _name, spans: len(spans))
    if overridden("_delete_many"):
        wrap("_delete_many", "DELETE_BATCH", lambda names: math.ceil(len(names) / batch))
