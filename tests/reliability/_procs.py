"""Starting, timing and killing worker processes (by the PIDs we started, never by name)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.reliability._support import REPO


class WorkerProc:
    """One worker process (``tests.reliability.worker`` unless ``module`` says another), its
    stderr kept in a file; with ``stdin`` the parent can send it lines."""

    def __init__(
        self,
        cfg: dict[str, Any],
        workdir: Path,
        name: str,
        *,
        module: str = "tests.reliability.worker",
        stdin: bool = False,
    ) -> None:
        self.cfg = cfg
        self.err_path = workdir / f"{name}.stderr"
        self.err = open(self.err_path, "wb")  # noqa: SIM115 - closed in finish()
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        env.pop("PIECESTORE_CONFIG", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, json.dumps(cfg)],
            cwd=REPO,
            stdin=subprocess.PIPE if stdin else None,
            stdout=subprocess.PIPE,
            stderr=self.err,
            env=env,
        )
        self.started = time.monotonic()

    def wait_ready(self, timeout: float = 60.0) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        buf = b""
        while b"READY" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise AssertionError(f"worker not ready after {timeout}s: {self.stderr()[-2000:]}")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    self.proc.wait(10)
                    raise AssertionError(
                        f"worker exited ({self.proc.returncode}) before ready: {self.stderr()[-3000:]}"
                    )
                buf += chunk

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stderr(self) -> str:
        self.err.flush()
        return self.err_path.read_text(errors="replace")

    def finish(self, timeout: float) -> int:
        """Wait for a clean exit; a worker still running after ``timeout`` is killed and fails."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"worker hung past {timeout}s: {self.stderr()[-3000:]}") from None
        finally:
            self.close()
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.err.close()


def trim_torn_tail(path: Path) -> None:
    """Drop a partial last line a killed writer may have left, so later appends stay parseable."""
    if not path.exists():
        return
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
