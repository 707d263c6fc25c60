"""A zygote that forks short-lived writer children to be SIGKILLed, for the model test.

    python -m tests.reliability.crashchild     (then one JSON job per stdin line)

The zygote imports everything once and never starts a thread, so forking it is safe and
costs milliseconds. Each child opens the store, runs the job's operations in order, appends
the index of each operation to the job's ack file once it returned, and kills itself with
SIGKILL at the job's ``kill_at``-th backend write call (before or after it), if it gets there.
The zygote answers each job with one JSON line: the child's wait status.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import sys
import traceback
from datetime import UTC, datetime, timedelta
from typing import Any

import piecestore
import piecestore.backends.file
import piecestore.backends.s3
import piecestore.gc
import piecestore.store
from piecestore.lease import GCBusyError
from tests.reliability._support import kill_at_write


def run_job(job: dict[str, Any]) -> None:
    store = piecestore.open(job["url"], **job["overrides"])
    if job.get("kill_at"):
        kill_at_write(store, int(job["kill_at"]), after=bool(job.get("after")))
    ack = os.open(job["acks"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for i, op in enumerate(job["ops"]):
        kind = op[0]
        if kind == "put":
            store.put(op[1], bytes.fromhex(op[2]))
        elif kind == "put_many":
            store.put_many({k: bytes.fromhex(v) for k, v in op[1].items()})
        elif kind == "delete":
            store.delete(op[1])
        elif kind == "gc":
            ahead = datetime.now(UTC) + timedelta(days=1)
            with contextlib.suppress(GCBusyError):
                store.gc(clock=lambda ahead=ahead: ahead)
        os.write(ack, f"{i}\n".encode())
    store.close()


def serve() -> None:
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: bounded in time, its stacks dumped if it overstays
            code = 0
            trace = open(job["acks"] + ".err", "w")  # noqa: SIM115 - the child exits below
            faulthandler.dump_traceback_later(float(job.get("timeout", 30)), exit=True, file=trace)
            try:
                run_job(job)
            except BaseException:
                trace.write(traceback.format_exc())
                trace.flush()
                code = 3
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": status}), flush=True)


if __name__ == "__main__":
    serve()
